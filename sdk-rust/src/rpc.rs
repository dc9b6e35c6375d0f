//! The one place where a client call gets its span and its trace metadata (see [`crate::trace`]).
//!
//! Span names and attributes follow the OpenTelemetry semantic conventions for RPC, as the
//! service's server spans do: named `jobplane.v1.JobService/SubmitJob`, kind client,
//! `rpc.system`, `rpc.service`, `rpc.method`, `server.address`/`server.port`, and on the result
//! `rpc.grpc.status_code` (and `otel.status_code = "ERROR"` unless OK).

use std::future::Future;

use opentelemetry::trace::TraceContextExt as _;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::Code;
use tracing::field::Empty;
use tracing::{Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::error::{Error, Result};
use crate::trace::{TraceContext, RPC_TARGET};

/// `rpc.service` of the job API.
pub(crate) const JOB_SERVICE: &str = "jobplane.v1.JobService";
/// `rpc.service` of the admin API.
pub(crate) const ADMIN_SERVICE: &str = "jobplane.v1.AdminService";

/// Where the client connects (`server.address`, `server.port`), when it is one known address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerAddr {
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
}

/// A client span for one call of `service`/`method`, in the current span. Fields a call may
/// fill: `jobplane.queue`/`messaging.destination.name` and
/// `jobplane.job_id`/`messaging.message.id` (see [`on_queue`], [`on_job`]).
pub(crate) fn span(
    service: &'static str,
    method: &'static str,
    server: Option<&ServerAddr>,
) -> Span {
    let span = tracing::info_span!(
        target: RPC_TARGET,
        "rpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        server.address = Empty,
        server.port = Empty,
        jobplane.queue = Empty,
        messaging.destination.name = Empty,
        jobplane.job_id = Empty,
        messaging.message.id = Empty,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if let Some(server) = server {
        span.record("server.address", server.host.as_str());
        if let Some(port) = server.port {
            // i64: an integer attribute (tracing-opentelemetry records unsigned values as text).
            span.record("server.port", i64::from(port));
        }
    }
    span
}

/// Records the queue a call is about.
pub(crate) fn on_queue(span: &Span, queue: &str) {
    span.record("jobplane.queue", queue);
    span.record("messaging.destination.name", queue);
}

/// Records the job a call is about.
pub(crate) fn on_job(span: &Span, job_id: &str) {
    span.record("jobplane.job_id", job_id);
    span.record("messaging.message.id", job_id);
}

/// Links `span` to a job's trace (a wait's span to the trace of the job it waits for).
pub(crate) fn link_job(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if let Some(tp) = traceparent {
        let job = TraceContext::new(tp).with_tracestate(tracestate.unwrap_or_default());
        // `add_link` ignores an invalid span context.
        span.add_link(job.to_otel().span().span_context().clone());
    }
}

/// A request carrying `message` and the trace context of the call (see [`propagated`]).
pub(crate) fn request<T>(
    span: &Span,
    message: T,
    explicit: Option<TraceContext>,
) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(message);
    if let Some(cx) = propagated(span, explicit) {
        inject(&cx, req.metadata_mut())?;
    }
    Ok(req)
}

/// The trace context a call sends, after making `span` a child of the explicit (or scoped)
/// context if there is one: the span's own context when it has one (an OpenTelemetry layer is
/// installed and enabled it); otherwise the explicit or scoped context as given; otherwise that
/// of the current span (an OpenTelemetry layer that filters out [`RPC_TARGET`]).
pub(crate) fn propagated(span: &Span, explicit: Option<TraceContext>) -> Option<TraceContext> {
    let parent = explicit.or_else(TraceContext::scoped);
    if let Some(parent) = &parent {
        let cx = parent.to_otel();
        if cx.span().span_context().is_valid() {
            // Fails only without a layer to take it or once the span started; neither applies
            // to a fresh span that has a layer.
            let _ = span.set_parent(cx);
        }
    }
    TraceContext::of_span(span)
        .or(parent)
        .or_else(|| TraceContext::of_span(&Span::current()))
}

/// Puts a trace context in request metadata.
fn inject(cx: &TraceContext, metadata: &mut MetadataMap) -> Result<()> {
    let value = |v: &str| {
        MetadataValue::try_from(v)
            .map_err(|_| Error::InvalidConfig(format!("invalid trace context header `{v}`")))
    };
    metadata.insert("traceparent", value(&cx.traceparent)?);
    if let Some(ts) = &cx.tracestate {
        metadata.insert("tracestate", value(ts)?);
    }
    Ok(())
}

/// Runs a call in `span` and records how it ended.
pub(crate) async fn traced<R>(
    span: &Span,
    call: impl Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
) -> std::result::Result<tonic::Response<R>, tonic::Status> {
    let result = call.instrument(span.clone()).await;
    ended(
        span,
        result
            .as_ref()
            .map_or_else(tonic::Status::code, |_| Code::Ok),
    );
    result
}

/// Records a call's gRPC status on its span.
pub(crate) fn ended(span: &Span, code: Code) {
    if span.is_disabled() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i32);
    if code != Code::Ok {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", code.description());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn sent(req: &tonic::Request<()>) -> (Option<&str>, Option<&str>) {
        let get = |k| req.metadata().get(k).and_then(|v| v.to_str().ok());
        (get("traceparent"), get("tracestate"))
    }

    #[test]
    fn without_opentelemetry_explicit_context_is_sent_unchanged() {
        let span = span(JOB_SERVICE, "SubmitJob", None);
        let explicit = TraceContext::new(TP).with_tracestate("k=v");
        let req = request(&span, (), Some(explicit)).unwrap();
        assert_eq!(sent(&req), (Some(TP), Some("k=v")));
        // Nothing to send, nothing sent.
        assert_eq!(sent(&request(&span, (), None).unwrap()), (None, None));
        // A context that is no header value is refused rather than dropped.
        assert!(request(&span, (), Some(TraceContext::new("bad\nvalue"))).is_err());
    }

    #[tokio::test]
    async fn without_opentelemetry_the_scoped_context_is_sent() {
        let scoped = TraceContext::new(TP);
        let req = scoped
            .scope(async { request(&span(JOB_SERVICE, "GetJob", None), (), None).unwrap() })
            .await;
        assert_eq!(sent(&req), (Some(TP), None));
        // The spec's own context wins over the scoped one.
        let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
        let req = TraceContext::new(TP)
            .scope(async {
                request(
                    &span(JOB_SERVICE, "SubmitJob", None),
                    (),
                    Some(TraceContext::new(other)),
                )
                .unwrap()
            })
            .await;
        assert_eq!(sent(&req), (Some(other), None));
    }

    /// The W3C context a request carries.
    fn carried(req: &tonic::Request<()>) -> opentelemetry::trace::SpanContext {
        let (tp, ts) = sent(req);
        TraceContext::new(tp.expect("traceparent"))
            .with_tracestate(ts.unwrap_or_default())
            .to_otel()
            .span()
            .span_context()
            .clone()
    }

    #[test]
    fn the_client_span_is_a_child_of_the_current_span_and_is_what_is_sent() {
        use opentelemetry::trace::{SpanKind, Status};
        let (_guard, finished) = crate::trace::testing::install(true);
        let req = {
            let user = tracing::info_span!("user");
            let _entered = user.enter();
            let server = ServerAddr {
                host: "db.example".into(),
                port: Some(7741),
            };
            let span = span(JOB_SERVICE, "GetJob", Some(&server));
            on_job(&span, "j1");
            let req = request(&span, (), None).unwrap();
            ended(&span, Code::NotFound);
            req
        };
        let user = finished.one("user").span_context;
        let sent = carried(&req);
        let client = finished.one("jobplane.v1.JobService/GetJob");
        assert_eq!(sent.trace_id(), user.trace_id());
        assert_eq!(sent.span_id(), client.span_context.span_id());
        assert_eq!(client.parent_span_id, user.span_id());
        assert_eq!(client.span_kind, SpanKind::Client);
        let attr = |k| crate::trace::testing::attr(&client, k).map(|v| v.to_string());
        assert_eq!(attr("rpc.system").as_deref(), Some("grpc"));
        assert_eq!(attr("rpc.service").as_deref(), Some(JOB_SERVICE));
        assert_eq!(attr("rpc.method").as_deref(), Some("GetJob"));
        assert_eq!(attr("server.address").as_deref(), Some("db.example"));
        assert_eq!(
            crate::trace::testing::attr(&client, "server.port"),
            Some(opentelemetry::Value::I64(7741))
        );
        assert_eq!(
            crate::trace::testing::attr(&client, "rpc.grpc.status_code"),
            Some(opentelemetry::Value::I64(5))
        );
        assert_eq!(attr("jobplane.job_id").as_deref(), Some("j1"));
        assert_eq!(attr("messaging.message.id").as_deref(), Some("j1"));
        assert_eq!(attr("rpc.grpc.status_code").as_deref(), Some("5"));
        assert!(
            matches!(client.status, Status::Error { .. }),
            "{:?}",
            client.status
        );
    }

    #[tokio::test]
    async fn an_explicit_or_scoped_context_is_the_client_spans_parent() {
        let (_guard, finished) = crate::trace::testing::install(true);
        let explicit = TraceContext::new(TP).with_tracestate("k=v");
        let parent = explicit.to_otel().span().span_context().clone();
        let user = tracing::info_span!("user");
        // Explicit (a spec's) context, inside a user span it overrides.
        let span_a = user.in_scope(|| span(JOB_SERVICE, "SubmitJob", None));
        on_queue(&span_a, "thumbnails");
        let req = request(&span_a, (), Some(explicit.clone())).unwrap();
        ended(&span_a, Code::Ok);
        drop(span_a);
        // Scoped context.
        let req_b = explicit
            .clone()
            .scope(async {
                let span = span(JOB_SERVICE, "WaitJob", None);
                request(&span, (), None).unwrap()
            })
            .await;
        let submit = finished.one("jobplane.v1.JobService/SubmitJob");
        let wait = finished.one("jobplane.v1.JobService/WaitJob");
        for (client, req) in [(&submit, &req), (&wait, &req_b)] {
            assert_eq!(client.span_context.trace_id(), parent.trace_id());
            assert_eq!(client.parent_span_id, parent.span_id());
            assert!(client.parent_span_is_remote);
            let sent = carried(req);
            assert_eq!(sent.span_id(), client.span_context.span_id());
            assert_eq!(sent.trace_id(), parent.trace_id());
            assert_eq!(sent.trace_state().header(), "k=v");
        }
        let attr = |k| crate::trace::testing::attr(&submit, k).map(|v| v.to_string());
        assert_eq!(attr("jobplane.queue").as_deref(), Some("thumbnails"));
        assert_eq!(
            attr("messaging.destination.name").as_deref(),
            Some("thumbnails")
        );
        assert_eq!(attr("rpc.grpc.status_code").as_deref(), Some("0"));
        assert_eq!(submit.status, opentelemetry::trace::Status::Unset);
    }

    #[test]
    fn a_layer_without_rpc_spans_still_propagates_the_current_span() {
        let (_guard, finished) = crate::trace::testing::install(false);
        let user = tracing::info_span!("user");
        let req = user.in_scope(|| request(&span(JOB_SERVICE, "GetJob", None), (), None).unwrap());
        drop(user);
        let user = finished.one("user");
        let sent = carried(&req);
        assert_eq!(sent.trace_id(), user.span_context.trace_id());
        assert_eq!(sent.span_id(), user.span_context.span_id());
    }

    #[test]
    fn a_wait_links_to_the_jobs_trace() {
        let (_guard, finished) = crate::trace::testing::install(true);
        let span = span(JOB_SERVICE, "WaitJob", None);
        let _req = request(&span, (), None).unwrap();
        link_job(&span, Some(TP), Some("k=v"));
        link_job(&span, None, None);
        link_job(&span, Some("garbage"), None);
        drop(span);
        let wait = finished.one("jobplane.v1.JobService/WaitJob");
        let links: Vec<_> = wait.links.iter().map(|l| l.span_context.clone()).collect();
        let job = TraceContext::new(TP)
            .to_otel()
            .span()
            .span_context()
            .clone();
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(links[0].trace_id(), job.trace_id());
        assert_eq!(links[0].span_id(), job.span_id());
    }
}
