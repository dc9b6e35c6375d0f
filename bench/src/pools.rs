//! Scheduling benchmarks: pool release → waiter start latency, throughput under a pool limit,
//! and the scheduler's decision cost with many waiting jobs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use jobplane::worker::{JobContext, Worker, WorkerHandle};
use jobplane::{Client, JobSpec, JobState, PoolConfig, PoolRequest, WaitMode, WaitOptions};
use jobplane_server::engine::model::{
    Demand, JobId, Name, PoolConfig as EnginePoolConfig, PoolKey, PoolRequest as EngineRequest,
    QueueKey, Resources, WorkerId,
};
use jobplane_server::engine::scheduler::{Decision, Scheduler, WorkerSpec};
use tokio::sync::{mpsc, oneshot};

/// Release → wake: a job holds a pool's only unit while another waits for it; the holder
/// finishes, and the time until the waiter's handler starts is recorded.
pub async fn release_wake(
    client: &Client,
    addr: &str,
    rounds: usize,
) -> anyhow::Result<Histogram<u64>> {
    client
        .configure_pool("bench-one", PoolConfig::new().max_units("requests", 1))
        .await?;
    // The holder's handler waits for the bench to let it go, then notes when it returned.
    let (release_tx, release_rx) = mpsc::unbounded_channel::<oneshot::Sender<Instant>>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    let started: Arc<Mutex<Option<oneshot::Sender<Instant>>>> = Arc::new(Mutex::new(None));
    let worker = {
        let started = started.clone();
        Worker::builder(addr)
            .concurrency(2)
            .handler("pool-wake", move |ctx: JobContext| {
                let release_rx = release_rx.clone();
                let started = started.clone();
                async move {
                    let now = Instant::now();
                    if ctx.payload() == b"hold" {
                        let done = release_rx.lock().await.recv().await;
                        if let Some(done) = done {
                            let _ = done.send(Instant::now());
                        }
                    } else if let Some(tx) = started.lock().expect("started").take() {
                        let _ = tx.send(now);
                    }
                    Ok(Vec::new())
                }
            })
            .build()?
            .spawn()
    };
    let spec = |payload: &'static str| {
        JobSpec::new("pool-wake")
            .payload(payload)
            .pool(PoolRequest::new("bench-one"))
    };
    let h = wake_rounds(
        client,
        client,
        || spec("hold"),
        || spec("wait"),
        &started,
        &release_tx,
        rounds,
    )
    .await?;
    worker.stop().await?;
    Ok(h)
}

/// The measuring loop of a release → wake bench on a pool of one unit: each round, a holder
/// (`hold`, through `holder_client`) takes the unit, a waiter (`wait`, through `waiter_client`)
/// queues behind it, the holder's handler is let go through `release_tx` (it answers with when
/// it returned) and the waiter's handler reports its start through `started`. Records, in
/// microseconds, from the holder's return to the waiter's start.
pub(crate) async fn wake_rounds(
    holder_client: &Client,
    waiter_client: &Client,
    hold: impl Fn() -> JobSpec,
    wait: impl Fn() -> JobSpec,
    started: &Mutex<Option<oneshot::Sender<Instant>>>,
    release_tx: &mpsc::UnboundedSender<oneshot::Sender<Instant>>,
    rounds: usize,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3)?;
    for _ in 0..rounds {
        let holder = holder_client.submit(hold()).await?.job.id;
        holder_client
            .wait(
                &holder,
                WaitOptions::new()
                    .until([JobState::Running])
                    .timeout(Duration::from_secs(30)),
            )
            .await?;
        let (start_tx, start_rx) = oneshot::channel();
        *started.lock().expect("started") = Some(start_tx);
        let waiter = waiter_client.submit(wait()).await?.job.id;
        anyhow::ensure!(
            waiter_client.get(&waiter).await?.state == JobState::Queued,
            "the waiter must wait for the unit"
        );
        let (done_tx, done_rx) = oneshot::channel();
        release_tx.send(done_tx)?;
        let released = done_rx.await?;
        let woke = start_rx.await?;
        h.record(woke.duration_since(released).as_micros() as u64)?;
        let r = waiter_client
            .wait_many([holder, waiter], WaitMode::All, Duration::from_secs(30))
            .await?;
        anyhow::ensure!(r.reached, "the round's jobs finished");
    }
    Ok(h)
}

/// Throughput under a pool limit: `jobs` jobs of `work` each, all waiting for a pool of
/// `limit` units. Returns jobs/s, the pool's utilisation (busy unit-time / available) and the
/// hand-over gaps: for each handler start after the first `limit`, the time since the latest
/// handler end before it (the unit's idle time), in microseconds.
pub async fn pool_throughput(
    client: &Client,
    addrs: &[String],
    jobs: usize,
    limit: u64,
    work: Duration,
) -> anyhow::Result<(f64, f64, Histogram<u64>)> {
    client
        .configure_pool(
            "bench-limit",
            PoolConfig::new().max_units("requests", limit),
        )
        .await?;
    let busy = Arc::new(Mutex::new(Duration::ZERO));
    let spans: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let workers: Vec<WorkerHandle> = (0..2)
        .map(|i| {
            let (busy, spans) = (busy.clone(), spans.clone());
            Worker::builder(addrs[i % addrs.len()].as_str())
                .concurrency(limit as u32 * 2)
                .handler("pool-tput", move |_ctx: JobContext| {
                    let (busy, spans) = (busy.clone(), spans.clone());
                    async move {
                        let t = Instant::now();
                        // The job's work: holding the unit for a fixed time.
                        tokio::time::sleep(work).await;
                        let end = Instant::now();
                        *busy.lock().expect("busy") += end - t;
                        spans.lock().expect("spans").push((t, end));
                        Ok(Vec::new())
                    }
                })
                .build()
                .expect("worker")
                .spawn()
        })
        .collect();
    let t0 = Instant::now();
    let specs: Vec<JobSpec> = (0..jobs)
        .map(|_| JobSpec::new("pool-tput").pool(PoolRequest::new("bench-limit")))
        .collect();
    let ids: Vec<String> = client
        .submit_batch(specs)
        .await?
        .into_iter()
        .map(|s| s.job.id)
        .collect();
    loop {
        let r = client
            .wait_many(ids.iter().cloned(), WaitMode::All, Duration::from_secs(60))
            .await?;
        if r.reached {
            break;
        }
    }
    let wall = t0.elapsed();
    for w in workers {
        w.stop().await?;
    }
    let busy = *busy.lock().expect("busy");
    let utilisation = busy.as_secs_f64() / (limit as f64 * wall.as_secs_f64());
    let mut spans = spans.lock().expect("spans").clone();
    spans.sort();
    let mut ends: Vec<Instant> = spans.iter().map(|s| s.1).collect();
    ends.sort();
    let mut gaps = Histogram::<u64>::new(3)?;
    for (start, _) in spans.iter().skip(limit as usize) {
        let before = ends.partition_point(|e| e <= start);
        if let Some(end) = before.checked_sub(1).map(|i| ends[i]) {
            gaps.record(start.duration_since(end).as_micros() as u64)?;
        }
    }
    Ok((jobs as f64 / wall.as_secs_f64(), utilisation, gaps))
}

/// The scheduler alone: `waiting` jobs spread over `pools` pools of one unit each, all units
/// held; then every unit is released and re-taken until every job ran. Returns the mean cost of
/// enqueueing a job and of one release + dispatch decision, in microseconds.
pub fn decision_cost(waiting: usize, pools: usize) -> (f64, f64) {
    let ns = Name::default_namespace();
    let queue = QueueKey {
        namespace: ns.clone(),
        name: Name::parse("q").expect("name"),
    };
    let pool_keys: Vec<PoolKey> = (0..pools)
        .map(|i| PoolKey {
            namespace: ns.clone(),
            name: Name::parse(&format!("p{i}")).expect("name"),
        })
        .collect();
    let now = tokio::time::Instant::now();
    let mut s = Scheduler::default();
    for pk in &pool_keys {
        s.set_pool(
            pk,
            EnginePoolConfig {
                max_units: [("requests".to_string(), 1)].into(),
                ..Default::default()
            },
            now,
        );
    }
    s.set_worker(
        &WorkerId("w".into()),
        WorkerSpec {
            queues: vec![queue.clone()],
            slots: u32::MAX,
            resources: Resources::default(),
            labels: Default::default(),
        },
    );
    let demands: Vec<Arc<Demand>> = pool_keys
        .iter()
        .map(|pk| {
            Arc::new(Demand {
                pools: vec![EngineRequest {
                    pool: pk.name.clone(),
                    units: [("requests".to_string(), 1)].into(),
                    max_wait: None,
                }],
                ..Default::default()
            })
        })
        .collect();
    let t = Instant::now();
    for i in 0..waiting {
        s.enqueue(
            JobId::new(),
            &queue,
            (i % 3) as i32,
            1,
            demands[i % pools].clone(),
            now,
        );
    }
    let mut held: Vec<(JobId, u32)> = dispatched(s.decide(now));
    let enqueue_us = t.elapsed().as_secs_f64() * 1e6 / waiting as f64;
    let t = Instant::now();
    let mut decisions = 0usize;
    while let Some((id, attempt)) = held.pop() {
        s.release(id, attempt);
        let d = dispatched(s.decide(now));
        decisions += 1;
        held.extend(d);
    }
    let decide_us = t.elapsed().as_secs_f64() * 1e6 / decisions.max(1) as f64;
    (enqueue_us, decide_us)
}

fn dispatched(d: Vec<Decision>) -> Vec<(JobId, u32)> {
    d.into_iter()
        .filter_map(|d| match d {
            Decision::Dispatch { job, attempt, .. } => Some((job, attempt)),
            Decision::Expire { .. } => None,
        })
        .collect()
}
