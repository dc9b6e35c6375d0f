//! `jobplane worker QUEUE... -- CMD [ARGS]`: a worker that runs a command once per job.
//!
//! The job's payload is the command's standard input; `JOBPLANE_JOB_ID`, `JOBPLANE_ATTEMPT`
//! and `JOBPLANE_QUEUE` (and `TRACEPARENT` when the submitter sent one) are set in its
//! environment. Its standard output and error are streamed as the job's output, in order, and
//! both are read to the end before the outcome is reported, so the last line is never lost. A
//! standard error line `progress: <0-100> [message]` also reports progress. Exit code 0
//! succeeds with the last non-empty line of standard output as the result; anything else is a
//! retryable failure. On cancel the command's process group gets SIGTERM, then SIGKILL after
//! the grace period.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use jobplane::worker::{Handler, HandlerError, HandlerFuture, JobContext, Worker};
use jobplane::OutputStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{parse_duration, parse_label, shutdown_signal, CliError, ConnArgs, Outcome};

/// Read size of the command's pipes (also the largest output chunk).
const READ_CHUNK: usize = 64 << 10;
/// Longest line kept for the result and for progress parsing.
const MAX_LINE: usize = 1 << 20;
/// Longest error excerpt put into a failure message.
const MAX_EXCERPT: usize = 500;

/// Arguments of `jobplane worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to serve.
    #[arg(required = true)]
    pub queues: Vec<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: u32,
    /// After a cancel, how long the command gets between SIGTERM and SIGKILL.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub grace: Duration,
    /// On SIGTERM/SIGINT, how long running commands may finish before being cancelled.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub shutdown_timeout: Duration,
    /// Worker name shown by `workers ls` (default: host and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Worker label `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The command to run per job, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Runs the worker until SIGTERM or SIGINT (a second signal exits at once).
pub async fn run(args: WorkerArgs) -> Result<Outcome, CliError> {
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(CliError::Usage(
            "missing the command to run after `--`".into(),
        ));
    };
    let handler: Arc<dyn Handler> = Arc::new(CommandHandler {
        program: program.clone(),
        args: program_args.to_vec(),
        grace: args.grace,
    });
    let mut builder = Worker::builder(args.conn.addr.clone())
        .namespace(args.conn.namespace.clone())
        .concurrency(args.concurrency)
        .shutdown_timeout(args.shutdown_timeout)
        // The command gets its SIGTERM-to-SIGKILL grace before the SDK aborts the handler.
        .abort_grace(args.grace + Duration::from_secs(1))
        .labels(args.labels.iter().cloned());
    if let Some(name) = &args.name {
        builder = builder.name(name.clone());
    }
    for queue in &args.queues {
        builder = builder.shared_handler(queue.clone(), handler.clone());
    }
    let worker = builder.build()?;
    tracing::info!(worker_id = worker.id(), queues = ?args.queues, command = ?args.command, "running");
    let shutdown = async {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing running jobs (signal again to exit now)");
        tokio::spawn(async {
            shutdown_signal().await;
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
    };
    worker.run(shutdown).await?;
    Ok(Outcome::Success)
}

/// Runs the command for one job.
struct CommandHandler {
    program: String,
    args: Vec<String>,
    grace: Duration,
}

impl Handler for CommandHandler {
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        let program = self.program.clone();
        let args = self.args.clone();
        let grace = self.grace;
        Box::pin(async move { run_command(ctx, program, args, grace).await })
    }
}

async fn run_command(
    ctx: JobContext,
    program: String,
    args: Vec<String>,
    grace: Duration,
) -> Result<Vec<u8>, HandlerError> {
    let mut command = Command::new(&program);
    command
        .args(&args)
        .env("JOBPLANE_JOB_ID", ctx.job_id())
        .env("JOBPLANE_ATTEMPT", ctx.attempt().to_string())
        .env("JOBPLANE_QUEUE", ctx.queue())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(tp) = ctx.traceparent() {
        command.env("TRACEPARENT", tp);
    }
    // Its own process group, so that signals reach whatever the command starts, and a Ctrl-C
    // in the worker's terminal does not kill running jobs before the graceful shutdown.
    #[cfg(unix)]
    command.process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| HandlerError::retryable(format!("cannot start {program}: {e}")))?;
    let group = ProcessGroup::new(child.id());
    // The job's span (set by the SDK) carries its id and attempt.
    tracing::info!(pid = ?child.id(), "job started");

    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let payload = ctx.payload_bytes();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its input closes the pipe: not an error.
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        }
    };
    let out = pump(stdout, &ctx, OutputStream::Stdout, false);
    let err = pump(stderr, &ctx, OutputStream::Stderr, true);
    // Both pipes are read to their end before the outcome: the last line is never lost.
    let work = async {
        let (status, ((), stdout_last, stderr_last)) =
            tokio::join!(child.wait(), async { tokio::join!(feed, out, err) });
        (status, stdout_last, stderr_last)
    };
    tokio::pin!(work);

    let cancellation = ctx.cancellation();
    let (status, stdout_last, stderr_last) = tokio::select! {
        done = &mut work => done,
        () = cancellation.cancelled() => {
            tracing::info!(reason = ctx.cancel_reason().unwrap_or("shutdown"), "cancelling: SIGTERM");
            group.signal("TERM").await;
            if tokio::time::timeout(grace, &mut work).await.is_err() {
                tracing::warn!(?grace, "still running after the grace period: SIGKILL");
                group.signal("KILL").await;
                let _ = work.await;
            }
            group.disarm();
            return Err(HandlerError::Cancelled);
        }
    };
    group.disarm();
    let status =
        status.map_err(|e| HandlerError::retryable(format!("cannot wait for {program}: {e}")))?;
    if status.success() {
        tracing::info!("job succeeded");
        return Ok(stdout_last.unwrap_or_default());
    }
    let mut message = exit_description(&status);
    if let Some(line) = stderr_last {
        let line = String::from_utf8_lossy(&line);
        let excerpt: String = line.chars().take(MAX_EXCERPT).collect();
        message.push_str(": ");
        message.push_str(&excerpt);
    }
    tracing::info!(%message, "job failed");
    Err(HandlerError::retryable(message))
}

fn exit_description(status: &std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("command exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("command killed by signal {signal}");
        }
    }
    format!("command ended abnormally ({status})")
}

/// Forwards a pipe as output, chunk by chunk, until its end. Returns the last non-empty line;
/// on standard error, lines `progress: N [message]` also report progress.
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    ctx: &JobContext,
    stream: OutputStream,
    progress: bool,
) -> Option<Vec<u8>> {
    let mut reader = reader?;
    let mut lines = LineScanner::default();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(%err, ?stream, "cannot read the command's output");
                break;
            }
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        ctx.output(stream, chunk.clone()).await;
        for line in lines.feed(&chunk) {
            if progress {
                if let Some((percent, message)) = parse_progress(&line) {
                    ctx.progress(percent, message).await;
                }
            }
        }
    }
    if let Some(line) = lines.finish() {
        if progress {
            if let Some((percent, message)) = parse_progress(&line) {
                ctx.progress(percent, message).await;
            }
        }
    }
    lines.last_non_empty
}

/// Splits a byte stream into lines, remembering the last non-empty one.
#[derive(Default)]
struct LineScanner {
    partial: Vec<u8>,
    overflow: bool,
    last_non_empty: Option<Vec<u8>>,
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

/// Signals the command's process group; on drop (the handler was aborted) kills it.
struct ProcessGroup {
    pid: Option<u32>,
    armed: std::sync::atomic::AtomicBool,
}

impl ProcessGroup {
    fn new(pid: Option<u32>) -> Self {
        ProcessGroup {
            pid,
            armed: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Sends `signal` (`TERM`, `KILL`) to the whole group. Uses kill(1), since the workspace
    /// forbids `unsafe` and has no signal crate.
    async fn signal(&self, signal: &str) {
        let Some(pid) = self.pid else { return };
        let result = Command::new("kill")
            .args([format!("-{signal}"), "--".into(), format!("-{pid}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
        if let Err(err) = result {
            tracing::warn!(%err, pid, signal, "cannot run kill(1)");
        }
    }

    fn disarm(&self) {
        self.armed
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.armed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(pid) = self.pid {
            let _ = std::process::Command::new("kill")
                .args(["-KILL".to_owned(), "--".into(), format!("-{pid}")])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
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
    fn exit_descriptions_name_the_code() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::ExitStatus::from_raw(3 << 8);
        assert_eq!(exit_description(&status), "command exited with code 3");
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(exit_description(&killed), "command killed by signal 9");
    }
}
