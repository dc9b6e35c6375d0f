//! OpenTelemetry trace export for programs built on the SDK (feature `otlp`), configured by the
//! standard `OTEL_*` environment variables — the same setup the `jobplane` service uses. The only
//! module that knows the OTLP exporter.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (and `OTEL_SDK_DISABLED` is not `true`); otherwise there is no OpenTelemetry layer at all, so
//! spans meant only for export (the RPC spans, target [`EXPORT_TARGET`]) cost nothing once a
//! program leaves them out of its logs. The OpenTelemetry SDK itself reads the rest:
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (the resource; the service name defaults
//! to the name the program passes rather than `unknown_service`), `OTEL_TRACES_SAMPLER[_ARG]`
//! (the sampler, parent-based always-on by default), `OTEL_BSP_*` (the batch span processor) and
//! `OTEL_EXPORTER_OTLP_[TRACES_]{TIMEOUT,HEADERS,COMPRESSION}`. Spans go over OTLP/gRPC.
//!
//! Spans are exported in batches from the batch processor's own thread, so a call never waits
//! for the collector; [`Telemetry::shutdown`] flushes what is left.
//!
//! ```no_run
//! # async fn demo() -> Result<(), jobplane::Error> {
//! use tracing_subscriber::layer::SubscriberExt as _;
//! use tracing_subscriber::util::SubscriberInitExt as _;
//!
//! // Inside the tokio runtime: the exporter runs on it.
//! let (telemetry, export) = jobplane::telemetry::Telemetry::from_env("thumbnailer")?;
//! tracing_subscriber::registry()
//!     .with(export)
//!     .with(tracing_subscriber::fmt::layer())
//!     .init();
//!
//! // ... run the client or the worker: their spans are exported ...
//!
//! telemetry.shutdown().await; // flush before exit
//! # Ok(()) }
//! ```

use std::sync::{Arc, OnceLock};

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::Key;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

use crate::error::{Error, Result};

/// Target of the spans made for export only (one per RPC, client and server side); logs
/// should leave them out.
pub const EXPORT_TARGET: &str = crate::trace::RPC_TARGET;

/// Whether the standard variables ask for trace export, read through `var`.
pub fn export_configured(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The tracer provider while export is on; nothing when it is off.
#[derive(Debug)]
#[must_use = "call `shutdown` before exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// If the environment asks for export, builds the OTLP/gRPC exporter and its batch
    /// processor, installs the provider as OpenTelemetry's global tracer provider and the W3C
    /// trace context propagator as the global propagator, and returns the `tracing` layer that
    /// feeds it; otherwise returns no layer and changes nothing. `default_service_name` is the
    /// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
    ///
    /// Must be called inside a tokio runtime (the exporter's channel is driven by it); that
    /// runtime must be multi-threaded or outlive [`Telemetry::shutdown`].
    pub fn from_env<S>(default_service_name: &str) -> Result<(Telemetry, Option<impl Layer<S>>)>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if !export_configured(|name| std::env::var(name).ok()) {
            return Ok((Telemetry { provider: None }, None));
        }
        let exporter = SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| Error::InvalidConfig(format!("OTLP exporter: {e}")))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource(default_service_name))
            .build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // For spans made with OpenTelemetry's API directly (`global::tracer`), e.g. with
        // explicit start times.
        opentelemetry::global::set_tracer_provider(provider.clone());
        let tracer = provider.tracer("jobplane");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false);
        Ok((
            Telemetry {
                provider: Some(provider),
            },
            Some(layer),
        ))
    }

    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter. Blocking, so it runs on a
    /// blocking thread: the runtime stays free to drive the export (on a current-thread runtime
    /// a flush from the runtime's own thread would never end).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("flushing traces: {e}"),
            Err(e) => eprintln!("flushing traces: {e}"),
        }
    }
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, the SDK's own
/// attributes), named `default_name` if the environment gives no service name.
fn resource(default_name: &str) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder()
            .with_service_name(default_name.to_owned())
            .build()
    }
}

/// A JSON log layer (`tracing_subscriber::fmt::layer().json()` writing to `make_writer`) whose
/// lines start with the OpenTelemetry `trace_id` and `span_id` of the event's span
/// (`{"trace_id":"…","span_id":"…","timestamp":…}`), so logs join traces.
///
/// The ids are those of the innermost span around the event that has an OpenTelemetry context,
/// including spans only exported and left out of the logs, such as the RPC spans. Events outside
/// any such span, and every event while export is off (no OpenTelemetry layer), have none.
///
/// ```no_run
/// use tracing_subscriber::layer::SubscriberExt as _;
/// use tracing_subscriber::util::SubscriberInitExt as _;
///
/// # async fn demo() -> Result<(), jobplane::Error> {
/// let (telemetry, export) = jobplane::telemetry::Telemetry::from_env("thumbnailer")?;
/// tracing_subscriber::registry()
///     .with(export)
///     .with(jobplane::telemetry::json_logs(std::io::stderr))
///     .init();
/// # Ok(()) }
/// ```
pub fn json_logs<S, W>(make_writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let dispatch = Arc::new(OnceLock::new());
    let format = WithTraceIds {
        inner: tracing_subscriber::fmt::format().json(),
        dispatch: dispatch.clone(),
    };
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(make_writer)
        .event_format(format);
    CaptureDispatch(dispatch).and_then(logs)
}

/// Keeps the dispatcher a layer is registered with: a formatter needs it to read the
/// OpenTelemetry context of spans, and cannot ask for the current one while an event is being
/// dispatched (`tracing` answers "none" to a nested lookup).
struct CaptureDispatch(Arc<OnceLock<WeakDispatch>>);

impl<S: Subscriber> Layer<S> for CaptureDispatch {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

/// A JSON event format with the ids of the event's trace first (see [`json_logs`]).
struct WithTraceIds<F> {
    inner: F,
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ids = self
            .dispatch
            .get()
            .and_then(WeakDispatch::upgrade)
            .and_then(|dispatch| trace_ids(ctx, &dispatch, event));
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                let comma = if rest.starts_with('}') { "" } else { "," };
                write!(
                    writer,
                    "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"{comma}{rest}"
                )
            }
            // Not a JSON object: left as it is.
            None => writer.write_str(&line),
        }
    }
}

/// The OpenTelemetry trace and span id of the innermost span around `event` that has a valid
/// OpenTelemetry context. Spans are looked up in the registry unfiltered, so a span left out of
/// the logs still counts.
fn trace_ids<S, N>(
    ctx: &FmtContext<'_, S, N>,
    dispatch: &Dispatch,
    event: &Event<'_>,
) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let mut id = match event.parent() {
        Some(id) => id.clone(),
        None if event.is_contextual() => dispatch.current_span().id()?.clone(),
        None => return None,
    };
    let registry = dispatch.downcast_ref::<Registry>();
    loop {
        // Must not hold a span's extensions here: the lookup locks them.
        if let Some(cx) = tracing_opentelemetry::get_otel_context(&id, dispatch) {
            let span = cx.span();
            let sc = span.span_context();
            if sc.is_valid() {
                return Some((sc.trace_id().to_string(), sc.span_id().to_string()));
            }
        }
        id = match registry {
            Some(registry) => registry.span(&id)?.parent()?.id(),
            // Another span store: the parents the log layer sees.
            None => ctx.span(&id)?.parent()?.id(),
        };
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn configured(vars: &[(&str, &str)]) -> bool {
        export_configured(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn export_needs_an_endpoint_and_no_disable() {
        assert!(!configured(&[]));
        assert!(!configured(&[("OTEL_SERVICE_NAME", "x")]));
        assert!(!configured(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]));
        assert!(configured(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4317"
        )]));
        assert!(configured(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:4317"
        )]));
        assert!(!configured(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]));
        assert!(configured(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "false"),
        ]));
    }

    /// Log lines written so far.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn json(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_id_of_their_span() {
        use tracing_subscriber::Layer as _;
        let lines = Lines::default();
        let writer = lines.clone();
        let provider = SdkTracerProvider::builder().build();
        let export = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        // Logs leave the export-only spans out, as the service's do.
        let logs = json_logs(move || writer.clone()).with_filter(
            tracing_subscriber::filter::filter_fn(|m| m.target() != EXPORT_TARGET),
        );
        let subscriber = tracing_subscriber::registry().with(export).with(logs);
        let (rpc, inner) = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let rpc = tracing::info_span!(target: EXPORT_TARGET, "rpc");
            // Not exported (the export layer takes INFO and up): its events take the ids of
            // the exported span around it.
            let debug = rpc.in_scope(|| tracing::debug_span!("detail"));
            let inner = rpc.in_scope(|| tracing::info_span!("inner"));
            rpc.in_scope(|| tracing::info!(answer = 42, "in an export-only span"));
            debug.in_scope(|| tracing::info!("in a span that is not exported"));
            inner.in_scope(|| tracing::info!("in a logged span"));
            let ids = |s: &tracing::Span| {
                let tc = crate::trace::TraceContext::of_span(s).unwrap();
                tc.to_otel().span().span_context().clone()
            };
            (ids(&rpc), ids(&inner))
        });
        let lines = lines.json();
        assert_eq!(lines.len(), 4, "{lines:?}");
        let ids = |l: &serde_json::Value| {
            (
                l.get("trace_id")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
                l.get("span_id").and_then(|v| v.as_str()).map(str::to_owned),
            )
        };
        assert_eq!(ids(&lines[0]), (None, None));
        assert_eq!(lines[0]["fields"]["message"], "outside");
        let rpc_ids = (
            Some(rpc.trace_id().to_string()),
            Some(rpc.span_id().to_string()),
        );
        assert_eq!(ids(&lines[1]), rpc_ids);
        assert_eq!(lines[1]["fields"]["answer"], 42);
        assert_eq!(lines[1]["level"], "INFO");
        assert_eq!(ids(&lines[2]), rpc_ids);
        assert_eq!(
            ids(&lines[3]),
            (
                Some(inner.trace_id().to_string()),
                Some(inner.span_id().to_string())
            )
        );
        assert_eq!(inner.trace_id(), rpc.trace_id());
        assert_eq!(lines[3]["span"]["name"], "inner");
    }
}
