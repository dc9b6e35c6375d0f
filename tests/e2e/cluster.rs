//! Several `jobplane serve` instances on one PostgreSQL database (issue 7): one leads, the others
//! forward to it, so capacity, timers and dispatch stay single while clients and workers use any
//! instance; the leader's death and the database's restart lose no acknowledged job.
//!
//! Real processes on a database of each test's own (see `jobplane_tests::cluster`); without a
//! reachable PostgreSQL the tests say "skipping" and pass, except under `CI=true`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobplane::worker::{JobContext, Worker, WorkerHandle};
use jobplane::{Client, JobSpec, JobState, PoolConfig, PoolRequest, RetryPolicy, WaitMode};
use jobplane_server::engine::model::EventKind;
use jobplane_tests::cluster::{wait_health, Cluster, PgServer, TestDatabase, SERVICES};
use jobplane_tests::{guard, one_leads};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tonic_health::pb::health_check_response::ServingStatus;

/// Guard for waits that include a failover: the new leader waits one worker lease (30 s by
/// default) for workers to reclaim their attempts before it gives up on the unclaimed ones.
const FAILOVER_GUARD: Duration = Duration::from_secs(180);

async fn long_guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(FAILOVER_GUARD, f).await {
        Ok(t) => t,
        Err(_) => panic!("timed out after {FAILOVER_GUARD:?} waiting for {what}"),
    }
}

/// An SDK worker on `addr` (one instance, or several comma-separated) that reconnects quickly.
fn worker<H, Fut>(addr: &str, queue: &str, concurrency: u32, handler: H) -> WorkerHandle
where
    H: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, jobplane::HandlerError>> + Send + 'static,
{
    Worker::builder(addr)
        .concurrency(concurrency)
        .shutdown_timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(500))
        .handler(queue, handler)
        .build()
        .expect("build worker")
        .spawn()
}

/// Waits until every job in `ids` is terminal; returns them.
async fn wait_terminal(client: &Client, ids: &[String]) -> Vec<jobplane::Job> {
    let mut jobs = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        loop {
            let r = client
                .wait_many(
                    chunk.iter().cloned(),
                    WaitMode::All,
                    Duration::from_secs(20),
                )
                .await
                .expect("wait for jobs");
            if r.reached {
                jobs.extend(r.results.into_iter().map(|w| w.job));
                break;
            }
        }
    }
    jobs
}

fn state_events(events: &[(i64, EventKind)]) -> Vec<(Option<JobState>, JobState, u32)> {
    events
        .iter()
        .filter_map(|(_, k)| match k {
            EventKind::State {
                from, to, attempt, ..
            } => Some((from.map(sdk_state), sdk_state(*to), *attempt)),
            _ => None,
        })
        .collect()
}

fn sdk_state(s: jobplane_server::engine::model::JobState) -> JobState {
    use jobplane_server::engine::model::JobState as S;
    match s {
        S::Queued => JobState::Queued,
        S::Leased => JobState::Leased,
        S::Running => JobState::Running,
        S::Succeeded => JobState::Succeeded,
        S::Failed => JobState::Failed,
        S::Cancelled => JobState::Cancelled,
        S::TimedOut => JobState::TimedOut,
        S::Expired => JobState::Expired,
    }
}

/// Submitters that keep submitting single jobs, each with a new idempotency key, through a
/// client of every instance; a failed submit is retried with the same key until it is
/// acknowledged (bounded by [`FAILOVER_GUARD`]).
struct SubmitLoad {
    acked: Arc<Mutex<HashMap<String, String>>>,
    count: watch::Receiver<usize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl SubmitLoad {
    async fn start(addrs: &str, queue: &str, submitters: usize) -> SubmitLoad {
        let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let (count_tx, count) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let stop = Arc::new(AtomicBool::new(false));
        let instances: Arc<[String]> = addrs.split(',').map(str::to_owned).collect();
        let mut tasks = Vec::new();
        for t in 0..submitters {
            let client = Client::connect(addrs.to_owned()).await.unwrap();
            let (acked, count_tx, stop) = (acked.clone(), count_tx.clone(), stop.clone());
            let instances = instances.clone();
            let queue = queue.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("{queue}-{t}-{i}");
                    let deadline = tokio::time::Instant::now() + FAILOVER_GUARD;
                    let job = loop {
                        let spec = JobSpec::new(queue.as_str())
                            .idempotency_key(key.clone())
                            .retries(10);
                        match client.submit(spec).await {
                            Ok(s) => break s.job,
                            Err(e) => {
                                assert!(
                                    tokio::time::Instant::now() < deadline,
                                    "submit {key} kept failing: {e}"
                                );
                                failures.push(format!("{:?}: {e}", e.code()));
                                // A leader gone: retry once an instance leads again.
                                one_leads(&instances).await;
                            }
                        }
                    };
                    let mut a = acked.lock().unwrap();
                    if let Some(id) = a.insert(key.clone(), job.id.clone()) {
                        panic!("key {key} acknowledged twice ({id}, {})", job.id);
                    }
                    count_tx.send_replace(a.len());
                }
                failures
            }));
        }
        SubmitLoad {
            acked,
            count,
            stop,
            tasks,
        }
    }

    /// Waits until at least `n` submits were acknowledged; returns how many were.
    async fn wait_acked(&mut self, n: usize) -> usize {
        let count = long_guard(
            &format!("{n} acknowledged submits"),
            self.count.wait_for(|c| *c >= n),
        )
        .await
        .expect("submitters alive");
        *count
    }

    /// Stops the submitters (each finishes the submit it is retrying); returns the acknowledged
    /// jobs by key and the errors of the submits that were retried.
    async fn finish(self) -> (HashMap<String, String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for t in self.tasks {
            failures.extend(long_guard("submitters stop", t).await.unwrap());
        }
        let acked = self.acked.lock().unwrap().clone();
        (acked, failures)
    }
}

/// Workers (on every instance's address) whose handlers count their runs per job and how many
/// run at once; each handler works 20 ms, so that attempts are running when a leader dies.
struct CountingWorkers {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    running: Arc<watch::Sender<usize>>,
    handles: Vec<WorkerHandle>,
}

impl CountingWorkers {
    fn start(addrs: &str, queue: &str, n: usize) -> CountingWorkers {
        let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let running = Arc::new(watch::channel(0usize).0);
        let handles = (0..n)
            .map(|_| {
                let (runs, running) = (runs.clone(), running.clone());
                worker(addrs, queue, 8, move |ctx: JobContext| {
                    let (runs, running) = (runs.clone(), running.clone());
                    async move {
                        *runs
                            .lock()
                            .unwrap()
                            .entry(ctx.job_id().to_owned())
                            .or_default() += 1;
                        running.send_modify(|n| *n += 1);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        running.send_modify(|n| *n -= 1);
                        Ok(Vec::new())
                    }
                })
            })
            .collect();
        CountingWorkers {
            runs,
            running,
            handles,
        }
    }

    async fn stop(self) {
        for w in self.handles {
            w.stop().await.unwrap();
        }
    }
}

/// Every job of `ids` ends SUCCEEDED, with exactly one terminal event in its stored log, the
/// last one.
async fn assert_succeeded_with_one_terminal_event(
    cluster: &Cluster,
    client: &Client,
    ids: &[String],
) {
    let jobs = long_guard("every acknowledged job", wait_terminal(client, ids)).await;
    assert_eq!(jobs.len(), ids.len());
    let not_ok: Vec<_> = jobs
        .iter()
        .filter(|j| j.state != JobState::Succeeded)
        .map(|j| (&j.id, j.state, &j.error))
        .collect();
    assert!(not_ok.is_empty(), "jobs that did not succeed: {not_ok:?}");
    let events = cluster.db.events().await;
    for id in ids {
        let states = state_events(events.get(id).map(Vec::as_slice).unwrap_or_default());
        let terminal = states.iter().filter(|(_, to, _)| to.is_terminal()).count();
        assert_eq!(terminal, 1, "job {id}: {states:?}");
        assert!(
            states.last().is_some_and(|(_, to, _)| to.is_terminal()),
            "job {id}: the terminal event is the last: {states:?}"
        );
    }
}

/// Every acknowledged job (by key) ends SUCCEEDED, with exactly one terminal event, its last;
/// no key has two jobs; every job's handler ran. Returns the number of handler runs.
async fn assert_each_succeeded_once(
    cluster: &Cluster,
    acked: &HashMap<String, String>,
    workers: &CountingWorkers,
) -> u32 {
    let ids: Vec<String> = acked.values().cloned().collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "one job per key");
    let client = Client::connect(cluster.addrs()).await.unwrap();
    assert_succeeded_with_one_terminal_event(cluster, &client, &ids).await;
    let dup = cluster.db.keys_with_more_rows_than(1).await;
    assert!(dup.is_empty(), "keys with several jobs: {dup:?}");
    let runs = workers.runs.lock().unwrap().clone();
    let never: Vec<_> = ids.iter().filter(|id| !runs.contains_key(*id)).collect();
    assert!(
        never.is_empty(),
        "succeeded without a handler run: {never:?}"
    );
    runs.values().sum()
}

/// Pool of one unit; a job holds it through a worker connected only to instance B; a second
/// job, submitted through instance A, waits on the pool; when the first completes, the second
/// starts on a worker connected only to A.
async fn release_on_one_instance_wakes_a_waiter_on_another(n: usize) {
    let Some(cluster) = Cluster::start(n).await else {
        return;
    };
    let (leader, _) = cluster.leader().await;
    let followers: Vec<usize> = cluster
        .live()
        .into_iter()
        .filter(|i| *i != leader)
        .collect();
    // With three instances neither A nor B leads: both forward everything.
    let (a, b) = if n >= 3 {
        (followers[0], followers[1])
    } else {
        (followers[0], leader)
    };
    let client_a = cluster.client(a).await;
    let client_b = cluster.client(b).await;
    client_a
        .configure_pool("one", PoolConfig::new().max_units("requests", 1))
        .await
        .unwrap();

    let (held_tx, held_rx) = oneshot::channel::<String>();
    let held_tx = Arc::new(Mutex::new(Some(held_tx)));
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let worker_b = worker(cluster.addr(b), "hold", 1, move |ctx: JobContext| {
        let (held_tx, r) = (held_tx.clone(), r.clone());
        async move {
            if let Some(tx) = held_tx.lock().unwrap().take() {
                let _ = tx.send(ctx.job_id().to_owned());
            }
            r.notified().await;
            Ok(b"held".to_vec())
        }
    });
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<String>();
    let worker_a = worker(cluster.addr(a), "wait", 1, move |ctx: JobContext| {
        let _ = started_tx.send(ctx.job_id().to_owned());
        async { Ok(b"woke".to_vec()) }
    });

    let holder = client_b
        .submit(JobSpec::new("hold").pool(PoolRequest::new("one")))
        .await
        .unwrap()
        .job;
    let held = guard("the holder to start on B's worker", held_rx)
        .await
        .unwrap();
    assert_eq!(held, holder.id);
    let waiter = client_a
        .submit(JobSpec::new("wait").pool(PoolRequest::new("one")))
        .await
        .unwrap()
        .job;
    let w = client_a.get(&waiter.id).await.unwrap();
    assert_eq!(w.state, JobState::Queued, "the waiter waits for the unit");
    if let Some(why) = w.waiting_for.as_deref().filter(|w| !w.is_empty()) {
        assert!(why.contains("one"), "the waiter waits on the pool: {why}");
    }
    assert!(started_rx.try_recv().is_err(), "nothing ran on A yet");

    release.notify_one();
    let started = guard("the waiter to start on A's worker", started_rx.recv())
        .await
        .unwrap();
    assert_eq!(started, waiter.id);
    let done = guard(
        "both jobs",
        client_a.wait_many(
            [holder.id.clone(), waiter.id.clone()],
            WaitMode::All,
            Duration::from_secs(20),
        ),
    )
    .await
    .unwrap();
    assert!(done.reached);
    assert!(done
        .results
        .iter()
        .all(|r| r.job.state == JobState::Succeeded));
    worker_a.stop().await.unwrap();
    worker_b.stop().await.unwrap();
}

/// A cancel through one follower wakes a waiter and a watcher connected to another follower
/// (3 instances; neither of them leads).
#[tokio::test]
async fn a_cancel_on_one_instance_wakes_a_waiter_and_a_watcher_on_another() {
    use futures::StreamExt;

    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    let (leader, _) = cluster.leader().await;
    let followers: Vec<usize> = cluster
        .live()
        .into_iter()
        .filter(|i| *i != leader)
        .collect();
    let (a, b) = (followers[0], followers[1]);
    let client_a = cluster.client(a).await;
    let client_b = cluster.client(b).await;
    // No worker serves the queue: the job waits until it is cancelled.
    let job = client_a.submit(JobSpec::new("idle")).await.unwrap().job;
    let mut events = client_a.watch(&job.id, 0);
    let first = guard("the first event on A", events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!first.is_terminal());
    let waiting = {
        let client_a = client_a.clone();
        let id = job.id.clone();
        tokio::spawn(async move { client_a.wait(&id, Duration::from_secs(60)).await })
    };

    client_b.cancel(&job.id, None).await.unwrap();
    let woke = guard("the waiter on A", waiting).await.unwrap().unwrap();
    assert!(woke.reached);
    assert_eq!(woke.job.state, JobState::Cancelled);
    let terminal = guard("the watcher on A", async {
        loop {
            let e = events
                .next()
                .await
                .expect("the watch ends after the terminal event")
                .unwrap();
            if e.is_terminal() {
                return e;
            }
        }
    })
    .await;
    assert!(matches!(
        terminal.kind,
        jobplane::EventKind::State {
            to: JobState::Cancelled,
            ..
        }
    ));
}

#[tokio::test]
async fn two_instances_release_on_one_wakes_a_waiter_on_the_other() {
    release_on_one_instance_wakes_a_waiter_on_another(2).await;
}

#[tokio::test]
async fn three_instances_release_on_one_follower_wakes_a_waiter_on_another() {
    release_on_one_instance_wakes_a_waiter_on_another(3).await;
}

/// 3 instances × 4 workers (each connected to one instance) × 500 jobs on a pool of 5 units:
/// never more than 5 handlers at once, every handler ran exactly once, every job succeeded.
#[tokio::test]
async fn three_instances_keep_a_pool_limit_and_run_each_job_once() {
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    let client = Client::connect(cluster.addrs()).await.unwrap();
    client
        .configure_pool("five", PoolConfig::new().max_units("requests", 5))
        .await
        .unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let high_water = Arc::new(AtomicUsize::new(0));
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut workers = Vec::new();
    for i in cluster.live() {
        for _ in 0..4 {
            let (running, high_water, runs) = (running.clone(), high_water.clone(), runs.clone());
            workers.push(worker(
                cluster.addr(i),
                "limited",
                4,
                move |ctx: JobContext| {
                    let (running, high_water, runs) =
                        (running.clone(), high_water.clone(), runs.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        high_water.fetch_max(now, Ordering::SeqCst);
                        *runs
                            .lock()
                            .unwrap()
                            .entry(ctx.job_id().to_owned())
                            .or_default() += 1;
                        // The job's work: holding its unit for a moment, so that handlers overlap.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok(Vec::new())
                    }
                },
            ));
        }
    }
    let mut ids = Vec::new();
    for _ in 0..5 {
        let specs = (0..100)
            .map(|_| JobSpec::new("limited").pool(PoolRequest::new("five")))
            .collect();
        ids.extend(
            client
                .submit_batch(specs)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.job.id),
        );
    }
    let jobs = long_guard("500 jobs", wait_terminal(&client, &ids)).await;
    for w in workers {
        w.stop().await.unwrap();
    }
    let high = high_water.load(Ordering::SeqCst);
    assert!(high <= 5, "{high} handlers ran at once on a pool of 5");
    assert!(
        jobs.iter().all(|j| j.state == JobState::Succeeded),
        "every job succeeded"
    );
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 500, "every job ran");
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "jobs whose handler ran more than once: {twice:?}"
    );
    eprintln!("high-water mark: {high} handlers at once");
}

/// kill -9 of the leader while submits (with idempotency keys, through every instance) and runs
/// go on: every acknowledged job reaches a terminal state exactly once, and the workers go on
/// through the other instances.
#[tokio::test]
async fn killing_the_leader_mid_load_ends_every_acknowledged_job_exactly_once() {
    let Some(mut cluster) = Cluster::start(3).await else {
        return;
    };
    let (leader, epoch) = cluster.leader().await;
    let all = cluster.addrs();
    let workers = CountingWorkers::start(&all, "failover", 3);
    let mut load = SubmitLoad::start(&all, "failover", 6).await;
    let before_kill = load.wait_acked(300).await;
    let mut running_rx = workers.running.subscribe();
    guard("handlers running", running_rx.wait_for(|n| *n >= 3))
        .await
        .unwrap();
    let running_at_kill = *workers.running.borrow();
    cluster.kill9(leader).await;
    let (new_leader, new_epoch) = long_guard("a new leader", cluster.leader_after(epoch)).await;
    assert_ne!(new_leader, leader);
    assert!(new_epoch > epoch);
    load.wait_acked(before_kill + 300).await;
    let (acked, failures) = load.finish().await;
    let runs = assert_each_succeeded_once(&cluster, &acked, &workers).await;
    // The attempts running at the kill survived it: their workers reconnected within their
    // lease, through another instance, and the new leader let them finish — none ran twice.
    assert_eq!(
        runs as usize,
        acked.len(),
        "handler runs against jobs: an attempt running at the kill was run again"
    );
    eprintln!(
        "{} jobs acknowledged ({before_kill} before the kill, {running_at_kill} handlers running \
         at the kill), {runs} handler runs, {} failed submits retried: {:?}",
        acked.len(),
        failures.len(),
        failures.iter().collect::<HashSet<_>>()
    );
    workers.stop().await;
}

/// Two leaders killed one after the other, with a new instance joining in between, under load:
/// the epochs grow, every acknowledged job ends exactly once.
#[tokio::test]
async fn successive_leader_kills_with_an_instance_joining_end_every_job_once() {
    let Some(mut cluster) = Cluster::start(3).await else {
        return;
    };
    let (first, epoch1) = cluster.leader().await;
    let all = cluster.addrs();
    let workers = CountingWorkers::start(&all, "succession", 3);
    let mut load = SubmitLoad::start(&all, "succession", 4).await;
    let n = load.wait_acked(200).await;
    cluster.kill9(first).await;
    let (second, epoch2) = long_guard("a second leader", cluster.leader_after(epoch1)).await;
    let joined = cluster.add().await;
    let n = load.wait_acked(n + 200).await;
    cluster.kill9(second).await;
    let (third, epoch3) = long_guard("a third leader", cluster.leader_after(epoch2)).await;
    assert!(epoch1 < epoch2 && epoch2 < epoch3);
    load.wait_acked(n + 200).await;
    let (acked, failures) = load.finish().await;
    let runs = assert_each_succeeded_once(&cluster, &acked, &workers).await;
    eprintln!(
        "leaders #{first} (epoch {epoch1}), #{second} ({epoch2}), #{third} ({epoch3}); #{joined} \
         joined; {} jobs acknowledged, {runs} handler runs, {} failed submits retried",
        acked.len(),
        failures.len()
    );
    workers.stop().await;
}

/// Run timeouts and retries with back-off under 3 instances: each (job, attempt) is dispatched
/// at most once, and attempt counts and events are what one timer firing per deadline gives.
#[tokio::test]
async fn three_instances_fire_each_timer_once_and_dispatch_each_attempt_once() {
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    const JOBS: usize = 30;
    const RETRIES: u32 = 2;
    let dispatched: Arc<Mutex<HashMap<(String, u32), u32>>> = Arc::default();
    let mut workers = Vec::new();
    for i in cluster.live() {
        let dispatched = dispatched.clone();
        workers.push(worker(
            cluster.addr(i),
            "timers",
            16,
            move |ctx: JobContext| {
                let dispatched = dispatched.clone();
                async move {
                    *dispatched
                        .lock()
                        .unwrap()
                        .entry((ctx.job_id().to_owned(), ctx.attempt()))
                        .or_default() += 1;
                    // Never finishes on its own: the run timeout ends every attempt.
                    ctx.cancelled().await;
                    Ok(Vec::new())
                }
            },
        ));
    }
    let client = Client::connect(cluster.addrs()).await.unwrap();
    let specs = (0..JOBS)
        .map(|_| {
            JobSpec::new("timers")
                .run_timeout(Duration::from_millis(300))
                .retry_policy(
                    RetryPolicy::new(RETRIES)
                        .initial_backoff(Duration::from_millis(100))
                        .multiplier(2.0),
                )
        })
        .collect();
    let ids: Vec<String> = client
        .submit_batch(specs)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.job.id)
        .collect();
    let jobs = long_guard("every job to time out", wait_terminal(&client, &ids)).await;
    for w in workers {
        w.stop().await.unwrap();
    }
    let attempts = RETRIES + 1;
    for j in &jobs {
        assert_eq!(j.state, JobState::TimedOut, "job {}", j.id);
        assert_eq!(j.attempt, attempts, "job {}", j.id);
        assert_eq!(j.retries_used, RETRIES, "job {}", j.id);
        assert_eq!(j.error.as_ref().unwrap().reason, "RUN_TIMEOUT");
    }
    let dispatched = dispatched.lock().unwrap().clone();
    let twice: Vec<_> = dispatched.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "attempts dispatched more than once: {twice:?}"
    );
    assert_eq!(dispatched.len(), JOBS * attempts as usize);
    // Created; then per attempt: leased, running, and its timeout (a retry, or the end).
    let mut expected = vec![(None, JobState::Queued, 0)];
    for k in 1..=attempts {
        expected.push((Some(JobState::Queued), JobState::Leased, k));
        expected.push((Some(JobState::Leased), JobState::Running, k));
        let to = if k < attempts {
            JobState::Queued
        } else {
            JobState::TimedOut
        };
        expected.push((Some(JobState::Running), to, k));
    }
    let events = cluster.db.events().await;
    for id in &ids {
        let states = state_events(events.get(id).map(Vec::as_slice).unwrap_or_default());
        assert_eq!(states, expected, "job {id}");
    }
}

/// The database stops and starts again under load (a PostgreSQL server of the test's own):
/// while it is down the instances answer UNAVAILABLE and health says NOT_SERVING; once it is
/// back, no acknowledged job is lost and all complete.
#[tokio::test]
async fn a_database_restart_under_load_loses_no_acknowledged_job() {
    let Some(mut pg) = PgServer::start().await else {
        return;
    };
    let db = TestDatabase::create_on(&pg.url()).await.expect("database");
    let cluster = Cluster::start_on(db, 2).await;
    let all = cluster.addrs();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let mut workers = Vec::new();
    for i in cluster.live() {
        let release = release.clone();
        workers.push(worker(
            cluster.addr(i),
            "restart",
            8,
            move |ctx: JobContext| {
                let release = release.clone();
                async move {
                    // Half the jobs run across the restart: they wait for the test to let them go.
                    if ctx.payload() == b"hold" {
                        release.acquire().await.unwrap().forget();
                    }
                    Ok(Vec::new())
                }
            },
        ));
    }
    let client = Client::connect(all.clone()).await.unwrap();
    let mut acked: Vec<String> = Vec::new();
    for round in 0..4 {
        let specs = (0..50)
            .map(|i| {
                JobSpec::new("restart")
                    .payload(if i % 2 == 0 { "hold" } else { "go" })
                    .idempotency_key(format!("before-{round}-{i}"))
                    .retries(10)
            })
            .collect();
        acked.extend(
            client
                .submit_batch(specs)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.job.id),
        );
    }

    let mut load = SubmitLoad::start(&all, "restart", 4).await;
    load.wait_acked(50).await;
    pg.stop().await;
    eprintln!(
        "{} jobs acknowledged; PostgreSQL on port {} stopped",
        acked.len(),
        pg.port
    );
    for i in cluster.live() {
        let addr = cluster.addr(i);
        for service in SERVICES {
            wait_health(addr, service, ServingStatus::NotServing).await;
        }
        let c = cluster.client(i).await;
        let err = c
            .submit(JobSpec::new("restart").idempotency_key("while-down"))
            .await
            .expect_err("a submit while the database is down");
        assert_eq!(
            err.code(),
            Some(tonic::Code::Unavailable),
            "instance {i}: {err}"
        );
        let err = c
            .get(&acked[0])
            .await
            .expect_err("a read while the database is down");
        assert_eq!(
            err.code(),
            Some(tonic::Code::Unavailable),
            "instance {i}: {err}"
        );
    }

    eprintln!("every instance NOT_SERVING and answering UNAVAILABLE");
    pg.start_again().await;
    for i in cluster.live() {
        for service in SERVICES {
            long_guard(
                "serving again",
                wait_health(cluster.addr(i), service, ServingStatus::Serving),
            )
            .await;
        }
    }
    let after_restart = load.wait_acked(0).await;
    load.wait_acked(after_restart + 100).await;
    let (singles, failures) = load.finish().await;
    eprintln!(
        "{} single submits acknowledged, {} failed submits retried: {:?}",
        singles.len(),
        failures.len(),
        failures.iter().collect::<HashSet<_>>()
    );
    acked.extend(singles.into_values());
    // A batch after the restart, then let the held jobs go.
    let specs = (0..50)
        .map(|i| {
            JobSpec::new("restart")
                .idempotency_key(format!("after-{i}"))
                .retries(10)
        })
        .collect();
    acked.extend(
        long_guard("a submit after the restart", client.submit_batch(specs))
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.job.id),
    );
    release.add_permits(1_000);
    assert_succeeded_with_one_terminal_event(&cluster, &client, &acked).await;
    for w in workers {
        w.stop().await.unwrap();
    }
    drop(cluster);
    drop(pg);
}
