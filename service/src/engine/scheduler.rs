//! The scheduler: which waiting job runs next, on which worker, with which pool's capacity
//! (SPEC §4).
//!
//! A component without I/O and without a clock of its own. The engine feeds it events — a job
//! is ready to run, it left the queue, an attempt ended, a worker came, changed or went, a queue
//! or pool was configured, an upstream rate limit was reported, time passed — and takes its
//! decisions: dispatch this job to that worker on that pool, or expire that job. Time is passed
//! in, so tests drive it deterministically, and the PostgreSQL multi-instance design can hold
//! the same state in the database.
//!
//! # Where a waiting job sits
//!
//! Exactly one place at a time:
//! - in its queue's `ready` set: a candidate for the queue's next free slot, in rank order
//!   (higher priority first, then first in, first out);
//! - parked on the pools it has reached: when it was its queue's turn, none of them could give
//!   it capacity (units in use, bucket empty, cooldown). It leaves when one of them frees
//!   enough for it (it is moved back to the front of its queue), or when it reaches its next
//!   pool or runs out of pools;
//! - in its queue's `unplaced` set: workers had free slots, but none with the resources and
//!   labels it needs. It leaves when a worker of the queue frees resources or connects.
//!
//! # Wake-ups
//!
//! Nothing polls. A released attempt, a refund of tokens, a changed pool or the end of a
//! cooldown scans the pool's waiters in rank order and moves back to their queues exactly those
//! the freed capacity can serve (counting what each will take), so one freed unit wakes one job.
//! A bucket that is short of tokens for its first waiter, or a cooldown, arms a timer for the
//! moment that changes; escalation and expiry are timers too. [`Scheduler::next_wakeup`] is the
//! earliest of them.
//!
//! # Head of the line
//!
//! The first waiter of a pool (by rank) reserves what it needs: a job ranked after it takes
//! capacity from the pool only if both fit. A job needing many units is therefore never starved
//! by a stream of small ones, and the capacity held back is bounded by one job's request.
//!
//! # Fairness
//!
//! Queues and workers belong to one namespace, so one tenant cannot take what another's jobs
//! wait for. A pool belongs to one namespace too, unless it is a shared pool of the `default`
//! namespace: then the jobs of every namespace without a pool of that name of their own use it,
//! and it is shared among them by weight (stride scheduling, see [`Waiters`]). Within a
//! namespace, a pool's waiters are served in rank order whatever their queue. Queues with work
//! take turns, one dispatch each, so queues sharing a worker share its slots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::model::{
    Demand, JobId, Name, PoolConfig, PoolKey, QueueKey, RateLimit, Resources, Unit, WorkerId,
};

/// Position of a waiting job: higher priority first, then first in, first out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Rank {
    neg_priority: i64,
    seq: u64,
    id: JobId,
}

/// A decision for the engine to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start `attempt` of `job` on `worker`. Its queue slot, worker slot, resources and pool
    /// units are held from now until [`Scheduler::release`].
    Dispatch {
        /// The job.
        job: JobId,
        /// The attempt number (fencing token) it was enqueued with.
        attempt: u32,
        /// The worker.
        worker: WorkerId,
        /// The pool its capacity comes from.
        pool: Option<Name>,
    },
    /// The job's pools' max waits ran out: it is no longer waiting.
    Expire {
        /// The job.
        job: JobId,
        /// Every pool it asked for, in order.
        tried: Vec<Name>,
    },
}

/// Why a job cannot take capacity from a pool now.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Blocked {
    /// Cooling down after an upstream rate limit until then.
    Cooldown(Instant),
    /// Not enough free units of a concurrency limit (a release will wake it).
    Units,
    /// A bucket is short; it holds enough at this time.
    Tokens(Instant),
}

/// A job a new job's dispatch must leave room for.
const NO_RESERVATION: &BTreeMap<Unit, u64> = &BTreeMap::new();

#[derive(Debug, Clone, PartialEq)]
enum Spot {
    Ready,
    Parked(Vec<PoolKey>),
    Unplaced,
}

#[derive(Debug)]
struct Waiting {
    rank: Rank,
    queue: QueueKey,
    /// The pools its request names, resolved (its namespace's own, or a shared one).
    pools: Vec<PoolKey>,
    attempt: u32,
    demand: Arc<Demand>,
    /// When it became ready: the start of its pools' escalation schedule.
    since: Instant,
    spot: Spot,
    timer: Option<TimerKey>,
}

impl Waiting {
    /// Pool `i` is reached this long after `since` (`None`: never, an earlier pool waits
    /// without bound).
    fn reached_after(&self, i: usize) -> Option<Duration> {
        self.demand.pools[..i]
            .iter()
            .try_fold(Duration::ZERO, |acc, p| Some(acc + p.max_wait?))
    }

    /// When the last pool's wait runs out (never for a job without pools).
    fn expires_after(&self) -> Option<Duration> {
        if self.demand.pools.is_empty() {
            return None;
        }
        self.reached_after(self.demand.pools.len())
    }

    /// Indices of the pools reached at `now`, in order.
    fn reached(&self, now: Instant) -> Vec<usize> {
        let waited = now.saturating_duration_since(self.since);
        (0..self.demand.pools.len())
            .take_while(|&i| self.reached_after(i).is_some_and(|d| d <= waited))
            .collect()
    }

    /// The first escalation or expiry (`after` = `None`), or the first one later than `after`.
    /// An expiry at the very moment it is enqueued counts: fail fast still expires, after the
    /// one try it gets.
    fn next_point(&self, after: Option<Instant>) -> Option<Instant> {
        (1..=self.demand.pools.len())
            .filter_map(|i| self.reached_after(i))
            .map(|d| self.since + d)
            .find(|at| after.is_none_or(|a| *at > a))
    }

    fn pool_key(&self, i: usize) -> PoolKey {
        self.pools[i].clone()
    }

    /// What it asks of pool `pk` (one it names).
    fn units_for(&self, pk: &PoolKey) -> Option<&BTreeMap<Unit, u64>> {
        let i = self.pools.iter().position(|k| k == pk)?;
        Some(&self.demand.pools[i].units)
    }
}

/// A pool's waiting jobs, in service order: each namespace's own in rank order; between
/// namespaces, weighted fair sharing by stride scheduling. Every namespace has a `pass`, the
/// service it has received so far: what it took of the pool (as a share of the pool, see
/// [`PoolConfig::cost`]) divided by its weight. The namespace with the least pass goes first
/// (ties by name). A namespace that starts waiting again after it had no waiters starts at the
/// pool's virtual time (the pass of the namespace served last), so it banks no credit while
/// away and cannot starve the others when it returns. With one namespace this is rank order.
#[derive(Debug, Default)]
struct Waiters {
    by_ns: BTreeMap<Name, BTreeSet<Rank>>,
    pass: HashMap<Name, f64>,
    vtime: f64,
}

impl Waiters {
    fn pass(&self, ns: &Name) -> f64 {
        self.pass.get(ns).copied().unwrap_or(0.0).max(self.vtime)
    }

    fn insert(&mut self, ns: &Name, rank: Rank) {
        if !self.by_ns.contains_key(ns) {
            let p = self.pass(ns);
            self.pass.insert(ns.clone(), p);
        }
        self.by_ns.entry(ns.clone()).or_default().insert(rank);
    }

    fn remove(&mut self, ns: &Name, rank: &Rank) {
        if let Some(set) = self.by_ns.get_mut(ns) {
            set.remove(rank);
            if set.is_empty() {
                self.by_ns.remove(ns);
            }
        }
    }

    #[cfg(test)]
    fn contains(&self, ns: &Name, rank: &Rank) -> bool {
        self.by_ns.get(ns).is_some_and(|set| set.contains(rank))
    }

    /// Service order of two namespaces' next jobs.
    fn ns_order(&self, a: &Name, b: &Name) -> std::cmp::Ordering {
        self.pass(a).total_cmp(&self.pass(b)).then_with(|| a.cmp(b))
    }

    /// The waiter served first.
    fn head(&self) -> Option<(&Name, Rank)> {
        self.by_ns
            .iter()
            .min_by(|a, b| self.ns_order(a.0, b.0))
            .and_then(|(ns, set)| Some((ns, *set.first()?)))
    }

    /// Whether waiter `a` is served before job `b` (a waiter or not).
    fn before(&self, a: (&Name, Rank), b: (&Name, Rank)) -> bool {
        if a.0 == b.0 {
            a.1 < b.1
        } else {
            self.ns_order(a.0, b.0).is_lt()
        }
    }

    /// A job of `ns` took `share` of the pool (its cost over its namespace's weight).
    fn charge(&mut self, ns: &Name, share: f64) {
        let p = self.pass(ns);
        self.vtime = self.vtime.max(p);
        self.pass.insert(ns.clone(), p + share);
        // Bounded: a namespace with no waiters at or below the virtual time needs no entry.
        if self.pass.len() > 2 * self.by_ns.len() + 64 {
            let (vtime, by_ns) = (self.vtime, &self.by_ns);
            self.pass.retain(|k, p| *p > vtime || by_ns.contains_key(k));
        }
    }

    /// The waiters in service order, charging as the caller says they take capacity.
    fn in_order(&self) -> ServiceOrder<'_> {
        ServiceOrder {
            cursors: self
                .by_ns
                .iter()
                .map(|(ns, set)| {
                    let mut it = set.iter();
                    Cursor {
                        ns,
                        pass: self.pass(ns),
                        next: it.next().copied(),
                        rest: it,
                    }
                })
                .collect(),
            last: None,
        }
    }
}

/// [`Waiters::in_order`]: yields waiters in service order; [`ServiceOrder::charge`] counts
/// what the last one yielded takes, which moves its namespace back in the order.
struct ServiceOrder<'a> {
    cursors: Vec<Cursor<'a>>,
    last: Option<usize>,
}

struct Cursor<'a> {
    ns: &'a Name,
    pass: f64,
    next: Option<Rank>,
    rest: std::collections::btree_set::Iter<'a, Rank>,
}

impl<'a> ServiceOrder<'a> {
    fn next(&mut self) -> Option<(&'a Name, Rank)> {
        let i = self
            .cursors
            .iter()
            .enumerate()
            .filter(|(_, c)| c.next.is_some())
            .min_by(|(_, a), (_, b)| a.pass.total_cmp(&b.pass).then_with(|| a.ns.cmp(b.ns)))
            .map(|(i, _)| i)?;
        self.last = Some(i);
        let c = &mut self.cursors[i];
        let rank = c.next?;
        c.next = c.rest.next().copied();
        Some((c.ns, rank))
    }

    fn charge(&mut self, share: f64) {
        if let Some(i) = self.last {
            self.cursors[i].pass += share;
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    slots: u32,
    paused: bool,
    ready: BTreeSet<Rank>,
    unplaced: BTreeSet<Rank>,
    /// Attempts holding a slot (including attempts the service ended that a worker still runs).
    held: u32,
    workers: Vec<WorkerId>,
    rr: usize,
    /// Jobs waiting in it, wherever they sit.
    waiting: u64,
}

impl Queue {
    fn has_slot(&self) -> bool {
        !self.paused && (self.slots == 0 || self.held < self.slots)
    }
}

#[derive(Debug)]
struct Worker {
    queues: Vec<QueueKey>,
    slots: u32,
    used: u32,
    offer: Resources,
    in_use: Resources,
    labels: BTreeMap<String, String>,
    /// Connected and not draining.
    open: bool,
    /// Removed while attempts still held capacity on it: forgotten when the last is released.
    gone: bool,
}

impl Worker {
    fn has_slot(&self) -> bool {
        self.open && self.used < self.slots
    }

    fn free(&self) -> Resources {
        Resources {
            cpu_millis: self.offer.cpu_millis.saturating_sub(self.in_use.cpu_millis),
            memory_bytes: self
                .offer
                .memory_bytes
                .saturating_sub(self.in_use.memory_bytes),
        }
    }

    fn fits(&self, demand: &Demand) -> bool {
        self.free().fits(&demand.resources) && demand.selects(&self.labels)
    }
}

/// A token bucket's level at a point in time.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

fn rate_per_sec(r: &RateLimit) -> f64 {
    r.amount as f64 / r.per.as_secs_f64().max(1e-6)
}

impl Bucket {
    fn full(r: &RateLimit, now: Instant) -> Self {
        Bucket {
            tokens: r.burst as f64,
            at: now,
        }
    }

    fn level(&self, r: &RateLimit, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + dt * rate_per_sec(r)).min(r.burst as f64)
    }

    fn settle(&mut self, r: &RateLimit, now: Instant) {
        self.tokens = self.level(r, now);
        self.at = now;
    }

    /// When the bucket holds `need` tokens (now if it does).
    fn ready_at(&self, r: &RateLimit, need: f64, now: Instant) -> Instant {
        let short = need - self.level(r, now);
        if short <= 0.0 {
            return now;
        }
        // Rounded up to the microsecond so the bucket holds enough when the timer fires.
        let secs = short / rate_per_sec(r);
        now + Duration::from_micros((secs * 1e6).ceil() as u64 + 1)
    }
}

#[derive(Debug)]
struct Pool {
    config: PoolConfig,
    in_use: BTreeMap<Unit, u64>,
    buckets: Vec<Bucket>,
    cooldown_until: Option<Instant>,
    epoch: u64,
    waiters: Waiters,
    running: u64,
    /// Queued jobs that ask for it (a pool asked for cannot be deleted).
    refs: u64,
    timer: Option<TimerKey>,
}

impl Pool {
    fn new(config: PoolConfig, now: Instant) -> Self {
        let buckets = config.rates.iter().map(|r| Bucket::full(r, now)).collect();
        Pool {
            config,
            in_use: BTreeMap::new(),
            buckets,
            cooldown_until: None,
            epoch: 0,
            waiters: Waiters::default(),
            running: 0,
            refs: 0,
            timer: None,
        }
    }

    /// Whether `units` (plus `also`, what a better-ranked waiter needs) can be taken now.
    fn check(
        &self,
        units: &BTreeMap<Unit, u64>,
        also: &BTreeMap<Unit, u64>,
        now: Instant,
    ) -> Result<(), Blocked> {
        if let Some(until) = self.cooldown_until.filter(|u| *u > now) {
            return Err(Blocked::Cooldown(until));
        }
        let need = |u: &str| units.get(u).copied().unwrap_or(0) + also.get(u).copied().unwrap_or(0);
        for (unit, max) in &self.config.max_units {
            let used = self.in_use.get(unit).copied().unwrap_or(0);
            if used.saturating_add(need(unit)) > *max {
                return Err(Blocked::Units);
            }
        }
        let mut ready = now;
        for (r, b) in self.config.rates.iter().zip(&self.buckets) {
            let n = need(&r.unit);
            if n > 0 {
                ready = ready.max(b.ready_at(r, n as f64, now));
            }
        }
        if ready > now {
            return Err(Blocked::Tokens(ready));
        }
        Ok(())
    }

    fn take(&mut self, units: &BTreeMap<Unit, u64>, now: Instant) {
        for (u, n) in units {
            *self.in_use.entry(u.clone()).or_insert(0) += n;
        }
        for (r, b) in self.config.rates.iter().zip(self.buckets.iter_mut()) {
            if let Some(n) = units.get(&r.unit) {
                b.settle(r, now);
                b.tokens -= *n as f64;
            }
        }
        self.running += 1;
    }

    fn give_back(&mut self, units: &BTreeMap<Unit, u64>) {
        for (u, n) in units {
            if let Some(v) = self.in_use.get_mut(u) {
                *v = v.saturating_sub(*n);
                if *v == 0 && !self.config.max_units.contains_key(u) {
                    self.in_use.remove(u);
                }
            }
        }
        self.running = self.running.saturating_sub(1);
    }

    /// Settles the buckets against what the attempt really used: tokens taken but not used go
    /// back, tokens used beyond what was taken are owed (the level may go below zero). Returns
    /// whether tokens came back.
    fn reconcile(
        &mut self,
        taken: &BTreeMap<Unit, u64>,
        used: &BTreeMap<Unit, u64>,
        now: Instant,
    ) -> bool {
        let mut refunded = false;
        for (r, b) in self.config.rates.iter().zip(self.buckets.iter_mut()) {
            let Some(u) = used.get(&r.unit) else { continue };
            let t = taken.get(&r.unit).copied().unwrap_or(0);
            b.settle(r, now);
            b.tokens = (b.tokens + t as f64 - *u as f64).min(r.burst as f64);
            refunded |= *u < t;
        }
        refunded
    }
}

/// Capacity held by one attempt.
#[derive(Debug, Clone)]
struct Alloc {
    queue: QueueKey,
    worker: WorkerId,
    pool: Option<PoolHold>,
    resources: Resources,
}

/// What an attempt holds of a pool.
#[derive(Debug, Clone)]
struct PoolHold {
    key: PoolKey,
    /// Units held until the attempt ends.
    units: BTreeMap<Unit, u64>,
    /// What the buckets were charged (the units at dispatch, then the reported usage).
    charged: BTreeMap<Unit, u64>,
}

#[derive(Debug, Clone)]
enum Wake {
    /// A waiting job reaches its next pool or runs out of pools.
    Job(JobId),
    /// A pool's bucket refilled or its cooldown ended.
    Pool(PoolKey),
}

type TimerKey = (Instant, u64);

/// Live figures of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolFigures {
    /// Units held by running attempts (every limited unit, and any other unit held).
    pub in_use: BTreeMap<Unit, u64>,
    /// Tokens in each rate limit's bucket, in the order of the config's `rates`.
    pub tokens: Vec<f64>,
    /// Attempts holding units.
    pub running: u64,
    /// Waiting jobs that ask for the pool.
    pub waiting: u64,
    /// End of the current cooldown, if one is running.
    pub cooldown_until: Option<Instant>,
    /// Cooldowns started so far.
    pub epoch: u64,
}

/// How a worker's slots and resources are used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerFigures {
    /// Slots held (attempts, including ones the service ended that the worker still runs).
    pub used_slots: u32,
    /// CPU and memory held.
    pub resources_in_use: Resources,
}

/// A worker as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Queues it serves.
    pub queues: Vec<QueueKey>,
    /// Attempts it runs at once.
    pub slots: u32,
    /// CPU and memory it offers.
    pub resources: Resources,
    /// Its labels, for selectors.
    pub labels: BTreeMap<String, String>,
}

/// Why a pool cannot be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletePoolError {
    /// There is no such pool.
    NotFound,
    /// Attempts hold its units or waiting jobs ask for it.
    InUse {
        /// Attempts holding units.
        running: u64,
        /// Waiting jobs asking for it.
        asked_by: u64,
    },
}

/// The scheduler's state. See the module documentation.
#[derive(Debug, Default)]
pub struct Scheduler {
    queues: HashMap<QueueKey, Queue>,
    pools: HashMap<PoolKey, Pool>,
    workers: HashMap<WorkerId, Worker>,
    waiting: HashMap<JobId, Waiting>,
    allocs: HashMap<(JobId, u32), Alloc>,
    timers: BTreeMap<TimerKey, Wake>,
    timer_seq: u64,
    dirty_queues: BTreeSet<QueueKey>,
    /// The queue dispatched last: queues with work take turns, one job each.
    last_queue: Option<QueueKey>,
    dirty_pools: BTreeSet<PoolKey>,
    /// Jobs a pool woke counting on them to take its capacity: if one is still waiting once
    /// its queue was dispatched, the pool is woken again for the next waiter.
    woken: Vec<(PoolKey, JobId)>,
    /// Whether jobs parked on pools or left unplaced are listed for [`Self::take_parked`].
    pub(crate) record_parks: bool,
    parked: Vec<JobId>,
    seq: u64,
}

impl Scheduler {
    // ------------------------------------------------------------------ configuration

    /// Sets a queue's slot limit (0 = none) and pause flag.
    pub fn set_queue(&mut self, key: &QueueKey, slots: u32, paused: bool) {
        let q = self.queues.entry(key.clone()).or_default();
        q.slots = slots;
        q.paused = paused;
        self.dirty_queues.insert(key.clone());
    }

    /// Whether a pool exists.
    pub fn pool_config(&self, key: &PoolKey) -> Option<&PoolConfig> {
        self.pools.get(key).map(|p| &p.config)
    }

    /// The pool a job of namespace `ns` gets when it names `name`: its namespace's own, else a
    /// shared pool of the `default` namespace.
    pub fn resolve_pool(&self, ns: &Name, name: &Name) -> Option<PoolKey> {
        let own = PoolKey {
            namespace: ns.clone(),
            name: name.clone(),
        };
        if self.pools.contains_key(&own) {
            return Some(own);
        }
        let shared = PoolKey {
            namespace: Name::default_namespace(),
            name: name.clone(),
        };
        self.pools
            .get(&shared)
            .is_some_and(|p| p.config.shared)
            .then_some(shared)
    }

    /// [`Self::resolve_pool`], or the namespace's own key if there is no such pool.
    fn resolve_or_own(&self, ns: &Name, name: &Name) -> PoolKey {
        self.resolve_pool(ns, name).unwrap_or_else(|| PoolKey {
            namespace: ns.clone(),
            name: name.clone(),
        })
    }

    /// Creates a pool or changes its limits (units in use, cooldown and bucket levels carry
    /// over; a bucket of a new rate limit starts full).
    pub fn set_pool(&mut self, key: &PoolKey, config: PoolConfig, now: Instant) {
        match self.pools.get_mut(key) {
            None => {
                self.pools.insert(key.clone(), Pool::new(config, now));
            }
            Some(p) => {
                let mut old: Vec<(RateLimit, Bucket)> = p
                    .config
                    .rates
                    .iter()
                    .cloned()
                    .zip(p.buckets.iter().copied())
                    .collect();
                let buckets = config
                    .rates
                    .iter()
                    .map(|r| match old.iter().position(|(o, _)| o.unit == r.unit) {
                        Some(i) => {
                            let (o, mut b) = old.remove(i);
                            b.settle(&o, now);
                            b.tokens = b.tokens.min(r.burst as f64);
                            b
                        }
                        None => Bucket::full(r, now),
                    })
                    .collect();
                p.config = config;
                p.buckets = buckets;
            }
        }
        self.dirty_pools.insert(key.clone());
    }

    /// Deletes a pool nothing uses or asks for.
    pub fn remove_pool(&mut self, key: &PoolKey) -> Result<(), DeletePoolError> {
        let p = self.pools.get(key).ok_or(DeletePoolError::NotFound)?;
        if p.running > 0 || p.refs > 0 {
            return Err(DeletePoolError::InUse {
                running: p.running,
                asked_by: p.refs,
            });
        }
        let p = self.pools.remove(key).expect("pool");
        if let Some(t) = p.timer {
            self.timers.remove(&t);
        }
        self.dirty_pools.remove(key);
        Ok(())
    }

    /// An upstream rate limit on a pool: nothing is dispatched on it until `until`. A report
    /// during a cooldown only extends it; one after it ended starts a new epoch. Returns false
    /// for an unknown pool.
    pub fn rate_limited(&mut self, key: &PoolKey, until: Instant, now: Instant) -> bool {
        let Some(p) = self.pools.get_mut(key) else {
            return false;
        };
        match p.cooldown_until {
            Some(u) if u > now => p.cooldown_until = Some(u.max(until)),
            _ => {
                p.epoch += 1;
                p.cooldown_until = Some(until);
            }
        }
        self.dirty_pools.insert(key.clone());
        true
    }

    /// After a restart or a change of leader: the pool's recorded cooldown (`until`, `epoch`)
    /// applies again, and its buckets start empty — what the previous run spent just before it
    /// ended is unknown, and an empty bucket can never let more through than the rate allows.
    pub fn restore_pool(&mut self, key: &PoolKey, cooldown: Option<(Instant, u64)>, now: Instant) {
        let Some(p) = self.pools.get_mut(key) else {
            return;
        };
        for b in &mut p.buckets {
            b.tokens = 0.0;
            b.at = now;
        }
        if let Some((until, epoch)) = cooldown {
            p.epoch = epoch;
            p.cooldown_until = (until > now).then_some(until);
        }
        self.dirty_pools.insert(key.clone());
    }

    /// A pool's live figures.
    pub fn pool_figures(&self, key: &PoolKey, now: Instant) -> Option<PoolFigures> {
        let p = self.pools.get(key)?;
        let mut in_use = p.in_use.clone();
        for u in p.config.max_units.keys() {
            in_use.entry(u.clone()).or_insert(0);
        }
        Some(PoolFigures {
            in_use,
            tokens: p
                .config
                .rates
                .iter()
                .zip(&p.buckets)
                .map(|(r, b)| b.level(r, now))
                .collect(),
            running: p.running,
            waiting: p.refs,
            cooldown_until: p.cooldown_until.filter(|u| *u > now),
            epoch: p.epoch,
        })
    }

    /// Every pool, for listing.
    pub fn pool_keys(&self) -> impl Iterator<Item = &PoolKey> {
        self.pools.keys()
    }

    // ------------------------------------------------------------------ workers

    /// A worker connected, or its settings changed (a reconnect). Its held capacity stays.
    pub fn set_worker(&mut self, id: &WorkerId, spec: WorkerSpec) {
        let old_queues = match self.workers.get_mut(id) {
            Some(w) => {
                let old = std::mem::replace(&mut w.queues, spec.queues.clone());
                w.slots = spec.slots;
                w.offer = spec.resources;
                w.labels = spec.labels;
                w.open = true;
                w.gone = false;
                old
            }
            None => {
                self.workers.insert(
                    id.clone(),
                    Worker {
                        queues: spec.queues.clone(),
                        slots: spec.slots,
                        used: 0,
                        offer: spec.resources,
                        in_use: Resources::default(),
                        labels: spec.labels,
                        open: true,
                        gone: false,
                    },
                );
                Vec::new()
            }
        };
        for q in old_queues {
            if let Some(q) = self.queues.get_mut(&q) {
                q.workers.retain(|w| w != id);
            }
        }
        for qk in &spec.queues {
            let q = self.queues.entry(qk.clone()).or_default();
            if !q.workers.contains(id) {
                q.workers.push(id.clone());
            }
        }
        self.worker_freed(id);
    }

    /// Whether the worker takes new attempts (connected and not draining).
    pub fn set_worker_open(&mut self, id: &WorkerId, open: bool) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.open = open;
        if open {
            self.worker_freed(id);
        }
    }

    /// A worker is gone for good. Capacity its attempts still hold stays held until each is
    /// released.
    pub fn remove_worker(&mut self, id: &WorkerId) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        let queues = std::mem::take(&mut w.queues);
        w.open = false;
        w.gone = true;
        if w.used == 0 {
            self.workers.remove(id);
        }
        for qk in queues {
            if let Some(q) = self.queues.get_mut(&qk) {
                q.workers.retain(|x| x != id);
            }
        }
    }

    /// Whether some connected worker of the queue could run the job if it were idle (its
    /// resources and labels suffice), whatever it runs now.
    pub fn could_place(&self, queue: &QueueKey, demand: &Demand) -> bool {
        self.queues.get(queue).is_some_and(|q| {
            q.workers.iter().any(|wid| {
                self.workers.get(wid).is_some_and(|w| {
                    !w.gone && w.offer.fits(&demand.resources) && demand.selects(&w.labels)
                })
            })
        })
    }

    /// How a worker's slots and resources are used.
    pub fn worker_figures(&self, id: &WorkerId) -> WorkerFigures {
        self.workers
            .get(id)
            .map(|w| WorkerFigures {
                used_slots: w.used,
                resources_in_use: w.in_use,
            })
            .unwrap_or_default()
    }

    /// A worker has room again: its queues may dispatch, and every unplaced job that fits its
    /// free resources and labels goes back to its queue (whether each then starts is for the
    /// queue's dispatch to find: one may park on a pool instead, leaving the room to the next).
    fn worker_freed(&mut self, id: &WorkerId) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        if !w.has_slot() {
            return;
        }
        let free = w.free();
        let labels = w.labels.clone();
        for qk in w.queues.clone() {
            self.dirty_queues.insert(qk.clone());
            let Some(q) = self.queues.get(&qk) else {
                continue;
            };
            let moved: Vec<JobId> = q
                .unplaced
                .iter()
                .filter(|rank| {
                    self.waiting.get(&rank.id).is_some_and(|j| {
                        free.fits(&j.demand.resources) && j.demand.selects(&labels)
                    })
                })
                .map(|rank| rank.id)
                .collect();
            for id in moved {
                self.unpark(id);
            }
        }
    }

    // ------------------------------------------------------------------ jobs

    /// A job is ready to run (`QUEUED`, its scheduled time reached). `attempt` is the fencing
    /// token its next attempt will carry.
    pub fn enqueue(
        &mut self,
        id: JobId,
        queue: &QueueKey,
        priority: i32,
        attempt: u32,
        demand: Arc<Demand>,
        now: Instant,
    ) {
        self.dequeue(id);
        self.seq += 1;
        let rank = Rank {
            neg_priority: -(priority as i64),
            seq: self.seq,
            id,
        };
        let keys: Vec<PoolKey> = demand
            .pools
            .iter()
            .map(|p| self.resolve_or_own(&queue.namespace, &p.pool))
            .collect();
        for key in &keys {
            if let Some(pool) = self.pools.get_mut(key) {
                pool.refs += 1;
            }
        }
        let mut w = Waiting {
            rank,
            queue: queue.clone(),
            pools: keys,
            attempt,
            demand,
            since: now,
            spot: Spot::Ready,
            timer: None,
        };
        if let Some(at) = w.next_point(None) {
            w.timer = Some(Self::add_timer(
                &mut self.timers,
                &mut self.timer_seq,
                at,
                Wake::Job(id),
            ));
        }
        self.waiting.insert(id, w);
        let q = self.queues.entry(queue.clone()).or_default();
        q.ready.insert(rank);
        q.waiting += 1;
        self.dirty_queues.insert(queue.clone());
    }

    /// The job is no longer waiting (cancelled, expired by its own max wait…). No-op if it was
    /// not waiting.
    pub fn dequeue(&mut self, id: JobId) {
        let Some(w) = self.waiting.remove(&id) else {
            return;
        };
        if let Some(t) = w.timer {
            self.timers.remove(&t);
        }
        let q = self.queues.entry(w.queue.clone()).or_default();
        q.waiting = q.waiting.saturating_sub(1);
        match &w.spot {
            Spot::Ready => {
                q.ready.remove(&w.rank);
            }
            Spot::Unplaced => {
                q.unplaced.remove(&w.rank);
            }
            Spot::Parked(pools) => {
                for pk in pools {
                    if let Some(p) = self.pools.get_mut(pk) {
                        let was_head = p.waiters.head().map(|h| h.1) == Some(w.rank);
                        p.waiters.remove(&w.queue.namespace, &w.rank);
                        if was_head {
                            // The reservation it held is gone.
                            self.dirty_pools.insert(pk.clone());
                        }
                    }
                }
            }
        }
        for i in 0..w.demand.pools.len() {
            if let Some(p) = self.pools.get_mut(&w.pool_key(i)) {
                p.refs = p.refs.saturating_sub(1);
            }
        }
    }

    /// The jobs parked on pools or left unplaced since the last call (if `record_parks`).
    pub(crate) fn take_parked(&mut self) -> Vec<JobId> {
        std::mem::take(&mut self.parked)
    }

    /// Whether the job is waiting here.
    pub fn is_waiting(&self, id: JobId) -> bool {
        self.waiting.contains_key(&id)
    }

    /// The capacity an attempt held is free again: its queue slot, worker slot, resources and
    /// pool units. `usage`, if the worker reported it, settles the pool's buckets first.
    pub fn release(&mut self, id: JobId, attempt: u32) {
        let Some(a) = self.allocs.remove(&(id, attempt)) else {
            return;
        };
        if let Some(q) = self.queues.get_mut(&a.queue) {
            q.held = q.held.saturating_sub(1);
        }
        self.dirty_queues.insert(a.queue.clone());
        if let Some(w) = self.workers.get_mut(&a.worker) {
            w.used = w.used.saturating_sub(1);
            w.in_use.cpu_millis = w.in_use.cpu_millis.saturating_sub(a.resources.cpu_millis);
            w.in_use.memory_bytes = w
                .in_use
                .memory_bytes
                .saturating_sub(a.resources.memory_bytes);
            if w.gone && w.used == 0 {
                self.workers.remove(&a.worker);
            }
        }
        if let Some(hold) = &a.pool {
            if let Some(p) = self.pools.get_mut(&hold.key) {
                p.give_back(&hold.units);
                self.dirty_pools.insert(hold.key.clone());
            }
        }
        self.worker_freed(&a.worker);
    }

    /// Whether an attempt holds capacity (on this worker).
    pub fn holds(&self, id: JobId, attempt: u32, worker: &WorkerId) -> bool {
        self.allocs
            .get(&(id, attempt))
            .is_some_and(|a| &a.worker == worker)
    }

    /// Re-creates what a leased or running attempt held, at recovery. The worker need not be
    /// connected; it is registered closed until it does.
    pub fn restore(
        &mut self,
        id: JobId,
        attempt: u32,
        queue: &QueueKey,
        worker: &WorkerId,
        pool: Option<&Name>,
        demand: &Demand,
    ) {
        let w = self
            .workers
            .entry(worker.clone())
            .or_insert_with(|| Worker {
                queues: Vec::new(),
                slots: 0,
                used: 0,
                offer: Resources::default(),
                in_use: Resources::default(),
                labels: BTreeMap::new(),
                open: false,
                gone: false,
            });
        w.used += 1;
        w.in_use.cpu_millis += demand.resources.cpu_millis;
        w.in_use.memory_bytes += demand.resources.memory_bytes;
        self.queues.entry(queue.clone()).or_default().held += 1;
        let pool = pool.and_then(|name| {
            let req = demand.pools.iter().find(|p| &p.pool == name)?;
            let key = self.resolve_pool(&queue.namespace, name)?;
            // Tokens were taken at the original dispatch; only the units are held again.
            let p = self.pools.get_mut(&key)?;
            for (u, n) in &req.units {
                *p.in_use.entry(u.clone()).or_insert(0) += n;
            }
            p.running += 1;
            Some(PoolHold {
                key,
                units: req.units.clone(),
                charged: req.units.clone(),
            })
        });
        self.allocs.insert(
            (id, attempt),
            Alloc {
                queue: queue.clone(),
                worker: worker.clone(),
                pool,
                resources: demand.resources,
            },
        );
    }

    /// What the attempt really used of its pool's units: the pool's buckets are settled
    /// against what they were charged (a later report settles the difference again).
    pub fn report_usage(
        &mut self,
        id: JobId,
        attempt: u32,
        used: &BTreeMap<Unit, u64>,
        now: Instant,
    ) {
        let Some(Alloc {
            pool: Some(hold), ..
        }) = self.allocs.get_mut(&(id, attempt))
        else {
            return;
        };
        let Some(p) = self.pools.get_mut(&hold.key) else {
            return;
        };
        if p.reconcile(&hold.charged, used, now) {
            self.dirty_pools.insert(hold.key.clone());
        }
        for (u, n) in used {
            if let Some(c) = hold.charged.get_mut(u) {
                *c = *n;
            }
        }
    }

    // ------------------------------------------------------------------ time

    /// The earliest moment something changes by itself (an escalation, an expiry, a refill, the
    /// end of a cooldown).
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.timers.keys().next().map(|k| k.0)
    }

    fn add_timer(
        timers: &mut BTreeMap<TimerKey, Wake>,
        seq: &mut u64,
        at: Instant,
        wake: Wake,
    ) -> TimerKey {
        *seq += 1;
        let key = (at, *seq);
        timers.insert(key, wake);
        key
    }

    // ------------------------------------------------------------------ deciding

    /// Everything that can happen now: pools with freed capacity, queues with room, then due
    /// timers (so a job enqueued at its own deadline, fail fast, still gets its one try).
    pub fn decide(&mut self, now: Instant) -> Vec<Decision> {
        let mut out = Vec::new();
        self.run_dirty(now, &mut out);
        while let Some((&key, _)) = self.timers.first_key_value() {
            if key.0 > now {
                break;
            }
            let wake = self.timers.remove(&key).expect("timer");
            match wake {
                Wake::Job(id) => self.job_timer(id, now, &mut out),
                Wake::Pool(pk) => {
                    if let Some(p) = self.pools.get_mut(&pk) {
                        if p.timer == Some(key) {
                            p.timer = None;
                        }
                    }
                    self.dirty_pools.insert(pk);
                }
            }
        }
        self.run_dirty(now, &mut out);
        out
    }

    /// The dirty queue after the one dispatched last (round robin), taken out of the set.
    fn next_dirty_queue(&mut self) -> Option<QueueKey> {
        use std::ops::Bound::{Excluded, Unbounded};
        let next = self
            .last_queue
            .as_ref()
            .and_then(|last| self.dirty_queues.range((Excluded(last), Unbounded)).next())
            .or_else(|| self.dirty_queues.first())
            .cloned()?;
        self.dirty_queues.remove(&next);
        self.last_queue = Some(next.clone());
        Some(next)
    }

    fn run_dirty(&mut self, now: Instant, out: &mut Vec<Decision>) {
        loop {
            if let Some(pk) = self.dirty_pools.pop_first() {
                self.wake_pool(&pk, now);
                continue;
            }
            if let Some(qk) = self.next_dirty_queue() {
                self.dispatch_queue(&qk, now, out);
                continue;
            }
            // A woken job that did not start after all did not take what the pool counted for
            // it: its queue's workers went to better jobs, or a better-ranked job that was not
            // a waiter took the capacity and it parked again (maybe behind a waiter the charge
            // moved ahead of it). The pool is looked at again for the next waiter. This ends:
            // of the jobs woken, the first in service order starts unless something else
            // started in its place.
            for (pk, id) in std::mem::take(&mut self.woken) {
                if self.waiting.contains_key(&id) {
                    self.dirty_pools.insert(pk);
                }
            }
            if self.dirty_pools.is_empty() {
                break;
            }
        }
    }

    fn job_timer(&mut self, id: JobId, now: Instant, out: &mut Vec<Decision>) {
        let Some(w) = self.waiting.get_mut(&id) else {
            return;
        };
        w.timer = None;
        if w.expires_after().is_some_and(|d| w.since + d <= now) {
            let tried = w.demand.pools.iter().map(|p| p.pool.clone()).collect();
            self.dequeue(id);
            out.push(Decision::Expire { job: id, tried });
            return;
        }
        if let Some(at) = w.next_point(Some(now)) {
            w.timer = Some(Self::add_timer(
                &mut self.timers,
                &mut self.timer_seq,
                at,
                Wake::Job(id),
            ));
        }
        // A new pool is reached: if it waits on pools, it is looked at again.
        if matches!(w.spot, Spot::Parked(_)) {
            self.unpark(id);
        }
    }

    /// Moves a waiting job back to its queue's ready set (from a pool or from unplaced).
    fn unpark(&mut self, id: JobId) {
        self.unpark_from(id, None);
    }

    /// [`Self::unpark`], woken by `waker`: that pool already counted what the job takes, so it
    /// is not woken again for the reservation the job leaves (that would wake every waiter).
    fn unpark_from(&mut self, id: JobId, waker: Option<&PoolKey>) {
        let Some(w) = self.waiting.get_mut(&id) else {
            return;
        };
        let spot = std::mem::replace(&mut w.spot, Spot::Ready);
        let rank = w.rank;
        let qk = w.queue.clone();
        let q = self.queues.entry(qk.clone()).or_default();
        match spot {
            Spot::Ready => return,
            Spot::Unplaced => {
                q.unplaced.remove(&rank);
            }
            Spot::Parked(pools) => {
                for pk in pools {
                    if let Some(p) = self.pools.get_mut(&pk) {
                        if p.waiters.head().map(|h| h.1) == Some(rank) && waker != Some(&pk) {
                            // The reservation it held is gone: the next waiter may fit.
                            self.dirty_pools.insert(pk.clone());
                        }
                        p.waiters.remove(&qk.namespace, &rank);
                    }
                }
            }
        }
        self.queues
            .entry(qk.clone())
            .or_default()
            .ready
            .insert(rank);
        self.dirty_queues.insert(qk);
    }

    /// Capacity of a pool may have freed: wake the waiters it can serve, in service order,
    /// counting what each will take; stop at the first it cannot (it keeps its reservation).
    fn wake_pool(&mut self, pk: &PoolKey, now: Instant) {
        let Some(p) = self.pools.get(pk) else { return };
        let mut tentative: BTreeMap<Unit, u64> = BTreeMap::new();
        let mut wake = Vec::new();
        let mut counted = Vec::new();
        let mut blocked = None;
        let mut order = p.waiters.in_order();
        while let Some((ns, rank)) = order.next() {
            let Some(w) = self.waiting.get(&rank.id) else {
                continue;
            };
            let Some(units) = w.units_for(pk) else {
                continue;
            };
            match p.check(units, &tentative, now) {
                Ok(()) => {
                    wake.push(rank.id);
                    // A job whose queue cannot start it now takes nothing yet: the next waiter
                    // may use the capacity meanwhile.
                    let startable = self.queues.get(&w.queue).is_some_and(|q| {
                        q.has_slot()
                            && q.workers.iter().any(|wid| {
                                self.workers
                                    .get(wid)
                                    .is_some_and(|wk| wk.has_slot() && wk.fits(&w.demand))
                            })
                    });
                    if startable {
                        for (u, n) in units {
                            *tentative.entry(u.clone()).or_insert(0) += n;
                        }
                        order.charge(p.config.cost(units) / f64::from(p.config.weight(ns)));
                        counted.push(rank.id);
                    }
                }
                Err(b) => {
                    blocked = Some(b);
                    break;
                }
            }
        }
        for id in wake {
            self.unpark_from(id, Some(pk));
        }
        self.woken
            .extend(counted.into_iter().map(|id| (pk.clone(), id)));
        self.arm_pool(pk, blocked, now);
    }

    /// Sets the pool's timer for when its first waiter could be served (a refill or the end of
    /// a cooldown); a units shortage waits for a release instead.
    fn arm_pool(&mut self, pk: &PoolKey, blocked: Option<Blocked>, _now: Instant) {
        let Some(p) = self.pools.get_mut(pk) else {
            return;
        };
        let at = match blocked {
            Some(Blocked::Cooldown(t)) | Some(Blocked::Tokens(t)) => Some(t),
            Some(Blocked::Units) | None => None,
        };
        if p.timer.map(|k| k.0) == at {
            return;
        }
        if let Some(k) = p.timer.take() {
            self.timers.remove(&k);
        }
        if let Some(at) = at {
            p.timer = Some(Self::add_timer(
                &mut self.timers,
                &mut self.timer_seq,
                at,
                Wake::Pool(pk.clone()),
            ));
        }
    }

    /// Picks a worker of the queue for a job: `Ok(worker)`, `Err(true)` if workers have free
    /// slots but none fits it, `Err(false)` if no worker has a free slot.
    fn pick_worker(&mut self, qk: &QueueKey, demand: &Demand) -> Result<WorkerId, bool> {
        let Some(q) = self.queues.get(qk) else {
            return Err(false);
        };
        let n = q.workers.len();
        let mut any_slot = false;
        let sized = !demand.resources.is_zero();
        let mut best: Option<(usize, (u64, u64))> = None;
        for i in 0..n {
            let idx = (q.rr + i) % n;
            let Some(w) = self.workers.get(&q.workers[idx]) else {
                continue;
            };
            if !w.has_slot() {
                continue;
            }
            any_slot = true;
            if !w.fits(demand) {
                continue;
            }
            if !sized {
                best = Some((idx, (0, 0)));
                break;
            }
            // Best fit: the worker left with the least room, so large jobs find large holes.
            let free = w.free();
            let left = (
                free.cpu_millis - demand.resources.cpu_millis,
                free.memory_bytes - demand.resources.memory_bytes,
            );
            if best.is_none_or(|(_, b)| left < b) {
                best = Some((idx, left));
            }
        }
        match best {
            Some((idx, _)) => {
                let q = self.queues.get_mut(qk).expect("queue");
                q.rr = (idx + 1) % n;
                Ok(q.workers[idx].clone())
            }
            None => Err(any_slot),
        }
    }

    fn dispatch_queue(&mut self, qk: &QueueKey, now: Instant, out: &mut Vec<Decision>) {
        loop {
            let Some(q) = self.queues.get(qk) else { return };
            if !q.has_slot() {
                return;
            }
            let Some(&rank) = q.ready.first() else { return };
            let w = self.waiting.get(&rank.id).expect("a ready job is waiting");
            let demand = w.demand.clone();
            let attempt = w.attempt;
            // Capacity: the first reached pool that can give it, after better-ranked waiters.
            let mut pool = None;
            if !demand.pools.is_empty() {
                let reached = w.reached(now);
                let mut parked_on = Vec::new();
                let mut blocks = Vec::new();
                for i in reached {
                    let pk = w.pool_key(i);
                    let Some(p) = self.pools.get(&pk) else {
                        continue;
                    };
                    let units = &demand.pools[i].units;
                    let also = match p.waiters.head() {
                        Some(head) if p.waiters.before(head, (&qk.namespace, rank)) => self
                            .waiting
                            .get(&head.1.id)
                            .and_then(|h| h.units_for(&pk))
                            .unwrap_or(NO_RESERVATION),
                        _ => NO_RESERVATION,
                    };
                    match p.check(units, also, now) {
                        Ok(()) => {
                            pool = Some((pk, units.clone()));
                            break;
                        }
                        Err(b) => {
                            parked_on.push(pk);
                            blocks.push(b);
                        }
                    }
                }
                if pool.is_none() {
                    let expired = w.expires_after().is_some_and(|d| w.since + d <= now);
                    if expired {
                        let tried = demand.pools.iter().map(|p| p.pool.clone()).collect();
                        self.dequeue(rank.id);
                        out.push(Decision::Expire {
                            job: rank.id,
                            tried,
                        });
                        continue;
                    }
                    // Park it on every pool it has reached.
                    let q = self.queues.get_mut(qk).expect("queue");
                    q.ready.remove(&rank);
                    for pk in &parked_on {
                        if let Some(p) = self.pools.get_mut(pk) {
                            p.waiters.insert(&qk.namespace, rank);
                        }
                    }
                    for (pk, b) in parked_on.iter().zip(blocks) {
                        let head = self
                            .pools
                            .get(pk)
                            .and_then(|p| p.waiters.head().map(|h| h.1));
                        if head == Some(rank) {
                            self.arm_pool(pk, Some(b), now);
                        }
                    }
                    self.waiting.get_mut(&rank.id).expect("waiting").spot = Spot::Parked(parked_on);
                    if self.record_parks {
                        self.parked.push(rank.id);
                    }
                    continue;
                }
            }
            let worker = match self.pick_worker(qk, &demand) {
                Ok(w) => w,
                Err(false) => return,
                Err(true) => {
                    let q = self.queues.get_mut(qk).expect("queue");
                    q.ready.remove(&rank);
                    q.unplaced.insert(rank);
                    self.waiting.get_mut(&rank.id).expect("waiting").spot = Spot::Unplaced;
                    if self.record_parks {
                        self.parked.push(rank.id);
                    }
                    continue;
                }
            };
            // Take everything.
            let w = self.waiting.remove(&rank.id).expect("waiting");
            if let Some(t) = w.timer {
                self.timers.remove(&t);
            }
            for i in 0..w.demand.pools.len() {
                if let Some(p) = self.pools.get_mut(&w.pool_key(i)) {
                    p.refs = p.refs.saturating_sub(1);
                }
            }
            let q = self.queues.get_mut(qk).expect("queue");
            q.ready.remove(&rank);
            q.waiting = q.waiting.saturating_sub(1);
            q.held += 1;
            let wk = self.workers.get_mut(&worker).expect("worker");
            wk.used += 1;
            wk.in_use.cpu_millis += demand.resources.cpu_millis;
            wk.in_use.memory_bytes += demand.resources.memory_bytes;
            if let Some((pk, units)) = &pool {
                let p = self.pools.get_mut(pk).expect("pool");
                p.take(units, now);
                let share = p.config.cost(units) / f64::from(p.config.weight(&qk.namespace));
                let head = p.waiters.head().map(|h| h.1);
                p.waiters.charge(&qk.namespace, share);
                if p.waiters.head().map(|h| h.1) != head {
                    // Another namespace's waiter is first now: its reservation and its timer
                    // are the pool's, and it may fit at once.
                    self.dirty_pools.insert(pk.clone());
                }
            }
            let pool_name = pool.as_ref().map(|(pk, _)| pk.name.clone());
            self.allocs.insert(
                (rank.id, attempt),
                Alloc {
                    queue: qk.clone(),
                    worker: worker.clone(),
                    pool: pool.map(|(key, units)| PoolHold {
                        key,
                        charged: units.clone(),
                        units,
                    }),
                    resources: demand.resources,
                },
            );
            out.push(Decision::Dispatch {
                job: rank.id,
                attempt,
                worker,
                pool: pool_name,
            });
            // One job per turn: other queues with work (sharing its workers or pools) go
            // next, then this one again.
            self.dirty_queues.insert(qk.clone());
            return;
        }
    }

    // ------------------------------------------------------------------ explaining

    /// Why a waiting job is not running, or `None` if it is not waiting here.
    pub fn explain(&self, id: JobId, now: Instant) -> Option<String> {
        let w = self.waiting.get(&id)?;
        let q = self.queues.get(&w.queue)?;
        let name = &w.queue.name;
        Some(match &w.spot {
            Spot::Parked(pools) => {
                let names: Vec<String> = pools
                    .iter()
                    .map(|pk| {
                        let cooling = self
                            .pools
                            .get(pk)
                            .and_then(|p| p.cooldown_until)
                            .filter(|u| *u > now);
                        match cooling {
                            Some(u) => format!(
                                "{} cooling down {}ms",
                                pk.name,
                                u.saturating_duration_since(now).as_millis()
                            ),
                            None => pk.name.to_string(),
                        }
                    })
                    .collect();
                if names.len() == 1 {
                    format!("capacity(pool={})", names[0])
                } else {
                    format!("capacity(pools={})", names.join(","))
                }
            }
            Spot::Unplaced => {
                let mut parts = Vec::new();
                let r = &w.demand.resources;
                if r.cpu_millis > 0 {
                    parts.push(format!("cpu={}", r.cpu_millis as f64 / 1000.0));
                }
                if r.memory_bytes > 0 {
                    parts.push(format!("memory={}", r.memory_bytes));
                }
                for (k, v) in &w.demand.selector {
                    parts.push(format!("{k}={v}"));
                }
                format!("placement(queue={name}, {})", parts.join(", "))
            }
            Spot::Ready => {
                if q.paused {
                    format!("queue_paused(queue={name})")
                } else if !q.has_slot() {
                    format!("queue_slot(queue={name}, limit={})", q.slots)
                } else {
                    let open = q
                        .workers
                        .iter()
                        .filter(|w| self.workers.get(*w).is_some_and(|w| w.open))
                        .count();
                    if open == 0 {
                        format!("worker(queue={name})")
                    } else {
                        format!("worker_slot(queue={name}, workers={open})")
                    }
                }
            }
        })
    }

    /// Attempts holding a slot of the queue, and its open workers.
    #[cfg(test)]
    pub fn queue_figures(&self, key: &QueueKey) -> (u32, u32) {
        self.queues.get(key).map_or((0, 0), |q| {
            let open = q
                .workers
                .iter()
                .filter(|w| self.workers.get(*w).is_some_and(|w| w.open))
                .count() as u32;
            (q.held, open)
        })
    }

    /// Checks the books (tests): every count matches what is held and waiting.
    #[cfg(test)]
    pub fn check(&self) {
        let mut held: HashMap<&QueueKey, u32> = HashMap::new();
        let mut used: HashMap<&WorkerId, u32> = HashMap::new();
        let mut units: HashMap<&PoolKey, BTreeMap<Unit, u64>> = HashMap::new();
        for a in self.allocs.values() {
            *held.entry(&a.queue).or_default() += 1;
            *used.entry(&a.worker).or_default() += 1;
            if let Some(hold) = &a.pool {
                let e = units.entry(&hold.key).or_default();
                for (k, n) in &hold.units {
                    *e.entry(k.clone()).or_default() += n;
                }
            }
        }
        for (k, q) in &self.queues {
            assert_eq!(
                q.held,
                held.get(k).copied().unwrap_or(0),
                "held slots of {k}"
            );
            if q.slots > 0 {
                assert!(q.held <= q.slots, "slots of {k}");
            }
        }
        for (k, w) in &self.workers {
            assert_eq!(
                w.used,
                used.get(k).copied().unwrap_or(0),
                "used slots of {k}"
            );
        }
        for (k, p) in &self.pools {
            let u = units.remove(k).unwrap_or_default();
            for (unit, max) in &p.config.max_units {
                let n = u.get(unit).copied().unwrap_or(0);
                assert_eq!(p.in_use.get(unit).copied().unwrap_or(0), n, "{unit} of {k}");
                assert!(n <= *max, "{unit} of {k}: {n} > {max}");
            }
        }
        for (id, w) in &self.waiting {
            let q = &self.queues[&w.queue];
            match &w.spot {
                Spot::Ready => assert!(q.ready.contains(&w.rank), "{id} ready"),
                Spot::Unplaced => assert!(q.unplaced.contains(&w.rank), "{id} unplaced"),
                Spot::Parked(ps) => {
                    for pk in ps {
                        assert!(
                            self.pools[pk].waiters.contains(&w.queue.namespace, &w.rank),
                            "{id} parked"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::PoolRequest;

    const MS: Duration = Duration::from_millis(1);

    fn ns() -> Name {
        Name::default_namespace()
    }

    fn qk(name: &str) -> QueueKey {
        QueueKey {
            namespace: ns(),
            name: Name::parse(name).unwrap(),
        }
    }

    fn pk(name: &str) -> PoolKey {
        PoolKey {
            namespace: ns(),
            name: Name::parse(name).unwrap(),
        }
    }

    fn units(list: &[(&str, u64)]) -> BTreeMap<Unit, u64> {
        list.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    fn max_units(n: u64) -> PoolConfig {
        PoolConfig {
            max_units: units(&[("requests", n)]),
            ..Default::default()
        }
    }

    fn req(pool: &str, u: &[(&str, u64)], max_wait: Option<Duration>) -> PoolRequest {
        PoolRequest {
            pool: Name::parse(pool).unwrap(),
            units: units(u),
            max_wait,
        }
    }

    fn pools(list: Vec<PoolRequest>) -> Arc<Demand> {
        Arc::new(Demand {
            pools: list,
            ..Default::default()
        })
    }

    fn wid(s: &str) -> WorkerId {
        WorkerId(s.into())
    }

    struct T {
        s: Scheduler,
        t0: Instant,
    }

    impl T {
        fn new() -> Self {
            T {
                s: Scheduler::default(),
                t0: Instant::now(),
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + MS * ms as u32
        }

        fn worker(&mut self, id: &str, queues: &[&str], slots: u32, res: Resources) {
            self.s.set_worker(
                &wid(id),
                WorkerSpec {
                    queues: queues.iter().map(|q| qk(q)).collect(),
                    slots,
                    resources: res,
                    labels: BTreeMap::new(),
                },
            );
        }

        fn job(&mut self, queue: &str, priority: i32, demand: Arc<Demand>, at: u64) -> JobId {
            let id = JobId::new();
            self.s
                .enqueue(id, &qk(queue), priority, 1, demand, self.at(at));
            id
        }

        /// A job of queue `queue` in namespace `ns`.
        fn ns_job(&mut self, ns: &str, queue: &str, demand: Arc<Demand>, at: u64) -> JobId {
            let id = JobId::new();
            let key = QueueKey {
                namespace: Name::parse(ns).unwrap(),
                name: Name::parse(queue).unwrap(),
            };
            self.s.enqueue(id, &key, 0, 1, demand, self.at(at));
            id
        }

        fn ns_worker(&mut self, id: &str, ns: &str, queue: &str, slots: u32) {
            let key = QueueKey {
                namespace: Name::parse(ns).unwrap(),
                name: Name::parse(queue).unwrap(),
            };
            self.s.set_worker(
                &wid(id),
                WorkerSpec {
                    queues: vec![key],
                    slots,
                    resources: Resources::default(),
                    labels: BTreeMap::new(),
                },
            );
        }

        fn decide(&mut self, at: u64) -> Vec<Decision> {
            let d = self.s.decide(self.at(at));
            self.s.check();
            d
        }
    }

    fn dispatched(d: &[Decision]) -> Vec<JobId> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Dispatch { job, .. } => Some(*job),
                _ => None,
            })
            .collect()
    }

    fn expired(d: &[Decision]) -> Vec<JobId> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Expire { job, .. } => Some(*job),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn priority_then_fifo_within_queue_slots() {
        let mut t = T::new();
        t.s.set_queue(&qk("q"), 2, false);
        t.worker("w", &["q"], 10, Resources::default());
        let a = t.job("q", 0, Default::default(), 0);
        let b = t.job("q", 5, Default::default(), 0);
        let c = t.job("q", 0, Default::default(), 0);
        assert_eq!(dispatched(&t.decide(0)), vec![b, a]);
        assert_eq!(
            t.s.explain(c, t.at(0)).unwrap(),
            "queue_slot(queue=q, limit=2)"
        );
        t.s.release(b, 1);
        assert_eq!(dispatched(&t.decide(1)), vec![c]);
    }

    #[test]
    fn one_freed_unit_wakes_exactly_one_job() {
        let mut t = T::new();
        t.s.set_pool(&pk("p"), max_units(1), t.at(0));
        t.worker("w", &["q"], 100, Resources::default());
        let first = t.job("q", 0, pools(vec![req("p", &[("requests", 1)], None)]), 0);
        let rest: Vec<JobId> = (0..10)
            .map(|_| t.job("q", 0, pools(vec![req("p", &[("requests", 1)], None)]), 0))
            .collect();
        assert_eq!(dispatched(&t.decide(0)), vec![first]);
        assert_eq!(t.s.explain(rest[0], t.at(0)).unwrap(), "capacity(pool=p)");
        assert_eq!(t.s.pool_figures(&pk("p"), t.at(0)).unwrap().waiting, 10);
        t.s.release(first, 1);
        assert_eq!(
            dispatched(&t.decide(1)),
            vec![rest[0]],
            "exactly the first waiter"
        );
        t.s.release(rest[0], 1);
        assert_eq!(dispatched(&t.decide(2)), vec![rest[1]]);
    }

    /// Rounds of: every running attempt ends, then what can start starts. Returns the
    /// namespaces of the jobs that started, in order.
    fn run_rounds(t: &mut T, jobs: &HashMap<JobId, &'static str>, rounds: usize) -> String {
        let mut order = String::new();
        for round in 0..rounds {
            let running: Vec<(JobId, u32)> = t.s.allocs.keys().copied().collect();
            for (id, attempt) in running {
                t.s.release(id, attempt);
            }
            for id in dispatched(&t.decide(100 + round as u64)) {
                order.push_str(jobs[&id]);
            }
        }
        order
    }

    fn shared_pool(max: u64, weights: &[(&str, u32)]) -> PoolConfig {
        PoolConfig {
            shared: true,
            weights: weights
                .iter()
                .map(|(n, w)| (Name::parse(n).unwrap(), *w))
                .collect(),
            ..max_units(max)
        }
    }

    #[test]
    fn a_shared_pool_alternates_between_namespaces_whoever_came_first() {
        let mut t = T::new();
        t.s.set_pool(&pk("llm"), shared_pool(1, &[]), t.at(0));
        t.ns_worker("wa", "a", "q", 100);
        t.ns_worker("wb", "b", "q", 100);
        let d = || pools(vec![req("llm", &[("requests", 1)], None)]);
        let mut jobs = HashMap::new();
        // Namespace a floods the pool first; b arrives later with fewer jobs.
        for _ in 0..10 {
            jobs.insert(t.ns_job("a", "q", d(), 0), "a");
        }
        for _ in 0..3 {
            jobs.insert(t.ns_job("b", "q", d(), 0), "b");
        }
        assert_eq!(run_rounds(&mut t, &jobs, 13), "abababaaaaaaa");
    }

    #[test]
    fn a_shared_pool_gives_capacity_by_weight() {
        let mut t = T::new();
        t.s.set_pool(&pk("llm"), shared_pool(2, &[("a", 3)]), t.at(0));
        t.ns_worker("wa", "a", "q", 100);
        t.ns_worker("wb", "b", "q", 100);
        let d = || pools(vec![req("llm", &[("requests", 1)], None)]);
        let mut jobs = HashMap::new();
        for _ in 0..100 {
            jobs.insert(t.ns_job("b", "q", d(), 0), "b");
            jobs.insert(t.ns_job("a", "q", d(), 0), "a");
        }
        let order = run_rounds(&mut t, &jobs, 40);
        assert_eq!(order.len(), 80, "two at a time: {order}");
        let a = order.matches('a').count();
        assert!(
            (58..=62).contains(&a),
            "a weighs 3 to b's 1: {a} of 80 in {order}"
        );
    }

    #[test]
    fn a_namespace_banks_no_credit_while_it_does_not_wait() {
        let mut t = T::new();
        t.s.set_pool(&pk("llm"), shared_pool(1, &[]), t.at(0));
        t.ns_worker("wa", "a", "q", 100);
        t.ns_worker("wb", "b", "q", 100);
        let d = || pools(vec![req("llm", &[("requests", 1)], None)]);
        let mut jobs = HashMap::new();
        for _ in 0..30 {
            jobs.insert(t.ns_job("a", "q", d(), 0), "a");
        }
        assert_eq!(run_rounds(&mut t, &jobs, 20), "a".repeat(20));
        // b had the pool to itself for nothing: it now shares it, not takes 20 turns.
        for _ in 0..10 {
            let id = t.ns_job("b", "q", d(), 30);
            jobs.insert(id, "b");
        }
        let order = run_rounds(&mut t, &jobs, 8);
        assert!(order.matches('a').count() >= 3, "{order}");
    }

    #[test]
    fn shares_follow_the_size_of_what_jobs_take() {
        let mut t = T::new();
        t.s.set_pool(&pk("llm"), shared_pool(4, &[]), t.at(0));
        t.ns_worker("wa", "a", "q", 100);
        t.ns_worker("wb", "b", "q", 100);
        let mut jobs = HashMap::new();
        for _ in 0..200 {
            // a's jobs take the whole pool, b's a quarter of it.
            let big = pools(vec![req("llm", &[("requests", 4)], None)]);
            jobs.insert(t.ns_job("a", "q", big, 0), "a");
            let small = pools(vec![req("llm", &[("requests", 1)], None)]);
            jobs.insert(t.ns_job("b", "q", small, 0), "b");
        }
        let order = run_rounds(&mut t, &jobs, 40);
        // Equal shares of the pool: one big job per four small ones.
        let (a, b) = (order.matches('a').count(), order.matches('b').count());
        assert!(b >= 3 * a && b <= 5 * a + 4, "a {a} b {b}: {order}");
    }

    #[test]
    fn queues_sharing_a_worker_take_turns() {
        let mut t = T::new();
        t.worker("w", &["qa", "qb"], 1, Resources::default());
        let mut jobs = HashMap::new();
        for _ in 0..10 {
            jobs.insert(t.job("qa", 0, Default::default(), 0), "a");
        }
        for _ in 0..3 {
            jobs.insert(t.job("qb", 0, Default::default(), 0), "b");
        }
        assert_eq!(run_rounds(&mut t, &jobs, 13), "abababaaaaaaa");
    }

    #[test]
    fn a_namespace_own_pool_comes_before_a_shared_one() {
        let mut t = T::new();
        t.s.set_pool(&pk("llm"), shared_pool(1, &[]), t.at(0));
        let own = PoolKey {
            namespace: Name::parse("a").unwrap(),
            name: Name::parse("llm").unwrap(),
        };
        t.s.set_pool(&own, max_units(5), t.at(0));
        let a = Name::parse("a").unwrap();
        let b = Name::parse("b").unwrap();
        let llm = Name::parse("llm").unwrap();
        assert_eq!(t.s.resolve_pool(&a, &llm), Some(own.clone()));
        assert_eq!(t.s.resolve_pool(&b, &llm), Some(pk("llm")));
        // Not shared: only its own namespace sees it.
        t.s.set_pool(&pk("private"), max_units(1), t.at(0));
        assert_eq!(t.s.resolve_pool(&b, &Name::parse("private").unwrap()), None);
        t.ns_worker("wa", "a", "q", 100);
        let d = || pools(vec![req("llm", &[("requests", 1)], None)]);
        let ids: Vec<JobId> = (0..5).map(|_| t.ns_job("a", "q", d(), 0)).collect();
        assert_eq!(dispatched(&t.decide(0)).len(), ids.len());
        assert_eq!(t.s.pool_figures(&own, t.at(0)).unwrap().running, 5);
        assert_eq!(t.s.pool_figures(&pk("llm"), t.at(0)).unwrap().running, 0);
    }

    #[test]
    fn fail_fast_expires_at_once_and_names_the_pools() {
        let mut t = T::new();
        t.s.set_pool(&pk("p"), max_units(1), t.at(0));
        t.worker("w", &["q"], 10, Resources::default());
        let holder = t.job("q", 0, pools(vec![req("p", &[("requests", 1)], None)]), 0);
        assert_eq!(dispatched(&t.decide(0)), vec![holder]);
        let ff = t.job(
            "q",
            0,
            pools(vec![req("p", &[("requests", 1)], Some(Duration::ZERO))]),
            0,
        );
        let d = t.decide(0);
        assert_eq!(expired(&d), vec![ff]);
        assert!(matches!(&d[0], Decision::Expire { tried, .. } if tried[0].as_str() == "p"));
        assert!(!t.s.is_waiting(ff));
    }

    #[test]
    fn a_job_that_fits_runs_at_once_even_with_fail_fast() {
        let mut t = T::new();
        t.s.set_pool(&pk("p"), max_units(3), t.at(0));
        t.worker("w", &["q"], 10, Resources::default());
        let a = t.job("q", 0, pools(vec![req("p", &[("requests", 2)], None)]), 0);
        let b = t.job(
            "q",
            0,
            pools(vec![req("p", &[("requests", 1)], Some(Duration::ZERO))]),
            0,
        );
        assert_eq!(dispatched(&t.decide(0)), vec![a, b]);
    }

    #[test]
    fn escalation_after_the_first_pools_wait() {
        let mut t = T::new();
        t.s.set_pool(&pk("big"), max_units(1), t.at(0));
        t.s.set_pool(&pk("small"), max_units(1), t.at(0));
        t.worker("w", &["q"], 10, Resources::default());
        let holder = t.job("q", 0, pools(vec![req("big", &[("requests", 1)], None)]), 0);
        assert_eq!(dispatched(&t.decide(0)), vec![holder]);
        let j = t.job(
            "q",
            0,
            pools(vec![
                req("big", &[("requests", 1)], Some(MS * 100)),
                req("small", &[("requests", 1)], Some(MS * 100)),
            ]),
            0,
        );
        assert!(dispatched(&t.decide(0)).is_empty());
        assert_eq!(t.s.next_wakeup(), Some(t.at(100)));
        assert!(t.decide(99).is_empty());
        let d = t.decide(100);
        assert_eq!(
            d,
            vec![Decision::Dispatch {
                job: j,
                attempt: 1,
                worker: wid("w"),
                pool: Some(Name::parse("small").unwrap()),
            }]
        );
    }

    #[test]
    fn after_escalation_the_first_pool_to_free_wins_and_the_last_wait_expires() {
        let mut t = T::new();
        t.s.set_pool(&pk("a"), max_units(1), t.at(0));
        t.s.set_pool(&pk("b"), max_units(1), t.at(0));
        t.worker("w", &["q"], 10, Resources::default());
        let ha = t.job("q", 0, pools(vec![req("a", &[("requests", 1)], None)]), 0);
        let hb = t.job("q", 0, pools(vec![req("b", &[("requests", 1)], None)]), 0);
        assert_eq!(dispatched(&t.decide(0)).len(), 2);
        let two = || {
            pools(vec![
                req("a", &[("requests", 1)], Some(MS * 10)),
                req("b", &[("requests", 1)], Some(MS * 50)),
            ])
        };
        let j = t.job("q", 0, two(), 0);
        let k = t.job("q", 0, two(), 0);
        assert!(t.decide(10).is_empty());
        assert_eq!(t.s.explain(j, t.at(10)).unwrap(), "capacity(pools=a,b)");
        // b frees first: the best waiter takes it.
        t.s.release(hb, 1);
        assert_eq!(
            t.decide(20),
            vec![Decision::Dispatch {
                job: j,
                attempt: 1,
                worker: wid("w"),
                pool: Some(Name::parse("b").unwrap()),
            }]
        );
        // k runs out of pools at 10 + 50 ms.
        assert_eq!(t.s.next_wakeup(), Some(t.at(60)));
        assert_eq!(expired(&t.decide(60)), vec![k]);
        let _ = ha;
    }

    #[test]
    fn rate_limit_tokens_refill_on_a_timer() {
        let mut t = T::new();
        t.s.set_pool(
            &pk("llm"),
            PoolConfig {
                max_units: BTreeMap::new(),
                rates: vec![RateLimit {
                    unit: "tokens".into(),
                    amount: 1000,
                    per: Duration::from_secs(1),
                    burst: 1000,
                }],
                ..Default::default()
            },
            t.at(0),
        );
        t.worker("w", &["q"], 10, Resources::default());
        let d = || pools(vec![req("llm", &[("tokens", 600)], None)]);
        let a = t.job("q", 0, d(), 0);
        let b = t.job("q", 0, d(), 0);
        assert_eq!(dispatched(&t.decide(0)), vec![a]);
        // 400 left: 200 more take 200 ms.
        let wake = t.s.next_wakeup().unwrap();
        assert!(wake > t.at(199) && wake <= t.at(201), "{:?}", wake - t.t0);
        assert!(t.decide(150).is_empty());
        let at = wake.duration_since(t.t0).as_millis() as u64 + 1;
        assert_eq!(dispatched(&t.decide(at)), vec![b]);
    }

    #[test]
    fn usage_refunds_tokens_and_wakes_a_waiter() {
        let mut t = T::new();
        t.s.set_pool(
            &pk("llm"),
            PoolConfig {
                max_units: BTreeMap::new(),
                rates: vec![RateLimit {
                    unit: "tokens".into(),
                    amount: 1,
                    per: Duration::from_secs(3600),
                    burst: 1000,
                }],
                ..Default::default()
            },
            t.at(0),
        );
        t.worker("w", &["q"], 10, Resources::default());
        let d = || pools(vec![req("llm", &[("tokens", 800)], None)]);
        let a = t.job("q", 0, d(), 0);
        let b = t.job("q", 0, d(), 0);
        assert_eq!(dispatched(&t.decide(0)), vec![a]);
        assert!(t.decide(1).is_empty());
        // It used 100 of the 800 it was charged: 700 come back (900 in the bucket).
        t.s.report_usage(a, 1, &units(&[("tokens", 100)]), t.at(2));
        assert_eq!(dispatched(&t.decide(2)), vec![b]);
        // A second report of the same usage changes nothing.
        t.s.report_usage(a, 1, &units(&[("tokens", 100)]), t.at(3));
        let tokens = t.s.pool_figures(&pk("llm"), t.at(3)).unwrap().tokens[0];
        assert!((tokens - 100.0).abs() < 1.0, "{tokens}");
    }

    #[test]
    fn cooldown_holds_dispatch_until_it_ends_and_epochs_count() {
        let mut t = T::new();
        t.s.set_pool(&pk("p"), max_units(10), t.at(0));
        t.worker("w", &["q"], 10, Resources::default());
        assert!(t.s.rate_limited(&pk("p"), t.at(500), t.at(0)));
        assert!(t.s.rate_limited(&pk("p"), t.at(800), t.at(10)), "extends");
        assert!(
            t.s.rate_limited(&pk("p"), t.at(300), t.at(20)),
            "never shortens"
        );
        let f = t.s.pool_figures(&pk("p"), t.at(20)).unwrap();
        assert_eq!((f.epoch, f.cooldown_until), (1, Some(t.at(800))));
        let j = t.job("q", 0, pools(vec![req("p", &[("requests", 1)], None)]), 20);
        assert!(t.decide(20).is_empty());
        assert!(t.s.explain(j, t.at(20)).unwrap().contains("cooling down"));
        assert_eq!(t.s.next_wakeup(), Some(t.at(800)));
        assert_eq!(dispatched(&t.decide(800)), vec![j]);
        assert!(t.s.rate_limited(&pk("p"), t.at(900), t.at(850)));
        assert_eq!(t.s.pool_figures(&pk("p"), t.at(850)).unwrap().epoch, 2);
    }

    #[test]
    fn the_head_of_the_line_is_not_starved_by_small_jobs() {
        let mut t = T::new();
        t.s.set_pool(&pk("p"), max_units(4), t.at(0));
        t.worker("w", &["q"], 100, Resources::default());
        let small = |t: &mut T| t.job("q", 0, pools(vec![req("p", &[("requests", 1)], None)]), 0);
        let s1 = small(&mut t);
        let s2 = small(&mut t);
        let s3 = small(&mut t);
        assert_eq!(dispatched(&t.decide(0)).len(), 3);
        let big = t.job("q", 0, pools(vec![req("p", &[("requests", 3)], None)]), 0);
        let s4 = small(&mut t);
        // 1 unit free: the big job waits for 3, and the small one behind it may not take the
        // last unit.
        assert!(t.decide(1).is_empty());
        t.s.release(s1, 1);
        assert!(t.decide(2).is_empty(), "2 free, the big job needs 3");
        t.s.release(s2, 1);
        assert_eq!(dispatched(&t.decide(3)), vec![big]);
        t.s.release(s3, 1);
        assert_eq!(dispatched(&t.decide(4)), vec![s4]);
    }

    #[test]
    fn placement_best_fit_and_unplaced_jobs_wait_for_room() {
        let mut t = T::new();
        let cores = |c: u64| Resources {
            cpu_millis: c * 1000,
            memory_bytes: 1 << 30,
        };
        t.worker("big", &["q"], 10, cores(8));
        t.worker("small", &["q"], 10, cores(2));
        let need = |c: u64| {
            Arc::new(Demand {
                resources: Resources {
                    cpu_millis: c * 1000,
                    memory_bytes: 0,
                },
                ..Default::default()
            })
        };
        let a = t.job("q", 0, need(2), 0);
        let b = t.job("q", 0, need(8), 0);
        let d = t.decide(0);
        // The 2-core job goes to the 2-core worker, leaving the 8-core one for the 8-core job.
        assert_eq!(
            d,
            vec![
                Decision::Dispatch {
                    job: a,
                    attempt: 1,
                    worker: wid("small"),
                    pool: None
                },
                Decision::Dispatch {
                    job: b,
                    attempt: 1,
                    worker: wid("big"),
                    pool: None
                },
            ]
        );
        let c = t.job("q", 0, need(4), 0);
        assert!(t.decide(1).is_empty());
        assert_eq!(
            t.s.explain(c, t.at(1)).unwrap(),
            "placement(queue=q, cpu=4)"
        );
        t.s.release(b, 1);
        assert_eq!(dispatched(&t.decide(2)), vec![c]);
        assert_eq!(
            t.s.worker_figures(&wid("big")).resources_in_use.cpu_millis,
            4000
        );
    }

    #[test]
    fn selector_matches_worker_labels() {
        let mut t = T::new();
        t.worker("cpu", &["q"], 10, Resources::default());
        t.s.set_worker(
            &wid("gpu"),
            WorkerSpec {
                queues: vec![qk("q")],
                slots: 10,
                resources: Resources::default(),
                labels: [("gpu".to_string(), "a100".to_string())].into(),
            },
        );
        let j = t.job(
            "q",
            0,
            Arc::new(Demand {
                selector: [("gpu".to_string(), "a100".to_string())].into(),
                ..Default::default()
            }),
            0,
        );
        let d = t.decide(0);
        assert!(
            matches!(&d[..], [Decision::Dispatch { job, worker, .. }] if *job == j && worker == &wid("gpu"))
        );
    }

    #[test]
    fn a_slot_limited_queue_does_not_idle_a_pool_other_queues_can_use() {
        let mut t = T::new();
        t.s.set_pool(&pk("p"), max_units(1), t.at(0));
        t.s.set_queue(&qk("slow"), 1, false);
        t.worker("w", &["slow", "other"], 10, Resources::default());
        let d = || pools(vec![req("p", &[("requests", 1)], None)]);
        let holder = t.job("other", 0, d(), 0);
        assert_eq!(dispatched(&t.decide(0)), vec![holder]);
        // `slow` has its slot taken by a job outside the pool.
        let plain = t.job("slow", 0, Default::default(), 0);
        assert_eq!(dispatched(&t.decide(0)), vec![plain]);
        let blocked = t.job("slow", 5, d(), 0);
        let other = t.job("other", 0, d(), 0);
        assert!(t.decide(1).is_empty());
        t.s.release(holder, 1);
        // The better-ranked waiter cannot start (no slot in `slow`): the unit goes to `other`.
        assert_eq!(dispatched(&t.decide(2)), vec![other]);
        t.s.release(plain, 1);
        assert!(t.decide(3).is_empty(), "the unit is taken");
        t.s.release(other, 1);
        assert_eq!(dispatched(&t.decide(4)), vec![blocked]);
    }

    // ---------------------------------------------------------------- property test

    #[derive(Debug, Clone)]
    enum Op {
        Enqueue {
            queue: usize,
            priority: i32,
            kind: usize,
            size: u64,
        },
        Release(usize),
        Dequeue(usize),
        RateLimited {
            pool: usize,
            for_ms: u64,
        },
        Usage {
            alloc: usize,
            tokens: u64,
        },
        Open {
            worker: usize,
            open: bool,
        },
        Advance(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..2usize, 0..3i32, 0..6usize, 1..3u64).prop_map(|(queue, priority, kind, size)| {
                Op::Enqueue { queue, priority, kind, size }
            }),
            3 => (0..64usize).prop_map(Op::Release),
            1 => (0..64usize).prop_map(Op::Dequeue),
            1 => (0..2usize, 0..300u64).prop_map(|(pool, for_ms)| Op::RateLimited { pool, for_ms }),
            1 => (0..64usize, 0..400u64).prop_map(|(alloc, tokens)| Op::Usage { alloc, tokens }),
            1 => (0..2usize, any::<bool>()).prop_map(|(worker, open)| Op::Open { worker, open }),
            3 => (0..120u64).prop_map(Op::Advance),
        ]
    }

    fn demand(kind: usize, size: u64) -> Arc<Demand> {
        let a = |n: u64, w: Option<Duration>| req("a", &[("requests", n), ("tokens", 50 * n)], w);
        let b = |w: Option<Duration>| req("b", &[("requests", 1)], w);
        match kind {
            0 => Default::default(),
            1 => pools(vec![a(size, None)]),
            2 => pools(vec![a(size, Some(MS * 30)), b(Some(MS * 60))]),
            3 => pools(vec![b(Some(Duration::ZERO))]),
            4 => Arc::new(Demand {
                resources: Resources {
                    cpu_millis: 1000 * size,
                    memory_bytes: 0,
                },
                ..Default::default()
            }),
            _ => Arc::new(Demand {
                pools: vec![b(None)],
                selector: [("gpu".to_string(), "yes".to_string())].into(),
                ..Default::default()
            }),
        }
    }

    /// The oracle: a waiting job that could be dispatched right now, by the rules the
    /// scheduler must follow.
    fn dispatchable(s: &Scheduler, now: Instant) -> Option<JobId> {
        for (id, w) in &s.waiting {
            let q = &s.queues[&w.queue];
            if !q.has_slot() {
                continue;
            }
            let worker_fits = q.workers.iter().any(|wid| {
                s.workers
                    .get(wid)
                    .is_some_and(|wk| wk.has_slot() && wk.fits(&w.demand))
            });
            if !worker_fits {
                continue;
            }
            // A better-ranked job of the same queue that could run would go first.
            if q.ready.first().is_some_and(|r| *r < w.rank) && w.spot == Spot::Ready {
                continue;
            }
            if w.demand.pools.is_empty() {
                return Some(*id);
            }
            for i in w.reached(now) {
                let pk = w.pool_key(i);
                let p = &s.pools[&pk];
                let also = match p.waiters.head() {
                    Some(h) if p.waiters.before(h, (&w.queue.namespace, w.rank)) => {
                        s.waiting[&h.1.id].units_for(&pk).unwrap_or(NO_RESERVATION)
                    }
                    _ => NO_RESERVATION,
                };
                // A refill timer rounds up to the next microsecond: a bucket that reaches the
                // level exactly now is served by that timer.
                let refill_due = p
                    .timer
                    .is_some_and(|k| k.0 <= now + Duration::from_micros(2));
                if p.check(&w.demand.pools[i].units, also, now).is_ok() && !refill_due {
                    return Some(*id);
                }
            }
        }
        None
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Random events never exceed a queue's slots, a worker's slots or resources, or a
        /// pool's units; never dispatch on a cooling pool; and never leave a job waiting that
        /// could run.
        #[test]
        fn limits_hold_and_nothing_dispatchable_waits(ops in proptest::collection::vec(op(), 1..120)) {
            replay(ops)?;
        }
    }

    /// Cases the property test found (kept as plain tests so they run whatever the seed file).
    #[test]
    fn found_cases_hold() {
        use Op::*;
        let e = |queue, priority, kind, size| Enqueue {
            queue,
            priority,
            kind,
            size,
        };
        // A dispatch charged its namespace, which made another namespace's waiter the head of
        // the pool: that waiter fits at once and must be woken.
        replay(vec![
            e(0, 0, 1, 1),
            Usage {
                alloc: 0,
                tokens: 0,
            },
            e(1, 0, 1, 2),
            Usage {
                alloc: 20,
                tokens: 183,
            },
            e(1, 0, 0, 1),
            Release(9),
            Release(2),
            e(1, 0, 1, 1),
            Advance(2),
            Advance(18),
            e(0, 0, 1, 2),
            e(1, 0, 0, 1),
            e(1, 0, 0, 1),
            e(0, 0, 0, 1),
            e(0, 0, 5, 1),
            e(1, 0, 1, 1),
            e(0, 1, 1, 1),
            Advance(20),
            Advance(52),
            Advance(91),
        ])
        .unwrap();
        replay(vec![
            e(1, 0, 1, 2),
            Open {
                worker: 0,
                open: false,
            },
            e(0, 0, 1, 1),
            Open {
                worker: 1,
                open: false,
            },
            e(1, 0, 1, 1),
            e(0, 0, 1, 2),
            RateLimited {
                pool: 0,
                for_ms: 116,
            },
            Open {
                worker: 0,
                open: true,
            },
            Advance(55),
            e(0, 1, 2, 1),
            Release(0),
            Advance(61),
        ])
        .unwrap();
    }

    /// Plays `ops` against a scheduler with two namespaces sharing pools `a` and `b`, checking
    /// the invariants after each step.
    fn replay(ops: Vec<Op>) -> Result<(), proptest::test_runner::TestCaseError> {
        let mut t = T::new();
        // q1 is another namespace's queue: both share pools a and b.
        let pq = |i: usize| {
            if i == 0 {
                qk("q0")
            } else {
                QueueKey {
                    namespace: Name::parse("other").unwrap(),
                    name: Name::parse("q1").unwrap(),
                }
            }
        };
        t.s.set_queue(&pq(0), 3, false);
        t.s.set_queue(&pq(1), 0, false);
        t.s.set_pool(
            &pk("a"),
            PoolConfig {
                max_units: units(&[("requests", 3)]),
                rates: vec![RateLimit {
                    unit: "tokens".into(),
                    amount: 100,
                    per: MS * 100,
                    burst: 200,
                }],
                shared: true,
                weights: [(Name::parse("other").unwrap(), 2)].into(),
            },
            t.at(0),
        );
        t.s.set_pool(
            &pk("b"),
            PoolConfig {
                shared: true,
                ..max_units(2)
            },
            t.at(0),
        );
        t.s.set_worker(
            &wid("w0"),
            WorkerSpec {
                queues: vec![pq(0), pq(1)],
                slots: 4,
                resources: Resources {
                    cpu_millis: 4000,
                    memory_bytes: 0,
                },
                labels: BTreeMap::new(),
            },
        );
        t.s.set_worker(
            &wid("w1"),
            WorkerSpec {
                queues: vec![pq(1)],
                slots: 2,
                resources: Resources {
                    cpu_millis: 2000,
                    memory_bytes: 0,
                },
                labels: [("gpu".to_string(), "yes".to_string())].into(),
            },
        );
        let mut now = 0u64;
        let mut held: Vec<(JobId, u32)> = Vec::new();
        let mut waiting: Vec<JobId> = Vec::new();
        for op in ops {
            match op {
                Op::Enqueue {
                    queue,
                    priority,
                    kind,
                    size,
                } => {
                    let id = JobId::new();
                    t.s.enqueue(id, &pq(queue), priority, 1, demand(kind, size), t.at(now));
                    waiting.push(id);
                }
                Op::Release(i) if !held.is_empty() => {
                    let (id, a) = held.remove(i % held.len());
                    t.s.release(id, a);
                }
                Op::Dequeue(i) if !waiting.is_empty() => {
                    let id = waiting.remove(i % waiting.len());
                    t.s.dequeue(id);
                }
                Op::RateLimited { pool, for_ms } => {
                    let key = pk(["a", "b"][pool]);
                    t.s.rate_limited(&key, t.at(now + for_ms), t.at(now));
                }
                Op::Usage { alloc, tokens } if !held.is_empty() => {
                    let (id, a) = held[alloc % held.len()];
                    t.s.report_usage(id, a, &units(&[("tokens", tokens)]), t.at(now));
                }
                Op::Open { worker, open } => {
                    t.s.set_worker_open(&wid(["w0", "w1"][worker]), open);
                }
                Op::Advance(ms) => now += ms,
                _ => {}
            }
            let at = t.at(now);
            let before: HashMap<PoolKey, Option<Instant>> =
                t.s.pools
                    .iter()
                    .map(|(k, p)| (k.clone(), p.cooldown_until))
                    .collect();
            for d in t.decide(now) {
                match d {
                    Decision::Dispatch {
                        job, attempt, pool, ..
                    } => {
                        if let Some(name) = pool {
                            let key = PoolKey {
                                namespace: ns(),
                                name,
                            };
                            let cooling = before[&key].is_some_and(|u| u > at);
                            proptest::prop_assert!(!cooling, "dispatched on cooling pool {key}");
                        }
                        waiting.retain(|w| *w != job);
                        held.push((job, attempt));
                    }
                    Decision::Expire { job, .. } => waiting.retain(|w| *w != job),
                }
            }
            for (k, w) in &t.s.workers {
                proptest::prop_assert!(w.in_use.cpu_millis <= w.offer.cpu_millis, "cpu of {k}");
                proptest::prop_assert!(w.used <= w.slots || !w.open, "slots of {k}");
            }
            if let Some(id) = dispatchable(&t.s, at) {
                let w = &t.s.waiting[&id];
                let pools: Vec<String> =
                    t.s.pools
                        .iter()
                        .map(|(k, p)| {
                            format!(
                            "{k}: in_use {:?} tokens {:?} cooldown {:?} waiters {:?} timer {:?}",
                            p.in_use,
                            p.config
                                .rates
                                .iter()
                                .zip(&p.buckets)
                                .map(|(r, b)| b.level(r, at))
                                .collect::<Vec<_>>(),
                            p.cooldown_until.map(|u| u.saturating_duration_since(t.t0)),
                            p.waiters
                                .by_ns
                                .values()
                                .flatten()
                                .map(|r| r.id)
                                .collect::<Vec<_>>(),
                            p.timer.map(|k| k.0.saturating_duration_since(t.t0)),
                        )
                        })
                        .collect();
                proptest::prop_assert!(false, "dispatchable job {id} waits: spot {:?} rank {:?} queue {} demand {:?} since {:?} now {:?}\n{}\ntimers {:?}",
                    w.spot, w.rank, w.queue, w.demand, w.since.saturating_duration_since(t.t0), at.saturating_duration_since(t.t0), pools.join("\n"),
                    t.s.timers.iter().map(|(k, v)| (k.0.saturating_duration_since(t.t0), v.clone())).collect::<Vec<_>>());
            }
            // Nothing waits forever for a timer that is not armed.
            for w in t.s.waiting.values() {
                if let Some(d) = w.expires_after() {
                    proptest::prop_assert!(w.timer.is_some() || w.since + d > at);
                }
            }
        }
        Ok(())
    }
}
