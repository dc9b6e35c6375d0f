use std::time::Duration;

use futures::StreamExt;
use jobplane::worker::{HandlerError, JobContext};
use jobplane::{EventKind, JobSpec, JobState, ListFilter, WaitMode, WaitOptions};
use jobplane_tests::{guard, TestServer};

use crate::spawn_worker;

#[tokio::test]
async fn submit_run_and_succeed() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "shout", 2, |ctx: JobContext| async move {
        ctx.progress(50.0, "half way").await;
        ctx.stdout("shouting\n").await;
        let text =
            std::str::from_utf8(ctx.payload()).map_err(|e| HandlerError::fatal(e.to_string()))?;
        Ok(text.to_uppercase().into_bytes())
    });
    let s = client
        .submit(JobSpec::new("shout").payload("hello").label("team", "red"))
        .await
        .unwrap();
    assert!(s.created);
    let w = guard("wait", client.wait(&s.job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(w.reached);
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.result.as_deref(), Some(&b"HELLO"[..]));
    assert_eq!(w.job.attempt, 1);
    assert_eq!(w.job.progress, 100.0);
    assert!(w.job.finished_at.is_some());

    let got = client.get(&s.job.id).await.unwrap();
    assert_eq!(got.state, JobState::Succeeded);
    let page = client
        .list(
            ListFilter::new()
                .queue("shout")
                .state(JobState::Succeeded)
                .label("team", "red"),
        )
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1);
    assert_eq!(page.jobs[0].id, s.job.id);

    // The whole life is in the event log, the terminal event last.
    let events: Vec<_> = client.watch(&s.job.id, 0).collect().await;
    let events: Vec<_> = events.into_iter().map(|e| e.unwrap()).collect();
    let states: Vec<JobState> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::State { to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        vec![
            JobState::Queued,
            JobState::Leased,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    assert!(events
        .iter()
        .any(|e| matches!(&e.kind, EventKind::Progress { percent, .. } if *percent == 50.0)));
    assert!(events.last().unwrap().is_terminal());
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn wait_returns_at_the_deadline_with_the_snapshot() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let s = client.submit(JobSpec::new("nobody-serves")).await.unwrap();
    let w = client
        .wait(&s.job.id, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(!w.reached);
    assert_eq!(w.job.state, JobState::Queued);
    assert_eq!(
        w.job.waiting_for.as_deref(),
        Some("worker(queue=nobody-serves)")
    );
}

#[tokio::test]
async fn wait_for_a_named_state_and_for_many() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "hold", 4, |ctx: JobContext| async move {
        if ctx.payload() == b"hold" {
            ctx.cancelled().await;
            return Err(HandlerError::cancelled());
        }
        Ok(b"done".to_vec())
    });
    let held = client
        .submit(JobSpec::new("hold").payload("hold"))
        .await
        .unwrap()
        .job;
    let quick = client
        .submit(JobSpec::new("hold").payload("go"))
        .await
        .unwrap()
        .job;
    let running = guard(
        "running",
        client.wait(
            &held.id,
            WaitOptions::new()
                .until([JobState::Running])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    assert!(running.reached);
    assert_eq!(running.job.state, JobState::Running);

    let any = client
        .wait_many(
            [held.id.clone(), quick.id.clone()],
            WaitMode::Any,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert!(any.reached);
    assert_eq!(any.results[1].job.state, JobState::Succeeded);
    assert!(!any.results[0].reached);

    let all = client
        .wait_many(
            [held.id.clone(), quick.id.clone()],
            WaitMode::All,
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    assert!(!all.reached, "the held job is still running");

    client.cancel(&held.id, None).await.unwrap();
    let all = client
        .wait_many(
            [held.id.clone(), quick.id.clone()],
            WaitMode::All,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert!(all.reached);
    assert_eq!(all.results[0].job.state, JobState::Cancelled);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn many_concurrent_waiters_are_all_woken() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let s = client.submit(JobSpec::new("later")).await.unwrap().job;
    let mut waiters = Vec::new();
    for _ in 0..2000 {
        let c = client.clone();
        let id = s.id.clone();
        waiters.push(tokio::spawn(async move {
            c.wait(&id, Duration::from_secs(25)).await
        }));
    }
    let worker = spawn_worker(&server.addr, "later", 1, |_ctx: JobContext| async {
        Ok(b"ok".to_vec())
    });
    for w in waiters {
        let r = guard("waiter", w).await.unwrap().unwrap();
        assert!(r.reached);
        assert_eq!(r.job.state, JobState::Succeeded);
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn scheduled_jobs_wait_for_their_time() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "sched", 1, |_ctx: JobContext| async {
        Ok(vec![])
    });
    let at = std::time::SystemTime::now() + Duration::from_millis(300);
    let s = client
        .submit(JobSpec::new("sched").scheduled_at(at))
        .await
        .unwrap()
        .job;
    let first = client.get(&s.id).await.unwrap();
    assert_eq!(first.state, JobState::Queued);
    assert!(first
        .waiting_for
        .unwrap_or_default()
        .starts_with("scheduled(at="));
    let w = guard("scheduled job", client.wait(&s.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert!(
        w.job.started_at.unwrap() + Duration::from_millis(1) >= at,
        "not started before its time"
    );
    worker.stop().await.unwrap();
}

/// A thousand waiters cost one read each when they start, and nothing more: not while nothing
/// changes, and not when the job's completion wakes them all.
#[tokio::test]
async fn waiters_cost_no_queries_while_waiting() {
    let (server, store) = TestServer::start_counting().await;
    let client = server.client().await;
    let s = client.submit(JobSpec::new("counted")).await.unwrap().job;
    let before = store.reads();
    let mut waiters = Vec::new();
    for _ in 0..1000 {
        let c = client.clone();
        let id = s.id.clone();
        waiters.push(tokio::spawn(async move {
            c.wait(&id, Duration::from_secs(25)).await
        }));
    }
    // Every waiter has made its one read and is now waiting on the hub.
    guard("initial reads", store.wait_reads(before + 1000)).await;
    let worker = spawn_worker(&server.addr, "counted", 1, |_ctx: JobContext| async {
        Ok(b"ok".to_vec())
    });
    for w in waiters {
        let r = guard("waiter", w).await.unwrap().unwrap();
        assert_eq!(r.job.state, JobState::Succeeded);
    }
    assert_eq!(
        store.reads(),
        before + 1000,
        "waking 1,000 waiters read nothing from the database"
    );
    worker.stop().await.unwrap();
}

/// Several addresses (instances of one service): the client and the worker connect to one that
/// answers, whichever of them is tried first; an address nothing listens on is skipped.
#[tokio::test]
async fn several_addresses_use_one_that_answers() {
    let server = TestServer::start().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for addrs in [
        format!("{dead},{}", server.addr),
        format!("{},{dead}", server.addr),
    ] {
        let client = guard("connect", jobplane::Client::connect(addrs.clone()))
            .await
            .unwrap();
        let worker = spawn_worker(&addrs, "several", 1, |_ctx: JobContext| async move {
            Ok(b"done".to_vec())
        });
        for _ in 0..4 {
            let s = client.submit(JobSpec::new("several")).await.unwrap();
            let w = guard("wait", client.wait(&s.job.id, Duration::from_secs(20)))
                .await
                .unwrap();
            assert_eq!(w.job.state, JobState::Succeeded, "{addrs}");
        }
        worker.stop().await.unwrap();
    }
}
