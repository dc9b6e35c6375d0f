//! The `jobplane` binary: parses the command line, sets up logging (and trace export when the
//! `OTEL_*` variables ask for it) and runs the command.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use jobplane_server::telemetry::{
    export_filter, json_logs, Telemetry, DEFAULT_SERVICE_NAME, EXPORT_TARGET,
};
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// mimalloc: the service allocates many small short-lived values (jobs, events, spans); glibc's
/// allocator spent a quarter of the CPU in malloc/free under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Multi-threaded: the trace exporter's flush at exit blocks a thread while the runtime drives it.
#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Spans made only for export never show in the logs.
    let not_export = filter_fn(|meta| meta.target() != EXPORT_TARGET);
    let logs = match cli.log_format {
        cli::LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter.and(not_export))
            .boxed(),
        // Each line inside a traced span carries its trace_id and span_id.
        cli::LogFormat::Json => json_logs(std::io::stderr)
            .with_filter(filter.and(not_export))
            .boxed(),
    };
    let (telemetry, export) = match Telemetry::from_env(DEFAULT_SERVICE_NAME) {
        Ok((t, layer)) => (Some(t), layer.map(|l| l.with_filter(export_filter()))),
        Err(e) => {
            eprintln!("jobplane: trace export disabled: {e}");
            (None, None)
        }
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(export)
        .init();
    let code = cli::run(cli).await;
    if let Some(t) = telemetry {
        t.shutdown().await;
    }
    code
}
