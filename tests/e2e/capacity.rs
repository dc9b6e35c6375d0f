//! Capacity pools end to end: max waits, escalation, limits held under load, upstream rate-limit
//! cooldowns, and refusing jobs no worker could ever run. Backend-neutral: only the public API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobplane::worker::{HandlerError, JobContext};
use jobplane::{
    Error, JobSpec, JobState, PoolConfig, PoolRequest, QueueConfig, WaitMode, WaitOptions,
};
use jobplane_tests::{guard, TestServer};
use tokio::sync::Notify;

use crate::spawn_worker;

const LONG: Duration = Duration::from_secs(25);

fn one_unit() -> PoolConfig {
    PoolConfig::new().max_units("requests", 1)
}

/// A handler that holds its unit until the test releases it.
fn holding(
    release: Arc<Notify>,
) -> impl Fn(JobContext) -> futures::future::BoxFuture<'static, Result<Vec<u8>, HandlerError>>
       + Send
       + Sync
       + 'static {
    move |ctx: JobContext| {
        let release = release.clone();
        Box::pin(async move {
            if ctx.payload() == b"hold" {
                release.notified().await;
            }
            Ok(ctx.job_id().as_bytes().to_vec())
        })
    }
}

async fn running(client: &jobplane::Client, id: &str) {
    let r = guard(
        "running",
        client.wait(
            id,
            WaitOptions::new().until([JobState::Running]).timeout(LONG),
        ),
    )
    .await
    .unwrap();
    assert!(r.reached, "{id} reached RUNNING");
}

#[tokio::test]
async fn fail_fast_expires_at_once_naming_the_pool_and_leaves_the_queue() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("gpu", one_unit()).await.unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "ff", 4, holding(release.clone()));
    let holder = client
        .submit(
            JobSpec::new("ff")
                .payload("hold")
                .pool(PoolRequest::new("gpu")),
        )
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    let ff = client
        .submit(JobSpec::new("ff").pool(PoolRequest::new("gpu").max_wait(Duration::ZERO)))
        .await
        .unwrap()
        .job;
    let w = guard("expired", client.wait(&ff.id, LONG)).await.unwrap();
    assert_eq!(w.job.state, JobState::Expired);
    let err = w.job.error.expect("error");
    assert_eq!(err.reason, "MAX_WAIT_EXCEEDED");
    assert!(err.message.contains("gpu"), "{}", err.message);
    let q = client.list_queues().await.unwrap();
    let ffq = q.iter().find(|q| q.name == "ff").unwrap();
    assert_eq!(ffq.depth, 0, "an expired job leaves the queue");
    release.notify_one();
    let w = guard("holder", client.wait(&holder.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(
        w.job.pool.as_deref(),
        Some("gpu"),
        "the job records its pool"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_waiting_job_runs_when_the_unit_frees_and_escalates_when_it_does_not() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("big", one_unit()).await.unwrap();
    client.configure_pool("small", one_unit()).await.unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "esc", 8, holding(release.clone()));
    let holder = client
        .submit(
            JobSpec::new("esc")
                .payload("hold")
                .pool(PoolRequest::new("big")),
        )
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    // Waits for `big` without bound: runs once the holder releases it.
    let patient = client
        .submit(JobSpec::new("esc").pool(PoolRequest::new("big")))
        .await
        .unwrap()
        .job;
    let got = client.get(&patient.id).await.unwrap();
    assert_eq!(got.state, JobState::Queued);
    assert_eq!(got.waiting_for.as_deref(), Some("capacity(pool=big)"));
    // Waits 200 ms for `big`, then takes `small`.
    let t = Instant::now();
    let escalating = client
        .submit(
            JobSpec::new("esc")
                .pool(PoolRequest::new("big").max_wait(Duration::from_millis(200)))
                .pool(PoolRequest::new("small")),
        )
        .await
        .unwrap()
        .job;
    let w = guard("escalated", client.wait(&escalating.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.pool.as_deref(), Some("small"));
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    release.notify_one();
    let w = guard("patient", client.wait(&patient.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.pool.as_deref(), Some("big"));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_100ms_max_wait_is_honoured_even_behind_a_full_queue_slot() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("free", one_unit()).await.unwrap();
    client
        .configure_queue(
            "narrow",
            QueueConfig {
                max_concurrency: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "narrow", 4, holding(release.clone()));
    let holder = client
        .submit(JobSpec::new("narrow").payload("hold"))
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    // The pool is free; the queue's only slot is not. The pool's max wait still bounds the wait.
    let t = Instant::now();
    let j = client
        .submit(
            JobSpec::new("narrow")
                .pool(PoolRequest::new("free").max_wait(Duration::from_millis(100))),
        )
        .await
        .unwrap()
        .job;
    let w = guard("expired", client.wait(&j.id, LONG)).await.unwrap();
    let waited = t.elapsed();
    assert_eq!(w.job.state, JobState::Expired);
    assert!(
        waited >= Duration::from_millis(100),
        "expired after {waited:?}"
    );
    assert!(waited < Duration::from_millis(100) + Duration::from_secs(5));
    release.notify_one();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn fifty_waiting_jobs_never_exceed_the_pool_and_all_run() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("three", PoolConfig::new().max_units("requests", 3))
        .await
        .unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let high = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (now, high) = (now.clone(), high.clone());
        workers.push(spawn_worker(
            &server.addr,
            "busy",
            8,
            move |_ctx: JobContext| {
                let (now, high) = (now.clone(), high.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    high.fetch_max(n, Ordering::SeqCst);
                    for _ in 0..50 {
                        tokio::task::yield_now().await;
                    }
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(vec![])
                }
            },
        ));
    }
    let ids: Vec<String> = client
        .submit_batch(
            (0..50)
                .map(|_| JobSpec::new("busy").pool(PoolRequest::new("three")))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.job.id)
        .collect();
    let r = guard("all ran", client.wait_many(ids, WaitMode::All, LONG))
        .await
        .unwrap();
    assert!(r.reached);
    assert!(r.results.iter().all(|w| w.job.state == JobState::Succeeded));
    assert!(
        high.load(Ordering::SeqCst) <= 3,
        "high-water mark {}",
        high.load(Ordering::SeqCst)
    );
    let pool = client.get_pool("three").await.unwrap();
    assert_eq!(pool.in_use.get("requests"), Some(&0));
    assert_eq!((pool.running, pool.waiting), (0, 0));
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn ten_workers_hit_a_rate_limit_at_once_and_every_job_succeeds_once() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("llm", PoolConfig::new().max_units("requests", 10))
        .await
        .unwrap();
    let successes: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let limited = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..10 {
        let (successes, limited) = (successes.clone(), limited.clone());
        workers.push(spawn_worker(
            &server.addr,
            "calls",
            1,
            move |ctx: JobContext| {
                let (successes, limited) = (successes.clone(), limited.clone());
                async move {
                    if ctx.attempt() == 1 {
                        limited.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::rate_limited(
                            Some("llm".into()),
                            Duration::from_millis(150),
                        ));
                    }
                    *successes
                        .lock()
                        .unwrap()
                        .entry(ctx.job_id().to_string())
                        .or_default() += 1;
                    Ok(vec![])
                }
            },
        ));
    }
    let t = Instant::now();
    let ids: Vec<String> = client
        .submit_batch(
            (0..10)
                .map(|_| {
                    JobSpec::new("calls")
                        .retries(0)
                        .pool(PoolRequest::new("llm"))
                })
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.job.id)
        .collect();
    let r = guard(
        "all succeeded",
        client.wait_many(ids.clone(), WaitMode::All, LONG),
    )
    .await
    .unwrap();
    assert!(r.reached);
    for w in &r.results {
        assert_eq!(w.job.state, JobState::Succeeded, "{:?}", w.job.error);
        assert_eq!(w.job.retries_used, 0, "a rate limit uses no retry");
        assert!(w.job.attempt >= 2);
    }
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "the cooldown held dispatch"
    );
    let successes = successes.lock().unwrap().clone();
    assert_eq!(successes.len(), 10);
    assert!(
        successes.values().all(|n| *n == 1),
        "no job succeeded twice"
    );
    assert!(limited.load(Ordering::SeqCst) >= 10);
    let pool = client.get_pool("llm").await.unwrap();
    assert!(pool.epoch >= 1, "a cooldown started");
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn submits_asking_for_what_no_pool_can_give_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("p", PoolConfig::new().max_units("requests", 2))
        .await
        .unwrap();
    let cases = [
        (
            JobSpec::new("q").pool(PoolRequest::new("nope")),
            "spec.pools[0].pool",
        ),
        (
            JobSpec::new("q").pool(PoolRequest::new("p").units("requests", 3)),
            "spec.pools[0].units[\"requests\"]",
        ),
    ];
    for (spec, field) in cases {
        match client.submit(spec).await {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f.as_deref(), Some(field)),
            other => panic!("expected INVALID_ARGUMENT on {field}, got {other:?}"),
        }
    }
    assert!(client
        .list(Default::default())
        .await
        .unwrap()
        .jobs
        .is_empty());
}

#[tokio::test]
async fn a_queue_can_refuse_jobs_no_connected_worker_could_ever_fit() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_queue(
            "strict",
            QueueConfig {
                reject_unplaceable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // No worker at all: a job that asks for labels is refused; a plain one is accepted.
    match client
        .submit(JobSpec::new("strict").selector("gpu", "a100"))
        .await
    {
        Err(Error::FailedPrecondition { reason, .. }) => {
            assert_eq!(reason.as_deref(), Some("NO_WORKER_FITS"))
        }
        other => panic!("expected NO_WORKER_FITS, got {other:?}"),
    }
    client.submit(JobSpec::new("strict")).await.unwrap();
    // Elsewhere such a job waits, saying what for.
    let waiting = client
        .submit(JobSpec::new("lenient").cpu(4.0))
        .await
        .unwrap()
        .job;
    assert_eq!(waiting.state, JobState::Queued);
}
