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
    /// Inspects and configures capacity pools.
    Pools {
        #[command(subcommand)]
        command: admin::PoolsCommand,
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
        Command::Pools { command } => admin::pools(command).await,
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

/// Parses `UNIT=N` (a pool unit and a whole amount).
pub fn parse_unit_amount(s: &str) -> Result<(String, u64), String> {
    let (unit, n) = s
        .split_once('=')
        .ok_or_else(|| format!("expected UNIT=N, got `{s}`"))?;
    let unit = unit.trim();
    if unit.is_empty() {
        return Err(format!("expected UNIT=N, got `{s}`: the unit is missing"));
    }
    let n = n
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("expected UNIT=N, got `{s}`: `{n}` is not a whole number"))?;
    Ok((unit.to_owned(), n))
}

/// Parses a number of CPU cores (`2`, `0.5`).
pub fn parse_cpu(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(c) if c.is_finite() && c >= 0.0 => Ok(c),
        _ => Err(format!(
            "expected a number of cores such as 2 or 0.5, got `{s}`"
        )),
    }
}

/// Parses a size in bytes: `1024`, `512Mi`, `2G`, `1.5GiB`. `K M G T P E` are powers of 1000,
/// `Ki Mi Gi Ti Pi Ei` powers of 1024 (as Kubernetes spells them); a trailing `B` is allowed
/// and case does not matter. A fractional size is rounded up to a whole byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("invalid size `{s}`: {why} (e.g. 1024, 512Mi, 2G)");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("a number must come first"));
    }
    let suffix = suffix.trim().to_ascii_lowercase();
    let suffix = suffix.strip_suffix('b').unwrap_or(&suffix);
    let (power, binary) = match suffix.strip_suffix('i') {
        Some(p) if !p.is_empty() => (p, true),
        Some(_) => return Err(bad("unknown unit")),
        None => (suffix, false),
    };
    let exp = match power {
        "" if !binary => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        "e" => 6,
        _ => return Err(bad("unknown unit")),
    };
    let base: u64 = if binary { 1024 } else { 1000 };
    let mult = base.pow(exp);
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| bad("too large"));
    }
    let n: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let bytes = (n * mult as f64).ceil();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    // Finite, non-negative and below u64::MAX: the cast is exact enough.
    Ok(bytes as u64)
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
            &["pools", "ls"],
            &["pools", "get", "gpt-4o", "--output", "json"],
            &["pools", "rm", "gpt-4o"],
            &[
                "pools",
                "set",
                "gpt-4o",
                "--max-units",
                "requests=2",
                "--rate",
                "tokens=90000/1m",
            ],
            &[
                "submit",
                "q",
                "--pool",
                "gpt-4o:tokens=1200@5s",
                "--pool",
                "gpt-4o-mini@0s",
                "--cpu",
                "2",
                "--memory",
                "2G",
                "--selector",
                "k=v",
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
        assert_eq!(
            parse_unit_amount("tokens=1200").unwrap(),
            ("tokens".into(), 1200)
        );
        for bad in ["tokens", "=3", "tokens=", "tokens=-1", "tokens=1.5"] {
            assert!(parse_unit_amount(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpu("0.5").unwrap(), 0.5);
        assert_eq!(parse_cpu("2").unwrap(), 2.0);
        for bad in ["-1", "NaN", "inf", "two", ""] {
            assert!(parse_cpu(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_parse() {
        for (s, n) in [
            ("1024", 1024),
            ("0", 0),
            ("1024B", 1024),
            ("512Mi", 512 << 20),
            ("512MiB", 512 << 20),
            ("512mi", 512 << 20),
            ("2G", 2_000_000_000),
            ("2GB", 2_000_000_000),
            ("1Ki", 1024),
            ("1k", 1000),
            ("1.5Gi", 3 << 29),
            ("0.5K", 500),
            ("1.0001K", 1001),
            ("3Ti", 3 << 40),
            ("1Ei", 1 << 60),
            (" 7 Mi ", 7 << 20),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in [
            "",
            "Mi",
            "12X",
            "1i",
            "1.2.3G",
            "-1",
            "16Ei",
            "1e3",
            "99999999999999999999",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
    }
}
