//! OpenTelemetry trace export, configured by the standard `OTEL_*` environment variables: the
//! Rust SDK's [`jobplane::telemetry`] (feature `otlp`, the only module that knows the OTLP
//! exporter), set up by the binary with the service's default name. Re-exported here so the
//! service's modules name it in one place.

pub use jobplane::telemetry::{export_configured, json_logs, Telemetry, EXPORT_TARGET};

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "jobplane";
