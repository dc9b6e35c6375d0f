use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jobplane::worker::JobContext;
use jobplane::{JobSpec, JobState};
use jobplane_proto::pb;
use jobplane_tests::{guard, RawWorker, ServerProcess, TestDir, TestServer};
use tokio::sync::Mutex;

use crate::spawn_worker;

#[tokio::test]
async fn unacked_assignment_requeues_without_using_retries_and_fences_the_zombie() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut raw = RawWorker::connect(&server.addr, "raw-1", &["fence"], 1).await;
    let job = client
        .submit(JobSpec::new("fence").retries(0))
        .await
        .unwrap()
        .job;
    let first = raw.assignments().await;
    assert_eq!(first[0].job_id, job.id);
    assert_eq!(first[0].attempt, 1);
    // No ack: after the ack timeout the job goes back to the queue and comes again, attempt 2.
    let second = raw.assignments().await;
    assert_eq!(second[0].job_id, job.id);
    assert_eq!(second[0].attempt, 2);
    let j = client.get(&job.id).await.unwrap();
    assert_eq!(
        j.retries_used, 0,
        "an unacknowledged dispatch uses no retry"
    );

    // The first attempt's late result is rejected.
    raw.succeed(&job.id, 1, b"zombie");
    loop {
        match raw.next().await {
            pb::connect_response::Msg::Rejected(r) => {
                assert_eq!(r.attempt, 1);
                assert_eq!(r.reason, "STALE_ATTEMPT");
                break;
            }
            pb::connect_response::Msg::Cancel(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    raw.ack(&job.id, 2);
    raw.succeed(&job.id, 2, b"real");
    let w = guard("done", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.result.as_deref(), Some(&b"real"[..]));
    assert_eq!(w.job.attempt, 2);
}

#[tokio::test]
async fn lease_expiry_requeues_and_the_zombie_cannot_complete() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut zombie = RawWorker::connect(&server.addr, "zombie", &["lease"], 1).await;
    let job = client
        .submit(JobSpec::new("lease").retries(3))
        .await
        .unwrap()
        .job;
    let a = zombie.assignments().await;
    zombie.ack(&job.id, a[0].attempt);
    // The zombie now falls silent: no heartbeats. Its lease runs out and the job is retried.
    let w = guard(
        "requeued",
        client.wait(
            &job.id,
            jobplane::WaitOptions::new()
                .until([JobState::Queued])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    assert!(w.reached);
    assert_eq!(w.job.error.as_ref().unwrap().reason, "WORKER_LOST");
    assert_eq!(w.job.retries_used, 1);

    let worker = spawn_worker(&server.addr, "lease", 1, |_ctx: JobContext| async {
        Ok(b"fresh".to_vec())
    });
    let done = guard("done", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.job.state, JobState::Succeeded);
    // The zombie comes back to life and reports: nothing changes.
    zombie.succeed(&job.id, a[0].attempt, b"zombie");
    zombie.heartbeat();
    let after = client.get(&job.id).await.unwrap();
    assert_eq!(after.result.as_deref(), Some(&b"fresh"[..]));
    worker.stop().await.unwrap();
}

/// A cancel asked for before a reconnect is pushed again on the new stream, with what is left of
/// its grace period (not a fresh default grace): the forced end stays where the cancel put it.
#[tokio::test]
async fn a_reconnected_worker_gets_the_pending_cancel_with_the_grace_left() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut raw = RawWorker::connect(&server.addr, "cancel-reconnect", &["cr"], 1).await;
    let job = client.submit(JobSpec::new("cr")).await.unwrap().job;
    let a = raw.assignments().await;
    raw.ack(&job.id, a[0].attempt);
    guard(
        "running",
        client.wait(
            &job.id,
            jobplane::WaitOptions::new()
                .until([JobState::Running])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    let grace = Duration::from_secs(300);
    client.cancel(&job.id, Some(grace)).await.unwrap();
    let first = loop {
        if let pb::connect_response::Msg::Cancel(c) = raw.next().await {
            break c;
        }
    };
    assert_eq!(first.job_id, job.id);
    drop(raw);
    let mut raw = RawWorker::connect_with(
        &server.addr,
        "cancel-reconnect",
        &["cr"],
        1,
        vec![pb::AttemptRef {
            job_id: job.id.clone(),
            attempt: a[0].attempt,
        }],
    )
    .await;
    assert_eq!(raw.welcome.kept.len(), 1, "the attempt is kept");
    let again = loop {
        if let pb::connect_response::Msg::Cancel(c) = raw.next().await {
            break c;
        }
    };
    assert_eq!(
        (again.job_id.as_str(), again.attempt),
        (job.id.as_str(), a[0].attempt)
    );
    let left = again.grace.expect("grace");
    let left = Duration::new(left.seconds as u64, left.nanos as u32);
    // Well above the default grace (10 s), and not more than what the cancel gave.
    assert!(
        left > grace - Duration::from_secs(60) && left <= grace,
        "grace left {left:?} of {grace:?}"
    );
    raw.report(
        &job.id,
        a[0].attempt,
        pb::worker_report::Kind::Outcome(pb::AttemptOutcome {
            kind: Some(pb::attempt_outcome::Kind::Cancelled(pb::Cancelled {})),
        }),
    );
    let w = guard("cancelled", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Cancelled);
}

#[tokio::test]
async fn reconnect_within_the_lease_keeps_the_attempt() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut raw = RawWorker::connect(&server.addr, "flaky", &["keep"], 1).await;
    let job = client.submit(JobSpec::new("keep")).await.unwrap().job;
    let a = raw.assignments().await;
    raw.ack(&job.id, a[0].attempt);
    guard(
        "running",
        client.wait(
            &job.id,
            jobplane::WaitOptions::new()
                .until([JobState::Running])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    drop(raw);
    let raw = RawWorker::connect_with(
        &server.addr,
        "flaky",
        &["keep"],
        1,
        vec![pb::AttemptRef {
            job_id: job.id.clone(),
            attempt: a[0].attempt,
        }],
    )
    .await;
    assert_eq!(raw.welcome.kept.len(), 1, "the attempt is kept");
    raw.succeed(&job.id, a[0].attempt, b"kept");
    let w = guard("done", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.attempt, 1);
    assert_eq!(w.job.retries_used, 0);
}

#[tokio::test]
async fn kill_9_during_submits_loses_no_acknowledged_job() {
    let dir = TestDir::new().await;
    let server = ServerProcess::start_in(&dir).await;
    let client = jobplane::Client::connect(server.addr.clone())
        .await
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let c = client.clone();
        let acked = acked.clone();
        let count_tx = count_tx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let spec = JobSpec::new("durable").payload(format!("{t}-{i}"));
                match c.submit(spec).await {
                    Ok(s) => {
                        let mut a = acked.lock().await;
                        a.push(s.job.id);
                        count_tx.send_replace(a.len());
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once a good number of submits were acknowledged, while they keep coming.
    guard("acknowledged submits", count_rx.wait_for(|n| *n >= 300))
        .await
        .unwrap();
    server.kill9().await;
    for t in tasks {
        guard("submitters stop", t).await.unwrap();
    }
    let acked: HashSet<String> = acked.lock().await.iter().cloned().collect();
    assert!(acked.len() >= 300);

    // Restart on the same database: every acknowledged job is there.
    let server = ServerProcess::start_in(&dir).await;
    let client = jobplane::Client::connect(server.addr.clone())
        .await
        .unwrap();
    for id in &acked {
        let j = client
            .get(id)
            .await
            .unwrap_or_else(|e| panic!("acknowledged job {id} lost: {e}"));
        assert_eq!(j.state, JobState::Queued);
    }
    server.kill9().await;
}

#[tokio::test]
async fn sigterm_stops_gracefully_and_a_restart_resumes() {
    let dir = TestDir::new().await;
    let server = ServerProcess::start_in(&dir).await;
    let client = jobplane::Client::connect(server.addr.clone())
        .await
        .unwrap();
    let jobs = client
        .submit_batch((0..50).map(|_| JobSpec::new("after-restart")).collect())
        .await
        .unwrap();
    // A worker connected while the service stops: its stream ends, it does not hang shutdown.
    let early = spawn_worker(&server.addr, "other", 1, |_ctx: JobContext| async {
        Ok(vec![])
    });
    assert!(server.terminate().await, "exit status 0 after SIGTERM");
    early.shutdown();

    let server = ServerProcess::start_in(&dir).await;
    let client = jobplane::Client::connect(server.addr.clone())
        .await
        .unwrap();
    let worker = spawn_worker(&server.addr, "after-restart", 8, |_ctx: JobContext| async {
        Ok(vec![])
    });
    let ids: Vec<String> = jobs.iter().map(|s| s.job.id.clone()).collect();
    let r = guard(
        "all jobs after the restart",
        client.wait_many(ids, jobplane::WaitMode::All, Duration::from_secs(25)),
    )
    .await
    .unwrap();
    assert!(r.reached);
    worker.stop().await.unwrap();
    server.kill9().await;
}

#[tokio::test]
async fn drain_stops_new_assignments_and_lets_work_finish() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let worker = spawn_worker(&server.addr, "drainq", 2, move |_ctx: JobContext| {
        let r = r.clone();
        async move {
            r.notified().await;
            Ok(b"finished".to_vec())
        }
    });
    let first = client.submit(JobSpec::new("drainq")).await.unwrap().job;
    guard(
        "running",
        client.wait(
            &first.id,
            jobplane::WaitOptions::new()
                .until([JobState::Running])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    let workers = client.list_workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    let info = client.drain_worker(&workers[0].id).await.unwrap();
    assert!(info.draining);
    let second = client.submit(JobSpec::new("drainq")).await.unwrap().job;
    let w = client
        .wait(&second.id, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(
        w.job.state,
        JobState::Queued,
        "a draining worker gets nothing new"
    );
    release.notify_one();
    let done = guard(
        "in-flight finishes",
        client.wait(&first.id, Duration::from_secs(20)),
    )
    .await
    .unwrap();
    assert_eq!(done.job.state, JobState::Succeeded);
    guard("drained worker exits", worker.join()).await.unwrap();
}

#[tokio::test]
async fn a_cancel_survives_an_ack_timeout() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut raw = RawWorker::connect(&server.addr, "slow-acker", &["ackless"], 1).await;
    let job = client.submit(JobSpec::new("ackless")).await.unwrap().job;
    raw.assignments().await;
    // Leased, never acknowledged; the cancel's grace outlasts the ack timeout.
    let c = client
        .cancel(&job.id, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(c.outcome, jobplane::CancelOutcome::Requested);
    let w = guard("cancelled", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(
        w.job.state,
        JobState::Cancelled,
        "the ack timeout must not requeue a cancelled job"
    );
}

#[tokio::test]
async fn a_restart_rearms_the_run_timeout_of_a_kept_attempt() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut raw = RawWorker::connect(&server.addr, "keeper", &["rearm"], 1).await;
    let job = client
        .submit(
            JobSpec::new("rearm")
                .run_timeout(Duration::from_millis(300))
                .retries(0),
        )
        .await
        .unwrap()
        .job;
    let a = raw.assignments().await;
    raw.ack(&job.id, a[0].attempt);
    guard(
        "running",
        client.wait(
            &job.id,
            jobplane::WaitOptions::new()
                .until([JobState::Running])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    drop(raw);
    let server = server.restart().await;
    let client = server.client().await;
    let raw = RawWorker::connect_with(
        &server.addr,
        "keeper",
        &["rearm"],
        1,
        vec![pb::AttemptRef {
            job_id: job.id.clone(),
            attempt: a[0].attempt,
        }],
    )
    .await;
    assert_eq!(raw.welcome.kept.len(), 1);
    // The worker keeps it but never finishes: the run timeout, re-armed at start, ends it.
    let w = guard("timed out", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::TimedOut);
    drop(raw);
}

#[tokio::test]
async fn a_lost_unacknowledged_attempt_uses_no_retry() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut raw = RawWorker::connect(&server.addr, "vanishing", &["unacked"], 1).await;
    let job = client
        .submit(JobSpec::new("unacked").retries(0))
        .await
        .unwrap()
        .job;
    raw.assignments().await;
    // The worker reconnects at once without claiming the attempt it never acknowledged.
    drop(raw);
    let raw = RawWorker::connect(&server.addr, "vanishing", &["other"], 1).await;
    let w = guard(
        "requeued",
        client.wait(
            &job.id,
            jobplane::WaitOptions::new()
                .until([JobState::Queued])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    assert!(w.reached);
    assert_eq!(w.job.retries_used, 0);
    assert_eq!(w.job.error.unwrap().reason, "WORKER_LOST");
    drop(raw);
}
