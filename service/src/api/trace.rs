//! A tower layer over the gRPC server that opens one server span per call, named and attributed
//! after the OpenTelemetry semantic conventions for RPC (`jobplane.v1.JobService/SubmitJob`;
//! `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`), continuing the caller's
//! trace when the request carries W3C `traceparent`/`tracestate` metadata.
//!
//! The spans have the target [`EXPORT_TARGET`]: only the OpenTelemetry layer enables them, so
//! without trace export they are disabled where they are made and nothing else is done. The
//! span records the call's status and ends with the call ([`super::outcome`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body as HttpBody;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::Code;
use tower::{Layer, Service};
use tracing::field::Empty;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::outcome::{observe, CallEnd, Observed};
use crate::engine::model::TraceContext;
use crate::engine::spans;
use crate::telemetry::EXPORT_TARGET;

/// Layer opening a span per call.
#[derive(Clone, Default)]
pub(crate) struct RpcTraceLayer;

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// The service of [`RpcTraceLayer`].
#[derive(Clone)]
pub(crate) struct RpcTrace<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// `rpc.service` and `rpc.method` of a gRPC path (`/jobplane.v1.JobService/SubmitJob`).
fn split_path(path: &str) -> (&str, &str) {
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) if !service.is_empty() && !method.contains('/') => {
            (service, method)
        }
        _ => ("unknown", "unknown"),
    }
}

/// Writes W3C trace context into request headers.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// A call forwarded to the leader continues this instance's server span of it (the current
/// span), when traces are exported: the leader's span becomes its child instead of a sibling.
/// Otherwise the caller's trace context goes on unchanged.
pub(crate) fn forward_context(headers: &mut http::HeaderMap) {
    let call = Span::current();
    if call.is_disabled() {
        return;
    }
    let cx = call.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Reads W3C trace context from request headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

fn rpc_span(headers: &http::HeaderMap, path: &str) -> Span {
    let (service, method) = split_path(path);
    let span = tracing::info_span!(
        target: EXPORT_TARGET,
        "rpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        if parent.span().span_context().is_valid() {
            // Fails only if the span has already started, which it has not.
            let _ = span.set_parent(parent);
        }
    }
    span
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcTrace<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<Observed<ResBody, TracedCall>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let span = rpc_span(req.headers(), req.uri().path());
        // The clone that was made ready is the one that must serve the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = inner.call(req).instrument(span.clone());
        Box::pin(observe(future, TracedCall { span }))
    }
}

/// The trace context submitted jobs get: that of the call's server span (the current span) when
/// traces are exported, else the caller's from the request metadata (so a worker still
/// continues the submitter's trace), else none.
pub(crate) fn job_trace(meta: &MetadataMap) -> Option<Arc<TraceContext>> {
    // A span that is not disabled may still have no OpenTelemetry context (another layer
    // enabled it): then the caller's is kept.
    let call = Span::current();
    let exported = (!call.is_disabled())
        .then(|| call.context())
        .filter(|cx| cx.span().span_context().is_valid());
    let cx =
        exported.unwrap_or_else(|| TraceContextPropagator::new().extract(&MetadataExtractor(meta)));
    spans::trace_context(cx.span().span_context()).map(Arc::new)
}

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// One call's span; it ends when this is dropped, once told the call's status.
pub(crate) struct TracedCall {
    span: Span,
}

impl CallEnd for TracedCall {
    fn end(self, code: Code) {
        if self.span.is_disabled() {
            return;
        }
        self.span.record("rpc.grpc.status_code", code as i32);
        if code != Code::Ok {
            self.span.record("otel.status_code", "ERROR");
            self.span
                .record("otel.status_description", code.description());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            split_path("/jobplane.v1.JobService/SubmitJob"),
            ("jobplane.v1.JobService", "SubmitJob")
        );
        assert_eq!(split_path("/x"), ("unknown", "unknown"));
        assert_eq!(split_path("/a/b/c"), ("unknown", "unknown"));
        assert_eq!(split_path(""), ("unknown", "unknown"));
    }

    #[test]
    fn extracts_w3c_context_from_metadata() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
    }
}
