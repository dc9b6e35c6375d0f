use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jobplane::worker::{HandlerError, JobContext};
use jobplane::{EventKind, JobSpec, JobState, RetryPolicy};
use jobplane_tests::{guard, TestServer};

use crate::spawn_worker;

fn quick_retries(n: u32) -> RetryPolicy {
    RetryPolicy::new(n)
        .initial_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(100))
}

#[tokio::test]
async fn retryable_failures_are_retried_with_backoff_then_succeed() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let worker = spawn_worker(&server.addr, "flaky", 1, move |_ctx: JobContext| {
        let c = c.clone();
        async move {
            if c.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(HandlerError::retryable("not yet"))
            } else {
                Ok(b"third time".to_vec())
            }
        }
    });
    let job = client
        .submit(JobSpec::new("flaky").retry_policy(quick_retries(3)))
        .await
        .unwrap()
        .job;
    let w = guard("done", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.attempt, 3);
    assert_eq!(w.job.retries_used, 2);
    let events: Vec<_> = client.watch(&job.id, 0).map(|e| e.unwrap()).collect().await;
    let backoffs = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::State { to: JobState::Queued, waiting_for: Some(w), .. } if w.starts_with("retry_backoff")))
        .count();
    assert_eq!(backoffs, 2);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_retry_budget_is_capped() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "broken", 1, |_ctx: JobContext| async {
        Err::<Vec<u8>, _>(HandlerError::retryable("always"))
    });
    let job = client
        .submit(JobSpec::new("broken").retry_policy(quick_retries(2)))
        .await
        .unwrap()
        .job;
    let w = guard("failed", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Failed);
    assert_eq!(w.job.attempt, 3);
    assert_eq!(w.job.retries_used, 2);
    assert_eq!(w.job.error.unwrap().message, "always");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn fatal_failures_are_not_retried() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "fatal", 1, |_ctx: JobContext| async {
        Err::<Vec<u8>, _>(HandlerError::fatal("bad input"))
    });
    let job = client
        .submit(JobSpec::new("fatal").retries(5))
        .await
        .unwrap()
        .job;
    let w = guard("failed", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Failed);
    assert_eq!(w.job.attempt, 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn run_timeout_ends_in_timed_out() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "slow", 1, |ctx: JobContext| async move {
        ctx.cancelled().await;
        Err(HandlerError::cancelled())
    });
    let job = client
        .submit(
            JobSpec::new("slow")
                .run_timeout(Duration::from_millis(200))
                .retries(0),
        )
        .await
        .unwrap()
        .job;
    let w = guard("timed out", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::TimedOut);
    assert_eq!(w.job.error.unwrap().reason, "RUN_TIMEOUT");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn schedule_to_start_expiry() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let submitted = std::time::Instant::now();
    let job = client
        .submit(JobSpec::new("unserved").max_wait(Duration::from_millis(150)))
        .await
        .unwrap()
        .job;
    let w = guard("expired", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(submitted.elapsed() >= Duration::from_millis(150));
    assert_eq!(w.job.state, JobState::Expired);
    let e = w.job.error.unwrap();
    assert_eq!(e.reason, "MAX_WAIT_EXPIRED");
    assert!(
        e.message.contains("worker(queue=unserved)"),
        "{}",
        e.message
    );
}
