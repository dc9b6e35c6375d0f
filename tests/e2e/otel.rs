//! Trace export over OTLP/gRPC, for real: a receiver built on `opentelemetry-proto`'s generated
//! `TraceService` runs in the test, and the real `jobplane serve` process exports to it when the
//! standard `OTEL_*` variables say so — and sends nothing when they are unset. The Rust SDK's
//! client and worker in the test process export to the same receiver through
//! `jobplane::telemetry`, so a job's trace can be followed across all three.

use std::time::Duration;

use jobplane::telemetry::Telemetry;
use jobplane::worker::{HandlerError, JobContext};
use jobplane::{Client, JobSpec, JobState};
use jobplane_tests::{guard, jobplane_bin, ServerProcess, TestServer};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::spawn_worker;

/// Every OTEL variable the service reads, removed unless a test sets it.
const OTEL_VARS: [&str; 8] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
    "OTEL_BSP_SCHEDULE_DELAY",
];

/// A span as received, with its resource's attributes.
struct Received {
    resource: Vec<KeyValue>,
    span: Span,
}

/// An OTLP/gRPC trace receiver: every exported span goes into a channel.
struct Receiver {
    tx: mpsc::UnboundedSender<Received>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    let _ = self.tx.send(Received {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts a receiver on `127.0.0.1:0`; returns its endpoint and the received spans.
async fn start_receiver() -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { tx }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (endpoint, rx)
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(s: &str) -> Value {
    Value::StringValue(s.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

fn env<'a>(set: &[(&'a str, &'a str)]) -> Vec<(&'a str, Option<&'a str>)> {
    let mut env: Vec<_> = OTEL_VARS.iter().map(|v| (*v, None)).collect();
    env.extend(set.iter().map(|(k, v)| (*k, Some(*v))));
    env
}

#[tokio::test]
async fn submit_is_exported_as_a_server_span_continuing_the_callers_trace() {
    let (endpoint, mut received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(
        dir.path(),
        &env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=e2e",
            ),
        ]),
    )
    .await;

    let client = Client::connect(&server.addr).await.unwrap();
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let job = client
        .submit(JobSpec::new("otel").traceparent(traceparent))
        .await
        .unwrap()
        .job;

    let Received { resource, span } = guard("the SubmitJob span", async {
        loop {
            let r = received.recv().await.expect("receiver running");
            if r.span.name == "jobplane.v1.JobService/SubmitJob" {
                return r;
            }
        }
    })
    .await;
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(hex(&span.parent_span_id), PARENT_SPAN_ID);
    assert_ne!(hex(&span.span_id), PARENT_SPAN_ID);
    assert_eq!(attr(&span.attributes, "rpc.system"), Some(&string("grpc")));
    assert_eq!(
        attr(&span.attributes, "rpc.service"),
        Some(&string("jobplane.v1.JobService"))
    );
    assert_eq!(
        attr(&span.attributes, "rpc.method"),
        Some(&string("SubmitJob"))
    );
    assert_eq!(
        attr(&span.attributes, "rpc.grpc.status_code"),
        Some(&Value::IntValue(0))
    );
    assert_ne!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(attr(&resource, "service.name"), Some(&string("jobplane")));
    assert_eq!(
        attr(&resource, "deployment.environment.name"),
        Some(&string("e2e"))
    );

    // A failing call: a server span with the gRPC code and an error status.
    let missing = client.get(&format!("{}-missing", job.id)).await;
    assert!(missing.is_err());
    let span = guard("the failed GetJob span", async {
        loop {
            let r = received.recv().await.expect("receiver running");
            if r.span.name == "jobplane.v1.JobService/GetJob" {
                return r.span;
            }
        }
    })
    .await;
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_ne!(
        attr(&span.attributes, "rpc.grpc.status_code"),
        Some(&Value::IntValue(0))
    );
    assert_eq!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    assert!(server.terminate().await, "graceful exit");
}

#[tokio::test]
async fn nothing_is_exported_when_the_variables_are_unset() {
    let (_endpoint, mut received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(dir.path(), &env(&[])).await;
    let client = Client::connect(&server.addr).await.unwrap();
    let caller = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let submitted = client
        .submit(JobSpec::new("otel").traceparent(caller.clone()))
        .await
        .unwrap();
    // Not exporting, the service keeps the caller's context as the job's trace.
    assert_eq!(submitted.job.traceparent.as_deref(), Some(caller.as_str()));
    let got = client.get(&submitted.job.id).await.unwrap();
    assert_eq!(got.traceparent.as_deref(), Some(caller.as_str()));
    // A graceful exit flushes an exporter if there is one: after it, nothing can still come.
    assert!(server.terminate().await, "graceful exit");
    assert!(received.try_recv().is_err(), "no span may be exported");
}

#[tokio::test]
async fn nothing_is_exported_when_the_sdk_is_disabled() {
    let (endpoint, mut received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(
        dir.path(),
        &env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SDK_DISABLED", "true"),
        ]),
    )
    .await;
    let client = Client::connect(&server.addr).await.unwrap();
    client.submit(JobSpec::new("otel")).await.unwrap();
    assert!(server.terminate().await, "graceful exit");
    assert!(received.try_recv().is_err(), "no span may be exported");
}

#[tokio::test]
async fn a_graceful_exit_flushes_the_spans_still_queued() {
    let (endpoint, mut received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    // A schedule delay far longer than the test: only the flush at exit can send the span.
    let server = ServerProcess::start_with_env(
        dir.path(),
        &env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "3600000"),
        ]),
    )
    .await;
    let client = Client::connect(&server.addr).await.unwrap();
    client.submit(JobSpec::new("otel")).await.unwrap();
    assert!(server.terminate().await, "graceful exit");
    let mut names = vec![];
    while let Ok(r) = received.try_recv() {
        names.push(r.span.name);
    }
    assert!(
        names
            .iter()
            .any(|n| n == "jobplane.v1.JobService/SubmitJob"),
        "flushed at exit: {names:?}"
    );
}

/// `service.name` of the spans this test process exports through the SDK.
const SDK_SERVICE: &str = "e2e-sdk";
/// `service.name` of the `jobplane serve` process's spans.
const SERVER_SERVICE: &str = "jobplane";

/// Makes this process export its spans (the SDK's client and worker spans, the test's own) to
/// `endpoint` through `jobplane::telemetry`, configured by the standard variables as any
/// program using the SDK would be. Each nextest test runs in a process of its own, so setting
/// the variables and the global subscriber here touches no other test.
fn export_from_this_process(endpoint: &str) -> Telemetry {
    for var in OTEL_VARS {
        std::env::remove_var(var);
    }
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    std::env::set_var("OTEL_SERVICE_NAME", SDK_SERVICE);
    let (telemetry, export) = Telemetry::from_env("unnamed").expect("telemetry");
    assert!(telemetry.is_exporting());
    tracing_subscriber::registry().with(export).init();
    telemetry
}

/// The spans received so far, by the `service.name` of their resource.
struct Collected {
    rx: mpsc::UnboundedReceiver<Received>,
    spans: Vec<(String, Span)>,
}

impl Collected {
    fn new(rx: mpsc::UnboundedReceiver<Received>) -> Self {
        Collected { rx, spans: vec![] }
    }

    /// Receives spans until each `(service, span name)` has come at least once.
    async fn until(&mut self, wanted: &[(&str, &str)]) {
        let what = format!("spans {wanted:?}");
        guard(&what, async {
            while !wanted
                .iter()
                .all(|(svc, name)| self.find(svc, name).is_some())
            {
                let r = self.rx.recv().await.expect("receiver running");
                let service = match attr(&r.resource, "service.name") {
                    Some(Value::StringValue(s)) => s.clone(),
                    _ => String::new(),
                };
                self.spans.push((service, r.span));
            }
        })
        .await;
    }

    /// The one span of `service` named `name` (panics if there are several).
    fn one(&self, service: &str, name: &str) -> &Span {
        let found: Vec<_> = self.all(service, name).collect();
        assert_eq!(found.len(), 1, "spans {name} of {service}");
        found[0]
    }

    fn find(&self, service: &str, name: &str) -> Option<&Span> {
        self.all(service, name).next()
    }

    fn all<'a>(&'a self, service: &str, name: &str) -> impl Iterator<Item = &'a Span> {
        let (service, name) = (service.to_owned(), name.to_owned());
        self.spans
            .iter()
            .filter(move |(s, span)| *s == service && span.name == name)
            .map(|(_, span)| span)
    }
}

fn int(i: i64) -> Value {
    Value::IntValue(i)
}

fn is_error(span: &Span) -> bool {
    span.status.as_ref().map(|s| s.code) == Some(StatusCode::Error as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_life_is_traced_from_the_client_through_the_service_to_the_worker() {
    let (endpoint, received) = start_receiver().await;
    let telemetry = export_from_this_process(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(
        dir.path(),
        &env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ]),
    )
    .await;
    let client = Client::connect(&server.addr).await.unwrap();
    let port: i64 = server.addr.rsplit(':').next().unwrap().parse().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let worker = spawn_worker(&server.addr, "thumbs", 1, move |ctx: JobContext| {
        let seen = seen_tx.clone();
        async move {
            // The user's own span inside the handler.
            async { tracing::info!("resizing") }
                .instrument(tracing::info_span!("resize"))
                .await;
            let _ = seen.send(ctx.trace_context());
            Ok(b"done".to_vec())
        }
    });

    // Submitted inside a span of the caller's; waited for outside it.
    let checkout = tracing::info_span!("checkout");
    let job = client
        .submit(JobSpec::new("thumbs"))
        .instrument(checkout.clone())
        .await
        .unwrap()
        .job;
    drop(checkout);
    let done = guard("the job", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.job.state, JobState::Succeeded);
    let handler_cx = guard("the handler", seen.recv()).await.unwrap();

    let mut spans = Collected::new(received);
    spans
        .until(&[
            (SDK_SERVICE, "checkout"),
            (SDK_SERVICE, "jobplane.v1.JobService/SubmitJob"),
            (SERVER_SERVICE, "jobplane.v1.JobService/SubmitJob"),
            (SDK_SERVICE, "process thumbs"),
            (SDK_SERVICE, "resize"),
            (SDK_SERVICE, "jobplane.v1.JobService/WaitJob"),
            (SERVER_SERVICE, "attempt thumbs"),
        ])
        .await;
    let checkout = spans.one(SDK_SERVICE, "checkout");
    let trace = hex(&checkout.trace_id);

    // The client's submit span: a child of the caller's span, attributed after the conventions.
    let submit = spans.one(SDK_SERVICE, "jobplane.v1.JobService/SubmitJob");
    assert_eq!(submit.kind, SpanKind::Client as i32);
    assert_eq!(hex(&submit.trace_id), trace);
    assert_eq!(submit.parent_span_id, checkout.span_id);
    for (key, value) in [
        ("rpc.system", string("grpc")),
        ("rpc.service", string("jobplane.v1.JobService")),
        ("rpc.method", string("SubmitJob")),
        ("server.address", string("127.0.0.1")),
        ("server.port", int(port)),
        ("jobplane.queue", string("thumbs")),
        ("messaging.destination.name", string("thumbs")),
        ("jobplane.job_id", string(&job.id)),
        ("rpc.grpc.status_code", int(0)),
    ] {
        assert_eq!(attr(&submit.attributes, key), Some(&value), "{key}");
    }

    // The service's SubmitJob span is the client span's child, in the same trace.
    let accepted = spans.one(SERVER_SERVICE, "jobplane.v1.JobService/SubmitJob");
    assert_eq!(accepted.kind, SpanKind::Server as i32);
    assert_eq!(hex(&accepted.trace_id), trace);
    assert_eq!(accepted.parent_span_id, submit.span_id);
    // ... and the job's trace context is that span's.
    let job_trace = format!("00-{trace}-{}-01", hex(&accepted.span_id));
    assert_eq!(job.traceparent.as_deref(), Some(job_trace.as_str()));

    // The service's span of the attempt is in the job's trace; its context is what the worker
    // got.
    let attempt = spans.one(SERVER_SERVICE, "attempt thumbs");
    assert_eq!(attempt.kind, SpanKind::Producer as i32);
    assert_eq!(hex(&attempt.trace_id), trace);
    assert_eq!(attempt.parent_span_id, accepted.span_id);

    // The worker's span: a consumer span with the messaging attributes, the user's span in it.
    let process = spans.one(SDK_SERVICE, "process thumbs");
    assert_eq!(process.kind, SpanKind::Consumer as i32);
    assert_eq!(hex(&process.trace_id), trace);
    assert_eq!(process.parent_span_id, attempt.span_id);
    for (key, value) in [
        ("messaging.system", string("jobplane")),
        ("messaging.operation.type", string("process")),
        ("messaging.destination.name", string("thumbs")),
        ("messaging.message.id", string(&job.id)),
        ("jobplane.job_id", string(&job.id)),
        ("jobplane.queue", string("thumbs")),
        ("jobplane.attempt", int(1)),
    ] {
        assert_eq!(attr(&process.attributes, key), Some(&value), "{key}");
    }
    assert_eq!(attr(&process.attributes, "jobplane.pool"), None);
    assert!(!is_error(process));
    let resize = spans.one(SDK_SERVICE, "resize");
    assert_eq!(resize.parent_span_id, process.span_id);
    assert_eq!(resize.trace_id, process.trace_id);
    // What the handler is told of its trace is its own span's context.
    let handler_cx = handler_cx.expect("a trace context");
    assert_eq!(
        handler_cx.traceparent,
        format!("00-{}-{}-01", hex(&process.trace_id), hex(&process.span_id))
    );

    // The wait, outside the caller's span, is a trace of its own, linked to the job's.
    let wait = spans
        .all(SDK_SERVICE, "jobplane.v1.JobService/WaitJob")
        .last()
        .unwrap();
    assert_eq!(wait.kind, SpanKind::Client as i32);
    assert_ne!(hex(&wait.trace_id), trace);
    let links: Vec<_> = wait
        .links
        .iter()
        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
        .collect();
    assert_eq!(links, [(trace.clone(), hex(&accepted.span_id))]);
    assert_eq!(
        attr(&wait.attributes, "messaging.message.id"),
        Some(&string(&job.id))
    );

    worker.stop().await.unwrap();
    telemetry.shutdown().await;
    assert!(server.terminate().await, "graceful exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_an_error_in_the_workers_span() {
    let (endpoint, received) = start_receiver().await;
    let telemetry = export_from_this_process(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(
        dir.path(),
        &env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ]),
    )
    .await;
    let client = Client::connect(&server.addr).await.unwrap();
    let worker = spawn_worker(&server.addr, "broken", 1, |_ctx: JobContext| async {
        Err::<Vec<u8>, _>(HandlerError::fatal("no such image"))
    });
    let job = client.submit(JobSpec::new("broken")).await.unwrap().job;
    let done = guard("the job", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.job.state, JobState::Failed);

    let mut spans = Collected::new(received);
    spans
        .until(&[
            (SDK_SERVICE, "process broken"),
            (SERVER_SERVICE, "attempt broken"),
        ])
        .await;
    let process = spans.one(SDK_SERVICE, "process broken");
    let status = process.status.as_ref().expect("a status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert_eq!(status.message, "no such image");
    // The worker's failed span in the service's span of the failed attempt, both errors.
    let attempt = spans.one(SERVER_SERVICE, "attempt broken");
    assert_eq!(process.parent_span_id, attempt.span_id);
    assert_eq!(attempt.trace_id, process.trace_id);
    assert!(is_error(attempt));
    assert_eq!(
        attr(&process.attributes, "jobplane.job_id"),
        Some(&string(&job.id))
    );

    worker.stop().await.unwrap();
    telemetry.shutdown().await;
    assert!(server.terminate().await, "graceful exit");
}

#[tokio::test]
async fn the_cli_workers_command_and_json_logs_continue_the_process_span() {
    let (endpoint, received) = start_receiver().await;
    let server = TestServer::start().await;
    let client = server.client().await;
    // `jobplane worker`, exporting, logging JSON; its command prints the TRACEPARENT it was
    // given as its result (the last line of its standard output).
    let mut worker = tokio::process::Command::new(jobplane_bin());
    for var in OTEL_VARS {
        worker.env_remove(var);
    }
    let mut worker = worker
        .args([
            "--log-format",
            "json",
            "worker",
            "traced",
            "--",
            "sh",
            "-c",
            "echo \"$TRACEPARENT\"",
        ])
        .env("JOBPLANE_ADDR", &server.addr)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_SERVICE_NAME", "cli-worker")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn jobplane worker");
    let mut logs = BufReader::new(worker.stderr.take().unwrap()).lines();

    let job = client.submit(JobSpec::new("traced")).await.unwrap().job;
    let done = guard("the job", client.wait(&job.id, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.job.state, JobState::Succeeded);
    let traceparent = String::from_utf8(done.job.result.unwrap().to_vec()).unwrap();

    let mut spans = Collected::new(received);
    spans.until(&[("cli-worker", "process traced")]).await;
    let process = spans.one("cli-worker", "process traced");
    assert_eq!(
        attr(&process.attributes, "jobplane.job_id"),
        Some(&string(&job.id))
    );
    assert_eq!(
        traceparent.trim(),
        format!("00-{}-{}-01", hex(&process.trace_id), hex(&process.span_id))
    );

    // Log lines inside the handler carry the process span's ids; those outside any span, none.
    let mut lines = vec![];
    let succeeded = guard("the worker's `job succeeded` line", async {
        loop {
            let line = logs.next_line().await.unwrap().expect("worker running");
            let line: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if line["fields"]["message"] == "job succeeded" {
                return line;
            }
            lines.push(line);
        }
    })
    .await;
    assert_eq!(succeeded["trace_id"], hex(&process.trace_id));
    assert_eq!(succeeded["span_id"], hex(&process.span_id));
    let running = lines
        .iter()
        .find(|l| l["fields"]["message"] == "running")
        .expect("the worker's first line");
    assert!(running.get("trace_id").is_none(), "{running}");
}

/// A call through a follower: the leader's server span is a child of the follower's, which
/// continues the caller's trace (one trace across the forwarding hop).
#[tokio::test]
async fn a_forwarded_call_is_traced_through_the_follower_to_the_leader() {
    use jobplane_tests::cluster::{wait_health, Instance, TestDatabase, JOB_SERVICE};
    use tonic_health::pb::health_check_response::ServingStatus;

    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (endpoint, mut received) = start_receiver().await;
    let vars = env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let leader = Instance::start_with_env(&db.url, "leader", &vars).await;
    leader.wait_leading(1).await;
    let follower = Instance::start_with_env(&db.url, "follower", &vars).await;
    wait_health(&follower.addr, JOB_SERVICE, ServingStatus::Serving).await;

    let client = Client::connect(&follower.addr).await.unwrap();
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    client
        .submit(JobSpec::new("forwarded").traceparent(traceparent))
        .await
        .unwrap();

    let mut submits = Vec::new();
    guard("both SubmitJob spans", async {
        while submits.len() < 2 {
            let r = received.recv().await.expect("receiver running");
            if r.span.name == "jobplane.v1.JobService/SubmitJob" {
                submits.push(r.span);
            }
        }
    })
    .await;
    let at_follower = submits
        .iter()
        .find(|s| hex(&s.parent_span_id) == PARENT_SPAN_ID)
        .expect("the follower's span continues the caller's");
    let at_leader = submits
        .iter()
        .find(|s| s.span_id != at_follower.span_id)
        .expect("the leader's span");
    assert_eq!(hex(&at_leader.trace_id), TRACE_ID);
    assert_eq!(
        hex(&at_leader.parent_span_id),
        hex(&at_follower.span_id),
        "the leader's span is the follower's child"
    );
    drop((leader, follower));
}
