//! OpenTelemetry trace export, configured by the standard `OTEL_*` environment variables: the
//! Rust SDK's [`jobplane::telemetry`] (feature `otlp`, the only module that knows the OTLP
//! exporter), set up by the binary with the service's default name. Re-exported here so the
//! service's modules name it in one place.

pub use jobplane::telemetry::{export_configured, json_logs, Telemetry, EXPORT_TARGET};

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "jobplane";

/// Target of the one log line per committed job state change: logs, not trace data.
pub const JOB_LOG_TARGET: &str = "jobplane::job";

/// What the export layer takes: spans and events at INFO and above, except the job state change
/// log lines (at thousands of jobs a second they would only cost).
pub fn export_filter<S>() -> impl tracing_subscriber::layer::Filter<S> {
    use tracing_subscriber::filter::{filter_fn, FilterExt as _, LevelFilter};
    LevelFilter::INFO.and(filter_fn(|meta| meta.target() != JOB_LOG_TARGET))
}
