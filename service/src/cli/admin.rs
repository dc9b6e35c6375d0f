//! Admin commands: `queues ls`, `queues set`, `workers ls`, `workers drain`.

use std::time::Duration;

use clap::{Args, Subcommand};
use jobplane::QueueConfig;
use serde_json::Value;

use super::render::{self, print_json, print_text};
use super::{parse_duration, CliError, ConnArgs, Outcome, OutputArgs, OutputFormat};

/// `jobplane queues …`.
#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Lists queues with their depth and settings.
    Ls(QueuesLsArgs),
    /// Changes a queue's settings (those not given keep their current value).
    Set(QueuesSetArgs),
}

/// Arguments of `jobplane queues ls`.
#[derive(Debug, Args)]
pub struct QueuesLsArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `jobplane queues set`.
#[derive(Debug, Args)]
pub struct QueuesSetArgs {
    /// Queue name.
    pub name: String,
    /// Max attempts running at once across all workers (0 = unlimited).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Default run timeout of an attempt (`0s` = none).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Default max wait for dispatch (`0s` = none).
    #[arg(long, value_parser = parse_duration)]
    pub max_wait: Option<Duration>,
    /// Default number of retries.
    #[arg(long)]
    pub retries: Option<u32>,
    /// Max queued jobs (0 = unlimited).
    #[arg(long)]
    pub max_depth: Option<u64>,
    /// Pause (`true`) or resume (`false`) dispatching.
    #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
    pub paused: Option<bool>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `jobplane workers …`.
#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// Lists workers.
    Ls(WorkersLsArgs),
    /// Drains a worker: no new assignments, in-flight work finishes.
    Drain(DrainArgs),
}

/// Arguments of `jobplane workers ls`.
#[derive(Debug, Args)]
pub struct WorkersLsArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `jobplane workers drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Worker id.
    pub id: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `jobplane queues …`.
pub async fn queues(command: QueuesCommand) -> Result<Outcome, CliError> {
    match command {
        QueuesCommand::Ls(args) => {
            let client = args.conn.connect().await?;
            let queues = client.list_queues().await?;
            match args.out.output {
                OutputFormat::Json => print_json(&Value::Array(
                    queues.iter().map(render::queue_value).collect(),
                )),
                OutputFormat::Table => print_text(&render::queues_table(&queues)),
            }
        }
        QueuesCommand::Set(args) => {
            let client = args.conn.connect().await?;
            // The service replaces a queue's settings whole: start from the current ones.
            let current = client
                .list_queues()
                .await?
                .into_iter()
                .find(|q| q.name == args.name)
                .map(|q| q.config)
                .unwrap_or_default();
            let config = apply(current, &args);
            let queue = client.configure_queue(&args.name, config).await?;
            match args.out.output {
                OutputFormat::Json => print_json(&render::queue_value(&queue)),
                OutputFormat::Table => print_text(&render::queues_table(&[queue])),
            }
        }
    }
    Ok(Outcome::Success)
}

/// Overlays the flags given on a queue's settings.
fn apply(mut config: QueueConfig, args: &QueuesSetArgs) -> QueueConfig {
    let non_zero_duration = |d: Duration| (!d.is_zero()).then_some(d);
    if let Some(slots) = args.slots {
        config.max_concurrency = (slots != 0).then_some(slots);
    }
    if let Some(t) = args.timeout {
        config.default_run_timeout = non_zero_duration(t);
    }
    if let Some(w) = args.max_wait {
        config.default_max_wait = non_zero_duration(w);
    }
    if let Some(r) = args.retries {
        let mut policy = config.default_retry_policy.unwrap_or_default();
        policy.max_retries = r;
        config.default_retry_policy = Some(policy);
    }
    if let Some(d) = args.max_depth {
        config.max_depth = (d != 0).then_some(d);
    }
    if let Some(p) = args.paused {
        config.paused = p;
    }
    config
}

/// `jobplane workers …`.
pub async fn workers(command: WorkersCommand) -> Result<Outcome, CliError> {
    match command {
        WorkersCommand::Ls(args) => {
            let client = args.conn.connect().await?;
            let workers = client.list_workers().await?;
            match args.out.output {
                OutputFormat::Json => print_json(&Value::Array(
                    workers.iter().map(render::worker_value).collect(),
                )),
                OutputFormat::Table => print_text(&render::workers_table(&workers)),
            }
        }
        WorkersCommand::Drain(args) => {
            let client = args.conn.connect().await?;
            let worker = client.drain_worker(&args.id).await?;
            match args.out.output {
                OutputFormat::Json => print_json(&render::worker_value(&worker)),
                OutputFormat::Table => print_text(&render::worker_table(&worker)),
            }
        }
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use jobplane::RetryPolicy;

    fn set_args(flags: &[&str]) -> QueuesSetArgs {
        let cli = crate::cli::Cli::try_parse_from(
            ["jobplane", "queues", "set", "q"]
                .into_iter()
                .chain(flags.iter().copied()),
        )
        .unwrap();
        match cli.command {
            crate::cli::Command::Queues {
                command: QueuesCommand::Set(args),
            } => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_keeps_what_is_not_given() {
        let current = QueueConfig {
            max_concurrency: Some(4),
            default_run_timeout: Some(Duration::from_secs(60)),
            default_retry_policy: Some(RetryPolicy::new(2).multiplier(3.0)),
            max_depth: Some(100),
            paused: false,
            default_max_wait: None,
        };
        let config = apply(current.clone(), &set_args(&["--paused", "true"]));
        assert_eq!(
            config,
            QueueConfig {
                paused: true,
                ..current.clone()
            }
        );
        let config = apply(
            current,
            &set_args(&[
                "--slots",
                "0",
                "--retries",
                "5",
                "--timeout",
                "0s",
                "--max-depth",
                "0",
            ]),
        );
        assert_eq!(config.max_concurrency, None);
        assert_eq!(config.default_run_timeout, None);
        assert_eq!(config.max_depth, None);
        let policy = config.default_retry_policy.unwrap();
        assert_eq!((policy.max_retries, policy.multiplier), (5, Some(3.0)));
    }
}
