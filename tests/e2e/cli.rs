//! The `jobplane` binary, for real: a CLI worker running shell commands, and the client commands
//! with `--output json`.

use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use jobplane::{EventKind, JobSpec, JobState, OutputStream, WaitOptions};
use jobplane_tests::{guard, jobplane_bin, TestServer};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Runs a client command to completion; returns (exit code, stdout).
async fn cli(addr: &str, args: &[&str]) -> (i32, String) {
    let out = guard(
        "the jobplane command",
        tokio::process::Command::new(jobplane_bin())
            .args(args)
            .env("JOBPLANE_ADDR", addr)
            .env("NO_COLOR", "1")
            .output(),
    )
    .await
    .expect("run jobplane");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        eprintln!(
            "jobplane {args:?} stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.code().unwrap_or(-1), stdout)
}

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Starts `jobplane worker QUEUE -- sh -c SCRIPT`.
fn cli_worker(addr: &str, queue: &str, script: &str) -> tokio::process::Child {
    cli_worker_command(addr, queue, script)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker")
}

/// `jobplane worker QUEUE -- sh -c SCRIPT`, to be spawned; standard output goes nowhere.
fn cli_worker_command(addr: &str, queue: &str, script: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(jobplane_bin());
    command
        .args([
            "worker",
            queue,
            "--concurrency",
            "2",
            "--grace",
            "2s",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("JOBPLANE_ADDR", addr)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A named pipe that the commands under test open as their fd 3, which whatever they start
/// inherits. Its end of file shows that every process holding it has exited: that is how these
/// tests see that a command and everything it started were stopped for real.
struct Fifo {
    path: String,
    rx: tokio::net::unix::pipe::Receiver,
    _dir: tempfile::TempDir,
}

impl Fifo {
    fn new() -> Fifo {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("fifo").display().to_string();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo {path}");
        // Opened before any command runs, so that a command opening it for writing does not
        // block. Only read once a writer is known to have it open: without writers, a read
        // returns end of file at once.
        let rx = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&path)
            .expect("open the FIFO");
        Fifo {
            path,
            rx,
            _dir: dir,
        }
    }

    /// Shell words opening the FIFO as fd 3 of the current shell.
    fn open_fd3(&self) -> String {
        format!("exec 3>'{}'", self.path)
    }

    /// Reads what was written until every process holding it has exited.
    async fn read_until_all_closed(mut self) -> String {
        let mut text = String::new();
        guard(
            "every process holding the FIFO to exit",
            self.rx.read_to_string(&mut text),
        )
        .await
        .expect("read the FIFO");
        text
    }
}

/// Follows the job's standard output until it contains `needle`; returns it so far.
async fn stdout_until(client: &jobplane::Client, id: &str, needle: &str) -> String {
    let mut events = client.watch(id, 0);
    let mut stdout = String::new();
    guard(&format!("the job to print {needle:?}"), async {
        while let Some(event) = events.next().await {
            let event = event.expect("watch");
            if let EventKind::Output {
                stream: OutputStream::Stdout,
                data,
                ..
            } = &event.kind
            {
                stdout.push_str(&String::from_utf8_lossy(data));
                if stdout.contains(needle) {
                    return;
                }
            }
        }
        panic!("the job ended without printing {needle:?}: {stdout:?}");
    })
    .await;
    stdout
}

/// Sends `signal` (`TERM`, `KILL`) to process `pid`.
async fn send_signal(signal: &str, pid: u32) {
    let status = tokio::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Submits without retries (a failure is final); returns the job's id.
async fn submit(client: &jobplane::Client, spec: JobSpec) -> String {
    client.submit(spec.retries(0)).await.expect("submit").job.id
}

#[tokio::test]
async fn cli_worker_runs_a_shell_command_and_streams_its_output() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // Echo the payload, report progress on stderr, print a last line without a trailing newline
    // and exit at once: every byte must still arrive before the terminal event.
    let _worker = cli_worker(
        &server.addr,
        "shell",
        "cat; echo; echo 'progress: 50' >&2; echo working >&2; echo line1; printf 'the last line'",
    );
    let (code, out) = cli(
        &server.addr,
        &[
            "submit",
            "shell",
            "--payload",
            r#"{"n":1}"#,
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let submitted = json(&out);
    let id = submitted["id"].as_str().expect("id").to_string();
    // Already dispatched in the submit's own commit when the worker is idle.
    assert!(
        matches!(submitted["state"].as_str(), Some("QUEUED" | "LEASED")),
        "{submitted}"
    );

    let (code, out) = cli(
        &server.addr,
        &["wait", &id, "--timeout", "20s", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0, "wait exits 0 when the job succeeded");
    let waited = json(out.lines().next().expect("a line"));
    assert_eq!(waited["state"], "SUCCEEDED");
    assert_eq!(waited["reached"], true);

    let job = client.get(&id).await.unwrap();
    assert_eq!(job.result.as_deref(), Some(&b"the last line"[..]));
    let events: Vec<_> = client.watch(&id, 0).map(|e| e.unwrap()).collect().await;
    assert!(events.last().unwrap().is_terminal());
    let mut stdout = String::new();
    let mut stderr = String::new();
    for e in &events {
        if let EventKind::Output { stream, data, .. } = &e.kind {
            match stream {
                jobplane::OutputStream::Stdout => stdout.push_str(&String::from_utf8_lossy(data)),
                jobplane::OutputStream::Stderr => stderr.push_str(&String::from_utf8_lossy(data)),
            }
        }
    }
    assert_eq!(stdout, "{\"n\":1}\nline1\nthe last line");
    assert!(stderr.contains("working"), "{stderr:?}");
    assert!(events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Progress { percent, .. } if percent == 50.0)));

    // `watch --output json` replays the log, one event per line, the terminal one last.
    let (code, out) = cli(&server.addr, &["watch", &id, "--output", "json"]).await;
    assert_eq!(code, 0);
    let lines: Vec<Value> = out.lines().map(json).collect();
    assert_eq!(lines.len(), events.len());
    assert_eq!(lines.last().unwrap()["kind"], "state");
    assert_eq!(lines[0]["seq"], 1);
    let (_, out) = cli(
        &server.addr,
        &["watch", &id, "--from-seq", "3", "--output", "json"],
    )
    .await;
    assert_eq!(out.lines().map(json).next().unwrap()["seq"], 4);
}

#[tokio::test]
async fn cli_failures_cancel_and_listings() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let _worker = cli_worker(
        &server.addr,
        "cmds",
        "read p; case \"$p\" in *fail*) echo broken >&2; exit 3;; *sleep*) exec sleep 30;; esac; echo ok",
    );
    let submit = |payload: &'static str| {
        let addr = server.addr.clone();
        async move {
            let (code, out) = cli(
                &addr,
                &[
                    "submit",
                    "cmds",
                    "--payload",
                    payload,
                    "--retries",
                    "0",
                    "--output",
                    "json",
                ],
            )
            .await;
            assert_eq!(code, 0);
            json(&out)["id"].as_str().unwrap().to_string()
        }
    };

    let failing = submit(r#""fail""#).await;
    let (code, out) = cli(
        &server.addr,
        &["wait", &failing, "--timeout", "20s", "--output", "json"],
    )
    .await;
    assert_ne!(code, 0, "wait exits non-zero when the job failed");
    assert_eq!(json(out.lines().next().unwrap())["state"], "FAILED");
    let job = client.get(&failing).await.unwrap();
    assert!(
        job.error.unwrap().message.contains('3'),
        "the message names the exit code"
    );

    let sleeping = submit(r#""sleep""#).await;
    let running = guard(
        "running",
        client.wait(
            &sleeping,
            WaitOptions::new()
                .until([JobState::Running])
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .unwrap();
    assert!(running.reached);
    let (code, out) = cli(
        &server.addr,
        &["cancel", &sleeping, "--grace", "5s", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(json(&out)["state"], "RUNNING");
    let done = guard("cancelled", client.wait(&sleeping, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.job.state, JobState::Cancelled);
    assert!(
        !done.job.error.unwrap().message.contains("forced"),
        "the command stopped on SIGTERM within the grace period"
    );

    let (code, out) = cli(
        &server.addr,
        &["jobs", "ls", "--queue", "cmds", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(json(&out).as_array().unwrap().len(), 2);
    let (_, out) = cli(
        &server.addr,
        &["jobs", "ls", "--state", "FAILED", "--output", "json"],
    )
    .await;
    assert_eq!(json(&out).as_array().unwrap().len(), 1);
    let (_, out) = cli(&server.addr, &["queues", "ls", "--output", "json"]).await;
    assert!(json(&out)
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "cmds"));
    let (_, out) = cli(&server.addr, &["workers", "ls", "--output", "json"]).await;
    let workers = json(&out);
    let id = workers.as_array().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out) = cli(&server.addr, &["workers", "drain", &id, "--output", "json"]).await;
    assert_eq!(code, 0);
    assert_eq!(json(&out)["draining"], true);

    // Bad input: a clear error naming the field, non-zero exit.
    let (code, _) = cli(&server.addr, &["submit", "bad queue"]).await;
    assert_ne!(code, 0);
}

#[tokio::test]
async fn cli_worker_finishes_a_job_whose_background_child_holds_its_output() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let fifo = Fifo::new();
    // The background `sleep` inherits standard output (and the FIFO) and never exits by itself;
    // the main process prints its result and exits 0 at once.
    let _worker = cli_worker(
        &server.addr,
        "bg",
        &format!("{}; sleep 1000 & exec 3>&-; echo done", fifo.open_fd3()),
    );
    let id = submit(&client, JobSpec::new("bg")).await;
    let done = guard(
        "the job to end although its output is still open",
        client.wait(&id, Duration::from_secs(25)),
    )
    .await
    .unwrap();
    assert!(done.reached, "the job ended: {:?}", done.job.state);
    assert_eq!(done.job.state, JobState::Succeeded, "{:?}", done.job.error);
    assert_eq!(
        done.job.result.as_deref(),
        Some(&b"done"[..]),
        "the main process's last line is the result"
    );
    // The main process had the FIFO open before it exited, so the background child held it
    // since: its end shows that the child was stopped, not left behind.
    assert_eq!(fifo.read_until_all_closed().await, "");
}

#[tokio::test]
async fn cli_worker_second_signal_kills_the_running_commands() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let fifo = Fifo::new();
    // A main process and a background child, both holding the FIFO, neither ever exiting.
    let script = format!(
        "{}; sleep 1000 & echo started; exec sleep 1000",
        fifo.open_fd3()
    );
    let mut worker = cli_worker_command(&server.addr, "stubborn", &script)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    let mut logs = BufReader::new(worker.stderr.take().expect("stderr")).lines();
    let pid = worker.id().expect("worker pid");
    let id = submit(&client, JobSpec::new("stubborn")).await;
    stdout_until(&client, &id, "started").await;

    // The first signal drains: the command keeps running (the shutdown timeout is 30 s).
    send_signal("TERM", pid).await;
    guard("the worker to start draining", async {
        while let Some(line) = logs.next_line().await.expect("worker log") {
            if line.contains("signal again") {
                return;
            }
        }
        panic!("the worker exited on the first signal");
    })
    .await;
    let job = client.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Running, "the first signal lets it run");

    // The second one exits at once, and takes the command's whole process group with it.
    send_signal("TERM", pid).await;
    let status = guard("the worker to exit", worker.wait())
        .await
        .expect("wait for the worker");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(fifo.read_until_all_closed().await, "");
}

#[tokio::test]
async fn cli_worker_reports_a_command_killed_by_a_signal() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // `main`: the main process prints its own pid; `child`: the shell prints its child's pid
    // and reports how that child ended as its own exit code.
    let _worker = cli_worker(
        &server.addr,
        "killed",
        "read who; case \"$who\" in main) echo $$; exec sleep 1000;; *) sleep 1000 & echo $!; wait $!;; esac",
    );
    for (who, expected) in [
        ("main", "command killed by SIGKILL (signal 9)"),
        ("child", "code 137"),
    ] {
        let id = submit(
            &client,
            JobSpec::new("killed").payload(format!("{who}\n").into_bytes()),
        )
        .await;
        let out = stdout_until(&client, &id, "\n").await;
        let pid: u32 = out.trim().parse().expect("a pid");
        // Killed by someone else than the worker.
        send_signal("KILL", pid).await;
        let done = guard("the job to fail", client.wait(&id, Duration::from_secs(25)))
            .await
            .unwrap();
        assert_eq!(done.job.state, JobState::Failed, "{who}");
        let message = done.job.error.expect("an error").message;
        assert!(message.contains(expected), "{who}: {message}");
        assert!(message.contains("SIGKILL"), "{who}: {message}");
    }
}

#[tokio::test]
async fn cli_worker_sends_sigterm_before_sigkill_even_without_grace() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let fifo = Fifo::new();
    // On SIGTERM, a cleanup that takes a little while (a tenth of the least grace the worker
    // gives), then a word on the FIFO: it is only there if SIGKILL did not come right after
    // SIGTERM.
    let script = format!(
        "{}; trap 'sleep 0.1; echo term >&3; exit 1' TERM; echo ready; sleep 1000 & wait",
        fifo.open_fd3()
    );
    let _worker = cli_worker(&server.addr, "graceless", &script);
    let id = submit(&client, JobSpec::new("graceless")).await;
    stdout_until(&client, &id, "ready").await;
    // No grace at all, like a run timeout or an ack timeout.
    client.cancel(&id, Some(Duration::ZERO)).await.unwrap();
    let done = guard("cancelled", client.wait(&id, Duration::from_secs(25)))
        .await
        .unwrap();
    assert_eq!(done.job.state, JobState::Cancelled);
    assert_eq!(
        fifo.read_until_all_closed().await,
        "term\n",
        "the command ran its SIGTERM handler before being killed"
    );
}
