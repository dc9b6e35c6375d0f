//! The `jobplane` command line: `serve`, the client commands (built on the Rust SDK) and
//! `worker`, which runs a command per job.

mod admin;
mod jobs;
mod render;
mod serve;
mod worker;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit code of a command that ran but did not succeed, and of errors.
const EXIT_FAILURE: u8 = 1;
/// Exit code of usage errors (as clap uses).
const EXIT_USAGE: u8 = 2;

/// jobplane: a job control plane.
#[derive(Debug, Parser)]
#[command(name = "jobplane", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on standard error (filter with RUST_LOG; default `info`).
    #[arg(long, global = true, value_enum, env = "JOBPLANE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the service.
    Serve(serve::ServeArgs),
    /// Submits a job and prints it.
    Submit(jobs::SubmitArgs),
    /// Prints a job.
    Get(jobs::GetArgs),
    /// Waits for jobs to finish; exits 0 only if every one SUCCEEDED.
    Wait(jobs::WaitArgs),
    /// Cancels a job.
    Cancel(jobs::CancelArgs),
    /// Follows a job's events live: progress, output, state changes.
    Watch(jobs::WatchArgs),
    /// Lists jobs.
    Jobs {
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Inspects and configures queues.
    Queues {
        #[command(subcommand)]
        command: admin::QueuesCommand,
    },
    /// Inspects and drains workers.
    Workers {
        #[command(subcommand)]
        command: admin::WorkersCommand,
    },
    /// Runs a worker that executes a command once per job.
    Worker(worker::WorkerArgs),
}

/// Where the service is.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Service address; several, separated by commas, to fail over between instances.
    #[arg(long, env = "JOBPLANE_ADDR", default_value = jobplane::DEFAULT_ADDR)]
    pub addr: String,
    /// Namespace.
    #[arg(long, env = "JOBPLANE_NAMESPACE", default_value = jobplane::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl ConnArgs {
    /// Connects to the service.
    pub async fn connect(&self) -> Result<jobplane::Client, CliError> {
        let client = jobplane::Client::connect(self.addr.clone()).await?;
        Ok(client.with_namespace(self.namespace.clone()))
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Output selection shared by the client commands.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments that clap could not catch (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// An SDK call failed.
    #[error(transparent)]
    Sdk(#[from] jobplane::Error),
    /// The service failed to start or stopped with an error.
    #[error(transparent)]
    Serve(#[from] jobplane_server::ServeError),
    /// A local I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }
}

/// What a command that ran says about its success (e.g. `wait` when a job failed).
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1 without an error message: the output says why.
    Unsuccessful,
}

/// Runs a parsed command line and returns the process's exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Submit(args) => jobs::submit(args).await,
        Command::Get(args) => jobs::get(args).await,
        Command::Wait(args) => jobs::wait(args).await,
        Command::Cancel(args) => jobs::cancel(args).await,
        Command::Watch(args) => jobs::watch(args).await,
        Command::Jobs { command } => jobs::jobs(command).await,
        Command::Queues { command } => admin::queues(command).await,
        Command::Workers { command } => admin::workers(command).await,
        Command::Worker(args) => worker::run(args).await,
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Unsuccessful) => ExitCode::from(EXIT_FAILURE),
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Parses a duration such as `5s`, `100ms`, `1m`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

/// Parses `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only SIGINT stops the process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("jobplane").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn parses_the_documented_surface() {
        let cli = parse(&[
            "submit",
            "emails",
            "--payload",
            r#"{"a":1}"#,
            "--priority",
            "5",
            "--idempotency-key",
            "k",
            "--timeout",
            "5s",
            "--max-wait",
            "100ms",
            "--retries",
            "3",
            "--label",
            "a=b",
            "--label",
            "c=d",
            "--output",
            "json",
            "--addr",
            "http://127.0.0.1:1",
            "--namespace",
            "t",
        ]);
        let Command::Submit(args) = cli.command else {
            panic!("submit")
        };
        assert_eq!(args.queue, "emails");
        assert_eq!(args.timeout, Some(Duration::from_secs(5)));
        assert_eq!(args.max_wait, Some(Duration::from_millis(100)));
        assert_eq!(args.labels.len(), 2);
        assert_eq!(args.out.output, OutputFormat::Json);
        assert_eq!(args.conn.namespace, "t");

        for line in [
            &["serve", "--listen", "127.0.0.1:0", "--db", "sqlite://x.db"][..],
            &["serve", "--allow-insecure-non-loopback"],
            &["get", "id"],
            &["wait", "a", "b", "--timeout", "1m"],
            &["cancel", "id", "--grace", "2s"],
            &["watch", "id", "--from-seq", "4", "--output", "json"],
            &[
                "jobs", "ls", "--queue", "q", "--state", "FAILED", "--limit", "5",
            ],
            &["queues", "ls"],
            &[
                "queues",
                "set",
                "q",
                "--slots",
                "2",
                "--timeout",
                "1m",
                "--max-wait",
                "5s",
                "--retries",
                "1",
                "--max-depth",
                "10",
                "--paused",
                "true",
            ],
            &["workers", "ls"],
            &["workers", "drain", "w1"],
            &[
                "worker",
                "q1",
                "q2",
                "--concurrency",
                "4",
                "--grace",
                "3s",
                "--",
                "sh",
                "-c",
                "echo hi",
            ],
        ] {
            parse(line);
        }
    }

    #[test]
    fn worker_takes_the_command_after_the_separator() {
        let cli = parse(&["worker", "q", "--", "python3", "-u", "job.py", "--flag"]);
        let Command::Worker(args) = cli.command else {
            panic!("worker")
        };
        assert_eq!(args.queues, ["q"]);
        assert_eq!(args.command, ["python3", "-u", "job.py", "--flag"]);
        assert_eq!(args.grace, Duration::from_secs(10));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for line in [
            &["submit", "q", "--timeout", "soon"][..],
            &["submit", "q", "--label", "novalue"],
            &["worker", "q"],
            &["queues", "set", "q", "--paused", "maybe"],
            &["jobs", "ls", "--state", "DONE"],
        ] {
            let err = Cli::try_parse_from(std::iter::once("jobplane").chain(line.iter().copied()))
                .unwrap_err();
            assert_eq!(err.exit_code(), 2, "{line:?}");
        }
    }

    #[test]
    fn helpers_parse() {
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_label("=x").is_err());
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
    }
}
