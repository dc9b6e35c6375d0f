//! Job commands: `submit`, `get`, `wait`, `cancel`, `watch`, `jobs ls`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use jobplane::{
    EventKind, Job, JobSpec, JobState, ListFilter, OutputStream, PoolRequest, WaitMode,
};
use serde_json::Value;
use tokio::time::Instant;

use super::render::{self, print_json, print_text};
use super::{
    parse_cpu, parse_duration, parse_label, parse_size, parse_unit_amount, CliError, ConnArgs,
    Outcome, OutputArgs, OutputFormat,
};

/// Longest single wait call; longer waits are made of several calls (the service caps one at 1h).
const WAIT_CHUNK: Duration = Duration::from_secs(600);

/// Arguments of `jobplane submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Queue to submit to.
    pub queue: String,
    /// Payload, as JSON text.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Payload read from a file, as raw bytes (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// Priority: higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Idempotency key: resubmitting with the same key and spec returns the original job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Run timeout of each attempt (e.g. `30s`).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// The job expires if not started within this (e.g. `5m`).
    #[arg(long, value_parser = parse_duration)]
    pub max_wait: Option<Duration>,
    /// How many times a failed attempt is retried.
    #[arg(long)]
    pub retries: Option<u32>,
    /// Label `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Capacity pool to take units from while running, e.g. `gpt-4o:tokens=1200@5s`: every
    /// attempt also takes `requests=1` unless `requests` is given, `@MAXWAIT` is how long to wait for it before the next `--pool`
    /// is also tried (none: without bound; `0s`: fail fast). Repeatable, in fallback order.
    #[arg(long = "pool", value_name = "NAME[:UNIT=N[,UNIT=N]...][@MAXWAIT]", value_parser = parse_pool_request)]
    pub pools: Vec<PoolRequest>,
    /// CPU the job holds on its worker, in cores (e.g. `2`, `0.5`).
    #[arg(long, value_name = "N", value_parser = parse_cpu, allow_negative_numbers = true)]
    pub cpu: Option<f64>,
    /// Memory the job holds on its worker (e.g. `512Mi`, `2G`, `1024`).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Worker label the job needs, `KEY=VALUE` (repeatable).
    #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub selector: Vec<(String, String)>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Parses `NAME[:UNIT=N[,UNIT=N]...][@MAXWAIT]`. A pool name may itself contain `:`: the units
/// start after the last `:` before the first `=`.
pub fn parse_pool_request(s: &str) -> Result<PoolRequest, String> {
    let usage = "expected NAME[:UNIT=N[,UNIT=N]...][@MAXWAIT], e.g. gpt-4o:tokens=1200@5s";
    let (rest, max_wait) = match s.rsplit_once('@') {
        Some((rest, wait)) => {
            let wait = parse_duration(wait.trim()).map_err(|e| format!("{usage}; {e}"))?;
            (rest, Some(wait))
        }
        None => (s, None),
    };
    let (name, units) = match rest.find('=') {
        None => (rest, None),
        Some(eq) => match rest[..eq].rfind(':') {
            Some(colon) => (&rest[..colon], Some(&rest[colon + 1..])),
            None => {
                return Err(format!(
                    "{usage}; got `{s}`: units come after the pool name and a `:`"
                ))
            }
        },
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{usage}; got `{s}`: the pool name is missing"));
    }
    let mut request = PoolRequest::new(name);
    for unit in units.into_iter().flat_map(|u| u.split(',')) {
        let (unit, n) = parse_unit_amount(unit).map_err(|e| format!("{usage}; {e}"))?;
        if request.units.contains_key(&unit) {
            return Err(format!("{usage}; got `{s}`: unit `{unit}` is given twice"));
        }
        request = request.units(unit, n);
    }
    if let Some(wait) = max_wait {
        request = request.max_wait(wait);
    }
    Ok(request)
}

/// Arguments of `jobplane get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Job id.
    pub id: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `jobplane wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Job ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Give up after this long (default: wait until the jobs finish).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `jobplane cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Job id.
    pub id: String,
    /// How long a running attempt gets to stop before it is forced to CANCELLED (default 10s).
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `jobplane watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Job id.
    pub id: String,
    /// Only events after this sequence number (to resume).
    #[arg(long, default_value_t = 0)]
    pub from_seq: u64,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `jobplane jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Lists jobs, newest first.
    Ls(ListArgs),
}

/// Arguments of `jobplane jobs ls`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only these states (repeatable or comma-separated), e.g. `FAILED`.
    #[arg(long = "state", value_delimiter = ',', value_parser = parse_state)]
    pub states: Vec<JobState>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse()
        .map_err(|e: jobplane::ParseEnumError| e.to_string())
}

fn read_payload(args: &SubmitArgs) -> Result<Vec<u8>, CliError> {
    if let Some(text) = &args.payload {
        serde_json::from_str::<Value>(text).map_err(|e| {
            CliError::Usage(format!(
                "--payload is not valid JSON ({e}); use --payload-file for raw bytes"
            ))
        })?;
        return Ok(text.as_bytes().to_vec());
    }
    match &args.payload_file {
        None => Ok(Vec::new()),
        Some(path) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map_err(|source| {
                CliError::Io {
                    context: "cannot read the payload from standard input".into(),
                    source,
                }
            })?;
            Ok(buf)
        }
        Some(path) => std::fs::read(path).map_err(|source| CliError::Io {
            context: format!("cannot read {}", path.display()),
            source,
        }),
    }
}

/// Prints a job with extra fields: `(JSON key, table label, value)`.
fn print_job(job: &Job, out: OutputFormat, extra: &[(&str, &str, Value)]) {
    match out {
        OutputFormat::Json => {
            let mut m = render::job_value(job);
            for (k, _, v) in extra {
                m.insert((*k).to_owned(), v.clone());
            }
            print_json(&Value::Object(m));
        }
        OutputFormat::Table => {
            let extra: Vec<(&str, String)> = extra
                .iter()
                .map(|(_, k, v)| {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Bool(true) => "yes".into(),
                        Value::Bool(false) => "no".into(),
                        other => other.to_string(),
                    };
                    (*k, text)
                })
                .collect();
            print_text(&render::job_table(job, &extra));
        }
    }
}

/// `jobplane submit`.
pub async fn submit(args: SubmitArgs) -> Result<Outcome, CliError> {
    let payload = read_payload(&args)?;
    let mut spec = JobSpec::new(args.queue.clone())
        .payload(payload)
        .priority(args.priority);
    if let Some(key) = &args.idempotency_key {
        spec = spec.idempotency_key(key.clone());
    }
    if let Some(t) = args.timeout {
        spec = spec.run_timeout(t);
    }
    if let Some(w) = args.max_wait {
        spec = spec.max_wait(w);
    }
    if let Some(r) = args.retries {
        spec = spec.retries(r);
    }
    for (k, v) in &args.labels {
        spec = spec.label(k.clone(), v.clone());
    }
    for pool in &args.pools {
        spec = spec.pool(pool.clone());
    }
    if let Some(cpu) = args.cpu {
        spec = spec.cpu(cpu);
    }
    if let Some(memory) = args.memory {
        spec = spec.memory_bytes(memory);
    }
    for (k, v) in &args.selector {
        spec = spec.selector(k.clone(), v.clone());
    }
    let client = args.conn.connect().await?;
    let submitted = client.submit(spec).await?;
    print_job(
        &submitted.job,
        args.out.output,
        &[("created", "new job", Value::Bool(submitted.created))],
    );
    Ok(Outcome::Success)
}

/// `jobplane get`.
pub async fn get(args: GetArgs) -> Result<Outcome, CliError> {
    let client = args.conn.connect().await?;
    let job = client.get(&args.id).await?;
    print_job(&job, args.out.output, &[]);
    Ok(Outcome::Success)
}

/// `jobplane wait`: one wait call per chunk of time until the jobs finish or the timeout.
pub async fn wait(args: WaitArgs) -> Result<Outcome, CliError> {
    let client = args.conn.connect().await?;
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let results = loop {
        let chunk = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_CHUNK),
            None => WAIT_CHUNK,
        };
        let (results, reached) = if let [id] = args.ids.as_slice() {
            let r = client.wait(id, chunk).await?;
            let reached = r.reached;
            (vec![r], reached)
        } else {
            let r = client
                .wait_many(args.ids.iter().cloned(), WaitMode::All, chunk)
                .await?;
            (r.results, r.reached)
        };
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if reached || expired {
            break results;
        }
    };
    let mut all_succeeded = true;
    match args.out.output {
        OutputFormat::Json => {
            for r in &results {
                let mut m = render::job_value(&r.job);
                m.insert("reached".into(), Value::Bool(r.reached));
                print_json(&Value::Object(m));
            }
        }
        OutputFormat::Table if results.len() == 1 => {
            let r = &results[0];
            print_text(&render::job_table(
                &r.job,
                &[("reached", if r.reached { "yes" } else { "no" }.into())],
            ));
        }
        OutputFormat::Table => {
            let rows = results
                .iter()
                .map(|r| {
                    vec![
                        r.job.id.clone(),
                        r.job.state.to_string(),
                        if r.reached { "yes" } else { "no" }.into(),
                        r.job.attempt.to_string(),
                        r.job
                            .error
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            print_text(&render::table(
                &["ID", "STATE", "REACHED", "ATTEMPT", "ERROR"],
                rows,
            ));
        }
    }
    for r in &results {
        all_succeeded &= r.job.state == JobState::Succeeded;
    }
    Ok(if all_succeeded {
        Outcome::Success
    } else {
        Outcome::Unsuccessful
    })
}

/// `jobplane cancel`.
pub async fn cancel(args: CancelArgs) -> Result<Outcome, CliError> {
    let client = args.conn.connect().await?;
    let result = client.cancel(&args.id, args.grace).await?;
    print_job(
        &result.job,
        args.out.output,
        &[(
            "outcome",
            "outcome",
            Value::String(result.outcome.as_str().into()),
        )],
    );
    Ok(Outcome::Success)
}

/// `jobplane watch`: events as JSON lines, or a progress bar with the output live.
pub async fn watch(args: WatchArgs) -> Result<Outcome, CliError> {
    let client = args.conn.connect().await?;
    let mut events = client.watch(&args.id, args.from_seq);
    let mut terminal: Option<JobState> = None;
    match args.out.output {
        OutputFormat::Json => {
            while let Some(event) = events.next().await {
                let event = event?;
                if let EventKind::State { to, .. } = &event.kind {
                    if to.is_terminal() {
                        terminal = Some(*to);
                    }
                }
                print_json(&render::event_value(&event));
            }
        }
        OutputFormat::Table => {
            let bar = ProgressBar::new(100);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:40}] {pos:>3}% {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(args.id.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            let mut stdout_at_line_start = true;
            let result =
                watch_table(&mut events, &bar, &mut terminal, &mut stdout_at_line_start).await;
            bar.finish_and_clear();
            if !stdout_at_line_start {
                print_text("\n");
            }
            result?;
        }
    }
    let state = match terminal {
        Some(state) => state,
        // Resumed past the end: the job's current state says how it ended.
        None => client.get(&args.id).await?.state,
    };
    if let OutputFormat::Table = args.out.output {
        eprintln!("{}: {state}", args.id);
    }
    Ok(if state == JobState::Succeeded {
        Outcome::Success
    } else {
        Outcome::Unsuccessful
    })
}

async fn watch_table(
    events: &mut jobplane::EventStream,
    bar: &ProgressBar,
    terminal: &mut Option<JobState>,
    stdout_at_line_start: &mut bool,
) -> Result<(), CliError> {
    while let Some(event) = events.next().await {
        let event = event?;
        match &event.kind {
            EventKind::State {
                from,
                to,
                attempt,
                error,
                waiting_for,
                ..
            } => {
                if to.is_terminal() {
                    *terminal = Some(*to);
                }
                let mut line = match from {
                    Some(from) => format!("[{}] {from} -> {to}", event.seq),
                    None => format!("[{}] {to}", event.seq),
                };
                if *attempt > 0 {
                    line.push_str(&format!(" (attempt {attempt})"));
                }
                if let Some(w) = waiting_for {
                    line.push_str(&format!(" waiting for {w}"));
                }
                if let Some(e) = error {
                    line.push_str(&format!(": {e}"));
                }
                bar.suspend(|| eprintln!("{line}"));
                if *to == JobState::Running {
                    bar.set_position(0);
                }
                if *to == JobState::Succeeded {
                    bar.set_position(100);
                }
            }
            EventKind::Progress {
                percent, message, ..
            } => {
                // Clamped to 0-100, so the cast is exact enough.
                bar.set_position(percent.clamp(0.0, 100.0).round() as u64);
                if let Some(m) = message {
                    bar.set_message(m.clone());
                }
            }
            EventKind::Output {
                stream,
                data,
                truncated,
                ..
            } => bar.suspend(|| {
                let _ = match stream {
                    OutputStream::Stdout => {
                        if let Some(last) = data.last() {
                            *stdout_at_line_start = *last == b'\n';
                        }
                        let mut out = std::io::stdout().lock();
                        out.write_all(data).and_then(|()| out.flush())
                    }
                    OutputStream::Stderr => {
                        let mut err = std::io::stderr().lock();
                        err.write_all(data).and_then(|()| err.flush())
                    }
                };
                if *truncated {
                    eprintln!("[output truncated: the job produced more than the service keeps]");
                }
            }),
            _ => {}
        }
    }
    Ok(())
}

/// `jobplane jobs …`.
pub async fn jobs(command: JobsCommand) -> Result<Outcome, CliError> {
    match command {
        JobsCommand::Ls(args) => list(args).await,
    }
}

async fn list(args: ListArgs) -> Result<Outcome, CliError> {
    let client = args.conn.connect().await?;
    let limit = args.limit.max(1) as usize;
    let mut jobs: Vec<Job> = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let want = u32::try_from(limit - jobs.len())
            .unwrap_or(u32::MAX)
            .min(1000);
        let mut filter = ListFilter::new()
            .states(args.states.iter().copied())
            .page_size(want);
        if let Some(q) = &args.queue {
            filter = filter.queue(q.clone());
        }
        if let Some(t) = token.take() {
            filter = filter.page_token(t);
        }
        let page = client.list(filter).await?;
        jobs.extend(page.jobs);
        match page.next_page_token {
            Some(t) if jobs.len() < limit => token = Some(t),
            _ => break,
        }
    }
    jobs.truncate(limit);
    match args.out.output {
        OutputFormat::Json => print_json(&Value::Array(
            jobs.iter()
                .map(|j| Value::Object(render::job_value(j)))
                .collect(),
        )),
        OutputFormat::Table => print_text(&render::jobs_table(&jobs)),
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn pool_requests_parse() {
        let secs = Duration::from_secs;
        for (s, want) in [
            ("gpt-4o", PoolRequest::new("gpt-4o")),
            (
                "gpt-4o:tokens=1200@5s",
                PoolRequest::new("gpt-4o")
                    .units("tokens", 1200)
                    .max_wait(secs(5)),
            ),
            (
                "gpt-4o-mini@0s",
                PoolRequest::new("gpt-4o-mini").max_wait(Duration::ZERO),
            ),
            (
                "gpt-4o:requests=1,tokens=1200",
                PoolRequest::new("gpt-4o")
                    .units("requests", 1)
                    .units("tokens", 1200),
            ),
            // Names may contain `:`.
            ("openai:gpt-4o", PoolRequest::new("openai:gpt-4o")),
            (
                "openai:gpt-4o:tokens=5@1m 30s",
                PoolRequest::new("openai:gpt-4o")
                    .units("tokens", 5)
                    .max_wait(secs(90)),
            ),
        ] {
            assert_eq!(parse_pool_request(s), Ok(want), "{s}");
        }
        for bad in [
            "",
            "@5s",
            ":tokens=1",
            "tokens=1",
            "p:tokens=",
            "p:tokens=x",
            "p:tokens=1,",
            "p:tokens=1,tokens=2",
            "p@soon",
            "p:tokens=1@",
        ] {
            let e = parse_pool_request(bad).unwrap_err();
            assert!(e.contains("expected NAME"), "{bad}: {e}");
        }
    }

    fn submit_args(flags: &[&str]) -> Result<SubmitArgs, clap::Error> {
        let cli = crate::cli::Cli::try_parse_from(
            ["jobplane", "submit", "q"]
                .into_iter()
                .chain(flags.iter().copied()),
        )?;
        match cli.command {
            crate::cli::Command::Submit(args) => Ok(args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn submit_takes_the_demand() {
        let args = submit_args(&[
            "--pool",
            "gpt-4o:tokens=1200@5s",
            "--pool",
            "gpt-4o-mini@0s",
            "--cpu",
            "0.5",
            "--memory",
            "512Mi",
            "--selector",
            "gpu=a100",
        ])
        .unwrap();
        assert_eq!(
            args.pools
                .iter()
                .map(|p| p.pool.as_str())
                .collect::<Vec<_>>(),
            ["gpt-4o", "gpt-4o-mini"],
            "in fallback order"
        );
        assert_eq!(args.cpu, Some(0.5));
        assert_eq!(args.memory, Some(512 << 20));
        assert_eq!(args.selector, [("gpu".to_owned(), "a100".to_owned())]);
        for (flag, value) in [
            ("--pool", "p:tokens=x"),
            ("--cpu", "-1"),
            ("--memory", "lots"),
            ("--selector", "novalue"),
        ] {
            let e = submit_args(&[flag, value]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{flag} {value}");
            assert!(e.to_string().contains(flag), "{flag} {value}: {e}");
        }
    }
}
