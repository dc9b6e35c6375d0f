use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jobplane::worker::JobContext;
use jobplane::{JobSpec, JobState, QueueConfig, WaitMode};
use jobplane_tests::{guard, TestServer};

use crate::spawn_worker;

#[tokio::test]
async fn queue_slots_are_never_exceeded_across_workers() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_queue(
            "slotted",
            QueueConfig {
                max_concurrency: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let high = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (now, high) = (now.clone(), high.clone());
        workers.push(spawn_worker(
            &server.addr,
            "slotted",
            4,
            move |_ctx: JobContext| {
                let (now, high) = (now.clone(), high.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    high.fetch_max(n, Ordering::SeqCst);
                    // Yield a few times so that attempts overlap if the service allowed it.
                    for _ in 0..50 {
                        tokio::task::yield_now().await;
                    }
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(vec![])
                }
            },
        ));
    }
    let jobs = client
        .submit_batch((0..120).map(|_| JobSpec::new("slotted")).collect())
        .await
        .unwrap();
    let ids: Vec<String> = jobs.iter().map(|s| s.job.id.clone()).collect();
    let r = guard(
        "all done",
        client.wait_many(ids, WaitMode::All, Duration::from_secs(25)),
    )
    .await
    .unwrap();
    assert!(r.reached);
    assert!(r.results.iter().all(|w| w.job.state == JobState::Succeeded));
    let h = high.load(Ordering::SeqCst);
    assert!(h <= 3, "high-water mark {h} exceeds the queue's 3 slots");
    let queues = client.list_queues().await.unwrap();
    let q = queues.iter().find(|q| q.name == "slotted").unwrap();
    assert_eq!(q.running, 0);
    assert_eq!(q.depth, 0);
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_paused_queue_dispatches_nothing_until_resumed() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_queue(
            "paused",
            QueueConfig {
                paused: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let worker = spawn_worker(&server.addr, "paused", 1, |_ctx: JobContext| async {
        Ok(vec![])
    });
    let job = client.submit(JobSpec::new("paused")).await.unwrap().job;
    let w = client
        .wait(&job.id, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(!w.reached);
    assert_eq!(
        w.job.waiting_for.as_deref(),
        Some("queue_paused(queue=paused)")
    );
    client
        .configure_queue(
            "paused",
            QueueConfig {
                paused: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let w = guard("resumed", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn priority_then_fifo() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut specs = Vec::new();
    for i in 0..6 {
        specs.push(
            JobSpec::new("prio")
                .priority(if i % 2 == 0 { 0 } else { 10 })
                .payload(format!("{i}")),
        );
    }
    client.submit_batch(specs).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let worker = spawn_worker(&server.addr, "prio", 1, move |ctx: JobContext| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(String::from_utf8(ctx.payload().to_vec()).unwrap());
            Ok(vec![])
        }
    });
    let mut order = Vec::new();
    while order.len() < 6 {
        order.push(guard("next job", rx.recv()).await.unwrap());
    }
    assert_eq!(order, vec!["1", "3", "5", "0", "2", "4"]);
    worker.stop().await.unwrap();
}
