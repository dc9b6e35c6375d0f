use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jobplane::worker::{HandlerError, JobContext};
use jobplane::{CancelOutcome, JobSpec, JobState, WaitOptions};
use jobplane_tests::{guard, TestServer};

use crate::spawn_worker;

#[tokio::test]
async fn cancel_queued_then_again() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let s = client.submit(JobSpec::new("idle")).await.unwrap().job;
    let c = client.cancel(&s.id, None).await.unwrap();
    assert_eq!(c.outcome, CancelOutcome::Cancelled);
    assert_eq!(c.job.state, JobState::Cancelled);
    let again = client.cancel(&s.id, None).await.unwrap();
    assert_eq!(again.outcome, CancelOutcome::AlreadyTerminal);
    assert_eq!(again.job.state, JobState::Cancelled);
    assert_eq!(again.job.last_seq, c.job.last_seq, "nothing changed");
}

async fn running(client: &jobplane::Client, id: &str) {
    let r = guard(
        "running",
        client.wait(
            id,
            WaitOptions::new()
                .until([JobState::Running])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    assert!(r.reached, "job reached RUNNING");
}

#[tokio::test]
async fn cancel_running_tells_the_worker() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let saw = saw_cancel.clone();
    let worker = spawn_worker(&server.addr, "long", 1, move |ctx: JobContext| {
        let saw = saw.clone();
        async move {
            ctx.cancelled().await;
            saw.store(true, Ordering::SeqCst);
            Err(HandlerError::cancelled())
        }
    });
    let s = client.submit(JobSpec::new("long")).await.unwrap().job;
    running(&client, &s.id).await;
    let c = client
        .cancel(&s.id, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(c.outcome, CancelOutcome::Requested);
    assert!(c.job.cancel_requested);
    let w = guard("cancelled", client.wait(&s.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Cancelled);
    assert!(
        saw_cancel.load(Ordering::SeqCst),
        "the handler saw the cancellation"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_is_forced_after_the_grace_period() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    // A handler that ignores cancellation until the test releases it.
    let worker = spawn_worker(&server.addr, "stubborn", 1, move |_ctx: JobContext| {
        let r = r.clone();
        async move {
            r.notified().await;
            Ok(b"too late".to_vec())
        }
    });
    let s = client.submit(JobSpec::new("stubborn")).await.unwrap().job;
    running(&client, &s.id).await;
    client
        .cancel(&s.id, Some(Duration::from_millis(200)))
        .await
        .unwrap();
    let w = guard("forced cancel", client.wait(&s.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Cancelled);
    assert!(w.job.error.unwrap().message.contains("forced"));
    // The late success is fenced off.
    release.notify_one();
    worker.stop().await.unwrap();
    let after = client.get(&s.id).await.unwrap();
    assert_eq!(after.state, JobState::Cancelled);
    assert!(after.result.is_none());
}

#[tokio::test]
async fn cancel_racing_completion_ends_each_job_once() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "race", 8, |_ctx: JobContext| async {
        Ok(b"ok".to_vec())
    });
    let specs = (0..100).map(|_| JobSpec::new("race")).collect();
    let jobs = client.submit_batch(specs).await.unwrap();
    let mut cancels = Vec::new();
    for s in &jobs {
        let c = client.clone();
        let id = s.job.id.clone();
        cancels.push(tokio::spawn(async move {
            c.cancel(&id, Some(Duration::from_millis(500))).await
        }));
    }
    for c in cancels {
        c.await.unwrap().unwrap();
    }
    for s in &jobs {
        let w = guard("terminal", client.wait(&s.job.id, Duration::from_secs(20)))
            .await
            .unwrap();
        assert!(
            matches!(w.job.state, JobState::Succeeded | JobState::Cancelled),
            "{:?}",
            w.job.state
        );
        let events: Vec<_> = client.watch(&s.job.id, 0).collect().await;
        let terminal = events
            .iter()
            .filter(|e| e.as_ref().unwrap().is_terminal())
            .count();
        assert_eq!(terminal, 1, "exactly one terminal event");
        assert!(events.last().unwrap().as_ref().unwrap().is_terminal());
    }
    worker.stop().await.unwrap();
}
