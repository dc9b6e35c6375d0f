//! Trace context: how the SDK's calls join a distributed trace.
//!
//! Every call the [`Client`](crate::Client) makes runs in a client span (target [`RPC_TARGET`])
//! and carries W3C `traceparent`/`tracestate` gRPC metadata, so the service's spans continue the
//! caller's trace. Which context a call continues, first match wins:
//!
//! 1. the [`JobSpec`](crate::JobSpec)'s own `traceparent`/`tracestate` (submits only);
//! 2. the [`TraceContext`] of the current task, set with [`TraceContext::scope`] — for callers
//!    that have no `tracing` spans of their own, such as language bindings;
//! 3. the current `tracing` span.
//!
//! With an OpenTelemetry layer (`tracing-opentelemetry`) in the subscriber, the client span is a
//! child of that context and the metadata names the client span. Without one there is no client
//! span to name: an explicit or scoped context is sent unchanged.

use std::future::Future;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Target of the SDK's RPC client spans (`jobplane.v1.JobService/SubmitJob`, …), so that a
/// subscriber can filter them, e.g. keep them out of logs and only export them.
pub const RPC_TARGET: &str = "jobplane::rpc";

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

tokio::task_local! {
    static SCOPED: TraceContext;
}

/// A W3C trace context: the `traceparent` and `tracestate` headers of one span.
///
/// Used to make the calls of a future continue a given trace when the caller has no `tracing`
/// span to carry it (a language binding, a message read from a queue):
///
/// ```no_run
/// # async fn demo(client: jobplane::Client) -> Result<(), jobplane::Error> {
/// use jobplane::trace::TraceContext;
/// use jobplane::JobSpec;
///
/// let incoming = TraceContext::new("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
///     .with_tracestate("vendor=opaque");
/// // Every call made inside the future continues that trace: its client span is a child of
/// // `incoming` (or, without an OpenTelemetry layer, `incoming` itself is sent).
/// let submitted = incoming
///     .scope(async { client.submit(JobSpec::new("thumbnails")).await })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
    pub traceparent: String,
    /// `tracestate`: vendor entries travelling with the trace, if any.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// A context with `traceparent` and no `tracestate`.
    pub fn new(traceparent: impl Into<String>) -> Self {
        TraceContext {
            traceparent: traceparent.into(),
            tracestate: None,
        }
    }

    /// Sets the `tracestate` (an empty one counts as none).
    pub fn with_tracestate(mut self, tracestate: impl Into<String>) -> Self {
        let tracestate = tracestate.into();
        self.tracestate = (!tracestate.is_empty()).then_some(tracestate);
        self
    }

    /// Whether `traceparent` is a well-formed W3C `traceparent` of a valid (non-zero) span.
    pub fn is_valid(&self) -> bool {
        self.to_otel().span().span_context().is_valid()
    }

    /// Runs `fut` with this context as the trace context of every SDK call made inside it
    /// (polled as part of it; a task spawned from it does not inherit it). An explicit
    /// [`JobSpec::traceparent`](crate::JobSpec::traceparent) still wins for its submit; a nested
    /// scope wins over this one.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        SCOPED.scope(self, fut)
    }

    /// Like [`TraceContext::scope`], for synchronous code (e.g. creating a
    /// [`Client::watch`](crate::Client::watch) stream, which captures the context when called).
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        SCOPED.sync_scope(self, f)
    }

    /// The context set by the innermost [`TraceContext::scope`] around the caller, if any.
    pub fn scoped() -> Option<TraceContext> {
        SCOPED.try_with(Clone::clone).ok()
    }

    /// The OpenTelemetry context of a `tracing` span in W3C form; `None` when the span has none
    /// (no OpenTelemetry layer in the subscriber, or the span is disabled).
    pub fn of_span(span: &Span) -> Option<TraceContext> {
        TraceContext::from_otel(&span.context())
    }

    /// The W3C form of an OpenTelemetry context, if it holds a valid span context.
    pub(crate) fn from_otel(cx: &opentelemetry::Context) -> Option<TraceContext> {
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = Carrier::default();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        Some(TraceContext {
            traceparent: carrier.traceparent?,
            tracestate: carrier.tracestate.filter(|s| !s.is_empty()),
        })
    }

    /// The OpenTelemetry context this names: a remote span context, or an empty context if the
    /// `traceparent` is malformed.
    pub(crate) fn to_otel(&self) -> opentelemetry::Context {
        TraceContextPropagator::new().extract(&Headers(self))
    }

    /// Context from a pair of possibly empty strings (as they travel in protobuf messages).
    pub(crate) fn from_parts(traceparent: &str, tracestate: &str) -> Option<TraceContext> {
        (!traceparent.is_empty())
            .then(|| TraceContext::new(traceparent).with_tracestate(tracestate))
    }
}

/// Reads a [`TraceContext`] as propagation headers.
struct Headers<'a>(&'a TraceContext);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.0.traceparent),
            TRACESTATE => self.0.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        if self.0.tracestate.is_some() {
            vec![TRACEPARENT, TRACESTATE]
        } else {
            vec![TRACEPARENT]
        }
    }
}

/// Receives injected propagation headers.
#[derive(Default)]
struct Carrier {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn w3c_round_trip() {
        let tc = TraceContext::new(TP).with_tracestate("k=v");
        assert!(tc.is_valid());
        let cx = tc.to_otel();
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert_eq!(TraceContext::from_otel(&cx), Some(tc));
        assert_eq!(
            TraceContext::new(TP).with_tracestate(""),
            TraceContext::new(TP)
        );
    }

    #[test]
    fn malformed_contexts_are_invalid() {
        for tp in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert!(!TraceContext::new(tp).is_valid(), "{tp}");
            assert_eq!(
                TraceContext::from_otel(&TraceContext::new(tp).to_otel()),
                None
            );
        }
        assert_eq!(TraceContext::from_parts("", "k=v"), None);
        assert_eq!(
            TraceContext::from_parts(TP, ""),
            Some(TraceContext::new(TP))
        );
    }

    #[tokio::test]
    async fn scopes_nest_and_end() {
        assert_eq!(TraceContext::scoped(), None);
        let outer = TraceContext::new(TP);
        let inner = TraceContext::new("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-00");
        let seen = outer
            .clone()
            .scope(async {
                let before = TraceContext::scoped();
                let nested = inner.clone().scope(async { TraceContext::scoped() }).await;
                (before, nested, TraceContext::scoped())
            })
            .await;
        assert_eq!(
            seen,
            (Some(outer.clone()), Some(inner), Some(outer.clone()))
        );
        assert_eq!(TraceContext::scoped(), None);
        assert_eq!(outer.clone().sync_scope(TraceContext::scoped), Some(outer));
    }

    #[test]
    fn spans_without_an_opentelemetry_layer_have_no_context() {
        assert_eq!(TraceContext::of_span(&Span::none()), None);
        assert_eq!(TraceContext::of_span(&tracing::info_span!("x")), None);
    }
}

/// A subscriber with an OpenTelemetry layer whose finished spans the tests can read.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::Value;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Spans exported so far (a span is exported when it closes).
    #[derive(Clone, Debug, Default)]
    pub(crate) struct Finished(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Finished {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    impl Finished {
        /// The finished spans named `name`.
        pub(crate) fn named(&self, name: &str) -> Vec<SpanData> {
            let spans = self.0.lock().unwrap().clone();
            spans.into_iter().filter(|s| s.name == name).collect()
        }

        /// The finished span named `name`; panics unless there is exactly one.
        pub(crate) fn one(&self, name: &str) -> SpanData {
            let mut found = self.named(name);
            assert_eq!(found.len(), 1, "spans named {name}");
            found.remove(0)
        }
    }

    /// A span's attribute.
    pub(crate) fn attr(span: &SpanData, key: &str) -> Option<Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    }

    /// Sets, for the current thread until the guard drops, a subscriber whose OpenTelemetry
    /// layer exports every span synchronously to the returned [`Finished`]; with
    /// `rpc_spans: false` the layer leaves out the SDK's RPC spans.
    pub(crate) fn install(rpc_spans: bool) -> (tracing::subscriber::DefaultGuard, Finished) {
        use tracing_subscriber::Layer as _;
        let finished = Finished::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(finished.clone())
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
                rpc_spans || meta.target() != super::RPC_TARGET
            }));
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        (guard, finished)
    }
}
