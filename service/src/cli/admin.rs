//! Admin commands: `queues ls|set`, `pools ls|get|set|rm`, `workers ls|drain`.

use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use jobplane::{PoolConfig, QueueConfig, RateLimit};
use serde_json::{json, Value};

use super::render::{self, print_json, print_text};
use super::{
    parse_duration, parse_unit_amount, CliError, ConnArgs, Outcome, OutputArgs, OutputFormat,
};

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
    /// Refuse at submit (`true`) a job whose --cpu/--memory/--selector no connected worker of the
    /// queue could ever satisfy, instead of letting it wait (`false`, the default).
    #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
    pub reject_unplaceable: Option<bool>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `jobplane pools …`.
#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// Lists capacity pools with their limits and units in use.
    Ls(PoolsLsArgs),
    /// Prints a pool: limits, units in use, tokens, waiting jobs, cooldown.
    Get(PoolArgs),
    /// Creates a pool or replaces its limits: the limits given are all the pool has.
    #[command(group(ArgGroup::new("limits").required(true).multiple(true).args(["max_units", "rates"])))]
    Set(PoolsSetArgs),
    /// Deletes a pool (refused while jobs hold or wait for it).
    Rm(PoolArgs),
}

/// Arguments of `jobplane pools ls`.
#[derive(Debug, Args)]
pub struct PoolsLsArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `jobplane pools get` and `jobplane pools rm`.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Pool name.
    pub name: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `jobplane pools set`.
#[derive(Debug, Args)]
pub struct PoolsSetArgs {
    /// Pool name.
    pub name: String,
    /// Most units of UNIT held at once by running jobs, e.g. `requests=2` (repeatable).
    #[arg(long = "max-units", value_name = "UNIT=N", value_parser = parse_unit_amount)]
    pub max_units: Vec<(String, u64)>,
    /// Rate limit: N units of UNIT per DURATION, at most B at once (default N), e.g.
    /// `tokens=90000/1m` or `requests=10/1s:burst=20` (repeatable).
    #[arg(long = "rate", value_name = "UNIT=N/DURATION[:burst=B]", value_parser = parse_rate)]
    pub rates: Vec<RateLimit>,
    /// Share the pool with every namespace that has no pool of this name of its own (a pool of
    /// the default namespace only); contending namespaces get capacity by weight.
    #[arg(long)]
    pub shared: bool,
    /// A namespace's weight in a shared pool, e.g. `team-a=3` (repeatable; unlisted: 1).
    #[arg(long = "weight", value_name = "NAMESPACE=W", value_parser = parse_weight, requires = "shared")]
    pub weights: Vec<(String, u32)>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Parses `UNIT=N/DURATION[:burst=B]`; a bare unit of time counts one of it (`10/s` = `10/1s`).
pub fn parse_rate(s: &str) -> Result<RateLimit, String> {
    let usage = "expected UNIT=N/DURATION[:burst=B], e.g. tokens=90000/1m";
    let (rate, burst) = match s.split_once(':') {
        Some((rate, opt)) => {
            let b = opt
                .trim()
                .strip_prefix("burst=")
                .ok_or_else(|| format!("{usage}; got `{s}`: unknown option `{opt}`"))?;
            let b = b
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{usage}; got `{s}`: burst `{b}` is not a whole number"))?;
            (rate, Some(b))
        }
        None => (s, None),
    };
    let (amount, per) = rate
        .split_once('/')
        .ok_or_else(|| format!("{usage}; got `{s}`: `/DURATION` is missing"))?;
    let (unit, amount) = parse_unit_amount(amount).map_err(|e| format!("{usage}; {e}"))?;
    let per = per.trim();
    let per = if per.starts_with(|c: char| c.is_ascii_alphabetic()) {
        parse_duration(&format!("1{per}"))
    } else {
        parse_duration(per)
    }
    .map_err(|e| format!("{usage}; {e}"))?;
    let mut rate = RateLimit::new(unit, amount, per);
    if let Some(b) = burst {
        rate = rate.burst(b);
    }
    Ok(rate)
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
    if let Some(r) = args.reject_unplaceable {
        config.reject_unplaceable = r;
    }
    config
}

/// `jobplane pools …`.
pub async fn pools(command: PoolsCommand) -> Result<Outcome, CliError> {
    match command {
        PoolsCommand::Ls(args) => {
            let client = args.conn.connect().await?;
            let pools = client.list_pools().await?;
            match args.out.output {
                OutputFormat::Json => print_json(&Value::Array(
                    pools.iter().map(render::pool_value).collect(),
                )),
                OutputFormat::Table => print_text(&render::pools_table(&pools)),
            }
        }
        PoolsCommand::Get(args) => {
            let client = args.conn.connect().await?;
            let pool = client.get_pool(&args.name).await?;
            match args.out.output {
                OutputFormat::Json => print_json(&render::pool_value(&pool)),
                OutputFormat::Table => print_text(&render::pool_table(&pool)),
            }
        }
        PoolsCommand::Set(args) => {
            let client = args.conn.connect().await?;
            let pool = client
                .configure_pool(&args.name, pool_config(&args))
                .await?;
            match args.out.output {
                OutputFormat::Json => print_json(&render::pool_value(&pool)),
                OutputFormat::Table => print_text(&render::pool_table(&pool)),
            }
        }
        PoolsCommand::Rm(args) => {
            let client = args.conn.connect().await?;
            client.delete_pool(&args.name).await?;
            match args.out.output {
                OutputFormat::Json => print_json(&json!({
                    "namespace": client.namespace(),
                    "name": args.name,
                    "deleted": true,
                })),
                OutputFormat::Table => print_text(&format!("deleted pool {}\n", args.name)),
            }
        }
    }
    Ok(Outcome::Success)
}

/// The settings `pools set` gives a pool: exactly the limits on the command line.
fn pool_config(args: &PoolsSetArgs) -> PoolConfig {
    let mut config = PoolConfig::new();
    for (unit, n) in &args.max_units {
        config = config.max_units(unit.clone(), *n);
    }
    for rate in &args.rates {
        config = config.rate(rate.clone());
    }
    config = config.shared(args.shared);
    for (ns, w) in &args.weights {
        config = config.weight(ns.clone(), *w);
    }
    config
}

/// Parses `NAMESPACE=W` with W a whole number of at least 1.
fn parse_weight(s: &str) -> Result<(String, u32), String> {
    let usage = "expected NAMESPACE=W, e.g. team-a=3";
    let (ns, w) = s
        .split_once('=')
        .ok_or_else(|| format!("{usage}; got `{s}`"))?;
    let ns = ns.trim();
    if ns.is_empty() {
        return Err(format!("{usage}; got `{s}`: the namespace is missing"));
    }
    match w.trim().parse::<u32>() {
        Ok(w) if w >= 1 => Ok((ns.to_owned(), w)),
        _ => Err(format!(
            "{usage}; got `{s}`: `{w}` is not a whole number of at least 1"
        )),
    }
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
            reject_unplaceable: false,
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
            current.clone(),
            &set_args(&["--reject-unplaceable", "true"]),
        );
        assert_eq!(
            config,
            QueueConfig {
                reject_unplaceable: true,
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

    #[test]
    fn rates_parse() {
        let minute = Duration::from_secs(60);
        assert_eq!(
            parse_rate("tokens=90000/1m").unwrap(),
            RateLimit::new("tokens", 90_000, minute)
        );
        assert_eq!(
            parse_rate("requests=10/1s:burst=20").unwrap(),
            RateLimit::new("requests", 10, Duration::from_secs(1)).burst(20)
        );
        assert_eq!(
            parse_rate("requests=10/s").unwrap(),
            RateLimit::new("requests", 10, Duration::from_secs(1))
        );
        assert_eq!(
            parse_rate("tokens=5/100ms").unwrap(),
            RateLimit::new("tokens", 5, Duration::from_millis(100))
        );
        for bad in [
            "tokens=90000",
            "tokens/1m",
            "=5/1m",
            "tokens=x/1m",
            "tokens=5/soon",
            "tokens=5/1m:burst=",
            "tokens=5/1m:bursty=3",
            "tokens=5/1m:burst=-1",
        ] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("UNIT=N/DURATION"), "{bad}: {e}");
        }
    }

    fn pools_set_args(flags: &[&str]) -> Result<PoolsSetArgs, clap::Error> {
        let cli = crate::cli::Cli::try_parse_from(
            ["jobplane", "pools", "set", "gpt-4o"]
                .into_iter()
                .chain(flags.iter().copied()),
        )?;
        match cli.command {
            crate::cli::Command::Pools {
                command: PoolsCommand::Set(args),
            } => Ok(args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pools_set_takes_exactly_the_limits_given() {
        let args = pools_set_args(&[
            "--max-units",
            "requests=2",
            "--rate",
            "tokens=90000/1m",
            "--max-units",
            "tokens=50000",
        ])
        .unwrap();
        let config = pool_config(&args);
        assert_eq!(
            config,
            PoolConfig::new()
                .max_units("requests", 2)
                .max_units("tokens", 50_000)
                .rate(RateLimit::new("tokens", 90_000, Duration::from_secs(60)))
        );
        // Without any limit there is nothing to set: a usage error.
        let e = pools_set_args(&[]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        // Bad values are usage errors that name the flag.
        let e = pools_set_args(&["--rate", "tokens=1/x"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--rate"), "{e}");
        let e = pools_set_args(&["--max-units", "requests"]).unwrap_err();
        assert!(e.to_string().contains("--max-units"), "{e}");
    }
}
