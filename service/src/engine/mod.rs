//! The engine: job state machine, dispatch, timers, waiters. No tonic, no sqlx.
//!
//! State lives in memory for every active job and is written through to the [`Store`] by the
//! group committer; replies and side effects happen only after the commit. Reads of committed
//! state (get, list, event replay) go to the store; waits and watches subscribe to the [`Hub`],
//! which carries committed changes only.

pub mod commit;
mod core;
pub mod error;
pub mod hub;
pub mod model;
pub mod scheduler;
pub(crate) mod spans;
pub mod state;
mod timers;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod span_tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::commit::CommitStats;
use self::commit::{Committer, Outbox};
use self::core::{Core, Submitted as CoreSubmitted};
pub use self::error::EngineError;
use self::hub::Hub;
use self::model::*;
use crate::metrics::Metrics;
use crate::store::Store;

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long a worker has to acknowledge an assignment before it goes back to the queue.
    pub ack_timeout: Duration,
    /// A worker that sends nothing for this long is lost.
    pub worker_lease_ttl: Duration,
    /// Heartbeat interval suggested to workers (well under the lease).
    pub heartbeat_interval: Duration,
    /// Grace period of a cancel when the client names none.
    pub default_cancel_grace: Duration,
    /// How long idempotency keys are kept.
    pub idempotency_retention: Duration,
    /// Output recorded per job; past it output is truncated with a marker.
    pub max_output_bytes: u64,
    /// Most writes in one transaction.
    pub max_batch_writes: usize,
    /// How long terminal jobs and their events are kept; never less than the idempotency
    /// retention, so a remembered key always finds its job.
    pub retention: Duration,
    /// How often expired idempotency keys and jobs past their retention are pruned.
    pub maintenance_interval: Duration,
    /// Record a span per attempt of each job (see `spans`) through the global OpenTelemetry
    /// tracer provider; on when traces are exported.
    pub job_spans: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            ack_timeout: Duration::from_secs(10),
            worker_lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            default_cancel_grace: Duration::from_secs(10),
            idempotency_retention: Duration::from_secs(24 * 3600),
            max_output_bytes: 16 << 20,
            max_batch_writes: 8192,
            retention: Duration::from_secs(7 * 24 * 3600),
            maintenance_interval: Duration::from_secs(60),
            job_spans: false,
        }
    }
}

/// A message to a worker's stream.
#[derive(Debug, Clone)]
pub enum ToWorker {
    /// Answer to hello.
    Welcome {
        /// The worker.
        worker_id: WorkerId,
        /// Its lease.
        lease_ttl: Duration,
        /// Suggested heartbeat interval.
        heartbeat_interval: Duration,
        /// Attempts it keeps from an earlier session.
        kept: Vec<(JobId, u32)>,
    },
    /// New work (committed as LEASED), with the trace context the worker's span continues
    /// (the attempt's `dispatch` span, or the job's own trace).
    Assign(Arc<Job>, Option<Arc<TraceContext>>),
    /// Stop an attempt.
    Cancel {
        /// Job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// Time left.
        grace: Duration,
        /// Why.
        reason: String,
    },
    /// A report changed nothing.
    Rejected {
        /// Job.
        job_id: JobId,
        /// Attempt quoted.
        attempt: u32,
        /// Why.
        reason: &'static str,
    },
    /// An outcome was committed.
    Accepted {
        /// Job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// The job's state after it.
        state: JobState,
    },
    /// No more assignments will come.
    Drained,
}

/// A worker's hello, validated.
#[derive(Debug, Clone)]
pub struct WorkerHello {
    /// Id.
    pub worker_id: WorkerId,
    /// Namespace.
    pub namespace: Name,
    /// Queues served.
    pub queues: Vec<Name>,
    /// Concurrency.
    pub concurrency: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// CPU and memory it offers to jobs that declare theirs (zero: jobs that declare none).
    pub resources: Resources,
    /// Name.
    pub name: String,
    /// Attempts still running from an earlier session.
    pub running: Vec<(JobId, u32)>,
}

/// One stream session of a worker.
#[derive(Debug, Clone)]
pub struct WorkerSession {
    /// Worker.
    pub worker_id: WorkerId,
    /// Namespace.
    pub namespace: Name,
    /// Session number; a newer session of the same worker supersedes this one.
    pub session: u64,
}

/// A report about one attempt.
#[derive(Debug, Clone)]
pub struct Report {
    /// Job.
    pub job_id: JobId,
    /// Fencing token.
    pub attempt: u32,
    /// What.
    pub kind: ReportKind,
}

/// What a report says.
#[derive(Debug, Clone)]
pub enum ReportKind {
    /// Acknowledged; running.
    Ack,
    /// Progress.
    Progress {
        /// 0–100.
        percent: f64,
        /// Message.
        message: String,
    },
    /// Output.
    Output {
        /// Stream.
        stream: OutputStream,
        /// Bytes.
        data: Bytes,
    },
    /// What the attempt really used of its pool's units (e.g. tokens), for the pool's rate
    /// limits to be reconciled; sent before the outcome.
    Usage(BTreeMap<Unit, u64>),
    /// The attempt ended.
    Outcome(Outcome),
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// With a result.
    Success(Bytes),
    /// With an error.
    Failure {
        /// Message.
        message: String,
        /// May be retried.
        retryable: bool,
    },
    /// Stopped after a cancel request.
    Cancelled,
    /// Hit an upstream rate limit.
    RateLimited {
        /// Pool.
        pool: Option<String>,
        /// Retry after.
        retry_after: Duration,
    },
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Queued job cancelled.
    Cancelled,
    /// Running job: its worker was told.
    Requested,
    /// Already terminal.
    AlreadyTerminal,
}

/// A queue with live figures.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    /// Queue.
    pub key: QueueKey,
    /// Settings.
    pub config: QueueConfig,
    /// Jobs queued.
    pub depth: u64,
    /// Jobs leased or running.
    pub running: u64,
    /// Oldest ready job's submit time.
    pub oldest_queued_at: Option<Timestamp>,
    /// Connected workers serving it.
    pub workers: u32,
}

/// A worker as seen by the service.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// Id.
    pub id: WorkerId,
    /// Namespace.
    pub namespace: Name,
    /// Name.
    pub name: String,
    /// Queues.
    pub queues: Vec<Name>,
    /// Concurrency.
    pub concurrency: u32,
    /// Attempts running.
    pub running: u32,
    /// Draining.
    pub draining: bool,
    /// Stream connected.
    pub connected: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// CPU and memory it offers.
    pub resources: Resources,
    /// CPU and memory held by its running attempts.
    pub resources_in_use: Resources,
    /// Lease end.
    pub lease_expires_at: Timestamp,
}

/// A capacity pool with live figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolInfo {
    /// Pool.
    pub key: PoolKey,
    /// Settings.
    pub config: PoolConfig,
    /// Units held by running attempts, per unit (every unit of `max_units`, and any other
    /// unit held).
    pub in_use: BTreeMap<Unit, u64>,
    /// Tokens in each rate limit's bucket now, in the order of `config.rates`.
    pub tokens: Vec<f64>,
    /// Attempts holding units of it.
    pub running: u64,
    /// Queued jobs waiting for it (it is among the pools they have reached).
    pub waiting: u64,
    /// Nothing is dispatched on it until then, after an upstream rate limit.
    pub cooldown_until: Option<Timestamp>,
    /// Cooldown epoch: one more for every cooldown that starts after the previous one ended.
    pub epoch: u64,
}

/// Live figures of every namespace, read under the lock for a metrics scrape.
#[derive(Debug, Clone)]
pub struct LiveFigures {
    /// When they were read.
    pub now: Timestamp,
    /// Every queue configured or used since start.
    pub queues: Vec<QueueInfo>,
    /// Every pool.
    pub pools: Vec<PoolInfo>,
    /// Connected workers per namespace (namespaces with known workers only).
    pub workers_connected: Vec<(Name, u64)>,
}

/// Whether a multi-job wait needs all jobs or any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// All.
    All,
    /// Any.
    Any,
}

/// Result of a submit for one spec.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The job.
    pub job: Arc<Job>,
    /// False when an idempotency key matched.
    pub created: bool,
}

/// The engine.
pub struct Engine {
    core: Mutex<Core>,
    committer: Committer,
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    timer_wake: Notify,
    shutdown: CancellationToken,
    /// Cancelled when a commit failed: the instance must discard this engine and recover.
    pub fatal: CancellationToken,
    /// Commit statistics.
    pub stats: Arc<CommitStats>,
    config: EngineConfig,
    committer_stop: CancellationToken,
}

/// Resolves when the writes of an operation are committed.
pub struct CommitTicket(Option<tokio::sync::oneshot::Receiver<Result<(), EngineError>>>);

impl CommitTicket {
    /// Waits for the commit.
    pub async fn committed(self) -> Result<(), EngineError> {
        Engine::committed(self.0).await
    }
}

/// Background tasks of a started engine.
pub struct EngineTasks {
    committer: tokio::task::JoinHandle<()>,
    timers: tokio::task::JoinHandle<()>,
}

impl EngineTasks {
    /// Waits for the background tasks after [`Engine::close`].
    pub async fn join(self) {
        let _ = self.timers.await;
        let _ = self.committer.await;
    }
}

impl Engine {
    /// Recovers state from the store and starts the committer and the timer task; what happens
    /// is counted in `metrics`, which also reads the engine's live figures when scraped.
    pub async fn start(
        store: Arc<dyn Store>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Engine>, EngineTasks), EngineError> {
        let recovered = store.recover().await?;
        let hub = Arc::new(Hub::default());
        let fatal = CancellationToken::new();
        let stats = Arc::new(CommitStats::default());
        let committer_stop = CancellationToken::new();
        let (committer, committer_task) = Committer::start(
            store.clone(),
            hub.clone(),
            fatal.clone(),
            stats.clone(),
            metrics.clone(),
            config.max_batch_writes,
            committer_stop.clone(),
        );
        let mut core = Core::new(config.clone());
        core.metrics = metrics.clone();
        let n = recovered.active_jobs.len();
        core.recover(recovered, Timestamp::now());
        tracing::info!(active_jobs = n, "engine recovered");
        let engine = Arc::new(Engine {
            core: Mutex::new(core),
            committer,
            hub,
            store,
            timer_wake: Notify::new(),
            shutdown,
            fatal,
            stats,
            config,
            committer_stop,
        });
        {
            // Dispatch what was ready before the restart (to workers that reconnect).
            let mut core = engine.lock();
            let mut out = Outbox::default();
            core.settle(Timestamp::now(), &mut out);
            engine.committer.enqueue_detached(out);
        }
        metrics.attach(&engine);
        let timers = tokio::spawn(timer_loop(engine.clone()));
        Ok((
            engine,
            EngineTasks {
                committer: committer_task,
                timers,
            },
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().expect("engine lock poisoned")
    }

    /// Runs `f` on the core under the lock, enqueues what it produced, and returns the result
    /// together with the commit receiver.
    fn with_core<T>(
        &self,
        f: impl FnOnce(&mut Core, Timestamp, &mut Outbox) -> T,
    ) -> (
        T,
        Option<tokio::sync::oneshot::Receiver<Result<(), EngineError>>>,
    ) {
        let mut core = self.lock();
        let mut out = Outbox::default();
        let now = Timestamp::now();
        let t = f(&mut core, now, &mut out);
        let rearm = std::mem::take(&mut core.timer_rearm);
        let rx = (!out.is_empty()).then(|| self.committer.enqueue(out));
        drop(core);
        if rearm {
            self.timer_wake.notify_one();
        }
        (t, rx)
    }

    async fn committed(
        rx: Option<tokio::sync::oneshot::Receiver<Result<(), EngineError>>>,
    ) -> Result<(), EngineError> {
        match rx {
            None => Ok(()),
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(EngineError::Unavailable("shutting down".into()))),
        }
    }

    fn check_open(&self) -> Result<(), EngineError> {
        if self.fatal.is_cancelled() {
            return Err(EngineError::Unavailable(
                "this instance is recovering from a database failure; try again".into(),
            ));
        }
        Ok(())
    }

    /// Cancelled when the service begins to shut down.
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Waits until everything enqueued so far is committed.
    pub async fn flush(&self) -> Result<(), EngineError> {
        let rx = self.committer.enqueue(Outbox::default());
        Self::committed(Some(rx)).await
    }

    /// Submits validated specs (one transaction); returns once committed.
    pub async fn submit(&self, specs: Vec<JobSpec>) -> Result<Vec<Submitted>, EngineError> {
        self.check_open()?;
        let (res, rx) = self.with_core(|core, now, out| core.submit(specs, now, out));
        let res = res?;
        // Also covers idempotent duplicates: their original was enqueued before this point.
        let rx = rx.unwrap_or_else(|| self.committer.enqueue(Outbox::default()));
        Self::committed(Some(rx)).await?;
        let mut out = Vec::with_capacity(res.len());
        for r in res {
            match r {
                CoreSubmitted::Created(job) => {
                    let job = if job.state == JobState::Queued {
                        Arc::new(self.explain((*job).clone()))
                    } else {
                        job
                    };
                    out.push(Submitted { job, created: true })
                }
                CoreSubmitted::Existing(id) => {
                    let job = self
                        .store
                        .get_job(id)
                        .await?
                        .ok_or_else(|| EngineError::job_not_found(id))?;
                    out.push(Submitted {
                        job: Arc::new(job),
                        created: false,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Fills in the live `waiting_for` of a queued job.
    pub fn explain(&self, mut job: Job) -> Job {
        if job.state == JobState::Queued {
            job.waiting_for = self.lock().explain(&job, Timestamp::now());
        }
        job
    }

    /// [`Engine::explain`] for many jobs, under one lock.
    pub fn explain_all(&self, mut jobs: Vec<Job>) -> Vec<Job> {
        if jobs.iter().any(|j| j.state == JobState::Queued) {
            let core = self.lock();
            let now = Timestamp::now();
            for job in jobs.iter_mut().filter(|j| j.state == JobState::Queued) {
                job.waiting_for = core.explain(job, now);
            }
        }
        jobs
    }

    /// A job's committed state.
    pub async fn get(&self, namespace: &Name, id: JobId) -> Result<Job, EngineError> {
        match self.store.get_job(id).await? {
            Some(job) if &job.namespace == namespace => Ok(self.explain(job)),
            _ => Err(EngineError::job_not_found(id)),
        }
    }

    /// Lists jobs.
    pub async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, EngineError> {
        let jobs = self.store.list_jobs(filter).await?;
        Ok(self.explain_all(jobs))
    }

    /// Waits until the jobs reach one of `targets` (any terminal state if empty), per `mode`,
    /// or until `deadline`. Woken by committed changes only; no polling.
    pub async fn wait(
        &self,
        namespace: &Name,
        ids: &[JobId],
        targets: &[JobState],
        mode: WaitMode,
        deadline: Instant,
    ) -> Result<(Vec<(Job, bool)>, bool), EngineError> {
        use futures::StreamExt;
        let reached = |j: &Job| -> bool {
            if targets.is_empty() {
                j.state.is_terminal()
            } else {
                targets.contains(&j.state)
            }
        };
        // A terminal job that is not a target never becomes one.
        let dead = |j: &Job| j.state.is_terminal() && !reached(j);
        // Subscribe first, then read: nothing committed in between is missed. Each change wakes
        // only its own stream (SelectAll), so a wait on many jobs costs O(1) per change.
        let mut guards = Vec::with_capacity(ids.len());
        let mut changes = futures::stream::SelectAll::new();
        for (i, &id) in ids.iter().enumerate() {
            let sub = self.hub.subscribe(id, false);
            guards.push(sub.guard);
            changes.push(
                tokio_stream::wrappers::WatchStream::from_changes(sub.snapshot)
                    .map(move |s| (i, s)),
            );
        }
        let found: HashMap<JobId, Arc<Job>> = self
            .store
            .get_jobs(ids)
            .await?
            .into_iter()
            .map(|j| (j.id, Arc::new(j)))
            .collect();
        let mut current = Vec::with_capacity(ids.len());
        for id in ids {
            match found.get(id) {
                Some(job) if &job.namespace == namespace => current.push(job.clone()),
                _ => return Err(EngineError::job_not_found(id)),
            }
        }
        let mut hits = current.iter().filter(|j| reached(j)).count();
        let mut deads = current.iter().filter(|j| dead(j)).count();
        loop {
            let done = match mode {
                WaitMode::All => hits == current.len(),
                WaitMode::Any => hits > 0,
            };
            let hopeless = match mode {
                WaitMode::All => deads > 0,
                WaitMode::Any => deads == current.len(),
            };
            if done || hopeless || Instant::now() >= deadline {
                let reached_each: Vec<bool> = current.iter().map(|j| reached(j)).collect();
                let jobs = self.explain_all(current.iter().map(|j| (**j).clone()).collect());
                return Ok((jobs.into_iter().zip(reached_each).collect(), done));
            }
            tokio::select! {
                Some((i, snap)) = changes.next() => {
                    if let Some(newer) = snap {
                        if newer.version > current[i].version {
                            hits -= reached(&current[i]) as usize;
                            deads -= dead(&current[i]) as usize;
                            current[i] = newer;
                            hits += reached(&current[i]) as usize;
                            deads += dead(&current[i]) as usize;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => {
                    return Err(EngineError::Unavailable("the service is shutting down".into()));
                }
            }
        }
    }

    /// Cancels a job.
    pub async fn cancel(
        &self,
        namespace: &Name,
        id: JobId,
        grace: Option<Duration>,
        reason: &str,
    ) -> Result<(Job, CancelOutcome), EngineError> {
        self.check_open()?;
        let grace = grace.unwrap_or(self.config.default_cancel_grace);
        let (res, rx) =
            self.with_core(|core, now, out| core.cancel(namespace, id, grace, reason, now, out));
        // Even when this cancel wrote nothing (already requested; or the job just ended and its
        // terminal write is still in flight), answer only after everything before it is
        // committed, so the answer never shows uncommitted state.
        let rx = rx.unwrap_or_else(|| self.committer.enqueue(Outbox::default()));
        Self::committed(Some(rx)).await?;
        match res {
            Some((job, outcome)) => Ok(((*job).clone(), outcome)),
            None => {
                // Not active: terminal, or unknown, or another namespace's.
                let job = self.get(namespace, id).await?;
                if job.state.is_terminal() {
                    Ok((job, CancelOutcome::AlreadyTerminal))
                } else {
                    // Became active again between the two looks (cannot happen: terminal is
                    // final and unknown jobs do not appear); answer with what is committed.
                    Ok((job, CancelOutcome::Requested))
                }
            }
        }
    }

    /// A job's events with `seq > from_seq`, then live ones, ending after the terminal event.
    pub async fn watch(
        self: &Arc<Self>,
        namespace: &Name,
        id: JobId,
        from_seq: u64,
    ) -> Result<impl Stream<Item = Result<Arc<Event>, EngineError>> + Send + 'static, EngineError>
    {
        let sub = self.hub.subscribe(id, true);
        let guard = sub.guard;
        let mut snapshot = sub.snapshot;
        let mut events = sub.events.expect("asked for events");
        let job = match self.store.get_job(id).await? {
            Some(job) if &job.namespace == namespace => job,
            _ => return Err(EngineError::job_not_found(id)),
        };
        let engine = self.clone();
        Ok(async_stream::try_stream! {
            // The subscription lives as long as the stream.
            let _guard = guard;
            let mut last = from_seq;
            let mut known = Arc::new(job);
            loop {
                // Catch up from the database.
                loop {
                    let page = engine.store.events(id, last, 512).await?;
                    let n = page.len();
                    for e in page {
                        last = e.seq;
                        let terminal = e.is_terminal();
                        yield Arc::new(e);
                        if terminal {
                            return;
                        }
                    }
                    if n < 512 {
                        break;
                    }
                }
                if let Some(newer) = snapshot.borrow_and_update().as_ref() {
                    if newer.version > known.version {
                        known = newer.clone();
                    }
                }
                if known.state.is_terminal() && last >= known.last_seq {
                    return;
                }
                // Live, until a gap or lag sends us back to the database.
                loop {
                    let received = tokio::select! {
                        r = events.recv() => Some(r),
                        _ = engine.shutdown.cancelled() => None,
                    };
                    match received {
                        Some(Ok(e)) => {
                            if e.seq <= last {
                                continue;
                            }
                            if e.seq != last + 1 {
                                break;
                            }
                            last = e.seq;
                            let terminal = e.is_terminal();
                            yield e;
                            if terminal {
                                return;
                            }
                        }
                        Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                        Some(Err(tokio::sync::broadcast::error::RecvError::Closed)) | None => {
                            Err(EngineError::Unavailable("the service is shutting down".into()))?;
                        }
                    }
                }
            }
        })
    }

    /// Registers a worker stream.
    pub fn connect_worker(
        &self,
        hello: WorkerHello,
        tx: mpsc::UnboundedSender<ToWorker>,
    ) -> Result<WorkerSession, EngineError> {
        self.check_open()?;
        let (s, rx) = self.with_core(|core, now, out| core.connect_worker(hello, tx, now, out));
        drop(rx);
        s
    }

    /// Handles a worker's reports at once (in order with everything else the engine does) and
    /// returns a ticket that resolves when they are committed. The stream handler keeps a
    /// bounded number of tickets outstanding: pipelining without unbounded buffering.
    pub fn reports(
        &self,
        s: &WorkerSession,
        reports: Vec<Report>,
    ) -> Result<CommitTicket, EngineError> {
        self.check_open()?;
        let ((), rx) = self.with_core(|core, now, out| core.reports(s, reports, now, out));
        Ok(CommitTicket(rx))
    }

    /// Renews a worker's lease.
    pub fn heartbeat(&self, s: &WorkerSession) {
        self.lock().heartbeat(s);
    }

    /// The worker's stream ended.
    pub fn disconnect_worker(&self, s: &WorkerSession) {
        let ((), rx) = self.with_core(|core, now, out| core.disconnect_worker(s, now, out));
        drop(rx);
    }

    /// Drains a worker.
    pub async fn drain_worker(
        &self,
        namespace: &Name,
        id: &WorkerId,
    ) -> Result<WorkerInfo, EngineError> {
        let (info, rx) = self.with_core(|core, _, out| core.drain_worker(namespace, id, out));
        Self::committed(rx).await?;
        info.ok_or_else(|| EngineError::NotFound {
            reason: "WORKER_NOT_FOUND",
            what: format!("worker {id}"),
        })
    }

    /// Replaces a queue's settings.
    pub async fn configure_queue(
        &self,
        key: QueueKey,
        config: QueueConfig,
    ) -> Result<QueueInfo, EngineError> {
        self.check_open()?;
        let (info, rx) =
            self.with_core(|core, now, out| core.configure_queue(key, config, now, out));
        Self::committed(rx).await?;
        Ok(info)
    }

    /// Queues of a namespace.
    pub fn list_queues(&self, namespace: &Name) -> Vec<QueueInfo> {
        self.lock().list_queues(namespace)
    }

    /// Creates a capacity pool or replaces its settings. Jobs waiting for it are re-examined
    /// at once (a larger limit dispatches them).
    pub async fn configure_pool(
        &self,
        key: PoolKey,
        config: PoolConfig,
    ) -> Result<PoolInfo, EngineError> {
        self.check_open()?;
        let (info, rx) =
            self.with_core(|core, now, out| core.configure_pool(key, config, now, out));
        Self::committed(rx).await?;
        Ok(info)
    }

    /// A pool with its live figures; `NotFound` (`POOL_NOT_FOUND`) if there is none.
    pub fn get_pool(&self, key: &PoolKey) -> Result<PoolInfo, EngineError> {
        self.lock()
            .pool_info(key)
            .ok_or_else(|| EngineError::NotFound {
                reason: "POOL_NOT_FOUND",
                what: format!("pool {key}"),
            })
    }

    /// Pools of a namespace, by name.
    pub fn list_pools(&self, namespace: &Name) -> Vec<PoolInfo> {
        self.lock().list_pools(namespace)
    }

    /// Deletes a pool: `NotFound` if there is none, `FailedPrecondition` (`POOL_IN_USE`) while
    /// attempts hold its units or queued jobs ask for it.
    pub async fn delete_pool(&self, key: PoolKey) -> Result<(), EngineError> {
        self.check_open()?;
        let (res, rx) = self.with_core(|core, _now, out| core.delete_pool(&key, out));
        res?;
        Self::committed(rx).await?;
        Ok(())
    }

    /// Queues, pools and connected workers of every namespace (for metrics).
    pub fn live_figures(&self) -> LiveFigures {
        self.lock().live_figures()
    }

    /// Workers of a namespace.
    pub fn list_workers(&self, namespace: &Name) -> Vec<WorkerInfo> {
        self.lock().list_workers(namespace)
    }

    /// Whether a worker session is still the current one.
    pub fn is_current(&self, s: &WorkerSession) -> bool {
        self.lock().is_current(s)
    }

    /// Ends worker streams and flushes the commit queue; call after the server stopped
    /// accepting requests.
    pub async fn close(&self) {
        self.lock().close_all_workers();
        let _ = self.flush().await;
        self.committer_stop.cancel();
        let commits = self
            .stats
            .commits
            .load(std::sync::atomic::Ordering::Relaxed);
        let writes = self.stats.writes.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            commits,
            writes,
            writes_per_commit = writes as f64 / commits.max(1) as f64,
            "engine closed"
        );
    }

    /// Deletes terminal jobs (and their events) finished longer than the retention ago, in
    /// rounds of bounded size.
    async fn prune(&self) {
        // Small rounds: each holds the single writer connection while it deletes.
        const ROUND: u32 = 200;
        let keep = self.config.retention.max(self.config.idempotency_retention);
        let before = Timestamp(Timestamp::now().0 - keep.as_micros().min(i64::MAX as u128) as i64);
        let mut total = 0;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            match self.store.prune_finished(before, ROUND).await {
                Ok(n) => {
                    total += n;
                    if n < ROUND as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning failed; will retry at the next maintenance");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(jobs = total, "pruned jobs past their retention");
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Jobs with subscribers in the hub.
    pub fn hub_topics(&self) -> usize {
        self.hub.topics()
    }
}

/// Fires timers at their deadlines; sleeps until the earliest one or until woken by a new,
/// earlier one. Maintenance (pruning) is one of the timers, so an idle service only wakes for it.
async fn timer_loop(engine: Arc<Engine>) {
    engine.lock().schedule_maintenance();
    let pruning = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let (next, maintenance) = {
            let mut core = engine.lock();
            let mut out = Outbox::default();
            let now_i = Instant::now();
            let now = Timestamp::now();
            let mut maintenance = false;
            while let Some(t) = core.timers.pop_due(now_i) {
                maintenance |= t == timers::Timer::Maintenance;
                core.fire(t, now, &mut out);
            }
            core.timer_rearm = false;
            engine.committer.enqueue_detached(out);
            (core.timers.next_deadline(), maintenance)
        };
        if maintenance {
            // Pruning runs beside the timers, one round at a time.
            if let Ok(guard) = pruning.clone().try_lock_owned() {
                let engine = engine.clone();
                tokio::spawn(async move {
                    engine.prune().await;
                    drop(guard);
                });
            }
        }
        tokio::select! {
            _ = engine.timer_wake.notified() => {}
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = engine.shutdown.cancelled() => return,
        }
    }
}
