//! `jobplane worker QUEUE... -- CMD [ARGS]`: a worker that runs a command once per job.
//!
//! The job's payload is the command's standard input; `JOBPLANE_JOB_ID`, `JOBPLANE_ATTEMPT`
//! and `JOBPLANE_QUEUE` are set in its environment, `TRACEPARENT` (and `TRACESTATE`) when the
//! job has a trace (the context of the worker's `process {queue}` span while traces are
//! exported, else the attempt's context from the service), and `JOBPLANE_POOL` when the attempt
//! runs on a capacity pool. Its standard
//! output and error are streamed as the job's output, in order. Three standard error lines are
//! also understood (and still part of the output):
//!
//! - `progress: <0-100> [message]` reports progress;
//! - `usage: UNIT=N [UNIT=N]...` (spaces or commas between pairs) reports what the attempt
//!   really used of its pool's units, e.g. `usage: tokens=950`, so the pool's token buckets are
//!   settled (a later line for the same unit replaces the earlier figure);
//! - `rate-limited: retry-after=DURATION` (e.g. `2s`, `500ms`) followed by exit code 75 reports
//!   an upstream rate limit: the job's pool cools down until then and the job is requeued
//!   without using a retry.
//!
//! The main process's exit status decides the outcome: 0 succeeds with the last non-empty line
//! of standard output as the result; 75 after a `rate-limited:` line is a rate limit; anything
//! else is a retryable failure naming the exit code or the signal.
//!
//! The command runs in a process group of its own. After its main process exited, its output is
//! read to the end before the outcome is reported, so the last line is never lost; but whatever
//! it left running in the background and still holds the pipes is stopped after [`PIPE_DRAIN`]
//! instead of keeping the job running. On cancel the group gets SIGTERM, then SIGKILL after the
//! grace period (see [`process::MIN_KILL_GRACE`]). On SIGTERM or SIGINT the worker drains: it
//! takes no new jobs and lets running ones finish, up to `--shutdown-timeout`, then cancels
//! them. A second signal kills every command's process group and exits at once.

mod process;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use jobplane::worker::{Handler, HandlerError, HandlerFuture, JobContext, Worker};
use jobplane::OutputStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::process::{Groups, MIN_KILL_GRACE};
use super::{
    parse_cpu, parse_duration, parse_label, parse_size, parse_unit_amount, CliError, ConnArgs,
    Outcome,
};

/// Read size of the command's pipes (also the largest output chunk).
const READ_CHUNK: usize = 64 << 10;
/// Longest line kept for the result and for progress parsing.
const MAX_LINE: usize = 1 << 20;
/// Longest error excerpt put into a failure message.
const MAX_EXCERPT: usize = 500;
/// Once the command's main process has exited, how long each output pipe may keep the job
/// waiting for more output without giving any. Past it, what holds the pipe open (something the
/// command left running in the background) is stopped and reading ends. Only time spent waiting
/// on the pipe counts, not time spent sending what it gave (the service may be unreachable for
/// a while): output written before the exit is never lost.
const PIPE_DRAIN: Duration = Duration::from_secs(2);
/// Once the main process has exited, more than this on one pipe cannot be what it wrote before
/// exiting (several times what a pipe holds): something else keeps writing, and is stopped.
const PIPE_DRAIN_BYTES: usize = 4 << 20;
/// Exit code of a worker stopped by a second signal.
const EXIT_SECOND_SIGNAL: i32 = 130;
/// Exit code with which a command reports an upstream rate limit (`EX_TEMPFAIL`), after a
/// `rate-limited: retry-after=DURATION` line on standard error.
const EXIT_RATE_LIMITED: i32 = 75;

/// Arguments of `jobplane worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to serve.
    #[arg(required = true)]
    pub queues: Vec<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: u32,
    /// After a cancel, how long the command gets between SIGTERM and SIGKILL (at most the
    /// cancel's own grace period, at least half a second).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub grace: Duration,
    /// On SIGTERM/SIGINT, how long running commands may finish before being cancelled.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub shutdown_timeout: Duration,
    /// Worker name shown by `workers ls` (default: host and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Worker label `KEY=VALUE` (repeatable); jobs with `--selector` go only to workers whose
    /// labels match.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// CPU cores offered to jobs that declare `--cpu` (fractions allowed).
    #[arg(long, value_parser = parse_cpu)]
    pub cpu: Option<f64>,
    /// Memory offered to jobs that declare `--memory`, e.g. `8Gi`, `512M`, `1048576`.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The command to run per job, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Runs the worker until SIGTERM or SIGINT (a second signal kills the commands and exits).
pub async fn run(args: WorkerArgs) -> Result<Outcome, CliError> {
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(CliError::Usage(
            "missing the command to run after `--`".into(),
        ));
    };
    // Listening from the start, so that no signal goes unseen between the first and the second.
    let mut signals = StopSignals::new().map_err(|source| CliError::Io {
        context: "cannot listen for SIGTERM and SIGINT".into(),
        source,
    })?;
    let groups = Arc::new(Groups::default());
    let handler: Arc<dyn Handler> = Arc::new(CommandHandler {
        program: program.clone(),
        args: program_args.to_vec(),
        grace: args.grace,
        groups: groups.clone(),
    });
    let mut builder = Worker::builder(args.conn.addr.clone())
        .namespace(args.conn.namespace.clone())
        .concurrency(args.concurrency)
        .shutdown_timeout(args.shutdown_timeout)
        // The command gets its SIGTERM-to-SIGKILL grace before the SDK aborts the handler.
        .abort_grace(args.grace + Duration::from_secs(1))
        .labels(args.labels.iter().cloned());
    if let Some(cpu) = args.cpu {
        builder = builder.cpu(cpu);
    }
    if let Some(memory) = args.memory {
        builder = builder.memory_bytes(memory);
    }
    if let Some(name) = &args.name {
        builder = builder.name(name.clone());
    }
    for queue in &args.queues {
        builder = builder.shared_handler(queue.clone(), handler.clone());
    }
    let worker = builder.build()?;
    tracing::info!(worker_id = worker.id(), queues = ?args.queues, command = ?args.command, "running");
    let shutdown = async move {
        signals.recv().await;
        tracing::info!(
            "shutting down: finishing running jobs (signal again to kill them and exit now)"
        );
        tokio::spawn(async move {
            signals.recv().await;
            // `exit` runs no destructors: without this the commands would go on running while
            // the service gives their jobs to other workers.
            let killed = groups.kill_all();
            tracing::warn!(
                killed,
                "second signal: killed the running commands' process groups; exiting now"
            );
            std::process::exit(EXIT_SECOND_SIGNAL);
        });
    };
    worker.run(shutdown).await?;
    Ok(Outcome::Success)
}

/// SIGTERM and SIGINT, as one stream.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the command for one job.
struct CommandHandler {
    program: String,
    args: Vec<String>,
    grace: Duration,
    groups: Arc<Groups>,
}

impl Handler for CommandHandler {
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env("JOBPLANE_JOB_ID", ctx.job_id())
            .env("JOBPLANE_ATTEMPT", ctx.attempt().to_string())
            .env("JOBPLANE_QUEUE", ctx.queue())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(trace) = ctx.trace_context() {
            command.env("TRACEPARENT", trace.traceparent);
            if let Some(ts) = trace.tracestate {
                command.env("TRACESTATE", ts);
            }
        }
        if let Some(pool) = ctx.pool() {
            command.env("JOBPLANE_POOL", pool);
        }
        let program = self.program.clone();
        let grace = self.grace;
        let groups = self.groups.clone();
        Box::pin(async move { run_command(ctx, command, program, grace, groups).await })
    }
}

async fn run_command(
    ctx: JobContext,
    mut command: Command,
    program: String,
    grace: Duration,
    groups: Arc<Groups>,
) -> Result<Vec<u8>, HandlerError> {
    // Its own process group, so that signals reach whatever the command starts, and a Ctrl-C
    // in the worker's terminal does not kill running jobs before the graceful shutdown. If this
    // future is dropped (the SDK aborts it), dropping `running` still stops the command.
    let mut running = groups
        .spawn(&mut command)
        .map_err(|e| HandlerError::retryable(format!("cannot start {program}: {e}")))?;
    // The job's span (set by the SDK) carries its id and attempt.
    tracing::info!(pid = running.group.pgid(), "job started");

    // Set once the main process has exited: the pipes then get a bounded drain.
    let exited = CancellationToken::new();
    let stdin = running.child.stdin.take();
    let payload = ctx.payload_bytes();
    let feed_exited = exited.clone();
    let feed = async move {
        let Some(mut stdin) = stdin else { return };
        let write = async {
            // A command that does not read its input closes the pipe: not an error.
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        };
        // Once the main process is gone nobody is meant to read the rest.
        tokio::select! {
            () = write => {}
            () = feed_exited.cancelled() => {}
        }
    };
    let mut out_lines = LineScanner::default();
    let mut err_lines = LineScanner::default();
    let out = pump(
        running.stdout.as_mut(),
        &ctx,
        OutputStream::Stdout,
        &mut out_lines,
        false,
        &exited,
    );
    let err = pump(
        running.stderr.as_mut(),
        &ctx,
        OutputStream::Stderr,
        &mut err_lines,
        true,
        &exited,
    );
    let mut io = Box::pin(async move {
        let ((), out, err) = tokio::join!(feed, out, err);
        out == PipeEnd::Closed && err == PipeEnd::Closed
    });

    let cancellation = ctx.cancellation();
    let mut cancelled = false;
    let mut kill_at: Option<Instant> = None;
    let mut pipes_closed: Option<bool> = None;
    let status = loop {
        tokio::select! {
            closed = &mut io, if pipes_closed.is_none() => pipes_closed = Some(closed),
            status = running.child.wait() => break status,
            () = cancellation.cancelled(), if !cancelled => {
                cancelled = true;
                tracing::info!(reason = ctx.cancel_reason().unwrap_or("shutdown"), "cancelling: SIGTERM");
                let sent = running.group.terminate();
                kill_at = Some(sent + grace.max(MIN_KILL_GRACE));
            }
            () = sleep_until_opt(kill_at) => {
                tracing::warn!(?grace, "still running after the grace period: SIGKILL");
                running.group.kill();
                kill_at = None;
            }
        }
    };
    exited.cancel();
    // Bounded now that the main process is gone (see `pump`).
    let pipes_closed = match pipes_closed {
        Some(closed) => closed,
        None => (&mut io).await,
    };
    drop(io);
    let stderr_last = finish_lines(&ctx, &mut err_lines, true).await;
    let stdout_last = finish_lines(&ctx, &mut out_lines, false).await;
    if !pipes_closed {
        tracing::warn!(
            drain = ?PIPE_DRAIN,
            "the command exited, but what it left running still holds its output: stopping it"
        );
        running.stop_in_background();
    } else if status.is_err() {
        // Whether it still runs is unknown.
        running.stop_in_background();
    } else {
        running.release();
    }
    if cancelled {
        return Err(HandlerError::Cancelled);
    }
    let status =
        status.map_err(|e| HandlerError::retryable(format!("cannot wait for {program}: {e}")))?;
    if status.success() {
        tracing::info!("job succeeded");
        return Ok(stdout_last.unwrap_or_default());
    }
    if status.code() == Some(EXIT_RATE_LIMITED) {
        if let Some(retry_after) = err_lines.rate_limited {
            tracing::info!(?retry_after, pool = ?ctx.pool(), "upstream rate limit");
            return Err(HandlerError::rate_limited(
                ctx.pool().map(str::to_owned),
                retry_after,
            ));
        }
    }
    let mut message = exit_description(&status);
    if status.code() == Some(EXIT_RATE_LIMITED) {
        message.push_str(
            " (75 reports a rate limit only after a `rate-limited: retry-after=DURATION` line on \
             standard error)",
        );
    }
    if let Some(line) = stderr_last {
        let line = String::from_utf8_lossy(&line);
        let excerpt: String = line.chars().take(MAX_EXCERPT).collect();
        message.push_str(": ");
        message.push_str(&excerpt);
    }
    tracing::info!(%message, "job failed");
    Err(HandlerError::retryable(message))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn exit_description(status: &std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        #[cfg(unix)]
        if let Some(name) = code.checked_sub(128).and_then(process::signal_name) {
            return format!(
                "command exited with code {code} (128 + {}: how a shell reports a command killed by {name})",
                code - 128
            );
        }
        return format!("command exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            return match process::signal_name(signal) {
                Some(name) => format!("command killed by {name} (signal {signal}{core})"),
                None => format!("command killed by signal {signal}{core}"),
            };
        }
    }
    format!("command ended abnormally ({status})")
}

/// How reading a pipe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PipeEnd {
    /// End of file: every process holding it closed it.
    Closed,
    /// Given up after the main process exited (see [`PIPE_DRAIN`]).
    StillOpen,
}

/// Forwards a pipe as output, chunk by chunk, feeding `lines`; on standard error, lines
/// `progress: N [message]` also report progress. Reads to the end of the pipe, but once
/// `exited` is set, only for [`PIPE_DRAIN`] of waiting and [`PIPE_DRAIN_BYTES`].
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<&mut R>,
    ctx: &JobContext,
    stream: OutputStream,
    lines: &mut LineScanner,
    progress: bool,
    exited: &CancellationToken,
) -> PipeEnd {
    let Some(reader) = reader else {
        return PipeEnd::Closed;
    };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut wait_left = PIPE_DRAIN;
    let mut after_exit = 0usize;
    loop {
        let read = if exited.is_cancelled() {
            if after_exit > PIPE_DRAIN_BYTES {
                return PipeEnd::StillOpen;
            }
            let started = Instant::now();
            // Reading is cancel-safe: nothing read is lost when the timeout wins.
            let Ok(read) = tokio::time::timeout(wait_left, reader.read(&mut buf)).await else {
                return PipeEnd::StillOpen;
            };
            wait_left = wait_left.saturating_sub(started.elapsed());
            read
        } else {
            tokio::select! {
                read = reader.read(&mut buf) => read,
                // Read again, with the drain's bounds.
                () = exited.cancelled() => continue,
            }
        };
        let n = match read {
            Ok(0) => return PipeEnd::Closed,
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(%err, ?stream, "cannot read the command's output");
                return PipeEnd::Closed;
            }
        };
        if exited.is_cancelled() {
            after_exit += n;
        }
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        ctx.output(stream, chunk.clone()).await;
        for line in lines.feed(&chunk) {
            if progress {
                directives(ctx, &line, lines).await;
            }
        }
    }
}

/// Ends a pipe's lines; returns its last non-empty line.
async fn finish_lines(
    ctx: &JobContext,
    lines: &mut LineScanner,
    progress: bool,
) -> Option<Vec<u8>> {
    if let Some(line) = lines.finish() {
        if progress {
            directives(ctx, &line, lines).await;
        }
    }
    lines.last_non_empty.take()
}

/// Acts on a standard error line meant for the worker: progress, usage, rate limit.
async fn directives(ctx: &JobContext, line: &[u8], lines: &mut LineScanner) {
    if let Some((percent, message)) = parse_progress(line) {
        ctx.progress(percent, message).await;
    } else if let Some(units) = parse_usage(line) {
        ctx.report_usage(units).await;
    } else if let Some(retry_after) = parse_rate_limited(line) {
        lines.rate_limited = Some(retry_after);
    }
}

/// The text after a case-insensitive `prefix`, trimmed.
fn after_prefix<'a>(line: &'a [u8], prefix: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let (head, rest) = text.split_at_checked(prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| rest.trim())
}

/// Parses `usage: tokens=950` or `usage: tokens=950, requests=1`.
fn parse_usage(line: &[u8]) -> Option<Vec<(String, u64)>> {
    let rest = after_prefix(line, "usage:")?;
    let units: Vec<(String, u64)> = rest
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(parse_unit_amount)
        .collect::<Result<_, _>>()
        .ok()?;
    (!units.is_empty()).then_some(units)
}

/// Parses `rate-limited: retry-after=2s`.
fn parse_rate_limited(line: &[u8]) -> Option<Duration> {
    let rest = after_prefix(line, "rate-limited:")?;
    let value = rest.strip_prefix("retry-after=")?;
    humantime::parse_duration(value.trim()).ok()
}

/// Splits a byte stream into lines, remembering the last non-empty one.
#[derive(Default)]
struct LineScanner {
    partial: Vec<u8>,
    overflow: bool,
    last_non_empty: Option<Vec<u8>>,
    /// The retry-after of the last `rate-limited:` line (standard error only).
    rate_limited: Option<Duration>,
}

impl LineScanner {
    /// Feeds bytes; returns the lines they complete (without the line ending).
    fn feed(&mut self, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.push(&data[..pos]);
            if let Some(line) = self.complete() {
                done.push(line);
            }
            data = &data[pos + 1..];
        }
        self.push(data);
        done
    }

    /// Ends the stream; returns the unterminated last line, if any.
    fn finish(&mut self) -> Option<Vec<u8>> {
        if self.partial.is_empty() && !self.overflow {
            return None;
        }
        self.complete()
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.partial.len());
        if bytes.len() > room {
            self.overflow = true;
        }
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn complete(&mut self) -> Option<Vec<u8>> {
        let mut line = std::mem::take(&mut self.partial);
        self.overflow = false;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            self.last_non_empty = Some(line.clone());
        }
        Some(line)
    }
}

/// Parses `progress: 42` or `progress: 42.5 downloading`.
fn parse_progress(line: &[u8]) -> Option<(f64, String)> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let (head, rest) = text.split_at_checked(9)?;
    if !head.eq_ignore_ascii_case("progress:") {
        return None;
    }
    let rest = rest.trim_start();
    let (number, message) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let percent: f64 = number.trim_end_matches('%').parse().ok()?;
    if !(0.0..=100.0).contains(&percent) {
        return None;
    }
    Some((percent, message.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_splits_lines_across_chunks() {
        let mut s = LineScanner::default();
        assert!(s.feed(b"hel").is_empty());
        assert_eq!(s.feed(b"lo\nwor"), vec![b"hello".to_vec()]);
        assert_eq!(
            s.feed(b"ld\r\n\n  \n"),
            vec![b"world".to_vec(), vec![], b"  ".to_vec()]
        );
        assert_eq!(s.last_non_empty.as_deref(), Some(&b"world"[..]));
        assert_eq!(s.finish(), None);
        s.feed(b"tail without newline");
        assert_eq!(s.finish().as_deref(), Some(&b"tail without newline"[..]));
        assert_eq!(
            s.last_non_empty.as_deref(),
            Some(&b"tail without newline"[..])
        );
    }

    #[test]
    fn scanner_bounds_long_lines() {
        let mut s = LineScanner::default();
        s.feed(&vec![b'x'; MAX_LINE + 10]);
        let line = s.finish().unwrap();
        assert_eq!(line.len(), MAX_LINE);
    }

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress(b"progress: 42"), Some((42.0, String::new())));
        assert_eq!(
            parse_progress(b"Progress: 12.5% downloading files"),
            Some((12.5, "downloading files".into()))
        );
        assert_eq!(
            parse_progress(b"progress:100"),
            Some((100.0, String::new()))
        );
        assert_eq!(parse_progress(b"progress: 101"), None);
        assert_eq!(parse_progress(b"progress: lots"), None);
        assert_eq!(parse_progress(b"in progress: 5"), None);
    }

    #[test]
    fn usage_and_rate_limit_lines() {
        assert_eq!(
            parse_usage(b"usage: tokens=950"),
            Some(vec![("tokens".to_owned(), 950)])
        );
        assert_eq!(
            parse_usage(b"Usage: tokens=950, requests=1\r"),
            Some(vec![("tokens".to_owned(), 950), ("requests".to_owned(), 1)])
        );
        assert_eq!(parse_usage(b"usage: tokens=lots"), None);
        assert_eq!(parse_usage(b"usage:"), None);
        assert_eq!(parse_usage(b"my usage: tokens=1"), None);
        assert_eq!(
            parse_rate_limited(b"rate-limited: retry-after=2s"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_rate_limited(b"rate-limited: retry-after=500ms "),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_rate_limited(b"rate-limited: soon"), None);
        assert_eq!(parse_rate_limited(b"rate-limited: retry-after=never"), None);
    }

    #[test]
    fn exit_descriptions_name_the_code() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::ExitStatus::from_raw(3 << 8);
        assert_eq!(exit_description(&status), "command exited with code 3");
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(
            exit_description(&killed),
            "command killed by SIGKILL (signal 9)"
        );
        let dumped = std::process::ExitStatus::from_raw(11 | 0x80);
        assert_eq!(
            exit_description(&dumped),
            "command killed by SIGSEGV (signal 11, core dumped)"
        );
        let shell = std::process::ExitStatus::from_raw(137 << 8);
        assert!(
            exit_description(&shell).contains("code 137")
                && exit_description(&shell).contains("SIGKILL"),
            "{}",
            exit_description(&shell)
        );
    }
}
