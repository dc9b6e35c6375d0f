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
        allow_non_loopback: args.allow_insecure_non_loopback,
        engine: jobplane_server::EngineConfig {
            retention: args.retention,
            ..Default::default()
        },
    };
    jobplane_server::serve(config, shutdown_signal()).await?;
    Ok(Outcome::Success)
}
