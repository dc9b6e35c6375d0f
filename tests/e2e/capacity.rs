//! Capacity pools end to end: max waits, escalation, limits held under load, upstream rate-limit
//! cooldowns, and refusing jobs no worker could ever run. Backend-neutral: only the public API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobplane::worker::{HandlerError, JobContext};
use jobplane::{
    Error, JobSpec, JobState, PoolConfig, PoolRequest, QueueConfig, WaitMode, WaitOptions,
};
use jobplane_tests::{guard, TestServer};
use tokio::sync::Notify;

use crate::spawn_worker;

const LONG: Duration = Duration::from_secs(25);

fn one_unit() -> PoolConfig {
    PoolConfig::new().max_units("requests", 1)
}

/// A handler that holds its unit until the test releases it.
fn holding(
    release: Arc<Notify>,
) -> impl Fn(JobContext) -> futures::future::BoxFuture<'static, Result<Vec<u8>, HandlerError>>
       + Send
       + Sync
       + 'static {
    move |ctx: JobContext| {
        let release = release.clone();
        Box::pin(async move {
            if ctx.payload() == b"hold" {
                release.notified().await;
            }
            Ok(ctx.job_id().as_bytes().to_vec())
        })
    }
}

async fn running(client: &jobplane::Client, id: &str) {
    let r = guard(
        "running",
        client.wait(
            id,
            WaitOptions::new().until([JobState::Running]).timeout(LONG),
        ),
    )
    .await
    .unwrap();
    assert!(r.reached, "{id} reached RUNNING");
}

#[tokio::test]
async fn fail_fast_expires_at_once_naming_the_pool_and_leaves_the_queue() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("gpu", one_unit()).await.unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "ff", 4, holding(release.clone()));
    let holder = client
        .submit(
            JobSpec::new("ff")
                .payload("hold")
                .pool(PoolRequest::new("gpu")),
        )
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    let ff = client
        .submit(JobSpec::new("ff").pool(PoolRequest::new("gpu").max_wait(Duration::ZERO)))
        .await
        .unwrap()
        .job;
    let w = guard("expired", client.wait(&ff.id, LONG)).await.unwrap();
    assert_eq!(w.job.state, JobState::Expired);
    let err = w.job.error.expect("error");
    assert_eq!(err.reason, "MAX_WAIT_EXCEEDED");
    assert!(err.message.contains("gpu"), "{}", err.message);
    let q = client.list_queues().await.unwrap();
    let ffq = q.iter().find(|q| q.name == "ff").unwrap();
    assert_eq!(ffq.depth, 0, "an expired job leaves the queue");
    release.notify_one();
    let w = guard("holder", client.wait(&holder.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(
        w.job.pool.as_deref(),
        Some("gpu"),
        "the job records its pool"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_waiting_job_runs_when_the_unit_frees_and_escalates_when_it_does_not() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("big", one_unit()).await.unwrap();
    client.configure_pool("small", one_unit()).await.unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "esc", 8, holding(release.clone()));
    let holder = client
        .submit(
            JobSpec::new("esc")
                .payload("hold")
                .pool(PoolRequest::new("big")),
        )
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    // Waits for `big` without bound: runs once the holder releases it.
    let patient = client
        .submit(JobSpec::new("esc").pool(PoolRequest::new("big")))
        .await
        .unwrap()
        .job;
    let got = client.get(&patient.id).await.unwrap();
    assert_eq!(got.state, JobState::Queued);
    assert_eq!(got.waiting_for.as_deref(), Some("capacity(pool=big)"));
    // Waits 200 ms for `big`, then takes `small`.
    let t = Instant::now();
    let escalating = client
        .submit(
            JobSpec::new("esc")
                .pool(PoolRequest::new("big").max_wait(Duration::from_millis(200)))
                .pool(PoolRequest::new("small")),
        )
        .await
        .unwrap()
        .job;
    let w = guard("escalated", client.wait(&escalating.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.pool.as_deref(), Some("small"));
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    release.notify_one();
    let w = guard("patient", client.wait(&patient.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.pool.as_deref(), Some("big"));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_100ms_max_wait_is_honoured_even_behind_a_full_queue_slot() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("free", one_unit()).await.unwrap();
    client
        .configure_queue(
            "narrow",
            QueueConfig {
                max_concurrency: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "narrow", 4, holding(release.clone()));
    let holder = client
        .submit(JobSpec::new("narrow").payload("hold"))
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    // The pool is free; the queue's only slot is not. The pool's max wait still bounds the wait.
    let t = Instant::now();
    let j = client
        .submit(
            JobSpec::new("narrow")
                .pool(PoolRequest::new("free").max_wait(Duration::from_millis(100))),
        )
        .await
        .unwrap()
        .job;
    let w = guard("expired", client.wait(&j.id, LONG)).await.unwrap();
    let waited = t.elapsed();
    assert_eq!(w.job.state, JobState::Expired);
    assert!(
        waited >= Duration::from_millis(100),
        "expired after {waited:?}"
    );
    assert!(waited < Duration::from_millis(100) + Duration::from_secs(5));
    release.notify_one();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn fifty_waiting_jobs_never_exceed_the_pool_and_all_run() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("three", PoolConfig::new().max_units("requests", 3))
        .await
        .unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let high = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (now, high) = (now.clone(), high.clone());
        workers.push(spawn_worker(
            &server.addr,
            "busy",
            8,
            move |_ctx: JobContext| {
                let (now, high) = (now.clone(), high.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    high.fetch_max(n, Ordering::SeqCst);
                    for _ in 0..50 {
                        tokio::task::yield_now().await;
                    }
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(vec![])
                }
            },
        ));
    }
    let ids: Vec<String> = client
        .submit_batch(
            (0..50)
                .map(|_| JobSpec::new("busy").pool(PoolRequest::new("three")))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.job.id)
        .collect();
    let r = guard("all ran", client.wait_many(ids, WaitMode::All, LONG))
        .await
        .unwrap();
    assert!(r.reached);
    assert!(r.results.iter().all(|w| w.job.state == JobState::Succeeded));
    assert!(
        high.load(Ordering::SeqCst) <= 3,
        "high-water mark {}",
        high.load(Ordering::SeqCst)
    );
    let pool = client.get_pool("three").await.unwrap();
    assert_eq!(pool.in_use.get("requests"), Some(&0));
    assert_eq!((pool.running, pool.waiting), (0, 0));
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn ten_workers_hit_a_rate_limit_at_once_and_every_job_succeeds_once() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("llm", PoolConfig::new().max_units("requests", 10))
        .await
        .unwrap();
    let successes: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let limited = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..10 {
        let (successes, limited) = (successes.clone(), limited.clone());
        workers.push(spawn_worker(
            &server.addr,
            "calls",
            1,
            move |ctx: JobContext| {
                let (successes, limited) = (successes.clone(), limited.clone());
                async move {
                    if ctx.attempt() == 1 {
                        limited.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::rate_limited(
                            Some("llm".into()),
                            Duration::from_millis(150),
                        ));
                    }
                    *successes
                        .lock()
                        .unwrap()
                        .entry(ctx.job_id().to_string())
                        .or_default() += 1;
                    Ok(vec![])
                }
            },
        ));
    }
    let t = Instant::now();
    let ids: Vec<String> = client
        .submit_batch(
            (0..10)
                .map(|_| {
                    JobSpec::new("calls")
                        .retries(0)
                        .pool(PoolRequest::new("llm"))
                })
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.job.id)
        .collect();
    let r = guard(
        "all succeeded",
        client.wait_many(ids.clone(), WaitMode::All, LONG),
    )
    .await
    .unwrap();
    assert!(r.reached);
    for w in &r.results {
        assert_eq!(w.job.state, JobState::Succeeded, "{:?}", w.job.error);
        assert_eq!(w.job.retries_used, 0, "a rate limit uses no retry");
        assert!(w.job.attempt >= 2);
    }
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "the cooldown held dispatch"
    );
    let successes = successes.lock().unwrap().clone();
    assert_eq!(successes.len(), 10);
    assert!(
        successes.values().all(|n| *n == 1),
        "no job succeeded twice"
    );
    assert!(limited.load(Ordering::SeqCst) >= 10);
    let pool = client.get_pool("llm").await.unwrap();
    assert!(pool.epoch >= 1, "a cooldown started");
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn submits_asking_for_what_no_pool_can_give_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("p", PoolConfig::new().max_units("requests", 2))
        .await
        .unwrap();
    let cases = [
        (
            JobSpec::new("q").pool(PoolRequest::new("nope")),
            "spec.pools[0].pool",
        ),
        (
            JobSpec::new("q").pool(PoolRequest::new("p").units("requests", 3)),
            "spec.pools[0].units[\"requests\"]",
        ),
    ];
    for (spec, field) in cases {
        match client.submit(spec).await {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f.as_deref(), Some(field)),
            other => panic!("expected INVALID_ARGUMENT on {field}, got {other:?}"),
        }
    }
    assert!(client
        .list(Default::default())
        .await
        .unwrap()
        .jobs
        .is_empty());
}

#[tokio::test]
async fn a_queue_can_refuse_jobs_no_connected_worker_could_ever_fit() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_queue(
            "strict",
            QueueConfig {
                reject_unplaceable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // No worker at all: a job that asks for labels is refused; a plain one is accepted.
    match client
        .submit(JobSpec::new("strict").selector("gpu", "a100"))
        .await
    {
        Err(Error::FailedPrecondition { reason, .. }) => {
            assert_eq!(reason.as_deref(), Some("NO_WORKER_FITS"))
        }
        other => panic!("expected NO_WORKER_FITS, got {other:?}"),
    }
    client.submit(JobSpec::new("strict")).await.unwrap();
    // Elsewhere such a job waits, saying what for.
    let waiting = client
        .submit(JobSpec::new("lenient").cpu(4.0))
        .await
        .unwrap()
        .job;
    assert_eq!(waiting.state, JobState::Queued);
}

/// `jobplane worker … -- sh -c SCRIPT` with extra worker flags.
fn cli_worker(addr: &str, queue: &str, flags: &[&str], script: &str) -> tokio::process::Child {
    tokio::process::Command::new(jobplane_tests::jobplane_bin())
        .arg("worker")
        .arg(queue)
        .args(flags)
        .args(["--", "sh", "-c", script])
        .env("JOBPLANE_ADDR", addr)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn worker")
}

#[tokio::test]
async fn cli_worker_reports_rate_limits_and_usage_from_its_commands_stderr() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool(
            "llm",
            PoolConfig::new().rate(jobplane::RateLimit::new(
                "tokens",
                100,
                Duration::from_secs(3600),
            )),
        )
        .await
        .unwrap();
    // First attempt: an upstream 429. Second: success, having used 10 of its 90 tokens.
    let script = r#"
        test "$JOBPLANE_POOL" = llm || { echo "no pool: $JOBPLANE_POOL" >&2; exit 1; }
        if [ "$JOBPLANE_ATTEMPT" = 1 ]; then
            echo "rate-limited: retry-after=300ms" >&2
            exit 75
        fi
        echo "usage: tokens=10" >&2
        echo done
    "#;
    let mut worker = cli_worker(&server.addr, "llm-calls", &["--concurrency", "2"], script);
    let t = Instant::now();
    let job = client
        .submit(
            JobSpec::new("llm-calls")
                .retries(0)
                .pool(PoolRequest::new("llm").units("tokens", 45)),
        )
        .await
        .unwrap()
        .job;
    let w = guard("done", client.wait(&job.id, LONG)).await.unwrap();
    assert_eq!(w.job.state, JobState::Succeeded, "{:?}", w.job.error);
    assert_eq!(w.job.attempt, 2);
    assert_eq!(w.job.retries_used, 0, "a rate limit uses no retry");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "the cooldown held the retry"
    );
    let pool = client.get_pool("llm").await.unwrap();
    assert_eq!(pool.epoch, 1, "one cooldown");
    // Charged 45 twice (100 → 10); the second attempt used 10 of its 45: 35 came back.
    assert!(
        (pool.tokens[0] - 45.0).abs() < 1.0,
        "tokens {:?}",
        pool.tokens
    );
    worker.kill().await.unwrap();
}

#[tokio::test]
async fn cli_worker_offers_cpu_memory_and_labels_for_placement() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut small = cli_worker(
        &server.addr,
        "render",
        &["--cpu", "1", "--memory", "1Gi", "--name", "small"],
        "echo small",
    );
    let mut big = cli_worker(
        &server.addr,
        "render",
        &[
            "--cpu", "8", "--memory", "16Gi", "--label", "gpu=a100", "--name", "big",
        ],
        "echo big",
    );
    for spec in [
        JobSpec::new("render").cpu(4.0),
        JobSpec::new("render").memory_bytes(2 << 30),
        JobSpec::new("render").selector("gpu", "a100"),
    ] {
        let job = client.submit(spec).await.unwrap().job;
        let w = guard("placed", client.wait(&job.id, LONG)).await.unwrap();
        assert_eq!(w.job.state, JobState::Succeeded);
        assert_eq!(
            w.job.result.as_deref(),
            Some(&b"big"[..]),
            "only the big worker fits"
        );
    }
    // Whatever was submitted first waited until the big worker was there; it is by now.
    let workers = client.list_workers().await.unwrap();
    let big_info = workers.iter().find(|w| w.name == "big").unwrap();
    assert_eq!(big_info.resources.cpu, 8.0);
    assert_eq!(big_info.resources.memory_bytes, 16 << 30);
    assert_eq!(big_info.labels.get("gpu").map(String::as_str), Some("a100"));
    small.kill().await.unwrap();
    big.kill().await.unwrap();
}

/// Hundreds of jobs on 8 workers whose upstream answers 429 about a third of the time (short,
/// overlapping cooldowns), and fails for good on some jobs: every job ends, none is lost or
/// succeeds twice, 429s use no retry, and it all ends in bounded time.
#[tokio::test]
async fn waves_of_rate_limits_mixed_with_failures_lose_nothing() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("api", PoolConfig::new().max_units("requests", 16))
        .await
        .unwrap();
    let successes: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let successes = successes.clone();
        workers.push(spawn_worker(
            &server.addr,
            "waves",
            4,
            move |ctx: JobContext| {
                let successes = successes.clone();
                async move {
                    // Deterministic per job and attempt, different per worker: ~1/3 rate limited.
                    let seed = ctx
                        .job_id()
                        .bytes()
                        .fold(w, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
                        ^ (ctx.attempt() as u64 * 0x9e37_79b9);
                    if ctx.payload() == b"broken" {
                        return Err(HandlerError::fatal("broken input"));
                    }
                    if seed.is_multiple_of(3) && ctx.attempt() < 6 {
                        return Err(HandlerError::rate_limited(
                            None,
                            Duration::from_millis(5 + seed % 20),
                        ));
                    }
                    *successes
                        .lock()
                        .unwrap()
                        .entry(ctx.job_id().to_string())
                        .or_default() += 1;
                    Ok(vec![])
                }
            },
        ));
    }
    let specs: Vec<JobSpec> = (0..300)
        .map(|i| {
            JobSpec::new("waves")
                .retries(0)
                .payload(if i % 10 == 0 { "broken" } else { "ok" })
                .pool(PoolRequest::new("api"))
        })
        .collect();
    let ids: Vec<String> = client
        .submit_batch(specs)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.job.id)
        .collect();
    let r = guard(
        "every job ended",
        client.wait_many(ids, WaitMode::All, LONG),
    )
    .await
    .unwrap();
    assert!(r.reached, "every job ended");
    let mut failed = 0;
    for w in &r.results {
        match w.job.state {
            JobState::Succeeded => assert_eq!(w.job.retries_used, 0),
            JobState::Failed => failed += 1,
            other => panic!("job {} ended {other:?}: {:?}", w.job.id, w.job.error),
        }
    }
    assert_eq!(failed, 30, "exactly the broken jobs failed");
    let successes = successes.lock().unwrap().clone();
    assert_eq!(successes.len(), 270);
    assert!(
        successes.values().all(|n| *n == 1),
        "no job succeeded twice"
    );
    let pool = client.get_pool("api").await.unwrap();
    assert!(pool.epoch >= 1);
    assert_eq!((pool.running, pool.waiting), (0, 0));
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn priority_with_fail_fast_and_immediate_escalation() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("a", one_unit()).await.unwrap();
    client.configure_pool("b", one_unit()).await.unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "prio", 8, holding(release.clone()));
    let holder = client
        .submit(
            JobSpec::new("prio")
                .payload("hold")
                .pool(PoolRequest::new("a")),
        )
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    // `a` is taken: a first pool of @0 moves on to `b` at once.
    let esc = client
        .submit(
            JobSpec::new("prio")
                .pool(PoolRequest::new("a").max_wait(Duration::ZERO))
                .pool(PoolRequest::new("b")),
        )
        .await
        .unwrap()
        .job;
    let w = guard("escalated", client.wait(&esc.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(w.job.pool.as_deref(), Some("b"));
    // A low-priority job waits for `a`; a high-priority fail-fast one arrives after it. When the
    // unit frees, the high-priority job takes it first.
    let low = client
        .submit(JobSpec::new("prio").pool(PoolRequest::new("a")))
        .await
        .unwrap()
        .job;
    let high = client
        .submit(
            JobSpec::new("prio")
                .priority(10)
                .pool(PoolRequest::new("a").max_wait(Duration::ZERO)),
        )
        .await
        .unwrap()
        .job;
    // Fail fast: `a` is held, so it expires rather than waiting behind nobody.
    let w = guard("expired", client.wait(&high.id, LONG)).await.unwrap();
    assert_eq!(w.job.state, JobState::Expired);
    let high = client
        .submit(
            JobSpec::new("prio")
                .priority(10)
                .pool(PoolRequest::new("a")),
        )
        .await
        .unwrap()
        .job;
    release.notify_one();
    let w = guard("high", client.wait(&high.id, LONG)).await.unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    let l = guard("low", client.wait(&low.id, LONG)).await.unwrap();
    assert_eq!(l.job.state, JobState::Succeeded);
    assert!(
        w.job.started_at <= l.job.started_at,
        "the high-priority job started first"
    );
    worker.stop().await.unwrap();
}

/// A worker with 4 cores runs one 4-core job at a time; each way an attempt can end (success,
/// failure, cancel, run timeout) gives the cores back, so the next 4-core job runs.
#[tokio::test]
async fn resources_are_released_on_every_kind_of_attempt_end() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let worker = jobplane::Worker::builder(server.addr.as_str())
        .concurrency(4)
        .cpu(4.0)
        .abort_grace(Duration::from_millis(200))
        .handler("heavy", |ctx: JobContext| async move {
            match ctx.payload() {
                b"fail" => Err(HandlerError::fatal("failed")),
                b"wait-cancel" => {
                    ctx.cancelled().await;
                    Err(HandlerError::cancelled())
                }
                // Ignores the cancellation of its run timeout: aborted after the grace.
                b"overrun" => {
                    std::future::pending::<()>().await;
                    Ok(vec![])
                }
                _ => Ok(vec![]),
            }
        })
        .build()
        .unwrap()
        .spawn();
    let heavy = |payload: &'static str| JobSpec::new("heavy").payload(payload).cpu(4.0).retries(0);
    let expect = [
        ("ok", JobState::Succeeded),
        ("fail", JobState::Failed),
        ("wait-cancel", JobState::Cancelled),
        ("overrun", JobState::TimedOut),
        ("ok", JobState::Succeeded),
    ];
    for (payload, end) in expect {
        let spec = if payload == "overrun" {
            heavy(payload).run_timeout(Duration::from_millis(200))
        } else {
            heavy(payload)
        };
        let job = client.submit(spec).await.unwrap().job;
        if payload == "wait-cancel" {
            running(&client, &job.id).await;
            client.cancel(&job.id, None).await.unwrap();
        }
        let w = guard(payload, client.wait(&job.id, LONG)).await.unwrap();
        assert_eq!(w.job.state, end, "{payload}: {:?}", w.job.error);
    }
    let workers = client.list_workers().await.unwrap();
    assert_eq!(workers[0].resources_in_use.cpu, 0.0, "every core came back");
    worker.stop().await.unwrap();
}

/// Five jobs wait for a pool's only unit; when it frees, exactly one of them starts (it then
/// holds the unit), the others stay queued; and each release starts the next one.
#[tokio::test]
async fn one_freed_unit_starts_exactly_one_job() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("solo", one_unit()).await.unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "solo", 8, holding(release.clone()));
    let spec = || {
        JobSpec::new("solo")
            .payload("hold")
            .pool(PoolRequest::new("solo"))
    };
    let holder = client.submit(spec()).await.unwrap().job;
    running(&client, &holder.id).await;
    let mut waiting: Vec<String> = Vec::new();
    for _ in 0..5 {
        waiting.push(client.submit(spec()).await.unwrap().job.id);
    }
    for round in 0..5 {
        release.notify_one();
        let r = guard(
            "one waiter starts",
            client.wait_many(
                waiting.clone(),
                WaitMode::Any,
                WaitOptions::new().until([JobState::Running]).timeout(LONG),
            ),
        )
        .await
        .unwrap();
        assert!(r.reached);
        let running_now: Vec<String> = r
            .results
            .iter()
            .filter(|w| w.job.state == JobState::Running || w.job.state == JobState::Leased)
            .map(|w| w.job.id.clone())
            .collect();
        assert_eq!(running_now.len(), 1, "round {round}: {running_now:?}");
        waiting.retain(|id| *id != running_now[0]);
        for id in &waiting {
            assert_eq!(client.get(id).await.unwrap().state, JobState::Queued);
        }
    }
    release.notify_one();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn max_waits_differ_per_queue() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.configure_pool("shared", one_unit()).await.unwrap();
    client
        .configure_queue(
            "impatient",
            QueueConfig {
                default_max_wait: Some(Duration::from_millis(100)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let release = Arc::new(Notify::new());
    let w1 = spawn_worker(&server.addr, "impatient", 4, holding(release.clone()));
    let w2 = spawn_worker(&server.addr, "patient", 4, holding(release.clone()));
    let holder = client
        .submit(
            JobSpec::new("patient")
                .payload("hold")
                .pool(PoolRequest::new("shared")),
        )
        .await
        .unwrap()
        .job;
    running(&client, &holder.id).await;
    let impatient = client
        .submit(JobSpec::new("impatient").pool(PoolRequest::new("shared")))
        .await
        .unwrap()
        .job;
    let patient = client
        .submit(JobSpec::new("patient").pool(PoolRequest::new("shared")))
        .await
        .unwrap()
        .job;
    let w = guard("impatient expires", client.wait(&impatient.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Expired);
    assert_eq!(
        client.get(&patient.id).await.unwrap().state,
        JobState::Queued
    );
    release.notify_one();
    let w = guard("patient runs", client.wait(&patient.id, LONG))
        .await
        .unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_that_exactly_fits_the_remaining_capacity_runs_at_once() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("three", PoolConfig::new().max_units("requests", 3))
        .await
        .unwrap();
    let release = Arc::new(Notify::new());
    let worker = spawn_worker(&server.addr, "fit", 4, holding(release.clone()));
    let big = client
        .submit(
            JobSpec::new("fit")
                .payload("hold")
                .pool(PoolRequest::new("three").units("requests", 2)),
        )
        .await
        .unwrap()
        .job;
    running(&client, &big.id).await;
    // One unit left: a one-unit job fits exactly and runs while the two-unit job still holds
    // its units, with fail fast to prove it did not wait.
    let small = client
        .submit(JobSpec::new("fit").pool(PoolRequest::new("three").max_wait(Duration::ZERO)))
        .await
        .unwrap()
        .job;
    let w = guard("small", client.wait(&small.id, LONG)).await.unwrap();
    assert_eq!(w.job.state, JobState::Succeeded);
    assert_eq!(client.get(&big.id).await.unwrap().state, JobState::Running);
    release.notify_one();
    worker.stop().await.unwrap();
}

/// A 2-core and an 8-core worker; a 2-core job submitted first goes to the 2-core worker (best
/// fit), so the 8-core job submitted next runs at the same time on the 8-core one.
#[tokio::test]
async fn jobs_are_packed_on_the_worker_they_fit_best() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // Handlers hold until their gate opens (a watch: no wake-up can be missed).
    let (probe_gate, probe_rx) = tokio::sync::watch::channel(false);
    let (main_gate, main_rx) = tokio::sync::watch::channel(false);
    let start = |name: &'static str, cores: f64| {
        let (probe_rx, main_rx) = (probe_rx.clone(), main_rx.clone());
        jobplane::Worker::builder(server.addr.as_str())
            .concurrency(4)
            .cpu(cores)
            .name(name)
            .handler("pack", move |ctx: JobContext| {
                let mut gate = if ctx.payload() == b"probe" {
                    probe_rx.clone()
                } else {
                    main_rx.clone()
                };
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(vec![])
                }
            })
            .build()
            .unwrap()
            .spawn()
    };
    let small_worker = start("two", 2.0);
    let big_worker = start("eight", 8.0);
    // Both workers are connected once a job fitting only each of them has started.
    let probe = |cores: f64| JobSpec::new("pack").payload("probe").cpu(cores);
    let probe_small = client.submit(probe(2.0)).await.unwrap().job;
    let probe_big = client.submit(probe(8.0)).await.unwrap().job;
    for id in [&probe_small.id, &probe_big.id] {
        running(&client, id).await;
    }
    probe_gate.send_replace(true);
    for id in [&probe_small.id, &probe_big.id] {
        guard("probe", client.wait(id, LONG)).await.unwrap();
    }
    let two = client
        .submit(JobSpec::new("pack").cpu(2.0))
        .await
        .unwrap()
        .job;
    running(&client, &two.id).await;
    let eight = client
        .submit(JobSpec::new("pack").cpu(8.0))
        .await
        .unwrap()
        .job;
    running(&client, &eight.id).await;
    let workers = client.list_workers().await.unwrap();
    let id_of = |name: &str| workers.iter().find(|w| w.name == name).unwrap().id.clone();
    assert_eq!(
        client.get(&two.id).await.unwrap().worker_id.as_deref(),
        Some(id_of("two").as_str()),
        "the small job went to the small worker"
    );
    assert_eq!(
        client.get(&eight.id).await.unwrap().worker_id.as_deref(),
        Some(id_of("eight").as_str())
    );
    main_gate.send_replace(true);
    for id in [&two.id, &eight.id] {
        let w = guard("done", client.wait(id, LONG)).await.unwrap();
        assert_eq!(w.job.state, JobState::Succeeded);
    }
    small_worker.stop().await.unwrap();
    big_worker.stop().await.unwrap();
}

/// A worker that is lost (stops heartbeating) gives back the cores its attempt held: when it
/// comes back under the same id, a job needing all its cores is assigned to it.
#[tokio::test]
async fn resources_are_released_when_the_worker_is_lost() {
    use jobplane_proto::pb;
    use jobplane_tests::RawWorker;
    let server = TestServer::start().await;
    let client = server.client().await;
    let hello = || pb::WorkerHello {
        worker_id: "lost-worker".into(),
        queues: vec!["lossy".into()],
        concurrency: 4,
        name: "raw".into(),
        resources: Some(pb::Resources {
            cpu: 4.0,
            memory_bytes: 0,
        }),
        ..Default::default()
    };
    let mut raw = RawWorker::connect_hello(&server.addr, hello()).await;
    let first = client
        .submit(JobSpec::new("lossy").cpu(4.0).retries(0))
        .await
        .unwrap()
        .job;
    let a = raw.assignments().await;
    assert_eq!(a[0].job_id, first.id);
    raw.ack(&first.id, a[0].attempt);
    running(&client, &first.id).await;
    // Gone without a word: the lease runs out and the attempt is lost.
    drop(raw);
    let w = guard("lost", client.wait(&first.id, LONG)).await.unwrap();
    assert_eq!(w.job.state, JobState::Failed);
    assert_eq!(w.job.error.unwrap().reason, "WORKER_LOST");
    let mut raw = RawWorker::connect_hello(&server.addr, hello()).await;
    let second = client
        .submit(JobSpec::new("lossy").cpu(4.0))
        .await
        .unwrap()
        .job;
    let a = raw.assignments().await;
    assert_eq!(a[0].job_id, second.id, "all four cores are free again");
}

#[tokio::test]
async fn a_shared_pool_is_shared_fairly_between_namespaces() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .configure_pool("llm", one_unit().shared(true))
        .await
        .unwrap();
    let flood = client.with_namespace("flood");
    let light = client.with_namespace("light");
    // A pool of another namespace is not shared: only `default` can share.
    let err = flood
        .configure_pool("mine", one_unit().shared(true))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { field, .. } if field.as_deref() == Some("config.shared")),
        "{err:?}"
    );

    let started: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let release = Arc::new(Notify::new());
    let mut workers = Vec::new();
    for (ns, tag) in [("flood", "f"), ("light", "l")] {
        let (started, release) = (started.clone(), release.clone());
        let handler = move |ctx: JobContext| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                started.lock().unwrap().push(tag);
                if ctx.payload() == b"hold" {
                    release.notified().await;
                }
                Ok(vec![])
            }
        };
        workers.push(
            jobplane::Worker::builder(server.addr.as_str())
                .namespace(ns)
                .concurrency(8)
                .handler("work", handler)
                .build()
                .unwrap()
                .spawn(),
        );
    }
    let llm = || PoolRequest::new("llm");
    let holder = flood
        .submit(JobSpec::new("work").payload("hold").pool(llm()))
        .await
        .unwrap()
        .job;
    running(&flood, &holder.id).await;
    // The flooding namespace queues 20 jobs first; the light one 5 after them.
    let mut flood_ids: Vec<String> = Vec::new();
    for _ in 0..20 {
        flood_ids.push(
            flood
                .submit(JobSpec::new("work").pool(llm()))
                .await
                .unwrap()
                .job
                .id,
        );
    }
    let mut light_ids: Vec<String> = Vec::new();
    for _ in 0..5 {
        light_ids.push(
            light
                .submit(JobSpec::new("work").pool(llm()))
                .await
                .unwrap()
                .job
                .id,
        );
    }
    let pool = client.get_pool("llm").await.unwrap();
    assert_eq!((pool.running, pool.waiting), (1, 25), "{pool:?}");
    release.notify_one();
    for (c, ids) in [(&flood, flood_ids), (&light, light_ids)] {
        let r = guard("all ran", c.wait_many(ids, WaitMode::All, LONG))
            .await
            .unwrap();
        assert!(r.reached);
        assert!(r.results.iter().all(|w| w.job.state == JobState::Succeeded));
    }
    // First in, first out would start the light namespace's jobs last; sharing the pool
    // alternates between the namespaces while both wait.
    let order: String = started.lock().unwrap().concat();
    assert_eq!(&order[..11], "flflflflflf", "start order {order}");
    for w in workers {
        w.stop().await.unwrap();
    }
}
