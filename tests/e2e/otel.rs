//! Trace export over OTLP/gRPC, for real: a receiver built on `opentelemetry-proto`'s generated
//! `TraceService` runs in the test, and the real `jobplane serve` process exports to it when the
//! standard `OTEL_*` variables say so — and sends nothing when they are unset.

use jobplane::{Client, JobSpec};
use jobplane_tests::{guard, ServerProcess};
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
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;

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
    client
        .submit(JobSpec::new("otel").traceparent(format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")))
        .await
        .unwrap();
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
