//! jobplane benchmark: starts a service on a temp SQLite file, runs no-op jobs on in-process
//! workers over real gRPC, and prints figures. The last line is JSON.
//!
//! ```text
//! cargo run --release -p jobplane-bench -- --jobs 20000 --workers 4
//! ```
//!
//! Phases:
//! 1. batched: submitters send `SubmitJobs` batches; jobs/s from the first submit until every job
//!    is SUCCEEDED (confirmed by WaitJobs);
//! 2. unbatched: concurrent single `SubmitJob` calls, same measure;
//! 3. latency at low load: one job at a time; submit → handler start, and handler end →
//!    WaitJob return (the wake-up path);
//! 4. pools: a job holding a pool's only unit ends → the waiting job's handler starts;
//!    throughput and utilisation of a pool of 8 units with 1,000 waiting jobs; the scheduler's
//!    own cost per decision with 100,000 waiting jobs across 100 pools (no network).
//!
//! With `--db postgres://HOST/DB` the bench creates a fresh database on that server
//! (`jp_bench_<uuid>`, dropped at the end) and runs `--instances N` whole services in this process
//! on it (`jobplane_server::serve`, each on its own port; one leads, the others forward); the
//! client is given every address (one connection, to an instance chosen at random, failing over
//! to the next) and the workers are spread over them. Two more phases are
//! meant for that (`--phases cross-wake,idle`): release → wake across instances (the holder's
//! worker on one instance, the waiter's on another) and the queries per second an idle cluster
//! costs the database.
//!
//! With `--trace-export` everything is traced and exported over OTLP/gRPC, as in production with
//! the default sampler: the in-process service (RPC spans, every job's lifecycle spans) and the
//! SDK's client and worker spans go through one batch exporter, configured by the standard
//! variables, to a receiver in this process that decodes and counts them. Compare a run with
//! and without it for the cost of tracing.

mod cluster;
mod otlp;
mod pools;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use jobplane::worker::{JobContext, Worker, WorkerHandle};
use jobplane::{Client, JobSpec, JobState, WaitMode};

/// mimalloc: as the `jobplane` binary: the service allocates many small short-lived values (jobs, events, spans); glibc's
/// allocator spent a quarter of the CPU in malloc/free under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Prints jobplane throughput and latency figures")]
struct Args {
    /// Jobs in the batched phase (the unbatched phase runs a quarter of them).
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// In-process workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Concurrency of each worker.
    #[arg(long, default_value_t = 256)]
    concurrency: u32,
    /// Jobs per SubmitJobs call in the batched phase.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 8)]
    submitters: usize,
    /// Use a service already running at this address instead of starting one in-process.
    #[arg(long)]
    addr: Option<String>,
    /// SQLite durability: `full` (survives power loss) or `normal` (survives kill -9).
    #[arg(long, default_value = "full")]
    synchronous: String,
    /// Database of the in-process service: default a temp SQLite file; with `postgres://HOST/DB`
    /// a fresh database `jp_bench_<uuid>` is created on that server (DB is only used to connect)
    /// and dropped at the end.
    #[arg(long)]
    db: Option<String>,
    /// Keep the PostgreSQL database the bench created.
    #[arg(long)]
    keep_db: bool,
    /// In-process instances on the same database (more than one needs PostgreSQL); the client
    /// is given every address and worker `i` connects to instance `i mod N`.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Phases to run, comma-separated: submit-only, batched, unbatched, latency, pools, sched,
    /// cross-wake (2+ instances), idle (PostgreSQL).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "submit-only,batched,unbatched,latency,pools,sched"
    )]
    phases: Vec<String>,
    /// Rounds of the cross-instance release → wake phase.
    #[arg(long, default_value_t = 1000)]
    cross_wake_rounds: usize,
    /// Length of the idle probe, in seconds.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Consecutive windows of the idle probe (each printed; the JSON's figure is the first).
    #[arg(long, default_value_t = 1)]
    idle_windows: usize,
    /// Jobs in the latency phase.
    #[arg(long, default_value_t = 1000)]
    latency_jobs: usize,
    /// Rounds of the pool release → wake phase.
    #[arg(long, default_value_t = 500)]
    pool_wake_rounds: usize,
    /// Jobs of the pool throughput phase.
    #[arg(long, default_value_t = 1000)]
    pool_jobs: usize,
    /// Units of the pool in the throughput phase.
    #[arg(long, default_value_t = 8)]
    pool_limit: u64,
    /// How long each job of the pool throughput phase holds its unit, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pool_work_ms: u64,
    /// Jobs of the submit-only phase (0 skips it); they stay queued, on a queue no worker serves.
    #[arg(long, default_value_t = 20_000)]
    submit_only_jobs: usize,
    /// Waiting jobs of the scheduler decision-cost phase (spread over 100 pools).
    #[arg(long, default_value_t = 100_000)]
    sched_jobs: usize,
    /// Trace everything and export it over OTLP to a receiver started in this process
    /// (in-process service only).
    #[arg(long)]
    trace_export: bool,
}

#[derive(Default)]
struct Marks {
    started: HashMap<String, Instant>,
    finished: HashMap<String, Instant>,
}

async fn start_workers(
    addrs: &[String],
    n: usize,
    concurrency: u32,
    marks: Arc<Mutex<Marks>>,
) -> Vec<WorkerHandle> {
    (0..n)
        .map(|i| {
            let marks = marks.clone();
            Worker::builder(addrs[i % addrs.len()].as_str())
                .concurrency(concurrency)
                .handler("bench", move |ctx: JobContext| {
                    let marks = marks.clone();
                    async move {
                        let now = Instant::now();
                        if ctx.payload() == b"mark" {
                            marks
                                .lock()
                                .expect("marks")
                                .started
                                .insert(ctx.job_id().to_string(), now);
                            marks
                                .lock()
                                .expect("marks")
                                .finished
                                .insert(ctx.job_id().to_string(), Instant::now());
                        }
                        Ok(Vec::new())
                    }
                })
                .build()
                .expect("worker")
                .spawn()
        })
        .collect()
}

async fn wait_all(client: &Client, ids: &[String]) -> anyhow::Result<()> {
    for chunk in ids.chunks(10_000) {
        loop {
            let r = client
                .wait_many(
                    chunk.iter().cloned(),
                    WaitMode::All,
                    Duration::from_secs(60),
                )
                .await?;
            if r.reached {
                anyhow::ensure!(
                    r.results.iter().all(|w| w.job.state == JobState::Succeeded),
                    "a job did not succeed"
                );
                break;
            }
        }
    }
    Ok(())
}

async fn throughput(
    client: &Client,
    n: usize,
    batch: usize,
    submitters: usize,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let per = n.div_ceil(submitters);
    let mut tasks = Vec::new();
    for s in 0..submitters {
        let c = client.clone();
        let count = per.min(n.saturating_sub(s * per));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(count);
            let mut left = count;
            while left > 0 {
                let k = left.min(batch);
                if batch == 1 {
                    ids.push(c.submit(JobSpec::new("bench")).await?.job.id);
                } else {
                    let specs = (0..k).map(|_| JobSpec::new("bench")).collect();
                    ids.extend(c.submit_batch(specs).await?.into_iter().map(|s| s.job.id));
                }
                left -= k;
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.extend(t.await??);
    }
    let submitted = t0.elapsed();
    wait_all(client, &ids).await?;
    let total = t0.elapsed();
    eprintln!(
        "  {n} jobs: submitted in {:.3}s, all succeeded after {:.3}s",
        submitted.as_secs_f64(),
        total.as_secs_f64()
    );
    Ok(n as f64 / total.as_secs_f64())
}

/// Submits `n` jobs in batches to a queue without workers; returns once all are committed.
async fn submit_only(
    client: &Client,
    n: usize,
    batch: usize,
    submitters: usize,
) -> anyhow::Result<()> {
    let per = n.div_ceil(submitters);
    let mut tasks = Vec::new();
    for s in 0..submitters {
        let c = client.clone();
        let mut left = per.min(n.saturating_sub(s * per));
        tasks.push(tokio::spawn(async move {
            while left > 0 {
                let k = left.min(batch);
                let specs = (0..k).map(|_| JobSpec::new("bench-submit")).collect();
                c.submit_batch(specs).await?;
                left -= k;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The receiver's port is chosen before any thread exists, so that the standard variable
    // can name it: the exporter is configured exactly as a deployment's would be.
    let receiver = if args.trace_export {
        anyhow::ensure!(
            args.addr.is_none(),
            "--trace-export needs the in-process service"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", listener.local_addr()?),
        );
        std::env::remove_var("OTEL_SDK_DISABLED");
        // The default queue (2,048 spans) overflows at these rates and drops spans, which would
        // hide their cost: keep every span (unless the caller chose a size).
        if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
            std::env::set_var("OTEL_BSP_MAX_QUEUE_SIZE", "1000000");
        }
        Some((otlp::Receiver::default(), listener))
    } else {
        None
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args, receiver))
}

async fn run(
    args: Args,
    receiver: Option<(otlp::Receiver, std::net::TcpListener)>,
) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let receiver = match receiver {
        Some((r, listener)) => {
            r.serve(listener)?;
            Some(r)
        }
        None => None,
    };
    let telemetry = match &receiver {
        Some(_) => {
            let (telemetry, layer) =
                jobplane_server::telemetry::Telemetry::from_env("jobplane-bench")?;
            let layer = layer.context("trace export is configured")?;
            tracing_subscriber::registry()
                .with(layer.with_filter(jobplane_server::telemetry::export_filter()))
                .init();
            Some(telemetry)
        }
        None => None,
    };
    let phases: BTreeSet<&str> = args.phases.iter().map(|p| p.trim()).collect();
    let known = [
        "submit-only",
        "batched",
        "unbatched",
        "latency",
        "pools",
        "sched",
        "cross-wake",
        "idle",
    ];
    if let Some(p) = phases.iter().find(|p| !known.contains(p)) {
        anyhow::bail!("unknown phase {p:?}; known: {known:?}");
    }
    let dir = tempfile::tempdir()?;
    let engine = jobplane_server::EngineConfig {
        job_spans: args.trace_export,
        ..Default::default()
    };
    let postgres = args
        .db
        .as_deref()
        .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
    anyhow::ensure!(
        args.instances >= 1 && (args.instances == 1 || postgres),
        "--instances above 1 needs --db postgres://…"
    );
    // Dropped when this value is, also when a phase fails (unless `--keep-db`).
    let bench_db = match (&args.db, postgres, &args.addr) {
        (Some(server), true, None) => Some(cluster::BenchDb::create(server, args.keep_db).await?),
        _ => None,
    };
    let db_kind = match (&args.addr, postgres) {
        (Some(_), _) => "external",
        (None, true) => "postgres",
        (None, false) => "sqlite",
    };
    // Either services in this process on a temp database, or one already running elsewhere
    // (`--addr`, several comma-separated), e.g. to keep the service and the load generator in
    // separate processes.
    let (addrs, server, instances) = match (&args.addr, &bench_db) {
        (Some(addr), _) => (
            addr.split(',').map(str::to_owned).collect::<Vec<_>>(),
            None,
            None,
        ),
        (None, Some(db)) => {
            let instances = cluster::Instances::start(&db.url, args.instances, engine).await?;
            (instances.addrs.clone(), None, Some(instances))
        }
        (None, None) => {
            let db = args.db.clone().unwrap_or_else(|| {
                format!(
                    "sqlite://{}?synchronous={}",
                    dir.path().join("bench.db").display(),
                    args.synchronous
                )
            });
            let store = jobplane_server::store::open(&db).await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = format!("http://{}", listener.local_addr()?);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(jobplane_server::run(listener, store, engine, async {
                let _ = stop_rx.await;
            }));
            // The service answers UNAVAILABLE ("starting") until its engine has recovered.
            cluster::ready(&addr).await?;
            (vec![addr], Some((stop_tx, task)), None)
        }
    };
    let addr = addrs.join(",");
    if let Some(db) = &bench_db {
        eprintln!(
            "{} instance(s) on PostgreSQL database {}: {addr}",
            addrs.len(),
            db.name()
        );
    }
    let client = Client::connect(addr.clone()).await.context("connect")?;
    let marks = Arc::new(Mutex::new(Marks::default()));
    let workers = start_workers(&addrs, args.workers, args.concurrency, marks.clone()).await;
    // Warm up: connections, prepared statements, worker streams.
    throughput(&client, 500, 100, 2).await?;

    // Submits alone, to a queue no worker serves: what the client can push (the Python SDK's
    // bench measures the same, to compare the binding with the Rust client).
    let mut submit_only_rate = 0.0;
    if phases.contains("submit-only") && args.submit_only_jobs > 0 {
        let n = args.submit_only_jobs;
        let t0 = Instant::now();
        submit_only(&client, n, args.batch, args.submitters).await?;
        submit_only_rate = n as f64 / t0.elapsed().as_secs_f64();
        eprintln!(
            "submit only: {n} jobs, batches of {}, {} submitters",
            args.batch, args.submitters
        );
        eprintln!("  {submit_only_rate:.0} jobs/s");
    }

    let mut batched = 0.0;
    if phases.contains("batched") {
        eprintln!(
            "batched: {} jobs, batches of {}, {} submitters, {} workers x {}",
            args.jobs, args.batch, args.submitters, args.workers, args.concurrency
        );
        batched = throughput(&client, args.jobs, args.batch, args.submitters).await?;
        eprintln!("  {batched:.0} jobs/s");
    }
    let mut unbatched = 0.0;
    if phases.contains("unbatched") {
        let unbatched_n = (args.jobs / 4).max(1);
        eprintln!(
            "unbatched: {unbatched_n} jobs, {} concurrent single submits",
            args.submitters * 8
        );
        unbatched = throughput(&client, unbatched_n, 1, args.submitters * 8).await?;
        eprintln!("  {unbatched:.0} jobs/s");
    }

    let mut start = Histogram::<u64>::new(3)?;
    let mut wake = Histogram::<u64>::new(3)?;
    let mut submit_rtt = Histogram::<u64>::new(3)?;
    if phases.contains("latency") {
        eprintln!("latency: {} jobs one at a time", args.latency_jobs);
        for _ in 0..args.latency_jobs {
            let t = Instant::now();
            let id = client
                .submit(JobSpec::new("bench").payload("mark"))
                .await?
                .job
                .id;
            submit_rtt.record(t.elapsed().as_micros() as u64)?;
            let w = client.wait(&id, Duration::from_secs(30)).await?;
            let woke = Instant::now();
            anyhow::ensure!(w.job.state == JobState::Succeeded, "latency job failed");
            let m = marks.lock().expect("marks");
            let s = m.started[&id];
            let f = m.finished[&id];
            start.record(s.duration_since(t).as_micros() as u64)?;
            wake.record(woke.duration_since(f).as_micros() as u64)?;
        }
        eprintln!(
            "  submit round trip p50 {:.3} ms p99 {:.3} ms",
            ms(&submit_rtt, 0.5),
            ms(&submit_rtt, 0.99)
        );
        eprintln!(
            "  submit->start p50 {:.3} ms p99 {:.3} ms; handler end->wait returns p50 {:.3} ms p99 {:.3} ms",
            ms(&start, 0.5),
            ms(&start, 0.99),
            ms(&wake, 0.5),
            ms(&wake, 0.99)
        );
    }

    let mut pool_wake = Histogram::<u64>::new(3)?;
    let (mut pool_tput, mut pool_util, mut pool_gaps) = (0.0, 0.0, Histogram::<u64>::new(3)?);
    if phases.contains("pools") {
        eprintln!("pools: release -> wake, {} rounds", args.pool_wake_rounds);
        pool_wake = pools::release_wake(&client, &addrs[0], args.pool_wake_rounds).await?;
        eprintln!(
            "  holder's handler returns -> waiter's handler starts p50 {:.3} ms p99 {:.3} ms",
            ms(&pool_wake, 0.5),
            ms(&pool_wake, 0.99)
        );
        eprintln!(
            "pools: {} jobs of {} ms through a pool of {} units",
            args.pool_jobs, args.pool_work_ms, args.pool_limit
        );
        (pool_tput, pool_util, pool_gaps) = pools::pool_throughput(
            &client,
            &addrs,
            args.pool_jobs,
            args.pool_limit,
            Duration::from_millis(args.pool_work_ms),
        )
        .await?;
        eprintln!(
            "  {pool_tput:.0} jobs/s, utilisation {:.1}% (ideal {:.0} jobs/s); hand-over gap p50 {:.3} ms p99 {:.3} ms",
            pool_util * 100.0,
            args.pool_limit as f64 * 1000.0 / args.pool_work_ms as f64,
            ms(&pool_gaps, 0.5),
            ms(&pool_gaps, 0.99)
        );
    }
    let (mut enqueue_us, mut decide_us) = (0.0, 0.0);
    if phases.contains("sched") {
        eprintln!(
            "scheduler alone: {} waiting jobs over 100 pools",
            args.sched_jobs
        );
        (enqueue_us, decide_us) = pools::decision_cost(args.sched_jobs, 100);
        eprintln!(
            "  enqueue {enqueue_us:.2} us/job, release + dispatch decision {decide_us:.2} us"
        );
    }

    let mut cross_wake = Histogram::<u64>::new(3)?;
    if phases.contains("cross-wake") {
        anyhow::ensure!(addrs.len() >= 2, "cross-wake needs --instances 2 or more");
        let leader = match &bench_db {
            Some(db) => cluster::leader(&db.url, &addrs).await?,
            None => None,
        };
        // The holder's worker on B, the waiter's on A: with 3+ instances neither leads (both
        // forward); with 2, A follows and B leads.
        let others: Vec<usize> = (0..addrs.len()).filter(|i| Some(*i) != leader).collect();
        let (a, b) = match leader {
            Some(l) if others.len() < 2 => (others[0], l),
            _ => (others[0], others[1]),
        };
        eprintln!(
            "cross-wake: {} rounds, pool of 1 unit, holder's worker on instance {b}, waiter's on \
             instance {a} (leader: {leader:?})",
            args.cross_wake_rounds
        );
        cross_wake = cluster::cross_wake(&addrs[a], &addrs[b], args.cross_wake_rounds).await?;
        eprintln!(
            "  holder's handler returns -> waiter's handler starts p50 {:.3} ms p99 {:.3} ms",
            ms(&cross_wake, 0.5),
            ms(&cross_wake, 0.99)
        );
    }
    let mut idle_qps = 0.0;
    let mut idle_windows = Vec::new();
    if phases.contains("idle") {
        let db = bench_db
            .as_ref()
            .context("the idle probe needs --db postgres://…")?;
        eprintln!(
            "idle: {} instance(s), {} workers connected, no work; {} s of pg_stat_database",
            addrs.len(),
            args.workers,
            args.idle_secs
        );
        idle_windows =
            cluster::idle_queries_per_sec(&db.url, args.idle_secs, args.idle_windows).await?;
        idle_qps = idle_windows[0];
        for (i, qps) in idle_windows.iter().enumerate() {
            eprintln!(
                "  window {}: {qps:.2} transactions/s committed in database {}",
                i + 1,
                db.name()
            );
        }
    }

    for w in workers {
        w.stop().await?;
    }
    if let Some((stop_tx, task)) = server {
        let _ = stop_tx.send(());
        task.await??;
    }
    if let Some(instances) = instances {
        instances.stop().await?;
    }
    if let Some(db) = bench_db {
        if args.keep_db {
            eprintln!("kept database {}", db.url);
        }
        drop(db);
    }
    let mut spans_exported = 0;
    if let (Some(t), Some(r)) = (telemetry, &receiver) {
        t.shutdown().await;
        spans_exported = r.spans();
        eprintln!("trace export: {spans_exported} spans received");
    }
    let out = serde_json::json!({
        "jobs": args.jobs,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "batch": args.batch,
        "jobs_per_sec": batched.round(),
        "submit_only_jobs_per_sec": submit_only_rate.round(),
        "unbatched_jobs_per_sec": unbatched.round(),
        "start_p50_ms": ms(&start, 0.5),
        "start_p99_ms": ms(&start, 0.99),
        "wait_wake_p50_ms": ms(&wake, 0.5),
        "wait_wake_p99_ms": ms(&wake, 0.99),
        "submit_rtt_p50_ms": ms(&submit_rtt, 0.5),
        "submit_rtt_p99_ms": ms(&submit_rtt, 0.99),
        "pool_wake_p50_ms": ms(&pool_wake, 0.5),
        "pool_wake_p99_ms": ms(&pool_wake, 0.99),
        "pool_jobs_per_sec": pool_tput.round(),
        "pool_utilisation": (pool_util * 1000.0).round() / 1000.0,
        "pool_handover_p50_ms": ms(&pool_gaps, 0.5),
        "pool_handover_p99_ms": ms(&pool_gaps, 0.99),
        "sched_enqueue_us": (enqueue_us * 100.0).round() / 100.0,
        "sched_decision_us": (decide_us * 100.0).round() / 100.0,
        "instances": addrs.len(),
        "db": db_kind,
        "phases": phases,
        "cross_wake_p50_ms": ms(&cross_wake, 0.5),
        "cross_wake_p99_ms": ms(&cross_wake, 0.99),
        "idle_queries_per_sec": (idle_qps * 100.0).round() / 100.0,
        "idle_queries_per_sec_windows": idle_windows
            .iter()
            .map(|q| (q * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        "trace_export": args.trace_export,
        "spans_exported": spans_exported,
    });
    println!("{out}");
    Ok(())
}
