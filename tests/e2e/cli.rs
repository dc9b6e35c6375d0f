//! The `jobplane` binary, for real: a CLI worker running shell commands, and the client commands
//! with `--output json`.

use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use jobplane::{EventKind, JobState, WaitOptions};
use jobplane_tests::{guard, jobplane_bin, TestServer};
use serde_json::Value;

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
    tokio::process::Command::new(jobplane_bin())
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
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn worker")
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
