//! Domain types of the engine: validated, independent of the wire format and of the database.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use super::state::JobState;

/// A point in time, in microseconds since the Unix epoch (what the database stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(d.as_micros() as i64)
    }

    /// This time plus a duration.
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(d.as_micros().min(i64::MAX as u128) as i64),
        )
    }

    /// Time from `earlier` to `self`, zero if negative.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

/// Identifier of a job: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh id.
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifier of a worker, chosen by the worker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub Arc<str>);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated name (namespace, queue): 1–128 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(pub Arc<str>);

impl Name {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 128;

    /// Validates a name; the error says what is wrong (the caller names the field).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > Self::MAX_LEN {
            return Err(format!("must be at most {} characters", Self::MAX_LEN));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
        {
            return Err(format!("contains {c:?}; allowed are A-Z a-z 0-9 _ . : -"));
        }
        Ok(Name(s.into()))
    }

    /// The `default` namespace.
    pub fn default_namespace() -> Self {
        Name("default".into())
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::parse(&s).map_err(|e| serde::de::Error::custom(format!("name {s:?} {e}")))
    }
}

/// A queue is identified by its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueKey {
    /// Namespace.
    pub namespace: Name,
    /// Queue name.
    pub name: Name,
}

impl fmt::Display for QueueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How failed attempts are retried.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Back-off before the first retry.
    pub initial_backoff: Duration,
    /// Cap on the back-off.
    pub max_backoff: Duration,
    /// Growth per retry (>= 1).
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// Back-off before retry number `retry` (1-based), capped, with full jitter in [50%, 100%].
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let exp = self.multiplier.powi(retry.saturating_sub(1).min(64) as i32);
        let base = self.initial_backoff.as_secs_f64() * exp;
        let capped = base.min(self.max_backoff.as_secs_f64());
        Duration::from_secs_f64(capped * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
    }
}

/// A queue's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct QueueConfig {
    /// Max attempts running at once across all workers; 0 = unlimited.
    pub max_concurrency: u32,
    /// Default per-attempt run timeout.
    pub default_run_timeout: Option<Duration>,
    /// Default retry policy.
    pub default_retry_policy: Option<RetryPolicy>,
    /// Max queued jobs; 0 = unlimited.
    pub max_depth: u64,
    /// Dispatch nothing while paused.
    pub paused: bool,
    /// Default schedule-to-start bound.
    pub default_max_wait: Option<Duration>,
    /// Refuse at submit (`FAILED_PRECONDITION`, `NO_WORKER_FITS`) a job whose resources or
    /// selector no connected worker of the queue could ever satisfy, instead of letting it wait.
    #[serde(default)]
    pub reject_unplaceable: bool,
}

/// A capacity pool is identified by its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolKey {
    /// Namespace.
    pub namespace: Name,
    /// Pool name.
    pub name: Name,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Name of a unit a pool counts (`requests`, `tokens`…): 1-64 characters of `[a-z0-9_.-]`.
pub type Unit = String;

/// Checks a unit name; the error says what is wrong (the caller names the field).
pub fn validate_unit(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err("must be 1-64 characters".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("contains {c:?}; allowed are a-z 0-9 _ . -"));
    }
    Ok(())
}

/// The unit a pool request takes when it names none: one `requests`.
pub const DEFAULT_UNIT: &str = "requests";

/// A token bucket over one unit: `amount` tokens per `per`, holding at most `burst`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// The unit it limits.
    pub unit: Unit,
    /// Tokens added per `per` (at least 1).
    pub amount: u64,
    /// The refill interval (at least 1 ms).
    #[serde(with = "duration_us")]
    pub per: Duration,
    /// Most tokens the bucket holds (at least 1); a new bucket starts full.
    pub burst: u64,
}

/// Settings of a capacity pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Most units held at once, per unit, by running attempts.
    #[serde(default)]
    pub max_units: BTreeMap<Unit, u64>,
    /// Token buckets; tokens are taken at dispatch.
    #[serde(default)]
    pub rates: Vec<RateLimit>,
    /// Usable by the jobs of every namespace that has no pool of this name of its own (only a
    /// pool of the `default` namespace can be shared).
    #[serde(default)]
    pub shared: bool,
    /// Shares of a shared pool, per namespace (a namespace not listed has weight 1): while
    /// namespaces contend for it, each gets capacity in proportion to its weight.
    #[serde(default)]
    pub weights: BTreeMap<Name, u32>,
}

impl PoolConfig {
    /// A namespace's weight in this pool.
    pub fn weight(&self, ns: &Name) -> u32 {
        self.weights.get(ns).copied().unwrap_or(1).max(1)
    }

    /// The share of this pool that `units` take, for fair sharing: the largest fraction of any
    /// limit (a concurrency limit or a bucket's burst); zero if they take no limited unit.
    pub fn cost(&self, units: &BTreeMap<Unit, u64>) -> f64 {
        let frac = |u: &Unit, max: u64| units.get(u).copied().unwrap_or(0) as f64 / max as f64;
        self.max_units
            .iter()
            .map(|(u, max)| frac(u, *max))
            .chain(self.rates.iter().map(|r| frac(&r.unit, r.burst)))
            .fold(0.0, f64::max)
    }
}

/// One entry of a job's capacity request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRequest {
    /// The pool (in the job's namespace).
    pub pool: Name,
    /// Units taken from it (at least one entry; `requests=1` when the submitter named none).
    pub units: BTreeMap<Unit, u64>,
    /// How long the job waits for this pool before the next one is also tried; `None` waits
    /// without bound (later pools are never reached); zero tries it once, at once.
    #[serde(default, with = "opt_duration_us")]
    pub max_wait: Option<Duration>,
}

/// Worker resources: what a worker offers, or what an attempt holds while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

impl Resources {
    /// Whether nothing is asked for.
    pub fn is_zero(&self) -> bool {
        self.cpu_millis == 0 && self.memory_bytes == 0
    }

    /// Whether `need` fits in `self`.
    pub fn fits(&self, need: &Resources) -> bool {
        need.cpu_millis <= self.cpu_millis && need.memory_bytes <= self.memory_bytes
    }
}

/// What a job needs to be dispatched, beyond a queue slot and a worker slot. Fixed at submit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// Capacity request: pools in fallback order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolRequest>,
    /// Worker resources held while an attempt runs.
    #[serde(default, skip_serializing_if = "Resources::is_zero")]
    pub resources: Resources,
    /// Labels the worker must carry, each with this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

impl Demand {
    /// Whether it asks for nothing beyond a slot.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty() && self.resources.is_zero() && self.selector.is_empty()
    }

    /// Whether a worker with these labels satisfies the selector.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

mod duration_us {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

mod opt_duration_us {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_micros().min(u64::MAX as u128) as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_micros))
    }
}

/// A validated job submission.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Namespace.
    pub namespace: Name,
    /// Queue.
    pub queue: Name,
    /// Payload.
    pub payload: Bytes,
    /// Labels.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Priority: higher first.
    pub priority: i32,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Per-attempt run timeout (None: the queue default).
    pub run_timeout: Option<Duration>,
    /// Schedule-to-start bound (None: the queue default).
    pub max_wait: Option<Duration>,
    /// Retry policy (None: the queue default).
    pub retry_policy: Option<RetryPolicy>,
    /// Not before.
    pub scheduled_at: Option<Timestamp>,
    /// Pools, resources and worker selector.
    pub demand: Arc<Demand>,
    /// The trace the job's life is recorded in (not part of what the submitter chose: a
    /// retried submit with another trace is the same submit).
    pub trace: Option<Arc<TraceContext>>,
}

/// A W3C trace context: where a job's spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`: `00-<trace id>-<span id>-<flags>`.
    pub traceparent: String,
    /// `tracestate` (may be empty).
    pub tracestate: String,
}

impl JobSpec {
    /// A digest of everything the submitter chose, to tell a retried submit from a different one
    /// that reuses the idempotency key.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.namespace.as_str());
        h.update([0]);
        h.update(self.queue.as_str());
        h.update([0]);
        h.update((self.payload.len() as u64).to_le_bytes());
        h.update(&self.payload);
        for (k, v) in self.labels.iter() {
            h.update(k);
            h.update([0]);
            h.update(v);
            h.update([0]);
        }
        h.update(self.priority.to_le_bytes());
        h.update(format!(
            "{:?}|{:?}|{:?}|{:?}",
            self.run_timeout, self.max_wait, self.retry_policy, self.scheduled_at
        ));
        if !self.demand.is_empty() {
            // Only when set, so that digests of jobs without a demand stay what they were.
            h.update(format!("|{:?}", self.demand));
        }
        let out = h.finalize();
        out.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why an attempt or job failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// Stable reason, e.g. `WORKER_LOST`.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl JobError {
    /// A new error.
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        JobError {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The full state of one job, as stored. Cheap to clone (shared fields are reference counted).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Id.
    pub id: JobId,
    /// Namespace.
    pub namespace: Name,
    /// Queue.
    pub queue: Name,
    /// Payload.
    pub payload: Bytes,
    /// Labels.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Priority.
    pub priority: i32,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Current state.
    pub state: JobState,
    /// Current or last attempt; the fencing token.
    pub attempt: u32,
    /// Failures that counted against the retry budget.
    pub retries_used: u32,
    /// Effective retry policy.
    pub retry_policy: RetryPolicy,
    /// Effective run timeout.
    pub run_timeout: Option<Duration>,
    /// Schedule-to-start bound.
    pub max_wait: Option<Duration>,
    /// Result once succeeded.
    pub result: Option<Bytes>,
    /// Last error.
    pub error: Option<JobError>,
    /// Why it waits (QUEUED only).
    pub waiting_for: String,
    /// Last progress.
    pub progress: f64,
    /// Worker of the current attempt.
    pub worker_id: Option<WorkerId>,
    /// A cancel was requested while it ran.
    pub cancel_requested: bool,
    /// Submitted at.
    pub created_at: Timestamp,
    /// Not before.
    pub scheduled_at: Timestamp,
    /// The current or last attempt started at.
    pub started_at: Option<Timestamp>,
    /// Reached a terminal state at.
    pub finished_at: Option<Timestamp>,
    /// Last change.
    pub updated_at: Timestamp,
    /// Newest event's sequence number.
    pub last_seq: u64,
    /// Bumped by every persisted change; guards updates.
    pub version: u64,
    /// Output bytes recorded so far, for the per-job bound; one more than the bound once output
    /// was truncated (the marker is recorded).
    pub output_bytes: u64,
    /// Pools, resources and worker selector, as submitted.
    pub demand: Arc<Demand>,
    /// The pool the current or last attempt took its capacity from.
    pub pool: Option<Name>,
    /// The job's trace: the context of the service span that accepted it (or the submitter's,
    /// when the service does not export traces). Fixed at submit.
    pub trace: Option<Arc<TraceContext>>,
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A state change.
    State {
        /// Before (`None` for the submission).
        from: Option<JobState>,
        /// After.
        to: JobState,
        /// Attempt.
        attempt: u32,
        /// Error, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
        /// Why it waits, for QUEUED.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        waiting_for: String,
    },
    /// Progress.
    Progress {
        /// 0–100.
        percent: f64,
        /// Message.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
        /// Attempt.
        attempt: u32,
    },
    /// Output; the bytes are in [`Event::data`].
    Output {
        /// Which stream.
        stream: OutputStream,
        /// Attempt.
        attempt: u32,
        /// Marks the end of recorded output: the per-job bound was reached.
        #[serde(default)]
        truncated: bool,
    },
}

/// Which stream an output chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One entry of a job's event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Job.
    pub job_id: JobId,
    /// Sequence number, from 1, no gaps.
    pub seq: u64,
    /// When.
    pub time: Timestamp,
    /// What.
    pub kind: EventKind,
    /// Output bytes, or the result for a change to SUCCEEDED.
    pub data: Bytes,
}

impl Event {
    /// Whether this event is the job's terminal state change (always its last event).
    pub fn is_terminal(&self) -> bool {
        matches!(&self.kind, EventKind::State { to, .. } if to.is_terminal())
    }
}

/// A recorded idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    /// Namespace.
    pub namespace: Name,
    /// Key.
    pub key: String,
    /// Job it created.
    pub job_id: JobId,
    /// Digest of the spec.
    pub digest: String,
    /// Forgotten after.
    pub expires_at: Timestamp,
}

/// Filters of a job listing.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Namespace.
    pub namespace: Option<Name>,
    /// Queue.
    pub queue: Option<Name>,
    /// Any of these states.
    pub states: Vec<JobState>,
    /// All of these labels.
    pub labels: BTreeMap<String, String>,
    /// Created at or after.
    pub created_after: Option<Timestamp>,
    /// Created before.
    pub created_before: Option<Timestamp>,
    /// Page size.
    pub limit: u32,
    /// Continue after this job (listing is newest first, by id).
    pub before_id: Option<JobId>,
}
