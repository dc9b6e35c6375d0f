use jobplane::{Error, JobSpec, ListFilter};
use jobplane_tests::TestServer;

fn field(e: &Error) -> Option<&str> {
    e.field()
}

#[tokio::test]
async fn bad_specs_name_the_field_and_change_nothing() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let e = client.submit(JobSpec::new("")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    assert_eq!(field(&e), Some("spec.queue"));

    let e = client.submit(JobSpec::new("no spaces")).await.unwrap_err();
    assert_eq!(field(&e), Some("spec.queue"));

    let e = client
        .submit(JobSpec::new("q").payload(vec![0u8; (1 << 20) + 1]))
        .await
        .unwrap_err();
    assert_eq!(field(&e), Some("spec.payload"));

    let e = client
        .submit(JobSpec::new("q").namespace("bad/ns"))
        .await
        .unwrap_err();
    assert_eq!(field(&e), Some("spec.namespace"));

    let e = client
        .submit(JobSpec::new("q").idempotency_key("k".repeat(300)))
        .await
        .unwrap_err();
    assert_eq!(field(&e), Some("spec.idempotency_key"));

    let far = std::time::SystemTime::now() + std::time::Duration::from_secs(400 * 24 * 3600);
    let e = client
        .submit(JobSpec::new("q").scheduled_at(far))
        .await
        .unwrap_err();
    assert_eq!(field(&e), Some("spec.scheduled_at"));

    // One bad spec in a batch: nothing of the batch is created.
    let batch = vec![
        JobSpec::new("q"),
        JobSpec::new("q"),
        JobSpec::new("bad queue"),
    ];
    let e = client.submit_batch(batch).await.unwrap_err();
    assert_eq!(field(&e), Some("specs[2].queue"));
    let page = client.list(ListFilter::new()).await.unwrap();
    assert!(page.jobs.is_empty(), "nothing was created");
}

#[tokio::test]
async fn unknown_and_malformed_ids() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let e = client.get("not-a-uuid").await.unwrap_err();
    assert_eq!(field(&e), Some("id"));
    let e = client
        .get("0190f1c2-0000-7000-8000-000000000000")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(e.reason(), Some("JOB_NOT_FOUND"));
    let e = client
        .cancel("0190f1c2-0000-7000-8000-000000000000", None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
}

#[tokio::test]
async fn another_namespace_sees_nothing() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let job = client.submit(JobSpec::new("q")).await.unwrap().job;
    let other = client.with_namespace("tenant-b");
    let e = other.get(&job.id).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
    let e = other.cancel(&job.id, None).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
    assert!(other.list(ListFilter::new()).await.unwrap().jobs.is_empty());
    assert_eq!(
        client.get(&job.id).await.unwrap().state,
        jobplane::JobState::Queued
    );
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_with_retry_after() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_queue(
            "small",
            jobplane::QueueConfig {
                max_depth: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client.submit(JobSpec::new("small")).await.unwrap();
    client.submit(JobSpec::new("small")).await.unwrap();
    let e = client.submit(JobSpec::new("small")).await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted { .. }), "{e:?}");
    assert_eq!(e.reason(), Some("QUEUE_FULL"));
    assert!(e.retry_after().is_some());
    let page = client.list(ListFilter::new().queue("small")).await.unwrap();
    assert_eq!(page.jobs.len(), 2);
}
