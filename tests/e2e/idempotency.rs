use std::collections::HashSet;

use jobplane::{Error, JobSpec};
use jobplane_tests::TestServer;

#[tokio::test]
async fn same_key_same_spec_returns_the_original() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let spec = JobSpec::new("emails").payload("x").idempotency_key("k-1");
    let a = client.submit(spec.clone()).await.unwrap();
    let b = client.submit(spec).await.unwrap();
    assert!(a.created);
    assert!(!b.created);
    assert_eq!(a.job.id, b.job.id);
}

#[tokio::test]
async fn same_key_different_spec_is_already_exists() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .submit(JobSpec::new("emails").payload("x").idempotency_key("k-2"))
        .await
        .unwrap();
    let err = client
        .submit(JobSpec::new("emails").payload("y").idempotency_key("k-2"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(err.reason(), Some("IDEMPOTENCY_KEY_REUSED"));
}

#[tokio::test]
async fn concurrent_duplicates_create_one_job() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.submit(
                JobSpec::new("emails")
                    .payload("same")
                    .idempotency_key("k-3"),
            )
            .await
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let s = t.await.unwrap().unwrap();
        ids.insert(s.job.id);
        created += s.created as usize;
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(created, 1);
    let all = client
        .list(jobplane::ListFilter::new().queue("emails"))
        .await
        .unwrap();
    assert_eq!(all.jobs.len(), 1);
}

#[tokio::test]
async fn keys_survive_a_restart() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let spec = JobSpec::new("emails").payload("x").idempotency_key("k-4");
    let a = client.submit(spec.clone()).await.unwrap();
    let server = server.restart().await;
    let client = server.client().await;
    let b = client.submit(spec).await.unwrap();
    assert!(!b.created);
    assert_eq!(a.job.id, b.job.id);
}
