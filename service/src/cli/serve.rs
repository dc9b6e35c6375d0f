//! `jobplane serve`.

use std::net::SocketAddr;

use clap::Args;

use super::{shutdown_signal, CliError, Outcome};

/// Arguments of `jobplane serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "JOBPLANE_LISTEN", default_value = "127.0.0.1:7741")]
    pub listen: SocketAddr,
    /// Database URL.
    #[arg(long, env = "JOBPLANE_DB", default_value = "sqlite://jobplane.db")]
    pub db: String,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`), or `off`. Default
    /// 127.0.0.1:9741; if that port is taken the service runs without metrics (with a warning),
    /// while an address given here must be bound.
    #[arg(long, env = "JOBPLANE_METRICS_LISTEN", value_name = "ADDR|off", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<MetricsAddr>,
    /// Where other instances on the same PostgreSQL database reach this one (HOST:PORT), if not
    /// at the listening address (e.g. when listening on 0.0.0.0).
    #[arg(long, env = "JOBPLANE_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Listen on a non-loopback address although authentication is off.
    #[arg(long)]
    pub allow_insecure_non_loopback: bool,
    /// How long terminal jobs and their events are kept (e.g. `7d`, `12h`).
    #[arg(long, env = "JOBPLANE_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: std::time::Duration,
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> Result<Outcome, CliError> {
    let config = jobplane_server::ServeConfig {
        listen: args.listen,
        db_url: args.db,
        advertise: args.advertise,
        allow_non_loopback: args.allow_insecure_non_loopback,
        metrics: match args.metrics_listen {
            None => Some(jobplane_server::MetricsListen {
                addr: jobplane_server::metrics::DEFAULT_LISTEN,
                required: false,
            }),
            Some(MetricsAddr::Off) => None,
            Some(MetricsAddr::At(addr)) => Some(jobplane_server::MetricsListen {
                addr,
                required: true,
            }),
        },
        engine: jobplane_server::EngineConfig {
            retention: args.retention,
            job_spans: jobplane_server::telemetry::export_configured(|name| {
                std::env::var(name).ok()
            }),
            ..Default::default()
        },
    };
    jobplane_server::serve(config, shutdown_signal()).await?;
    Ok(Outcome::Success)
}

/// `--metrics-listen`: an address or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    /// No metrics endpoint.
    Off,
    /// Serve it here.
    At(SocketAddr),
}

fn parse_metrics_listen(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::At)
        .map_err(|e| format!("{e}: expected HOST:PORT (e.g. 127.0.0.1:9741) or `off`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metrics_listen() {
        assert_eq!(parse_metrics_listen("off"), Ok(MetricsAddr::Off));
        assert_eq!(
            parse_metrics_listen("127.0.0.1:0"),
            Ok(MetricsAddr::At(SocketAddr::from(([127, 0, 0, 1], 0))))
        );
        assert!(parse_metrics_listen("localhost").is_err());
    }
}
