use std::time::Duration;

use futures::StreamExt;
use jobplane::worker::JobContext;
use jobplane::{EventKind, JobEvent, JobSpec, JobState};
use jobplane_tests::{guard, TestServer};

use crate::spawn_worker;

fn output_text(events: &[JobEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Output { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn full_output_comes_before_the_terminal_event() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "chatty", 4, |ctx: JobContext| async move {
        for i in 0..200 {
            ctx.stdout(format!("line {i}\n")).await;
        }
        // The last line, and return at once.
        ctx.stdout("the end\n").await;
        Ok(b"ok".to_vec())
    });
    for _ in 0..5 {
        let job = client.submit(JobSpec::new("chatty")).await.unwrap().job;
        // A watcher from the start, live.
        let events: Vec<JobEvent> = guard(
            "watch",
            client.watch(&job.id, 0).map(|e| e.unwrap()).collect(),
        )
        .await;
        assert!(events.last().unwrap().is_terminal());
        assert!(matches!(
            events.last().unwrap().kind,
            EventKind::State {
                to: JobState::Succeeded,
                ..
            }
        ));
        let text = output_text(&events);
        let expected: String =
            (0..200).map(|i| format!("line {i}\n")).collect::<String>() + "the end\n";
        assert_eq!(text, expected);
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "no gaps, no duplicates");
        }
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn watch_resumes_from_a_sequence_number() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "lines", 1, |ctx: JobContext| async move {
        for i in 0..20 {
            ctx.stdout(format!("{i}\n")).await;
        }
        Ok(vec![])
    });
    let job = client.submit(JobSpec::new("lines")).await.unwrap().job;
    let all: Vec<JobEvent> = guard(
        "watch all",
        client.watch(&job.id, 0).map(|e| e.unwrap()).collect(),
    )
    .await;
    let tail: Vec<JobEvent> = client.watch(&job.id, 7).map(|e| e.unwrap()).collect().await;
    assert_eq!(tail.as_slice(), &all[7..]);
    // Past the end: nothing, and the stream ends.
    let none: Vec<_> = client.watch(&job.id, all.len() as u64).collect().await;
    assert!(none.is_empty());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_watcher_sees_progress_live() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let worker = spawn_worker(&server.addr, "live", 1, move |ctx: JobContext| {
        let mut go = go_rx.clone();
        async move {
            ctx.progress(10.0, "started").await;
            let _ = go.wait_for(|g| *g).await;
            ctx.progress(90.0, "almost").await;
            Ok(vec![])
        }
    });
    let job = client.submit(JobSpec::new("live")).await.unwrap().job;
    let mut stream = client.watch(&job.id, 0);
    // Progress 10 arrives while the handler is blocked: the watch is live, not a replay.
    loop {
        let e = guard("progress", stream.next()).await.unwrap().unwrap();
        if let EventKind::Progress { percent, .. } = e.kind {
            assert_eq!(percent, 10.0);
            break;
        }
    }
    go_tx.send_replace(true);
    let rest: Vec<JobEvent> = guard("rest", stream.map(|e| e.unwrap()).collect()).await;
    assert!(rest
        .iter()
        .any(|e| matches!(e.kind, EventKind::Progress { percent, .. } if percent == 90.0)));
    assert!(rest.last().unwrap().is_terminal());
    let _ = Duration::ZERO;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn output_past_the_bound_is_truncated_with_a_marker() {
    let server = TestServer::start_with(jobplane_server::EngineConfig {
        max_output_bytes: 1000,
        ..jobplane_tests::fast_config()
    })
    .await;
    let client = server.client().await;
    let worker = spawn_worker(&server.addr, "flood", 1, |ctx: JobContext| async move {
        for _ in 0..50 {
            ctx.stdout(vec![b'x'; 100]).await;
        }
        Ok(vec![])
    });
    let job = client.submit(JobSpec::new("flood")).await.unwrap().job;
    let events: Vec<JobEvent> = guard(
        "watch",
        client.watch(&job.id, 0).map(|e| e.unwrap()).collect(),
    )
    .await;
    let outputs: Vec<(usize, bool)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Output {
                data, truncated, ..
            } => Some((data.len(), *truncated)),
            _ => None,
        })
        .collect();
    assert_eq!(outputs.iter().map(|(n, _)| n).sum::<usize>(), 1000);
    assert!(
        outputs.last().unwrap().1,
        "the last chunk carries the truncation marker"
    );
    assert_eq!(outputs.iter().filter(|(_, t)| *t).count(), 1);
    assert!(matches!(
        events.last().unwrap().kind,
        EventKind::State {
            to: JobState::Succeeded,
            ..
        }
    ));
    worker.stop().await.unwrap();
}

/// A raw gRPC watcher (no SDK resume logic) stays live after catching up: the next event it gets
/// is the next change, not an error.
#[tokio::test]
async fn a_raw_watch_stays_live_after_catching_up() {
    use jobplane_proto::pb;
    let server = TestServer::start().await;
    let client = server.client().await;
    let job = client.submit(JobSpec::new("idle")).await.unwrap().job;
    let channel = tonic::transport::Endpoint::from_shared(server.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = pb::job_service_client::JobServiceClient::new(channel);
    let mut stream = raw
        .watch_job(pb::WatchJobRequest {
            namespace: String::new(),
            id: job.id.clone(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = guard("first event", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.event.unwrap().seq, 1);
    client.cancel(&job.id, None).await.unwrap();
    let next = guard("the cancel event", stream.message())
        .await
        .expect("no error after catching up")
        .expect("the stream is still open");
    let e = next.event.unwrap();
    assert_eq!(e.seq, 2);
    match e.kind.unwrap() {
        pb::job_event::Kind::State(s) => assert_eq!(s.to, pb::JobState::Cancelled as i32),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        guard("end", stream.message()).await.unwrap().is_none(),
        "ends after the terminal event"
    );
}
