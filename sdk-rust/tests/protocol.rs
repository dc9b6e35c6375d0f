//! The SDK against a scripted, in-process fake of the service: checks the worker protocol
//! (hello, acks, ordering of reports, outcomes, cancel, reconnect, shutdown) and the client's
//! watch resumption and error mapping, message by message. The real service is exercised by the
//! end-to-end suite in `tests/`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jobplane::worker::{HandlerError, JobContext, Worker};
use jobplane::{Client, Error, EventKind};
use jobplane_proto::pb;
use jobplane_proto::pb::job_service_server::{JobService, JobServiceServer};
use jobplane_proto::pb::worker_service_server::{WorkerService, WorkerServiceServer};
use pb::connect_request::Msg as Req;
use pb::connect_response::Msg as Resp;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// Failure guard for every wait: generous, never reached when things work.
const GUARD: Duration = Duration::from_secs(20);

// ---- fake worker service ----------------------------------------------------------------------

struct Session {
    rx: Streaming<pb::ConnectRequest>,
    tx: mpsc::UnboundedSender<Result<pb::ConnectResponse, Status>>,
}

impl Session {
    /// The next message from the worker, `None` once it closed its side.
    async fn recv(&mut self) -> Option<Req> {
        let msg = tokio::time::timeout(GUARD, self.rx.message())
            .await
            .expect("worker message in time");
        match msg {
            Ok(Some(req)) => Some(req.msg.expect("message set")),
            Ok(None) | Err(_) => None,
        }
    }

    /// The next message that is not a heartbeat.
    async fn recv_non_heartbeat(&mut self) -> Option<Req> {
        loop {
            match self.recv().await? {
                Req::Heartbeat(_) => continue,
                other => return Some(other),
            }
        }
    }

    async fn hello(&mut self) -> pb::WorkerHello {
        match self.recv().await {
            Some(Req::Hello(h)) => h,
            other => panic!("expected hello, got {other:?}"),
        }
    }

    fn send(&self, msg: Resp) {
        self.tx
            .send(Ok(pb::ConnectResponse { msg: Some(msg) }))
            .expect("session open");
    }

    fn welcome(&self, kept: Vec<pb::AttemptRef>) {
        self.send(Resp::Welcome(pb::Welcome {
            worker_id: String::new(),
            lease_ttl: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 20_000_000,
            }),
            kept,
        }));
    }

    fn assign(&self, jobs: &[(&str, &str, &[u8])]) {
        let assignments = jobs
            .iter()
            .map(|(id, queue, payload)| pb::Assignment {
                job_id: (*id).into(),
                attempt: 1,
                queue: (*queue).into(),
                payload: payload.to_vec().into(),
                ..Default::default()
            })
            .collect();
        self.send(Resp::Assignments(pb::Assignments { assignments }));
    }

    fn accept(&self, id: &str) {
        self.send(Resp::Accepted(pb::OutcomeAccepted {
            job_id: id.into(),
            attempt: 1,
            state: pb::JobState::Succeeded as i32,
        }));
    }

    fn reject(&self, id: &str, reason: &str) {
        self.send(Resp::Rejected(pb::ReportRejected {
            job_id: id.into(),
            attempt: 1,
            reason: reason.into(),
        }));
    }

    /// Answers a drain as the service does.
    fn drained(&self) {
        // The worker may have closed the stream already.
        let _ = self.tx.send(Ok(pb::ConnectResponse {
            msg: Some(Resp::Drained(pb::Drained {})),
        }));
    }

    /// Collects reports until `done` says enough, skipping heartbeats and answering drains.
    async fn reports_until(
        &mut self,
        mut done: impl FnMut(&[pb::WorkerReport]) -> bool,
    ) -> Vec<pb::WorkerReport> {
        let mut all = Vec::new();
        while !done(&all) {
            match self.recv().await {
                Some(Req::Reports(batch)) => all.extend(batch.reports),
                Some(Req::Heartbeat(_)) => {}
                Some(Req::Drain(_)) => self.drained(),
                other => panic!("expected reports, got {other:?}"),
            }
        }
        all
    }

    /// Collects reports until the worker ends its side of the stream, answering drains.
    async fn finish(&mut self) -> Vec<pb::WorkerReport> {
        let mut all = Vec::new();
        while let Some(msg) = self.recv().await {
            match msg {
                Req::Reports(batch) => all.extend(batch.reports),
                Req::Heartbeat(_) => {}
                Req::Drain(_) => self.drained(),
                Req::Hello(h) => panic!("unexpected hello {h:?}"),
            }
        }
        all
    }

    /// Ends the session with a transport-like error.
    fn break_stream(self) {
        let _ = self.tx.send(Err(Status::unavailable("connection lost")));
    }
}

fn outcome_of<'a>(
    reports: &'a [pb::WorkerReport],
    job: &str,
) -> Option<&'a pb::attempt_outcome::Kind> {
    reports.iter().find_map(|r| match &r.kind {
        Some(pb::worker_report::Kind::Outcome(o)) if r.job_id == job => o.kind.as_ref(),
        _ => None,
    })
}

fn has_outcome(reports: &[pb::WorkerReport], job: &str) -> bool {
    outcome_of(reports, job).is_some()
}

/// The kinds of `job`'s reports, in order.
fn kinds(reports: &[pb::WorkerReport], job: &str) -> Vec<&'static str> {
    reports
        .iter()
        .filter(|r| r.job_id == job)
        .map(|r| match r.kind.as_ref().expect("kind set") {
            pb::worker_report::Kind::Ack(_) => "ack",
            pb::worker_report::Kind::Progress(_) => "progress",
            pb::worker_report::Kind::Output(_) => "output",
            pb::worker_report::Kind::Outcome(_) => "outcome",
            pb::worker_report::Kind::Usage(_) => "usage",
        })
        .collect()
}

fn attempt_ref(id: &str) -> pb::AttemptRef {
    pb::AttemptRef {
        job_id: id.into(),
        attempt: 1,
    }
}

struct FakeWorkers {
    sessions: mpsc::UnboundedSender<Session>,
}

#[tonic::async_trait]
impl WorkerService for FakeWorkers {
    type ConnectStream = UnboundedReceiverStream<Result<pb::ConnectResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.sessions.send(Session {
            rx: request.into_inner(),
            tx,
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

// ---- fake job service -------------------------------------------------------------------------

#[derive(Default)]
struct FakeJobs {
    watch_calls: Mutex<Vec<u64>>,
}

fn event(seq: u64, kind: pb::job_event::Kind) -> Result<pb::WatchJobResponse, Status> {
    Ok(pb::WatchJobResponse {
        event: Some(pb::JobEvent {
            seq,
            job_id: "j".into(),
            time: None,
            kind: Some(kind),
        }),
    })
}

fn output(text: &str) -> pb::job_event::Kind {
    pb::job_event::Kind::Output(pb::Output {
        stream: pb::OutputStream::Stdout as i32,
        data: text.as_bytes().to_vec().into(),
        attempt: 1,
        truncated: false,
    })
}

#[tonic::async_trait]
impl JobService for FakeJobs {
    async fn submit_job(
        &self,
        _: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn submit_jobs(
        &self,
        _: Request<pb::SubmitJobsRequest>,
    ) -> Result<Response<pb::SubmitJobsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        use tonic_types::{ErrorDetails, StatusExt};
        let mut details = ErrorDetails::new();
        details.set_error_info(
            "JOB_NOT_FOUND",
            "jobplane",
            std::collections::HashMap::new(),
        );
        Err(Status::with_error_details(
            tonic::Code::NotFound,
            format!("job {} not found", request.into_inner().id),
            details,
        ))
    }
    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn wait_job(
        &self,
        _: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::WaitJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn wait_jobs(
        &self,
        _: Request<pb::WaitJobsRequest>,
    ) -> Result<Response<pb::WaitJobsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchJobStream =
        futures::stream::Iter<std::vec::IntoIter<Result<pb::WatchJobResponse, Status>>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let from = request.into_inner().from_seq;
        let call = {
            let mut calls = self.watch_calls.lock().unwrap();
            calls.push(from);
            calls.len()
        };
        let events = if call == 1 {
            // Three events, then the connection "breaks".
            vec![
                event(
                    1,
                    pb::job_event::Kind::State(pb::StateChange {
                        from: 0,
                        to: pb::JobState::Queued as i32,
                        ..Default::default()
                    }),
                ),
                event(2, output("one\n")),
                event(3, output("two\n")),
                Err(Status::unavailable("connection reset")),
            ]
        } else {
            // A resumed stream that (wrongly) repeats the last event must not produce a duplicate.
            vec![
                event(3, output("two\n")),
                event(4, output("three\n")),
                event(
                    5,
                    pb::job_event::Kind::State(pb::StateChange {
                        from: pb::JobState::Running as i32,
                        to: pb::JobState::Succeeded as i32,
                        attempt: 1,
                        ..Default::default()
                    }),
                ),
            ]
        };
        Ok(Response::new(futures::stream::iter(events)))
    }
}

// ---- harness ----------------------------------------------------------------------------------

struct Fake {
    addr: String,
    sessions: mpsc::UnboundedReceiver<Session>,
    jobs: Arc<FakeJobs>,
}

impl Fake {
    async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (tx, sessions) = mpsc::unbounded_channel();
        let jobs = Arc::new(FakeJobs::default());
        let router = tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(FakeWorkers { sessions: tx }))
            .add_service(JobServiceServer::from_arc(jobs.clone()));
        tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
        Fake {
            addr,
            sessions,
            jobs,
        }
    }

    async fn session(&mut self) -> Session {
        tokio::time::timeout(GUARD, self.sessions.recv())
            .await
            .expect("worker connects in time")
            .expect("server running")
    }
}

async fn echo(ctx: JobContext) -> Result<Vec<u8>, HandlerError> {
    ctx.progress(50.0, "half").await;
    ctx.stdout(ctx.payload_bytes()).await;
    Ok(ctx.payload().to_ascii_uppercase())
}

// ---- tests ------------------------------------------------------------------------------------

#[tokio::test]
async fn runs_jobs_in_order_and_shuts_down_cleanly() {
    let mut fake = Fake::start().await;
    let worker = Worker::builder(fake.addr.as_str())
        .concurrency(4)
        .label("zone", "a")
        .handler("echo", echo)
        .build()
        .unwrap();
    let worker_id = worker.id().to_owned();
    let handle = worker.spawn();

    let mut s = fake.session().await;
    let hello = s.hello().await;
    assert_eq!(hello.worker_id, worker_id);
    assert_eq!(hello.queues, ["echo"]);
    assert_eq!(hello.concurrency, 4);
    assert_eq!(hello.namespace, "default");
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("a"));
    assert!(hello.running.is_empty());

    s.welcome(vec![]);
    s.assign(&[("j1", "echo", b"hi"), ("j2", "echo", b"yo")]);
    let reports = s
        .reports_until(|r| has_outcome(r, "j1") && has_outcome(r, "j2"))
        .await;
    for (job, result) in [("j1", &b"HI"[..]), ("j2", &b"YO"[..])] {
        assert_eq!(
            kinds(&reports, job),
            ["ack", "progress", "output", "outcome"],
            "{job}"
        );
        match outcome_of(&reports, job) {
            Some(pb::attempt_outcome::Kind::Success(s)) => assert_eq!(&s.result[..], result),
            other => panic!("{job}: {other:?}"),
        }
    }
    // Heartbeats flow on their own.
    loop {
        if let Some(Req::Heartbeat(_)) = s.recv().await {
            break;
        }
    }
    s.accept("j1");
    s.accept("j2");

    handle.shutdown();
    // Nothing in flight: once the drain is confirmed, the worker ends its side of the stream.
    let rest = s.finish().await;
    assert!(rest.is_empty(), "{rest:?}");
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn server_cancel_reaches_the_handler_and_reports_cancelled() {
    let mut fake = Fake::start().await;
    let handle = Worker::builder(fake.addr.as_str())
        .handler("slow", |ctx: JobContext| async move {
            ctx.cancelled().await;
            if ctx.cancel_reason() == Some("CANCELLED") {
                Err(HandlerError::Cancelled)
            } else {
                Err(HandlerError::fatal("wrong reason"))
            }
        })
        .build()
        .unwrap()
        .spawn();
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    s.assign(&[("c1", "slow", b"")]);
    s.reports_until(|r| !r.is_empty()).await;
    s.send(Resp::Cancel(pb::CancelAttempt {
        job_id: "c1".into(),
        attempt: 1,
        grace: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        reason: "CANCELLED".into(),
    }));
    let reports = s.reports_until(|r| has_outcome(r, "c1")).await;
    assert!(matches!(
        outcome_of(&reports, "c1"),
        Some(pb::attempt_outcome::Kind::Cancelled(_))
    ));
    s.accept("c1");
    handle.shutdown();
    s.finish().await;
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn reconnects_resends_unconfirmed_outcomes_and_drops_lost_attempts() {
    let mut fake = Fake::start().await;
    let release = Arc::new(Notify::new());
    let lost_seen = Arc::new(Notify::new());
    let (release2, lost2) = (release.clone(), lost_seen.clone());
    let worker = Worker::builder(fake.addr.as_str())
        .concurrency(4)
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .handler("fast", |_ctx: JobContext| async { Ok(b"done".to_vec()) })
        .handler("slow", move |ctx: JobContext| {
            let release = release2.clone();
            let lost = lost2.clone();
            async move {
                tokio::select! {
                    () = release.notified() => Ok(b"slow done".to_vec()),
                    () = ctx.cancelled() => {
                        lost.notify_one();
                        Err(HandlerError::Cancelled)
                    }
                }
            }
        })
        .build()
        .unwrap();
    let worker_id = worker.id().to_owned();
    let handle = worker.spawn();

    // Session 1: f1 finishes but its outcome is never confirmed; s1 and s2 keep running.
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    s.assign(&[
        ("f1", "fast", b""),
        ("s1", "slow", b""),
        ("s2", "slow", b""),
    ]);
    s.reports_until(|r| {
        has_outcome(r, "f1")
            && ["s1", "s2"].iter().all(|id| {
                r.iter().any(|x| {
                    x.job_id == *id && matches!(x.kind, Some(pb::worker_report::Kind::Ack(_)))
                })
            })
    })
    .await;
    s.break_stream();

    // Session 2: same worker id, lists all three attempts; the service keeps f1 and s1 only.
    let mut s = fake.session().await;
    let hello = s.hello().await;
    assert_eq!(hello.worker_id, worker_id);
    let mut running: Vec<_> = hello.running.iter().map(|r| r.job_id.as_str()).collect();
    running.sort_unstable();
    assert_eq!(running, ["f1", "s1", "s2"]);
    s.welcome(vec![attempt_ref("f1"), attempt_ref("s1")]);

    // s2 is not ours any more: its handler is cancelled and nothing is reported for it.
    tokio::time::timeout(GUARD, lost_seen.notified())
        .await
        .expect("lost attempt cancelled");
    // f1's outcome is sent again.
    let reports = s.reports_until(|r| has_outcome(r, "f1")).await;
    assert!(matches!(
        outcome_of(&reports, "f1"),
        Some(pb::attempt_outcome::Kind::Success(s)) if &s.result[..] == b"done"
    ));
    s.accept("f1");
    release.notify_one();
    let reports = s.reports_until(|r| has_outcome(r, "s1")).await;
    assert!(!has_outcome(&reports, "s2"));
    s.accept("s1");

    handle.shutdown();
    let rest = s.finish().await;
    assert!(!has_outcome(&rest, "s2"), "lost attempt reported: {rest:?}");
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn graceful_shutdown_drains_and_waits_for_in_flight_work() {
    let mut fake = Fake::start().await;
    let release = Arc::new(Notify::new());
    let release2 = release.clone();
    let handle = Worker::builder(fake.addr.as_str())
        .handler("slow", move |ctx: JobContext| {
            let release = release2.clone();
            async move {
                release.notified().await;
                ctx.stdout("last line\n").await;
                Ok(b"ok".to_vec())
            }
        })
        .build()
        .unwrap()
        .spawn();
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    s.assign(&[("g1", "slow", b"")]);
    s.reports_until(|r| !r.is_empty()).await;

    handle.shutdown();
    match s.recv_non_heartbeat().await {
        Some(Req::Drain(_)) => {}
        other => panic!("expected drain, got {other:?}"),
    }
    s.send(Resp::Drained(pb::Drained {}));
    assert!(!handle.is_finished());
    release.notify_one();
    let reports = s.reports_until(|r| has_outcome(r, "g1")).await;
    assert!(reports
        .iter()
        .any(|r| matches!(&r.kind, Some(pb::worker_report::Kind::Output(o)) if &o.data[..] == b"last line\n")));
    // The worker waits for the confirmation before closing.
    assert!(!handle.is_finished());
    s.accept("g1");
    assert!(s.recv_non_heartbeat().await.is_none());
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_timeout_cancels_handlers_with_a_retryable_failure() {
    let mut fake = Fake::start().await;
    let handle = Worker::builder(fake.addr.as_str())
        .shutdown_timeout(Duration::from_millis(50))
        .handler("stuck", |ctx: JobContext| async move {
            ctx.cancelled().await;
            Err(HandlerError::Cancelled)
        })
        .build()
        .unwrap()
        .spawn();
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    s.assign(&[("t1", "stuck", b"")]);
    s.reports_until(|r| !r.is_empty()).await;
    handle.shutdown();
    let reports = s.reports_until(|r| has_outcome(r, "t1")).await;
    match outcome_of(&reports, "t1") {
        Some(pb::attempt_outcome::Kind::Failure(f)) => assert!(f.retryable, "{f:?}"),
        other => panic!("{other:?}"),
    }
    s.accept("t1");
    s.finish().await;
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn rejected_report_stops_the_attempt_and_still_reports_it_stopped() {
    let mut fake = Fake::start().await;
    let handle = Worker::builder(fake.addr.as_str())
        .handler("slow", |ctx: JobContext| async move {
            ctx.cancelled().await;
            // Reports of an attempt that is not the worker's any more are not sent.
            ctx.stdout("after the rejection\n").await;
            ctx.progress(99.0, "late").await;
            Ok(b"too late".to_vec())
        })
        .build()
        .unwrap()
        .spawn();
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    s.assign(&[("z1", "slow", b"")]);
    s.reports_until(|r| !r.is_empty()).await;
    // The service had already ended the attempt (say, its run timeout passed): the worker's
    // slot stays taken until the worker says it stopped.
    s.reject("z1", "NOT_RUNNING");
    let reports = s.reports_until(|r| has_outcome(r, "z1")).await;
    assert_eq!(kinds(&reports, "z1"), ["outcome"], "{reports:?}");
    assert!(matches!(
        outcome_of(&reports, "z1"),
        Some(pb::attempt_outcome::Kind::Cancelled(_))
    ));
    // The service answers that outcome with a rejection too, which settles the attempt: the
    // shutdown completes without waiting for anything more.
    s.reject("z1", "NOT_RUNNING");
    handle.shutdown();
    let rest = s.finish().await;
    assert!(rest.is_empty(), "{rest:?}");
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn rejected_attempt_that_ignores_its_cancellation_is_aborted_and_reported_stopped() {
    let mut fake = Fake::start().await;
    let handle = Worker::builder(fake.addr.as_str())
        .abort_grace(Duration::from_millis(50))
        .handler("stuck", |_ctx: JobContext| async move {
            std::future::pending::<()>().await;
            Ok(Vec::new())
        })
        .build()
        .unwrap()
        .spawn();
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    s.assign(&[("z2", "stuck", b"")]);
    s.reports_until(|r| !r.is_empty()).await;
    s.reject("z2", "STALE_ATTEMPT");
    let reports = s.reports_until(|r| has_outcome(r, "z2")).await;
    assert!(matches!(
        outcome_of(&reports, "z2"),
        Some(pb::attempt_outcome::Kind::Cancelled(_))
    ));
    s.reject("z2", "STALE_ATTEMPT");
    handle.shutdown();
    s.finish().await;
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn reconnect_resends_the_ack_and_queued_output_of_kept_attempts() {
    let mut fake = Fake::start().await;
    let go = Arc::new(Notify::new());
    let wrote = Arc::new(Notify::new());
    let done = Arc::new(Notify::new());
    let (go2, wrote2, done2) = (go.clone(), wrote.clone(), done.clone());
    let handle = Worker::builder(fake.addr.as_str())
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .handler("slow", move |ctx: JobContext| {
            let (go, wrote, done) = (go2.clone(), wrote2.clone(), done2.clone());
            async move {
                go.notified().await;
                ctx.stdout("during the outage\n").await;
                wrote.notify_one();
                done.notified().await;
                Ok(b"done".to_vec())
            }
        })
        .build()
        .unwrap()
        .spawn();

    // Session 1 breaks right after the assignment, before the service handled the ack (it
    // reached the fake, which drops it): to the worker, the ack may or may not have arrived.
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    s.assign(&[("k1", "slow", b"")]);
    let reports = s.reports_until(|r| !r.is_empty()).await;
    assert_eq!(kinds(&reports, "k1"), ["ack"]);
    s.break_stream();
    let mut s = fake.session().await;

    // Session 2: the worker still runs k1. Output written before the welcome waits for it.
    let hello = s.hello().await;
    let running: Vec<_> = hello.running.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(running, ["k1"]);
    go.notify_one();
    tokio::time::timeout(GUARD, wrote.notified())
        .await
        .expect("output queued");
    s.welcome(vec![attempt_ref("k1")]);
    let reports = s
        .reports_until(|r| kinds(r, "k1").contains(&"output"))
        .await;
    assert_eq!(kinds(&reports, "k1"), ["ack", "output"], "{reports:?}");
    assert!(reports.iter().any(|r| matches!(
        &r.kind,
        Some(pb::worker_report::Kind::Output(o)) if &o.data[..] == b"during the outage\n"
    )));

    done.notify_one();
    let reports = s.reports_until(|r| has_outcome(r, "k1")).await;
    assert_eq!(kinds(&reports, "k1"), ["outcome"]);
    assert!(matches!(
        outcome_of(&reports, "k1"),
        Some(pb::attempt_outcome::Kind::Success(r)) if &r.result[..] == b"done"
    ));
    s.accept("k1");
    handle.shutdown();
    s.finish().await;
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn assignment_crossing_the_shutdown_drain_is_run() {
    let mut fake = Fake::start().await;
    let handle = Worker::builder(fake.addr.as_str())
        // Also: a shutdown timeout too large to add to an instant means "no limit".
        .shutdown_timeout(Duration::MAX)
        .handler("echo", echo)
        .build()
        .unwrap()
        .spawn();
    let mut s = fake.session().await;
    s.hello().await;
    s.welcome(vec![]);
    handle.shutdown();
    match s.recv_non_heartbeat().await {
        Some(Req::Drain(_)) => {}
        other => panic!("expected drain, got {other:?}"),
    }
    // The service had sent an assignment before it saw the drain.
    s.assign(&[("d1", "echo", b"late")]);
    s.drained();
    let reports = s.reports_until(|r| has_outcome(r, "d1")).await;
    assert!(matches!(
        outcome_of(&reports, "d1"),
        Some(pb::attempt_outcome::Kind::Success(r)) if &r.result[..] == b"LATE"
    ));
    assert!(!handle.is_finished());
    s.accept("d1");
    let rest = s.finish().await;
    assert!(rest.is_empty(), "{rest:?}");
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn absurd_welcome_durations_do_not_break_the_worker() {
    let mut fake = Fake::start().await;
    let handle = Worker::builder(fake.addr.as_str())
        .handler("echo", echo)
        .build()
        .unwrap()
        .spawn();
    let mut s = fake.session().await;
    s.hello().await;
    let huge = prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    };
    s.send(Resp::Welcome(pb::Welcome {
        worker_id: String::new(),
        lease_ttl: Some(huge),
        heartbeat_interval: Some(huge),
        kept: vec![],
    }));
    s.assign(&[("h1", "echo", b"x")]);
    let reports = s.reports_until(|r| has_outcome(r, "h1")).await;
    assert!(matches!(
        outcome_of(&reports, "h1"),
        Some(pb::attempt_outcome::Kind::Success(_))
    ));
    s.accept("h1");
    handle.shutdown();
    s.finish().await;
    drop(s);
    tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn refused_hello_is_an_error() {
    let mut fake = Fake::start().await;
    let handle = Worker::builder(fake.addr.as_str())
        .handler("q", echo)
        .build()
        .unwrap()
        .spawn();
    let s = fake.session().await;
    let _ = s.tx.send(Err(Status::invalid_argument("bad queue name")));
    let err = tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[tokio::test]
async fn watch_resumes_after_a_broken_stream_without_gaps_or_duplicates() {
    let fake = Fake::start().await;
    let client = Client::connect(fake.addr.clone()).await.unwrap();
    let events: Vec<_> = tokio::time::timeout(GUARD, client.watch("j", 0).collect::<Vec<_>>())
        .await
        .unwrap();
    let events: Vec<_> = events.into_iter().map(Result::unwrap).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert!(events.last().unwrap().is_terminal());
    let text: String = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Output { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "one\ntwo\nthree\n");
    assert_eq!(*fake.jobs.watch_calls.lock().unwrap(), [0, 3]);
}

#[tokio::test]
async fn service_errors_map_to_typed_errors() {
    let fake = Fake::start().await;
    let client = Client::connect(fake.addr.clone()).await.unwrap();
    let err = client.get("nope").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert_eq!(err.reason(), Some("JOB_NOT_FOUND"));
    assert_eq!(err.to_string(), "not found: job nope not found");
    let err = client.list(Default::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unimplemented));
}
