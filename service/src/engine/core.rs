//! The engine's in-memory state and every change to it.
//!
//! `Core` is only touched under the engine's lock. Each operation changes memory through
//! [`Core::apply`] (the one door to the state machine) and records the writes and post-commit
//! effects in an [`Outbox`]; the engine hands that to the committer before releasing the lock.
//! Dispatch is event driven: whatever can free or fill a slot marks the queue dirty, and
//! [`Core::settle`] dispatches dirty queues before the operation returns.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::commit::{Effect, Outbox};
use super::model::*;
use super::scheduler::{Decision, DeletePoolError, Scheduler, WorkerSpec};
use super::spans;
use super::state::{transition, InvalidTransition, Trigger};
use super::timers::{Timer, TimerKey, Timers};
use super::{
    CancelOutcome, EngineConfig, EngineError, LiveFigures, Outcome, PoolInfo, QueueInfo, Report,
    ReportKind, ToWorker, WorkerHello, WorkerInfo, WorkerSession,
};
use crate::metrics::Metrics;
use crate::store::{Recovered, Write};

/// An active (non-terminal) job.
struct Active {
    job: Arc<Job>,
    state_timer: Option<TimerKey>,
    wait_timer: Option<TimerKey>,
    cancel_timer: Option<TimerKey>,
    /// Only while its spans are recorded ([`EngineConfig::job_spans`]): its current stay in
    /// QUEUED, and its current attempt's open span with the context handed to the worker.
    queued: Option<spans::Queued>,
    attempt_span: Option<(spans::Attempt, Arc<TraceContext>)>,
}

impl Active {
    fn new(job: Arc<Job>) -> Self {
        Active {
            job,
            state_timer: None,
            wait_timer: None,
            cancel_timer: None,
            queued: None,
            attempt_span: None,
        }
    }
}

/// What the engine keeps of a queue; dispatch state lives in the scheduler.
#[derive(Default)]
struct QueueState {
    config: QueueConfig,
    /// Jobs in QUEUED, ready or not, by submit time.
    queued: BTreeSet<(Timestamp, JobId)>,
    /// Jobs LEASED or RUNNING.
    active: u32,
}

struct WorkerState {
    id: WorkerId,
    namespace: Name,
    name: String,
    queues: Vec<QueueKey>,
    concurrency: u32,
    labels: BTreeMap<String, String>,
    resources: Resources,
    inflight: HashSet<JobId>,
    /// Attempts the service ended without the worker (run timeout, forced cancel) that the
    /// worker may still be running: they keep using a slot until the worker reports on them or
    /// reconnects without them, so the worker never runs more than its concurrency.
    zombies: HashMap<(JobId, u32), QueueKey>,
    tx: Option<mpsc::UnboundedSender<ToWorker>>,
    session: u64,
    lease_expires: Instant,
    /// The one lease timer of this worker.
    lease_timer: Option<TimerKey>,
    draining: bool,
}

impl WorkerState {
    /// A worker not connected yet (its stream attaches on hello).
    fn new(id: WorkerId, namespace: Name, lease_expires: Instant) -> Self {
        WorkerState {
            id,
            namespace,
            name: String::new(),
            queues: Vec::new(),
            concurrency: 0,
            labels: BTreeMap::new(),
            resources: Resources::default(),
            inflight: HashSet::new(),
            zombies: HashMap::new(),
            tx: None,
            session: 0,
            lease_expires,
            lease_timer: None,
            draining: false,
        }
    }
}

/// What a submit produced for one spec.
pub(crate) enum Submitted {
    /// A new job.
    Created(Arc<Job>),
    /// The idempotency key matched this job.
    Existing(JobId),
}

pub(crate) struct Core {
    pub config: EngineConfig,
    jobs: HashMap<JobId, Active>,
    queues: HashMap<QueueKey, QueueState>,
    sched: Scheduler,
    /// The timer armed for the scheduler's next wake-up.
    sched_timer: Option<TimerKey>,
    workers: HashMap<WorkerId, WorkerState>,
    idempotency: HashMap<(Name, String), IdempotencyRecord>,
    pub timers: Timers,
    /// Set when a timer earlier than all others was added: the timer task must re-arm.
    pub timer_rearm: bool,
    session_seq: u64,
    /// Counters and histograms of what happens (submits, completions, attempt times).
    pub metrics: Arc<Metrics>,
    /// Queued jobs whose `waiting_for` is to be noted for their `queued` span once the
    /// current step has settled (only while job spans are recorded).
    wait_noted: Vec<JobId>,
}

fn log_invalid(e: &InvalidTransition, id: JobId) {
    tracing::warn!(job = %id, from = %e.from, trigger = ?e.trigger, "rejected invalid transition");
}

fn rfc3339(t: Timestamp) -> String {
    use std::fmt::Write as _;
    let st = std::time::UNIX_EPOCH + Duration::from_micros(t.0.max(0) as u64);
    let mut out = String::new();
    // Input is bounded at the edge; still, formatting must never panic under the engine lock.
    if write!(out, "{}", humantime::format_rfc3339_millis(st)).is_err() {
        out = format!("{}us", t.0);
    }
    out
}

impl Core {
    pub fn new(config: EngineConfig) -> Self {
        let mut sched = Scheduler::default();
        sched.record_parks = config.job_spans;
        Core {
            config,
            jobs: HashMap::new(),
            queues: HashMap::new(),
            sched,
            sched_timer: None,
            workers: HashMap::new(),
            idempotency: HashMap::new(),
            timers: Timers::default(),
            timer_rearm: false,
            session_seq: 0,
            metrics: Arc::new(Metrics::new()),
            wait_noted: Vec::new(),
        }
    }

    fn queue_key(job: &Job) -> QueueKey {
        QueueKey {
            namespace: job.namespace.clone(),
            name: job.queue.clone(),
        }
    }

    fn timer(&mut self, at: Instant, t: Timer) -> TimerKey {
        let (key, earliest) = self.timers.insert(at, t);
        self.timer_rearm |= earliest;
        key
    }

    fn at(&self, now_wall: Timestamp, when: Timestamp) -> Instant {
        Instant::now() + when.since(now_wall)
    }

    /// Rebuilds memory from what the store recovered. Leased and running attempts are given
    /// one worker lease to be claimed by their worker reconnecting; after that they are lost.
    pub fn recover(&mut self, r: Recovered, now: Timestamp) {
        for (key, config) in r.queues {
            self.sched
                .set_queue(&key, config.max_concurrency, config.paused);
            self.queues.entry(key).or_default().config = config;
        }
        let cooldowns: HashMap<PoolKey, crate::store::PoolCooldown> =
            r.cooldowns.into_iter().collect();
        for (key, config) in r.pools {
            let at = Instant::now();
            self.sched.set_pool(&key, config, at);
            let cooldown = cooldowns
                .get(&key)
                .map(|c| (self.at(now, c.until), c.epoch));
            self.sched.restore_pool(&key, cooldown, at);
        }
        for rec in r.idempotency {
            self.idempotency
                .insert((rec.namespace.clone(), rec.key.clone()), rec);
        }
        let lease = Instant::now() + self.config.worker_lease_ttl;
        for job in r.active_jobs {
            let id = job.id;
            let qk = Self::queue_key(&job);
            let q = self.queues.entry(qk.clone()).or_default();
            match job.state {
                JobState::Queued => {
                    q.queued.insert((job.created_at, id));
                }
                JobState::Leased | JobState::Running => q.active += 1,
                _ => {}
            }
            let state = job.state;
            let worker = job.worker_id.clone();
            let max_wait_at = (job.attempt == 0)
                .then(|| job.max_wait.map(|w| job.scheduled_at.plus(w)))
                .flatten();
            let scheduled_at = job.scheduled_at;
            let mut active = Active::new(Arc::new(job));
            if state == JobState::Queued && self.spans_of(&active.job) {
                // Its stay in the queue began at its last change.
                active.queued = Some(spans::Queued::new(active.job.updated_at));
                self.wait_noted.push(id);
            }
            self.jobs.insert(id, active);
            match state {
                JobState::Queued => {
                    if scheduled_at > now {
                        let at = self.at(now, scheduled_at);
                        let k = self.timer(at, Timer::Ready(id));
                        self.active_mut(id).state_timer = Some(k);
                    } else {
                        self.make_ready(id);
                    }
                    if let Some(t) = max_wait_at {
                        let at = self.at(now, t);
                        let k = self.timer(at, Timer::MaxWait(id));
                        self.active_mut(id).wait_timer = Some(k);
                    }
                }
                JobState::Leased | JobState::Running => {
                    let wid = worker.unwrap_or_else(|| WorkerId("unknown".into()));
                    let w = self.workers.entry(wid.clone()).or_insert_with(|| {
                        WorkerState::new(wid.clone(), qk.namespace.clone(), lease)
                    });
                    w.inflight.insert(id);
                    w.concurrency = w.inflight.len() as u32;
                    let job = self.jobs[&id].job.clone();
                    self.sched
                        .restore(id, job.attempt, &qk, &wid, job.pool.as_ref(), &job.demand);
                    self.rearm_recovered(id, now);
                }
                _ => {}
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().cloned().collect();
        for wid in ids {
            let k = self.timer(lease, Timer::WorkerLease(wid.clone()));
            self.workers.get_mut(&wid).expect("worker").lease_timer = Some(k);
        }
    }

    /// Re-arms the timers of a leased or running job found at start: the acknowledgement, the
    /// run timeout (counted from its start) and a pending cancel's grace.
    fn rearm_recovered(&mut self, id: JobId, now: Timestamp) {
        let job = self.jobs[&id].job.clone();
        let state_timer = match job.state {
            JobState::Leased => Some(self.timer(
                Instant::now() + self.config.ack_timeout,
                Timer::AckTimeout(id, job.attempt),
            )),
            JobState::Running => job.run_timeout.map(|t| {
                let end = job.started_at.unwrap_or(now).plus(t);
                let at = self.at(now, end);
                self.timer(at, Timer::RunTimeout(id, job.attempt))
            }),
            _ => None,
        };
        let cancel_timer = job.cancel_requested.then(|| {
            self.timer(
                Instant::now() + self.config.default_cancel_grace,
                Timer::CancelGrace(id, job.attempt),
            )
        });
        let a = self.active_mut(id);
        a.state_timer = state_timer;
        a.cancel_timer = cancel_timer;
    }

    fn active_mut(&mut self, id: JobId) -> &mut Active {
        self.jobs.get_mut(&id).expect("active job")
    }

    /// The one door to the state machine: applies `trigger` to an active job, lets `edit` fill
    /// in the details, bumps version and sequence, records the write, the event and its
    /// publication, and keeps queue and worker bookkeeping in step.
    fn apply(
        &mut self,
        id: JobId,
        trigger: Trigger,
        now: Timestamp,
        out: &mut Outbox,
        edit: impl FnOnce(&mut Job),
    ) -> Result<Arc<Job>, InvalidTransition> {
        let active = self.jobs.get_mut(&id).expect("apply on an active job");
        let from = active.job.state;
        let to = match transition(from, trigger) {
            Ok(to) => to,
            Err(e) => {
                log_invalid(&e, id);
                return Err(e);
            }
        };
        let mut job = (*active.job).clone();
        let expected_version = job.version;
        let prev_worker = job.worker_id.clone();
        let started_at = job.started_at;
        job.state = to;
        edit(&mut job);
        job.version += 1;
        job.updated_at = now;
        job.last_seq += 1;
        if to.is_terminal() {
            job.finished_at = Some(now);
            job.waiting_for.clear();
        }
        let event = Event {
            job_id: id,
            seq: job.last_seq,
            time: now,
            kind: EventKind::State {
                from: Some(from),
                to,
                attempt: job.attempt,
                error: match to {
                    JobState::Queued
                    | JobState::Failed
                    | JobState::Cancelled
                    | JobState::TimedOut
                    | JobState::Expired => job.error.clone(),
                    JobState::Leased | JobState::Running | JobState::Succeeded => None,
                },
                waiting_for: job.waiting_for.clone(),
            },
            data: if to == JobState::Succeeded {
                job.result.clone().unwrap_or_default()
            } else {
                Bytes::new()
            },
        };
        if from == JobState::Leased && to == JobState::Running {
            self.metrics
                .attempt_started(&job.namespace, &job.queue, now.since(job.scheduled_at));
        }
        if from == JobState::Running && to != JobState::Running {
            if let Some(started) = started_at {
                self.metrics
                    .attempt_ended(&job.namespace, &job.queue, now.since(started));
            }
        }
        if to.is_terminal() {
            self.metrics.job_completed(&job.namespace, &job.queue, to);
        }
        let job = Arc::new(job);
        active.job = job.clone();
        if self.config.job_spans && job.trace.is_some() {
            Self::record_spans(active, &job, trigger, from, started_at, now);
            if to == JobState::Queued && from != JobState::Queued {
                self.wait_noted.push(id);
            }
        }
        out.writes.push(Write::UpdateJob {
            job: job.clone(),
            expected_version,
        });
        out.writes.push(Write::Event(event.clone()));
        out.effects.push(Effect::Publish {
            job: Some(job.clone()),
            events: vec![Arc::new(event)],
        });

        // Bookkeeping that follows from the change.
        let qk = Self::queue_key(&job);
        let holds = |s: JobState| matches!(s, JobState::Leased | JobState::Running);
        if from == JobState::Queued && to != JobState::Queued {
            if let Some(k) = active.wait_timer.take() {
                self.timers.remove(k);
            }
            self.sched.dequeue(id);
            let q = self.queues.entry(qk.clone()).or_default();
            q.queued.remove(&(job.created_at, id));
        }
        let active = self.jobs.get_mut(&id).expect("active");
        if from != to {
            if let Some(k) = active.state_timer.take() {
                self.timers.remove(k);
            }
        }
        if holds(from) && !holds(to) {
            let active = self.jobs.get_mut(&id).expect("active");
            if let Some(k) = active.cancel_timer.take() {
                self.timers.remove(k);
            }
            let q = self.queues.entry(qk.clone()).or_default();
            q.active = q.active.saturating_sub(1);
            if let Some(wid) = prev_worker {
                // An attempt the worker may still run (a zombie) keeps its capacity until the
                // worker is done with it.
                let zombie = self
                    .workers
                    .get(&wid)
                    .is_some_and(|w| w.zombies.contains_key(&(id, job.attempt)));
                if !zombie {
                    self.sched.release(id, job.attempt);
                }
                if let Some(w) = self.workers.get_mut(&wid) {
                    w.inflight.remove(&id);
                }
            }
        }
        if !holds(from) && holds(to) {
            self.queues.entry(qk.clone()).or_default().active += 1;
        }
        if to == JobState::Queued && from != JobState::Queued {
            self.queues
                .entry(qk)
                .or_default()
                .queued
                .insert((job.created_at, id));
        }
        if to.is_terminal() {
            let active = self.jobs.remove(&id).expect("active");
            for k in [active.state_timer, active.wait_timer, active.cancel_timer]
                .into_iter()
                .flatten()
            {
                self.timers.remove(k);
            }
        }
        Ok(job)
    }

    /// Whether the spans of this job's life are recorded.
    fn spans_of(&self, job: &Job) -> bool {
        self.config.job_spans && job.trace.is_some()
    }

    /// The spans a state change opens or ends (see [`spans`]); `started_at` is when the
    /// attempt that may have ended started running.
    fn record_spans(
        active: &mut Active,
        job: &Job,
        trigger: Trigger,
        from: JobState,
        started_at: Option<Timestamp>,
        now: Timestamp,
    ) {
        let to = job.state;
        let holds = |s: JobState| matches!(s, JobState::Leased | JobState::Running);
        if holds(from) && !holds(to) {
            let failed = matches!(trigger, Trigger::Retry | Trigger::Fail | Trigger::TimeOut);
            let attempt = active.attempt_span.take().map(|(a, _)| a);
            spans::complete(job, attempt, to, failed, started_at, now);
        }
        if from == JobState::Queued && to != JobState::Queued {
            if let Some(q) = active.queued.take() {
                active.attempt_span =
                    spans::left_queue(job, &q, to, now).map(|(a, t)| (a, Arc::new(t)));
            }
        }
        if to == JobState::Queued && from != JobState::Queued {
            active.queued = Some(spans::Queued::new(now));
        }
    }

    /// Notes why the queued jobs of [`Self::wait_noted`] and those the scheduler parked wait,
    /// for their `queued` spans.
    fn note_waits(&mut self, now: Timestamp) {
        let mut ids = std::mem::take(&mut self.wait_noted);
        ids.extend(self.sched.take_parked());
        for id in ids {
            let Some(a) = self.jobs.get(&id) else {
                continue;
            };
            if a.queued.is_none() || a.job.state != JobState::Queued {
                continue;
            }
            let reason = self.explain(&a.job, now);
            if let Some(q) = self.jobs.get_mut(&id).and_then(|a| a.queued.as_mut()) {
                q.note(now, reason);
            }
        }
    }

    /// Records a change that is not a state change (progress, output, cancel flag).
    fn touch(
        &mut self,
        id: JobId,
        now: Timestamp,
        out: &mut Outbox,
        edit: impl FnOnce(&mut Job) -> Option<(EventKind, Bytes)>,
    ) -> Arc<Job> {
        let active = self.jobs.get_mut(&id).expect("touch on an active job");
        let mut job = (*active.job).clone();
        let expected_version = job.version;
        let event = edit(&mut job);
        job.version += 1;
        job.updated_at = now;
        let mut events = Vec::new();
        if let Some((kind, data)) = event {
            job.last_seq += 1;
            let e = Event {
                job_id: id,
                seq: job.last_seq,
                time: now,
                kind,
                data,
            };
            out.writes.push(Write::Event(e.clone()));
            events.push(Arc::new(e));
        }
        let job = Arc::new(job);
        active.job = job.clone();
        out.writes.push(Write::UpdateJob {
            job: job.clone(),
            expected_version,
        });
        out.effects.push(Effect::Publish {
            job: Some(job.clone()),
            events,
        });
        job
    }

    /// The job is ready to run: the scheduler takes it.
    fn make_ready(&mut self, id: JobId) {
        let job = self.jobs.get(&id).expect("active").job.clone();
        self.sched.enqueue(
            id,
            &Self::queue_key(&job),
            job.priority,
            job.attempt + 1,
            job.demand.clone(),
            Instant::now(),
        );
    }

    /// Carries out everything the scheduler can decide now, then arms its next wake-up.
    pub fn settle(&mut self, now: Timestamp, out: &mut Outbox) {
        loop {
            let decisions = self.sched.decide(Instant::now());
            if decisions.is_empty() {
                break;
            }
            for d in decisions {
                match d {
                    Decision::Dispatch {
                        job,
                        attempt,
                        worker,
                        pool,
                    } => self.dispatch(job, attempt, worker, pool, now, out),
                    Decision::Expire { job, tried } => {
                        let names: Vec<&str> = tried.iter().map(|n| n.as_str()).collect();
                        let _ = self.apply(job, Trigger::Expire, now, out, |j| {
                            j.error = Some(JobError::new(
                                "MAX_WAIT_EXCEEDED",
                                format!(
                                    "no capacity within the max wait of its pools (tried {})",
                                    names.join(", ")
                                ),
                            ));
                        });
                    }
                }
            }
        }
        if self.config.job_spans {
            self.note_waits(now);
        }
        let want = self.sched.next_wakeup();
        if self.sched_timer.map(|k| k.at()) != want {
            if let Some(k) = self.sched_timer.take() {
                self.timers.remove(k);
            }
            if let Some(at) = want {
                self.sched_timer = Some(self.timer(at, Timer::Schedule));
            }
        }
    }

    fn dispatch(
        &mut self,
        id: JobId,
        attempt: u32,
        wid: WorkerId,
        pool: Option<Name>,
        now: Timestamp,
        out: &mut Outbox,
    ) {
        let tx = self.workers.get(&wid).and_then(|w| w.tx.clone());
        let current = self.jobs.get(&id).map(|a| (a.job.state, a.job.attempt));
        let (Some(tx), Some((JobState::Queued, before))) = (tx, current) else {
            // Unreachable by construction (the scheduler only dispatches waiting jobs to open
            // workers); keep the books straight anyway.
            self.sched.release(id, attempt);
            return;
        };
        debug_assert_eq!(before + 1, attempt);
        self.workers
            .get_mut(&wid)
            .expect("worker")
            .inflight
            .insert(id);
        let job = match self.apply(id, Trigger::Dispatch, now, out, |j| {
            j.attempt = attempt;
            j.worker_id = Some(wid.clone());
            j.pool = pool;
            j.waiting_for.clear();
            j.started_at = None;
            j.progress = 0.0;
        }) {
            Ok(job) => job,
            Err(_) => {
                if let Some(w) = self.workers.get_mut(&wid) {
                    w.inflight.remove(&id);
                }
                self.sched.release(id, attempt);
                return;
            }
        };
        let at = Instant::now() + self.config.ack_timeout;
        let k = self.timer(at, Timer::AckTimeout(job.id, job.attempt));
        self.active_mut(job.id).state_timer = Some(k);
        let trace = match &self.jobs[&job.id].attempt_span {
            Some((_, t)) => Some(t.clone()),
            None => job.trace.clone(),
        };
        out.effects.push(Effect::ToWorker {
            tx,
            msg: ToWorker::Assign(job, trace),
        });
    }

    /// Why a queued job is not running (computed live; the stored value is only a hint).
    pub fn explain(&self, job: &Job, now: Timestamp) -> String {
        if job.state != JobState::Queued {
            return String::new();
        }
        if job.scheduled_at > now {
            return if job.retries_used > 0 || job.error.is_some() {
                format!("retry_backoff(until={})", rfc3339(job.scheduled_at))
            } else {
                format!("scheduled(at={})", rfc3339(job.scheduled_at))
            };
        }
        self.sched
            .explain(job.id, Instant::now())
            .unwrap_or_else(|| format!("worker(queue={})", job.queue))
    }

    /// The in-memory view of an active job, if it is active.
    pub fn active_job(&self, id: JobId) -> Option<Arc<Job>> {
        self.jobs.get(&id).map(|a| a.job.clone())
    }

    // ---------------------------------------------------------------- submit

    /// Accepts a batch of validated specs: all or nothing.
    pub fn submit(
        &mut self,
        specs: Vec<JobSpec>,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Result<Vec<Submitted>, EngineError> {
        // Check everything before changing anything.
        let mut plan: Vec<Option<JobId>> = Vec::with_capacity(specs.len());
        let mut digests = Vec::with_capacity(specs.len());
        let mut new_per_queue: HashMap<QueueKey, u64> = HashMap::new();
        let mut keys_in_batch: HashMap<(Name, String), (String, usize)> = HashMap::new();
        let single = specs.len() == 1;
        for (i, spec) in specs.iter().enumerate() {
            let field = if single {
                "spec".to_string()
            } else {
                format!("specs[{i}]")
            };
            self.check_demand(spec, &field)?;
            let digest = spec.idempotency_key.as_ref().map(|_| spec.digest());
            let mut existing = None;
            if let (Some(key), Some(d)) = (&spec.idempotency_key, &digest) {
                let k = (spec.namespace.clone(), key.clone());
                match self.idempotency.get(&k) {
                    Some(rec) if rec.expires_at > now => {
                        if &rec.digest != d {
                            return Err(EngineError::AlreadyExists {
                                reason: "IDEMPOTENCY_KEY_REUSED",
                                message: format!(
                                    "idempotency key {key:?} was used for job {} with a different spec",
                                    rec.job_id
                                ),
                            });
                        }
                        existing = Some(rec.job_id);
                    }
                    _ => {
                        if let Some((d0, _)) = keys_in_batch.get(&k) {
                            if d0 != d {
                                return Err(EngineError::AlreadyExists {
                                    reason: "IDEMPOTENCY_KEY_REUSED",
                                    message: format!(
                                        "idempotency key {key:?} appears twice in the batch with different specs"
                                    ),
                                });
                            }
                        } else {
                            keys_in_batch.insert(k, (d.clone(), i));
                        }
                    }
                }
            }
            if existing.is_none() {
                *new_per_queue
                    .entry(QueueKey {
                        namespace: spec.namespace.clone(),
                        name: spec.queue.clone(),
                    })
                    .or_default() += 1;
            }
            plan.push(existing);
            digests.push(digest);
        }
        for (qk, n) in &new_per_queue {
            if let Some(q) = self.queues.get(qk) {
                let queued = q.queued.len() as u64;
                if q.config.max_depth > 0 && queued + n > q.config.max_depth {
                    return Err(EngineError::ResourceExhausted {
                        reason: "QUEUE_FULL",
                        message: format!(
                            "queue {} is full ({queued} queued, max depth {})",
                            qk.name, q.config.max_depth
                        ),
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }

        let mut results = Vec::with_capacity(specs.len());
        let mut created_keys: HashMap<(Name, String), JobId> = HashMap::new();
        for ((spec, existing), digest) in specs.into_iter().zip(plan).zip(digests) {
            if let Some(id) = existing {
                results.push(Submitted::Existing(id));
                continue;
            }
            if let Some(key) = &spec.idempotency_key {
                if let Some(id) = created_keys.get(&(spec.namespace.clone(), key.clone())) {
                    results.push(Submitted::Existing(*id));
                    continue;
                }
            }
            let job = self.create(spec, digest, now, out);
            if let Some(key) = &job.idempotency_key {
                created_keys.insert((job.namespace.clone(), key.clone()), job.id);
            }
            results.push(Submitted::Created(job));
        }
        self.settle(now, out);
        // Report the state after dispatch (a job may already be leased in this very commit).
        Ok(results
            .into_iter()
            .map(|r| match r {
                Submitted::Created(j) => Submitted::Created(self.active_job(j.id).unwrap_or(j)),
                other => other,
            })
            .collect())
    }

    /// Every pool a spec asks for exists, and each request fits its pool's limits (a request
    /// larger than a limit could never be served).
    fn check_demand(&self, spec: &JobSpec, field: &str) -> Result<(), EngineError> {
        let qk = QueueKey {
            namespace: spec.namespace.clone(),
            name: spec.queue.clone(),
        };
        let strict = self
            .queues
            .get(&qk)
            .is_some_and(|q| q.config.reject_unplaceable);
        let placed = spec.demand.resources.is_zero() && spec.demand.selector.is_empty();
        if strict && !placed && !self.sched.could_place(&qk, &spec.demand) {
            return Err(EngineError::FailedPrecondition {
                reason: "NO_WORKER_FITS",
                message: format!(
                    "no connected worker of queue {} has the resources and labels {field} asks \
                     for, and the queue refuses jobs no worker fits",
                    spec.queue
                ),
            });
        }
        for (j, req) in spec.demand.pools.iter().enumerate() {
            let Some(config) = self
                .sched
                .resolve_pool(&spec.namespace, &req.pool)
                .and_then(|key| self.sched.pool_config(&key))
            else {
                return Err(EngineError::InvalidArgument {
                    field: format!("{field}.pools[{j}].pool"),
                    message: format!(
                        "no pool named {} in namespace {} nor a shared one (create it first)",
                        req.pool, spec.namespace
                    ),
                });
            };
            for (unit, n) in &req.units {
                if let Some(max) = config.max_units.get(unit).filter(|m| n > *m) {
                    return Err(EngineError::InvalidArgument {
                        field: format!("{field}.pools[{j}].units[{unit:?}]"),
                        message: format!(
                            "asks for {n} {unit}, more than pool {} ever allows at once ({max})",
                            req.pool
                        ),
                    });
                }
                if let Some(r) = config
                    .rates
                    .iter()
                    .find(|r| &r.unit == unit && *n > r.burst)
                {
                    return Err(EngineError::InvalidArgument {
                        field: format!("{field}.pools[{j}].units[{unit:?}]"),
                        message: format!(
                            "asks for {n} {unit}, more than pool {}'s rate limit ever holds \
                             (burst {})",
                            req.pool, r.burst
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn create(
        &mut self,
        spec: JobSpec,
        digest: Option<String>,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Arc<Job> {
        let qk = QueueKey {
            namespace: spec.namespace.clone(),
            name: spec.queue.clone(),
        };
        let qcfg = self.queues.entry(qk.clone()).or_default().config.clone();
        let scheduled_at = spec.scheduled_at.unwrap_or(now).max(now);
        let id = JobId::new();
        let job = Job {
            id,
            namespace: spec.namespace,
            queue: spec.queue,
            payload: spec.payload,
            labels: spec.labels,
            priority: spec.priority,
            idempotency_key: spec.idempotency_key,
            state: JobState::Queued,
            attempt: 0,
            retries_used: 0,
            retry_policy: spec
                .retry_policy
                .or(qcfg.default_retry_policy)
                .unwrap_or_default(),
            run_timeout: spec.run_timeout.or(qcfg.default_run_timeout),
            max_wait: spec.max_wait.or(qcfg.default_max_wait),
            result: None,
            error: None,
            waiting_for: if scheduled_at > now {
                format!("scheduled(at={})", rfc3339(scheduled_at))
            } else {
                String::new()
            },
            progress: 0.0,
            worker_id: None,
            cancel_requested: false,
            created_at: now,
            scheduled_at,
            started_at: None,
            finished_at: None,
            updated_at: now,
            last_seq: 1,
            version: 1,
            output_bytes: 0,
            demand: spec.demand,
            pool: None,
            trace: spec.trace,
        };
        let event = Event {
            job_id: id,
            seq: 1,
            time: now,
            kind: EventKind::State {
                from: None,
                to: JobState::Queued,
                attempt: 0,
                error: None,
                waiting_for: job.waiting_for.clone(),
            },
            data: Bytes::new(),
        };
        let job = Arc::new(job);
        out.writes.push(Write::InsertJob(job.clone()));
        self.metrics.job_submitted(&qk);
        out.writes.push(Write::Event(event.clone()));
        if let (Some(key), Some(digest)) = (&job.idempotency_key, digest) {
            let rec = IdempotencyRecord {
                namespace: job.namespace.clone(),
                key: key.clone(),
                job_id: id,
                digest,
                expires_at: now.plus(self.config.idempotency_retention),
            };
            self.idempotency
                .insert((rec.namespace.clone(), rec.key.clone()), rec.clone());
            out.writes.push(Write::PutIdempotency(rec));
        }
        out.effects.push(Effect::Publish {
            job: Some(job.clone()),
            events: vec![Arc::new(event)],
        });
        self.queues
            .entry(qk)
            .or_default()
            .queued
            .insert((job.created_at, id));
        let mut active = Active::new(job.clone());
        if self.spans_of(&job) {
            active.queued = Some(spans::Queued::new(now));
            self.wait_noted.push(id);
        }
        self.jobs.insert(id, active);
        if scheduled_at > now {
            let at = self.at(now, scheduled_at);
            let k = self.timer(at, Timer::Ready(id));
            self.active_mut(id).state_timer = Some(k);
        } else {
            self.make_ready(id);
        }
        if let Some(w) = job.max_wait {
            let at = self.at(now, scheduled_at.plus(w));
            let k = self.timer(at, Timer::MaxWait(id));
            self.active_mut(id).wait_timer = Some(k);
        }
        job
    }

    /// Arms the next maintenance timer.
    pub fn schedule_maintenance(&mut self) {
        let at = Instant::now() + self.config.maintenance_interval;
        self.timer(at, Timer::Maintenance);
    }

    /// Forgets idempotency keys that expired.
    pub fn prune_idempotency(&mut self, now: Timestamp, out: &mut Outbox) {
        let expired: Vec<(Name, String)> = self
            .idempotency
            .iter()
            .filter(|(_, r)| r.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for (namespace, key) in expired {
            self.idempotency.remove(&(namespace.clone(), key.clone()));
            out.writes.push(Write::DeleteIdempotency { namespace, key });
        }
    }

    // ---------------------------------------------------------------- cancel

    /// Cancels an active job. `None` means the job is not active (terminal or unknown).
    pub fn cancel(
        &mut self,
        namespace: &Name,
        id: JobId,
        grace: Duration,
        reason: &str,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Option<(Arc<Job>, CancelOutcome)> {
        let job = self.active_job(id)?;
        if &job.namespace != namespace {
            return None;
        }
        let message = if reason.is_empty() {
            "cancelled by a client".to_string()
        } else {
            format!("cancelled by a client: {reason}")
        };
        let result = match job.state {
            JobState::Queued => {
                let job = self
                    .apply(id, Trigger::Cancel, now, out, |j| {
                        j.error = Some(JobError::new("CANCELLED", message));
                    })
                    .ok()?;
                (job, CancelOutcome::Cancelled)
            }
            JobState::Leased | JobState::Running => {
                if job.cancel_requested {
                    return Some((job, CancelOutcome::Requested));
                }
                let job = self.touch(id, now, out, |j| {
                    j.cancel_requested = true;
                    j.error = Some(JobError::new("CANCELLED", message));
                    None
                });
                self.ask_worker_to_stop(&job, grace, "CANCELLED", out);
                let at = Instant::now() + grace;
                let k = self.timer(at, Timer::CancelGrace(id, job.attempt));
                self.active_mut(id).cancel_timer = Some(k);
                (job, CancelOutcome::Requested)
            }
            JobState::Succeeded
            | JobState::Failed
            | JobState::Cancelled
            | JobState::TimedOut
            | JobState::Expired => return None,
        };
        self.settle(now, out);
        Some(result)
    }

    fn add_zombie(&mut self, job: &Job) {
        let qk = Self::queue_key(job);
        if let Some(w) = job.worker_id.as_ref().and_then(|w| self.workers.get_mut(w)) {
            w.zombies.insert((job.id, job.attempt), qk);
        }
    }

    /// The worker is done with an attempt the service had ended: its slots are free again.
    fn clear_zombie(&mut self, wid: &WorkerId, key: (JobId, u32)) {
        let Some(w) = self.workers.get_mut(wid) else {
            return;
        };
        if w.zombies.remove(&key).is_some() {
            self.sched.release(key.0, key.1);
        }
    }

    fn clear_all_zombies(&mut self, wid: &WorkerId) {
        let keys: Vec<(JobId, u32)> = self
            .workers
            .get(wid)
            .map(|w| w.zombies.keys().copied().collect())
            .unwrap_or_default();
        for k in keys {
            self.clear_zombie(wid, k);
        }
    }

    fn ask_worker_to_stop(&self, job: &Job, grace: Duration, reason: &str, out: &mut Outbox) {
        let Some(wid) = &job.worker_id else { return };
        if let Some(tx) = self.workers.get(wid).and_then(|w| w.tx.clone()) {
            out.effects.push(Effect::ToWorker {
                tx,
                msg: ToWorker::Cancel {
                    job_id: job.id,
                    attempt: job.attempt,
                    grace,
                    reason: reason.to_string(),
                },
            });
        }
    }

    // ---------------------------------------------------------------- attempts ending

    /// Ends the current attempt with a failure: retried under the policy when `retryable` and
    /// budget is left, otherwise terminal via `final_trigger` (Fail or TimeOut).
    fn fail_attempt(
        &mut self,
        id: JobId,
        error: JobError,
        retryable: bool,
        final_trigger: Trigger,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Option<Arc<Job>> {
        let job = self.active_job(id)?;
        if job.cancel_requested {
            // The client asked to cancel: a failure while stopping ends the job as cancelled.
            return self.apply(id, Trigger::Cancel, now, out, |_| {}).ok();
        }
        if retryable && job.retries_used < job.retry_policy.max_retries {
            let backoff = job
                .retry_policy
                .backoff(job.retries_used + 1, rand::random::<f64>());
            self.requeue(id, Trigger::Retry, backoff, true, error, now, out)
        } else {
            self.apply(id, final_trigger, now, out, |j| j.error = Some(error))
                .ok()
        }
    }

    /// Sends a job back to the queue, after `delay`.
    #[allow(clippy::too_many_arguments)]
    fn requeue(
        &mut self,
        id: JobId,
        trigger: Trigger,
        delay: Duration,
        counts: bool,
        error: JobError,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Option<Arc<Job>> {
        let until = now.plus(delay);
        let job = self
            .apply(id, trigger, now, out, |j| {
                if counts {
                    j.retries_used += 1;
                }
                j.error = Some(error);
                j.worker_id = None;
                j.cancel_requested = false;
                j.scheduled_at = until;
                j.waiting_for = if delay.is_zero() {
                    String::new()
                } else {
                    format!("retry_backoff(until={})", rfc3339(until))
                };
            })
            .ok()?;
        if delay.is_zero() {
            self.make_ready(id);
        } else {
            let k = self.timer(Instant::now() + delay, Timer::Ready(id));
            self.active_mut(id).state_timer = Some(k);
        }
        Some(job)
    }

    // ---------------------------------------------------------------- workers

    /// Registers a worker stream (or re-attaches one that reconnects within its lease).
    pub fn connect_worker(
        &mut self,
        hello: WorkerHello,
        tx: mpsc::UnboundedSender<ToWorker>,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Result<WorkerSession, EngineError> {
        if let Some(old) = self.workers.get(&hello.worker_id) {
            if old.namespace != hello.namespace {
                return Err(EngineError::FailedPrecondition {
                    reason: "WORKER_ID_IN_USE",
                    message: format!(
                        "worker id {} is in use in another namespace",
                        hello.worker_id
                    ),
                });
            }
        }
        self.session_seq += 1;
        let session = self.session_seq;
        let lease_expires = Instant::now() + self.config.worker_lease_ttl;
        let queues: Vec<QueueKey> = hello
            .queues
            .iter()
            .map(|q| QueueKey {
                namespace: hello.namespace.clone(),
                name: q.clone(),
            })
            .collect();
        let claimed: HashMap<JobId, u32> = hello.running.iter().copied().collect();
        let mut kept = Vec::new();
        let mut lost = Vec::new();
        if let Some(old) = self.workers.get_mut(&hello.worker_id) {
            for id in old.inflight.iter() {
                let attempt = self.jobs.get(id).map(|a| a.job.attempt);
                match (attempt, claimed.get(id)) {
                    (Some(a), Some(&c)) if a == c => kept.push((*id, a)),
                    _ => lost.push(*id),
                }
            }
        }
        // The worker stops whatever the welcome does not list as kept, and zombies never are.
        self.clear_all_zombies(&hello.worker_id);
        let w = self
            .workers
            .entry(hello.worker_id.clone())
            .or_insert_with(|| {
                WorkerState::new(
                    hello.worker_id.clone(),
                    hello.namespace.clone(),
                    lease_expires,
                )
            });
        w.namespace = hello.namespace.clone();
        w.name = hello.name.clone();
        w.queues = queues.clone();
        w.concurrency = hello.concurrency;
        w.labels = hello.labels.clone();
        w.resources = hello.resources;
        w.session = session;
        w.lease_expires = lease_expires;
        let draining = w.draining;
        let old_lease_timer = w.lease_timer.take();
        // Welcome goes first on the new stream, ahead of any assignment.
        let _ = tx.send(ToWorker::Welcome {
            worker_id: hello.worker_id.clone(),
            lease_ttl: self.config.worker_lease_ttl,
            heartbeat_interval: self.config.heartbeat_interval,
            kept: kept.clone(),
        });
        if draining {
            // A drain asked for while it was away still holds.
            let _ = tx.send(ToWorker::Drained);
        }
        // Cancels asked for while it was away are sent again for the attempts it keeps, with
        // what is left of their grace period (the force timer keeps its original deadline).
        for (id, attempt) in &kept {
            if let Some(a) = self.jobs.get(id) {
                if a.job.cancel_requested {
                    let grace = a
                        .cancel_timer
                        .map_or(self.config.default_cancel_grace, |k| {
                            k.at().saturating_duration_since(Instant::now())
                        });
                    let _ = tx.send(ToWorker::Cancel {
                        job_id: *id,
                        attempt: *attempt,
                        grace,
                        reason: "CANCELLED".into(),
                    });
                }
            }
        }
        let w = self.workers.get_mut(&hello.worker_id).expect("worker");
        w.tx = Some(tx);
        self.sched.set_worker(
            &hello.worker_id,
            WorkerSpec {
                queues: queues.clone(),
                slots: hello.concurrency,
                resources: hello.resources,
                labels: hello.labels.clone(),
            },
        );
        if draining {
            self.sched.set_worker_open(&hello.worker_id, false);
        }
        if let Some(k) = old_lease_timer {
            self.timers.remove(k);
        }
        let k = self.timer(lease_expires, Timer::WorkerLease(hello.worker_id.clone()));
        self.workers
            .get_mut(&hello.worker_id)
            .expect("worker")
            .lease_timer = Some(k);
        for id in lost {
            let err = JobError::new(
                "WORKER_LOST",
                format!(
                    "worker {} reconnected without this attempt",
                    hello.worker_id
                ),
            );
            if let Some(w) = self.workers.get_mut(&hello.worker_id) {
                w.inflight.remove(&id);
            }
            self.lose_attempt(id, err, now, out);
        }
        self.settle(now, out);
        Ok(WorkerSession {
            worker_id: hello.worker_id,
            namespace: hello.namespace,
            session,
        })
    }

    fn lose_attempt(&mut self, id: JobId, err: JobError, now: Timestamp, out: &mut Outbox) {
        let Some(job) = self.active_job(id) else {
            return;
        };
        match job.state {
            JobState::Leased | JobState::Running if job.cancel_requested => {
                let _ = self.apply(id, Trigger::Cancel, now, out, |_| {});
            }
            // Never acknowledged: it did not run, so it costs no retry.
            JobState::Leased => {
                self.requeue(
                    id,
                    Trigger::AckTimeout,
                    Duration::ZERO,
                    false,
                    err,
                    now,
                    out,
                );
            }
            JobState::Running => {
                self.fail_attempt(id, err, true, Trigger::Fail, now, out);
            }
            JobState::Queued
            | JobState::Succeeded
            | JobState::Failed
            | JobState::Cancelled
            | JobState::TimedOut
            | JobState::Expired => {}
        }
    }

    fn session_ok(&self, s: &WorkerSession) -> bool {
        self.workers
            .get(&s.worker_id)
            .is_some_and(|w| w.session == s.session)
    }

    /// Renews a worker's lease.
    pub fn heartbeat(&mut self, s: &WorkerSession) {
        let ttl = self.config.worker_lease_ttl;
        if let Some(w) = self.workers.get_mut(&s.worker_id) {
            if w.session == s.session {
                w.lease_expires = Instant::now() + ttl;
            }
        }
    }

    /// The worker's stream ended. It keeps its attempts until its lease runs out, unless it has
    /// none, in which case it is forgotten at once.
    pub fn disconnect_worker(&mut self, s: &WorkerSession, now: Timestamp, out: &mut Outbox) {
        let Some(w) = self.workers.get_mut(&s.worker_id) else {
            return;
        };
        if w.session != s.session {
            return;
        }
        w.tx = None;
        if w.inflight.is_empty() {
            self.remove_worker(&s.worker_id);
        } else {
            self.sched.set_worker_open(&s.worker_id, false);
        }
        self.settle(now, out);
    }

    fn remove_worker(&mut self, wid: &WorkerId) -> Option<WorkerState> {
        self.clear_all_zombies(wid);
        let w = self.workers.remove(wid)?;
        if let Some(k) = w.lease_timer {
            self.timers.remove(k);
        }
        self.sched.remove_worker(wid);
        Some(w)
    }

    /// Stops new assignments to a worker.
    pub fn drain_worker(
        &mut self,
        namespace: &Name,
        wid: &WorkerId,
        out: &mut Outbox,
    ) -> Option<WorkerInfo> {
        let w = self.workers.get_mut(wid)?;
        if &w.namespace != namespace {
            return None;
        }
        w.draining = true;
        self.sched.set_worker_open(wid, false);
        let w = self.workers.get(wid).expect("worker");
        if let Some(tx) = &w.tx {
            out.effects.push(Effect::ToWorker {
                tx: tx.clone(),
                msg: ToWorker::Drained,
            });
        }
        Some(self.worker_info(wid).expect("worker"))
    }

    /// Handles a batch of reports from one worker session, in order.
    pub fn reports(
        &mut self,
        s: &WorkerSession,
        reports: Vec<Report>,
        now: Timestamp,
        out: &mut Outbox,
    ) {
        let Some(w) = self.workers.get_mut(&s.worker_id) else {
            return;
        };
        if w.session != s.session {
            return;
        }
        w.lease_expires = Instant::now() + self.config.worker_lease_ttl;
        let tx = w.tx.clone();
        for r in reports {
            let verdict = self.report(s, r.job_id, r.attempt, r.kind, now, out);
            if let (Err(reason), Some(tx)) = (verdict, &tx) {
                out.effects.push(Effect::ToWorker {
                    tx: tx.clone(),
                    msg: ToWorker::Rejected {
                        job_id: r.job_id,
                        attempt: r.attempt,
                        reason,
                    },
                });
            }
        }
        self.settle(now, out);
    }

    fn report(
        &mut self,
        s: &WorkerSession,
        id: JobId,
        attempt: u32,
        kind: ReportKind,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Result<(), &'static str> {
        if matches!(kind, ReportKind::Outcome(_)) {
            self.clear_zombie(&s.worker_id, (id, attempt));
        }
        // Usage settles the pool's buckets for any attempt that still holds capacity on this
        // worker, a zombie's too (even of a job that has ended since): the upstream tokens were
        // spent either way. Worker ids are unique across namespaces.
        if let ReportKind::Usage(used) = &kind {
            if self.sched.holds(id, attempt, &s.worker_id) {
                self.sched.report_usage(id, attempt, used, Instant::now());
                return Ok(());
            }
        }
        let Some(job) = self.active_job(id) else {
            return Err("UNKNOWN_JOB");
        };
        // Fencing: only the current attempt, on the worker that holds it, may report.
        if job.attempt != attempt
            || job.worker_id.as_ref() != Some(&s.worker_id)
            || job.namespace != s.namespace
        {
            return Err("STALE_ATTEMPT");
        }
        if !matches!(job.state, JobState::Leased | JobState::Running) {
            return Err("NOT_RUNNING");
        }
        match kind {
            // Handled before the fencing checks.
            ReportKind::Usage(_) => Ok(()),
            ReportKind::Ack => {
                if job.state == JobState::Running {
                    return Ok(());
                }
                let job = self
                    .apply(id, Trigger::Ack, now, out, |j| j.started_at = Some(now))
                    .map_err(|_| "NOT_RUNNING")?;
                if let Some(t) = job.run_timeout {
                    let k = self.timer(Instant::now() + t, Timer::RunTimeout(id, attempt));
                    self.active_mut(id).state_timer = Some(k);
                }
                Ok(())
            }
            ReportKind::Progress { percent, message } => {
                self.touch(id, now, out, |j| {
                    j.progress = percent;
                    Some((
                        EventKind::Progress {
                            percent,
                            message,
                            attempt,
                        },
                        Bytes::new(),
                    ))
                });
                Ok(())
            }
            ReportKind::Output { stream, data } => {
                let max = self.config.max_output_bytes;
                // `output_bytes` passes the bound (max + 1) once the truncation marker is
                // recorded; from then on output is dropped.
                if job.output_bytes > max || data.is_empty() {
                    return Ok(());
                }
                self.touch(id, now, out, |j| {
                    let room = (max - j.output_bytes) as usize;
                    let (data, truncated) = if data.len() > room {
                        (data.slice(..room), true)
                    } else {
                        (data, false)
                    };
                    j.output_bytes = if truncated {
                        max + 1
                    } else {
                        j.output_bytes + data.len() as u64
                    };
                    Some((
                        EventKind::Output {
                            stream,
                            attempt,
                            truncated,
                        },
                        data,
                    ))
                });
                Ok(())
            }
            ReportKind::Outcome(outcome) => {
                let job = self.end_attempt(id, attempt, outcome, now, out)?;
                if let Some(tx) = self.workers.get(&s.worker_id).and_then(|w| w.tx.clone()) {
                    out.effects.push(Effect::ToWorker {
                        tx,
                        msg: ToWorker::Accepted {
                            job_id: id,
                            attempt,
                            state: job.state,
                        },
                    });
                }
                Ok(())
            }
        }
    }

    fn end_attempt(
        &mut self,
        id: JobId,
        attempt: u32,
        outcome: Outcome,
        now: Timestamp,
        out: &mut Outbox,
    ) -> Result<Arc<Job>, &'static str> {
        let job = self.active_job(id).ok_or("UNKNOWN_JOB")?;
        let ended = match outcome {
            Outcome::Success(result) => self
                .apply(id, Trigger::Succeed, now, out, |j| {
                    j.result = Some(result);
                    j.error = None;
                    j.progress = 100.0;
                })
                .ok(),
            Outcome::Failure { message, retryable } => self.fail_attempt(
                id,
                JobError::new("HANDLER_FAILED", message),
                retryable,
                Trigger::Fail,
                now,
                out,
            ),
            Outcome::Cancelled => {
                if job.cancel_requested {
                    self.apply(id, Trigger::Cancel, now, out, |_| {}).ok()
                } else {
                    self.fail_attempt(
                        id,
                        JobError::new(
                            "WORKER_CANCELLED",
                            format!("attempt {attempt} was cancelled by its worker"),
                        ),
                        true,
                        Trigger::Fail,
                        now,
                        out,
                    )
                }
            }
            Outcome::RateLimited { pool, retry_after } => {
                if job.cancel_requested {
                    self.apply(id, Trigger::Cancel, now, out, |_| {}).ok()
                } else {
                    // The pool named by the worker, else the one the attempt took: it cools
                    // down, and the job waits for it (or escalates) like any other waiter. With
                    // no known pool, the job itself backs off for the retry-after.
                    let named = pool
                        .as_deref()
                        .and_then(|p| Name::parse(p).ok())
                        .or_else(|| job.pool.clone());
                    let cooled = named
                        .as_ref()
                        .and_then(|name| self.sched.resolve_pool(&job.namespace, name))
                        .filter(|key| {
                            self.sched.rate_limited(
                                key,
                                Instant::now() + retry_after,
                                Instant::now(),
                            )
                        });
                    // The cooldown is kept in the database: it outlives a restart and binds
                    // the next leader.
                    if let Some(key) = &cooled {
                        let at = Instant::now();
                        if let Some(f) = self.sched.pool_figures(key, at) {
                            if let Some(until) = f.cooldown_until {
                                out.writes.push(Write::PoolCooldown {
                                    key: key.clone(),
                                    cooldown: crate::store::PoolCooldown {
                                        until: now.plus(until.saturating_duration_since(at)),
                                        epoch: f.epoch,
                                    },
                                });
                            }
                        }
                    }
                    let cooled = cooled.is_some();
                    let what = pool.map(|p| format!(" on pool {p}")).unwrap_or_default();
                    self.requeue(
                        id,
                        Trigger::RateLimited,
                        if cooled { Duration::ZERO } else { retry_after },
                        false,
                        JobError::new(
                            "RATE_LIMITED",
                            format!("upstream rate limit{what}; retry after {retry_after:?}"),
                        ),
                        now,
                        out,
                    )
                }
            }
        };
        ended.ok_or("NOT_RUNNING")
    }

    // ---------------------------------------------------------------- timers

    /// Fires one timer.
    pub fn fire(&mut self, timer: Timer, now: Timestamp, out: &mut Outbox) {
        match timer {
            Timer::Ready(id) => {
                let Some(a) = self.jobs.get_mut(&id) else {
                    return;
                };
                a.state_timer = None;
                if a.job.state == JobState::Queued && !self.sched.is_waiting(id) {
                    self.make_ready(id);
                }
            }
            Timer::MaxWait(id) => {
                let Some(job) = self.active_job(id) else {
                    return;
                };
                self.active_mut(id).wait_timer = None;
                if job.state == JobState::Queued && job.attempt == 0 {
                    let why = self.explain(&job, now);
                    let max = job.max_wait.unwrap_or_default();
                    let _ = self.apply(id, Trigger::Expire, now, out, |j| {
                        j.error = Some(JobError::new(
                            "MAX_WAIT_EXPIRED",
                            format!(
                                "not dispatched within its max wait of {}; it was waiting for {why}",
                                humantime::format_duration(max)
                            ),
                        ))
                    });
                }
            }
            Timer::AckTimeout(id, attempt) => {
                let Some(job) = self.active_job(id) else {
                    return;
                };
                if job.state == JobState::Leased && job.attempt == attempt {
                    self.active_mut(id).state_timer = None;
                    self.ask_worker_to_stop(&job, Duration::ZERO, "ACK_TIMEOUT", out);
                    if job.cancel_requested {
                        let _ = self.apply(id, Trigger::Cancel, now, out, |_| {});
                        self.settle(now, out);
                        return;
                    }
                    // Back to the queue at once, without using the retry budget.
                    self.requeue(
                        id,
                        Trigger::AckTimeout,
                        Duration::ZERO,
                        false,
                        JobError::new(
                            "ACK_TIMEOUT",
                            format!("attempt {attempt} was not acknowledged in time"),
                        ),
                        now,
                        out,
                    );
                }
            }
            Timer::RunTimeout(id, attempt) => {
                let Some(job) = self.active_job(id) else {
                    return;
                };
                if job.state == JobState::Running && job.attempt == attempt {
                    self.active_mut(id).state_timer = None;
                    self.ask_worker_to_stop(&job, Duration::ZERO, "RUN_TIMEOUT", out);
                    self.add_zombie(&job);
                    let t = job.run_timeout.unwrap_or_default();
                    self.fail_attempt(
                        id,
                        JobError::new(
                            "RUN_TIMEOUT",
                            format!(
                                "attempt {attempt} ran past its run timeout of {}",
                                humantime::format_duration(t)
                            ),
                        ),
                        true,
                        Trigger::TimeOut,
                        now,
                        out,
                    );
                }
            }
            Timer::CancelGrace(id, attempt) => {
                let Some(job) = self.active_job(id) else {
                    return;
                };
                if job.attempt == attempt
                    && matches!(job.state, JobState::Leased | JobState::Running)
                {
                    self.active_mut(id).cancel_timer = None;
                    if job.state == JobState::Running {
                        self.add_zombie(&job);
                    }
                    let _ = self.apply(id, Trigger::Cancel, now, out, |j| {
                        if let Some(e) = &mut j.error {
                            e.message.push_str(" (forced after the grace period)");
                        }
                    });
                }
            }
            Timer::Maintenance => {
                self.prune_idempotency(now, out);
                self.schedule_maintenance();
            }
            Timer::Schedule => {
                // `settle` (run by the caller after every timer) asks the scheduler.
                self.sched_timer = None;
            }
            Timer::WorkerLease(wid) => {
                let Some(w) = self.workers.get(&wid) else {
                    return;
                };
                let now_i = Instant::now();
                if w.lease_expires > now_i {
                    let at = w.lease_expires;
                    let k = self.timer(at, Timer::WorkerLease(wid.clone()));
                    self.workers.get_mut(&wid).expect("worker").lease_timer = Some(k);
                    return;
                }
                tracing::warn!(worker = %wid, attempts = w.inflight.len(), "worker lease expired; worker lost");
                let w = self.remove_worker(&wid).expect("worker");
                for id in w.inflight {
                    let err =
                        JobError::new("WORKER_LOST", format!("worker {wid} stopped heartbeating"));
                    self.lose_attempt(id, err, now, out);
                }
            }
        }
        self.settle(now, out);
    }

    // ---------------------------------------------------------------- admin

    /// Replaces a queue's settings.
    pub fn configure_queue(
        &mut self,
        key: QueueKey,
        config: QueueConfig,
        now: Timestamp,
        out: &mut Outbox,
    ) -> QueueInfo {
        out.writes.push(Write::PutQueue {
            key: key.clone(),
            config: config.clone(),
        });
        self.sched
            .set_queue(&key, config.max_concurrency, config.paused);
        self.queues.entry(key.clone()).or_default().config = config;
        self.settle(now, out);
        self.queue_info(&key)
    }

    fn queue_info(&self, key: &QueueKey) -> QueueInfo {
        let q = self.queues.get(key);
        QueueInfo {
            key: key.clone(),
            config: q.map(|q| q.config.clone()).unwrap_or_default(),
            depth: q.map_or(0, |q| q.queued.len() as u64),
            running: q.map_or(0, |q| q.active as u64),
            oldest_queued_at: q.and_then(|q| q.queued.first()).map(|(t, _)| *t),
            workers: self
                .workers
                .values()
                .filter(|w| w.tx.is_some() && w.queues.contains(key))
                .count() as u32,
        }
    }

    /// Creates or replaces a pool.
    pub fn configure_pool(
        &mut self,
        key: PoolKey,
        config: PoolConfig,
        now: Timestamp,
        out: &mut Outbox,
    ) -> PoolInfo {
        out.writes.push(Write::PutPool {
            key: key.clone(),
            config: config.clone(),
        });
        self.sched.set_pool(&key, config, Instant::now());
        self.settle(now, out);
        self.pool_info(&key).expect("pool just configured")
    }

    /// A pool with live figures.
    pub fn pool_info(&self, key: &PoolKey) -> Option<PoolInfo> {
        let config = self.sched.pool_config(key)?.clone();
        let now = Instant::now();
        let f = self.sched.pool_figures(key, now)?;
        let wall = Timestamp::now();
        Some(PoolInfo {
            key: key.clone(),
            config,
            in_use: f.in_use,
            tokens: f.tokens,
            running: f.running,
            waiting: f.waiting,
            cooldown_until: f
                .cooldown_until
                .map(|u| wall.plus(u.saturating_duration_since(now))),
            epoch: f.epoch,
        })
    }

    /// Pools of a namespace, by name.
    pub fn list_pools(&self, namespace: &Name) -> Vec<PoolInfo> {
        let mut keys: Vec<&PoolKey> = self
            .sched
            .pool_keys()
            .filter(|k| &k.namespace == namespace)
            .collect();
        keys.sort();
        keys.into_iter().filter_map(|k| self.pool_info(k)).collect()
    }

    /// Deletes a pool nobody uses.
    pub fn delete_pool(&mut self, key: &PoolKey, out: &mut Outbox) -> Result<(), EngineError> {
        match self.sched.remove_pool(key) {
            Ok(()) => {
                out.writes.push(Write::DeletePool { key: key.clone() });
                Ok(())
            }
            Err(DeletePoolError::NotFound) => Err(EngineError::NotFound {
                reason: "POOL_NOT_FOUND",
                what: format!("pool {key}"),
            }),
            Err(DeletePoolError::InUse { running, asked_by }) => {
                Err(EngineError::FailedPrecondition {
                    reason: "POOL_IN_USE",
                    message: format!(
                        "pool {key} is in use: {running} attempts hold its units and \
                         {asked_by} queued jobs ask for it"
                    ),
                })
            }
        }
    }

    /// Queues, pools and connected workers of every namespace, for a metrics scrape.
    pub fn live_figures(&self) -> LiveFigures {
        let mut queues: Vec<&QueueKey> = self.queues.keys().collect();
        queues.sort();
        let mut pools: Vec<&PoolKey> = self.sched.pool_keys().collect();
        pools.sort();
        let mut workers: BTreeMap<Name, u64> = BTreeMap::new();
        for w in self.workers.values() {
            let n = workers.entry(w.namespace.clone()).or_default();
            *n += u64::from(w.tx.is_some());
        }
        LiveFigures {
            now: Timestamp::now(),
            queues: queues.into_iter().map(|k| self.queue_info(k)).collect(),
            pools: pools
                .into_iter()
                .filter_map(|k| self.pool_info(k))
                .collect(),
            workers_connected: workers.into_iter().collect(),
        }
    }

    /// Every queue of a namespace that is configured or has had jobs since start.
    pub fn list_queues(&self, namespace: &Name) -> Vec<QueueInfo> {
        let mut keys: Vec<&QueueKey> = self
            .queues
            .keys()
            .filter(|k| &k.namespace == namespace)
            .collect();
        keys.sort();
        keys.into_iter().map(|k| self.queue_info(k)).collect()
    }

    fn worker_info(&self, wid: &WorkerId) -> Option<WorkerInfo> {
        let w = self.workers.get(wid)?;
        let left = w.lease_expires.saturating_duration_since(Instant::now());
        Some(WorkerInfo {
            id: w.id.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            queues: w.queues.iter().map(|q| q.name.clone()).collect(),
            concurrency: w.concurrency,
            running: w.inflight.len() as u32,
            draining: w.draining,
            connected: w.tx.is_some(),
            labels: w.labels.clone(),
            resources: w.resources,
            resources_in_use: self.sched.worker_figures(wid).resources_in_use,
            lease_expires_at: Timestamp::now().plus(left),
        })
    }

    /// Workers of a namespace.
    pub fn list_workers(&self, namespace: &Name) -> Vec<WorkerInfo> {
        let mut ids: Vec<&WorkerId> = self
            .workers
            .values()
            .filter(|w| &w.namespace == namespace)
            .map(|w| &w.id)
            .collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|w| self.worker_info(w))
            .collect()
    }

    /// Sessions of every connected worker, to end their streams at shutdown.
    pub fn close_all_workers(&mut self) {
        for w in self.workers.values_mut() {
            w.tx = None;
        }
    }

    /// Whether a worker session is current (used by the stream handler).
    pub fn is_current(&self, s: &WorkerSession) -> bool {
        self.session_ok(s)
    }

    /// Asserts that the books agree with the jobs (tests only).
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut active: HashMap<QueueKey, u32> = HashMap::new();
        let mut queued: HashMap<QueueKey, u64> = HashMap::new();
        for (id, a) in &self.jobs {
            let j = &a.job;
            assert_eq!(*id, j.id);
            assert!(!j.state.is_terminal(), "terminal job {id} still active");
            let qk = Self::queue_key(j);
            match j.state {
                JobState::Queued => {
                    *queued.entry(qk.clone()).or_default() += 1;
                    assert!(self.queues[&qk].queued.contains(&(j.created_at, *id)));
                }
                JobState::Leased | JobState::Running => {
                    *active.entry(qk.clone()).or_default() += 1;
                    assert!(!self.sched.is_waiting(*id));
                    let wid = j.worker_id.as_ref().expect("held job names its worker");
                    if let Some(w) = self.workers.get(wid) {
                        assert!(w.inflight.contains(id), "{wid} holds {id}");
                    }
                    assert!(
                        self.sched.holds(*id, j.attempt, wid),
                        "{id} attempt {} holds capacity on {wid}",
                        j.attempt
                    );
                }
                _ => unreachable!(),
            }
        }
        for (qk, q) in &self.queues {
            assert_eq!(
                q.active,
                active.get(qk).copied().unwrap_or(0),
                "active count of {qk}"
            );
            assert_eq!(
                q.queued.len() as u64,
                queued.get(qk).copied().unwrap_or(0),
                "queued count of {qk}"
            );
            let (held, _) = self.sched.queue_figures(qk);
            let zombies: usize = self
                .workers
                .values()
                .map(|w| w.zombies.values().filter(|z| *z == qk).count())
                .sum();
            assert_eq!(
                held as usize,
                q.active as usize + zombies,
                "slots held in {qk}: attempts and zombies"
            );
        }
        for w in self.workers.values() {
            for id in &w.inflight {
                let j = &self.jobs.get(id).expect("inflight job is active").job;
                assert_eq!(j.worker_id.as_ref(), Some(&w.id));
                assert!(matches!(j.state, JobState::Leased | JobState::Running));
            }
            if w.tx.is_some() {
                assert!(
                    (w.inflight.len() + w.zombies.len()) as u32 <= w.concurrency,
                    "credit of {}",
                    w.id
                );
            }
        }
        self.sched.check();
    }
}
