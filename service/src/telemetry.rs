//! OpenTelemetry trace export, configured by the standard `OTEL_*` environment variables. The
//! only module that knows the OpenTelemetry SDK and the OTLP exporter.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (and `OTEL_SDK_DISABLED` is not `true`); otherwise there is no OpenTelemetry layer at all, so
//! spans meant only for export (the RPC spans) are disabled at their call sites and cost nothing.
//! The SDK itself reads the rest: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (the resource;
//! the service name defaults to `jobplane` here rather than `unknown_service`),
//! `OTEL_TRACES_SAMPLER[_ARG]` (the sampler, parent-based always-on by default), `OTEL_BSP_*` (the
//! batch span processor) and `OTEL_EXPORTER_OTLP_[TRACES_]{TIMEOUT,HEADERS,COMPRESSION}`.
//!
//! Spans are exported in batches from the batch processor's own thread, so a request never waits
//! for the collector; [`Telemetry::shutdown`] flushes what is left.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Key;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "jobplane";

/// Target of the spans made for export only (one per RPC); log output leaves them out.
pub const EXPORT_TARGET: &str = "jobplane::rpc";

/// Whether the standard variables ask for trace export, read through `var`.
pub fn export_configured(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The tracer provider while export is on.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// If the environment asks for export, builds the OTLP/gRPC exporter and its batch
    /// processor and returns the `tracing` layer that feeds it. Must be called inside a tokio
    /// runtime (the exporter's channel is driven by it); that runtime must be multi-threaded or
    /// outlive [`Telemetry::shutdown`].
    #[allow(clippy::type_complexity)]
    pub fn from_env<S>() -> Result<Option<(Telemetry, impl Layer<S>)>, String>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if !export_configured(|name| std::env::var(name).ok()) {
            return Ok(None);
        }
        let exporter = SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build();
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let tracer = provider.tracer(DEFAULT_SERVICE_NAME);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false);
        Ok(Some((Telemetry { provider }, layer)))
    }

    /// Exports the spans still queued and stops the exporter. Blocking, so it runs on a
    /// blocking thread: the runtime stays free to drive the export.
    pub async fn shutdown(self) {
        let provider = self.provider;
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("jobplane: flushing traces: {e}"),
            Err(e) => eprintln!("jobplane: flushing traces: {e}"),
        }
    }
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, the SDK's own
/// attributes), named `jobplane` if the environment gives no service name.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build()
    }
}

#[cfg(test)]
mod tests {
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
}
