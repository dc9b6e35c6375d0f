//! The SDK's own domain types. They mirror the wire API (`jobplane_proto::pb`) with Rust types:
//! enums instead of integers, `Option` instead of empty strings and unset messages,
//! [`Duration`] and [`SystemTime`] instead of protobuf well-known types. Conversions live in
//! `convert.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Where a job is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Not running yet; [`Job::waiting_for`] says why.
    Queued,
    /// Assigned to a worker that has not acknowledged it yet.
    Leased,
    /// Acknowledged by a worker and running.
    Running,
    /// Finished with a result. Terminal.
    Succeeded,
    /// Failed and out of retries, or failed non-retryably. Terminal.
    Failed,
    /// Cancelled by a client. Terminal.
    Cancelled,
    /// The last attempt ran past its run timeout. Terminal.
    TimedOut,
    /// The job's max wait for dispatch ran out. Terminal.
    Expired,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Leased,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Expired,
    ];

    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        match self {
            JobState::Queued | JobState::Leased | JobState::Running => false,
            JobState::Succeeded
            | JobState::Failed
            | JobState::Cancelled
            | JobState::TimedOut
            | JobState::Expired => true,
        }
    }

    /// The state's name as the CLI and the wire API spell it, without prefix: `QUEUED`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Leased => "LEASED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
            JobState::Expired => "EXPIRED",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`JobState`] or another SDK enum from a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`; expected one of: {expected}")]
pub struct ParseEnumError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

impl FromStr for JobState {
    type Err = ParseEnumError;

    /// Parses `QUEUED`, `queued`, `JOB_STATE_QUEUED`, `timed-out`, ….
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        let norm = norm.strip_prefix("JOB_STATE_").unwrap_or(&norm);
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == norm)
            .ok_or_else(|| ParseEnumError {
                kind: "job state",
                value: s.to_owned(),
                expected:
                    "QUEUED, LEASED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, EXPIRED",
            })
    }
}

/// How a retryably failed attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RetryPolicy {
    /// How many times a failed attempt is retried (0 = never).
    pub max_retries: u32,
    /// Back-off before the first retry; `None` takes the service's default (1s).
    pub initial_backoff: Option<Duration>,
    /// Cap on the back-off; `None` takes the service's default (5m).
    pub max_backoff: Option<Duration>,
    /// Growth factor of the back-off per retry (>= 1); `None` takes the default (2.0).
    pub multiplier: Option<f64>,
}

impl RetryPolicy {
    /// A policy with `max_retries` retries and the service's default back-off.
    pub fn new(max_retries: u32) -> Self {
        RetryPolicy {
            max_retries,
            ..RetryPolicy::default()
        }
    }

    /// Sets the back-off before the first retry.
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.initial_backoff = Some(backoff);
        self
    }

    /// Sets the cap on the back-off.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = Some(backoff);
        self
    }

    /// Sets the back-off growth factor.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = Some(multiplier);
        self
    }
}

/// What a client submits: build one with [`JobSpec::new`] and the builder methods.
///
/// ```
/// use std::time::Duration;
/// use jobplane::JobSpec;
///
/// let spec = JobSpec::new("emails")
///     .json(&serde_json::json!({"to": "a@example.com"}))?
///     .priority(5)
///     .idempotency_key("welcome-a@example.com")
///     .run_timeout(Duration::from_secs(30))
///     .retries(3)
///     .label("team", "growth");
/// # Ok::<(), jobplane::Error>(())
/// ```
///
/// Capacity and placement: pools in fallback order, worker resources and a label selector.
///
/// ```
/// use std::time::Duration;
/// use jobplane::{JobSpec, PoolRequest};
///
/// let spec = JobSpec::new("chat")
///     .pool(PoolRequest::new("gpt-4o").units("tokens", 1200).max_wait(Duration::from_secs(5)))
///     .pool(PoolRequest::new("gpt-4o-mini").max_wait(Duration::ZERO))
///     .cpu(0.5)
///     .memory_bytes(512 << 20)
///     .selector("gpu", "a100");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Namespace; `None` takes the client's.
    pub namespace: Option<String>,
    /// Queue name.
    pub queue: String,
    /// Opaque payload handed to the worker.
    pub payload: Bytes,
    /// Labels for filtering.
    pub labels: BTreeMap<String, String>,
    /// Higher runs first; FIFO among equals.
    pub priority: i32,
    /// Makes the submit safe to retry.
    pub idempotency_key: Option<String>,
    /// Per-attempt run timeout; `None` takes the queue's default.
    pub run_timeout: Option<Duration>,
    /// Schedule-to-start bound: the job expires if not dispatched within it.
    pub max_wait: Option<Duration>,
    /// Retry policy; `None` takes the queue's default.
    pub retry_policy: Option<RetryPolicy>,
    /// Not before this time; `None` = now.
    pub scheduled_at: Option<SystemTime>,
    /// W3C `traceparent` of the submitter, sent as gRPC metadata so the job's trace continues
    /// the caller's: with an OpenTelemetry layer installed, the submit's client span is its
    /// child and the metadata names that span; without one it is sent as it is. `None`: the
    /// task's scoped [`TraceContext`](crate::trace::TraceContext) or the current span.
    pub traceparent: Option<String>,
    /// W3C `tracestate` going with [`JobSpec::traceparent`] (ignored without it).
    pub tracestate: Option<String>,
    /// Capacity request: pools in fallback order.
    pub pools: Vec<PoolRequest>,
    /// Worker resources held while an attempt runs (zero = none).
    pub resources: Resources,
    /// Labels a worker must carry, each with this value, to run the job.
    pub selector: BTreeMap<String, String>,
}

impl JobSpec {
    /// A job for `queue` with an empty payload and defaults for everything else.
    pub fn new(queue: impl Into<String>) -> Self {
        JobSpec {
            namespace: None,
            queue: queue.into(),
            payload: Bytes::new(),
            labels: BTreeMap::new(),
            priority: 0,
            idempotency_key: None,
            run_timeout: None,
            max_wait: None,
            retry_policy: None,
            scheduled_at: None,
            traceparent: None,
            tracestate: None,
            pools: Vec::new(),
            resources: Resources::default(),
            selector: BTreeMap::new(),
        }
    }

    /// Sets the namespace, overriding the client's.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sets the payload bytes.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Sets the payload to `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self> {
        self.payload = Bytes::from(serde_json::to_vec(value)?);
        Ok(self)
    }

    /// Sets the priority (higher runs first).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the per-attempt run timeout.
    pub fn run_timeout(mut self, timeout: Duration) -> Self {
        self.run_timeout = Some(timeout);
        self
    }

    /// Sets the schedule-to-start bound.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// Sets a retry policy of `max_retries` retries with the default back-off.
    pub fn retries(mut self, max_retries: u32) -> Self {
        self.retry_policy = Some(RetryPolicy::new(max_retries));
        self
    }

    /// Sets the retry policy.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = Some(policy);
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the time before which the job does not run.
    pub fn scheduled_at(mut self, at: SystemTime) -> Self {
        self.scheduled_at = Some(at);
        self
    }

    /// Sets the W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) the job's trace continues.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Sets the W3C `tracestate` going with the [`JobSpec::traceparent`].
    pub fn tracestate(mut self, tracestate: impl Into<String>) -> Self {
        self.tracestate = Some(tracestate.into());
        self
    }

    /// The explicit trace context of the submit, if the spec has one.
    pub(crate) fn explicit_trace(&self) -> Option<crate::trace::TraceContext> {
        let traceparent = self.traceparent.as_ref()?;
        Some(
            crate::trace::TraceContext::new(traceparent.clone())
                .with_tracestate(self.tracestate.clone().unwrap_or_default()),
        )
    }

    /// Adds a pool to the capacity request (repeatable: pools are tried in the order added).
    pub fn pool(mut self, request: PoolRequest) -> Self {
        self.pools.push(request);
        self
    }

    /// Sets the CPU an attempt holds on its worker, in cores (fractions allowed).
    pub fn cpu(mut self, cores: f64) -> Self {
        self.resources.cpu = cores;
        self
    }

    /// Sets the memory an attempt holds on its worker, in bytes.
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.resources.memory_bytes = bytes;
        self
    }

    /// Adds a selector entry: only a worker with label `key` equal to `value` runs the job.
    pub fn selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.selector.insert(key.into(), value.into());
        self
    }
}

/// One entry of a job's capacity request: units taken from a pool while an attempt runs, and
/// how long to wait for that pool before the next one is also tried.
///
/// ```
/// use std::time::Duration;
/// use jobplane::PoolRequest;
///
/// // 1 request and 1200 tokens of `gpt-4o`, waiting at most 5s before falling back.
/// let r = PoolRequest::new("gpt-4o")
///     .units("requests", 1)
///     .units("tokens", 1200)
///     .max_wait(Duration::from_secs(5));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRequest {
    /// Pool name (in the job's namespace).
    pub pool: String,
    /// Units by unit name; the service adds `requests=1` unless `requests` is named.
    pub units: BTreeMap<String, u64>,
    /// How long to wait for this pool before the next is also tried: `None` waits without
    /// bound, zero fails fast (take it now or move on).
    pub max_wait: Option<Duration>,
}

impl PoolRequest {
    /// A request for `pool` of `requests=1` (the service's default) without a max wait.
    pub fn new(pool: impl Into<String>) -> Self {
        PoolRequest {
            pool: pool.into(),
            units: BTreeMap::new(),
            max_wait: None,
        }
    }

    /// Asks for `amount` of `unit` (repeatable, one call per unit).
    pub fn units(mut self, unit: impl Into<String>, amount: u64) -> Self {
        self.units.insert(unit.into(), amount);
        self
    }

    /// Sets how long to wait for this pool before the next one is also tried.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }
}

/// CPU and memory: what a worker offers, or what an attempt holds while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    /// CPU in cores (fractions allowed; the service counts thousandths, rounding up).
    pub cpu: f64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

impl Resources {
    /// Whether nothing is asked for or offered.
    pub fn is_zero(&self) -> bool {
        self.cpu == 0.0 && self.memory_bytes == 0
    }
}

/// Why a job or attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobError {
    /// Stable machine-readable reason, e.g. `WORKER_LOST`, `HANDLER_FAILED`, `RUN_TIMEOUT`.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.reason.is_empty(), self.message.is_empty()) {
            (false, false) => write!(f, "{}: {}", self.reason, self.message),
            (false, true) => f.write_str(&self.reason),
            _ => f.write_str(&self.message),
        }
    }
}

/// A snapshot of one job.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Job id (UUID).
    pub id: String,
    /// Namespace it belongs to.
    pub namespace: String,
    /// Queue it was submitted to.
    pub queue: String,
    /// Payload as submitted.
    pub payload: Bytes,
    /// Labels as submitted.
    pub labels: BTreeMap<String, String>,
    /// Priority as submitted.
    pub priority: i32,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Current state.
    pub state: JobState,
    /// Number of the current or last attempt (its fencing token); 0 before the first dispatch.
    pub attempt: u32,
    /// Failed attempts so far that counted against the retry budget.
    pub retries_used: u32,
    /// Effective retry policy.
    pub retry_policy: Option<RetryPolicy>,
    /// Effective per-attempt run timeout.
    pub run_timeout: Option<Duration>,
    /// Schedule-to-start bound.
    pub max_wait: Option<Duration>,
    /// Result bytes: always `Some` once [`JobState::Succeeded`] (possibly empty).
    pub result: Option<Bytes>,
    /// Error of the last failed attempt or of the terminal failure.
    pub error: Option<JobError>,
    /// Why a queued job is not running, e.g. `queue_slot(queue=emails)`.
    pub waiting_for: Option<String>,
    /// Last reported progress, 0-100.
    pub progress: f64,
    /// Worker running the current attempt.
    pub worker_id: Option<String>,
    /// Whether a cancel was requested while it was running.
    pub cancel_requested: bool,
    /// When it was submitted.
    pub created_at: Option<SystemTime>,
    /// Not before this time.
    pub scheduled_at: Option<SystemTime>,
    /// When the current or last attempt started running.
    pub started_at: Option<SystemTime>,
    /// When it reached its terminal state.
    pub finished_at: Option<SystemTime>,
    /// Last change.
    pub updated_at: Option<SystemTime>,
    /// Sequence number of the job's newest event: watch from here to see only what comes next.
    pub last_seq: u64,
    /// Capacity request as submitted: pools in fallback order.
    pub pools: Vec<PoolRequest>,
    /// Worker resources as submitted (zero = none).
    pub resources: Resources,
    /// Worker label selector as submitted.
    pub selector: BTreeMap<String, String>,
    /// The pool the current or last attempt took its capacity from.
    pub pool: Option<String>,
    /// W3C `traceparent` of the job's trace (the service span that accepted it), if it has one:
    /// a span that waits for the job can link to it.
    pub traceparent: Option<String>,
    /// W3C `tracestate` that came with the job's trace context, if any.
    pub tracestate: Option<String>,
}

impl Job {
    /// Whether the job is in a terminal state.
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// Decodes the result as JSON.
    pub fn result_json<T: DeserializeOwned>(&self) -> Result<T> {
        let bytes = self.result.as_ref().ok_or_else(|| {
            Error::decode(format!(
                "job {} has no result (state {})",
                self.id, self.state
            ))
        })?;
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Decodes the payload as JSON.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// The answer to a submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// The committed job.
    pub job: Job,
    /// False when an idempotency key matched an existing job.
    pub created: bool,
}

/// Filters and paging of [`Client::list`](crate::Client::list).
///
/// ```
/// use jobplane::{JobState, ListFilter};
/// let filter = ListFilter::new().queue("emails").state(JobState::Failed).page_size(50);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only these states (empty = all).
    pub states: Vec<JobState>,
    /// Only jobs having all these labels.
    pub labels: BTreeMap<String, String>,
    /// Only jobs created at or after this.
    pub created_after: Option<SystemTime>,
    /// Only jobs created before this.
    pub created_before: Option<SystemTime>,
    /// Page size, 1-1000; `None` = the service's default (100).
    pub page_size: Option<u32>,
    /// Cursor from a previous [`JobPage::next_page_token`].
    pub page_token: Option<String>,
}

impl ListFilter {
    /// No filter: every job, first page.
    pub fn new() -> Self {
        ListFilter::default()
    }

    /// Only jobs of this queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Adds a state to the accepted states.
    pub fn state(mut self, state: JobState) -> Self {
        self.states.push(state);
        self
    }

    /// Only jobs in one of these states.
    pub fn states(mut self, states: impl IntoIterator<Item = JobState>) -> Self {
        self.states = states.into_iter().collect();
        self
    }

    /// Only jobs with this label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Only jobs created at or after this time.
    pub fn created_after(mut self, at: SystemTime) -> Self {
        self.created_after = Some(at);
        self
    }

    /// Only jobs created before this time.
    pub fn created_before(mut self, at: SystemTime) -> Self {
        self.created_before = Some(at);
        self
    }

    /// Sets the page size.
    pub fn page_size(mut self, size: u32) -> Self {
        self.page_size = Some(size);
        self
    }

    /// Continues from a previous page.
    pub fn page_token(mut self, token: impl Into<String>) -> Self {
        self.page_token = Some(token.into());
        self
    }
}

/// One page of [`Client::list`](crate::Client::list).
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<Job>,
    /// Cursor of the next page; `None` at the end.
    pub next_page_token: Option<String>,
}

/// What [`Client::wait`](crate::Client::wait) waits for.
///
/// A [`Duration`] converts into options with that timeout and the default targets (any terminal
/// state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitOptions {
    /// How long to wait at most; `None` = the service's default (30s). The service bounds one
    /// wait call (1h): longer timeouts are waited out in several calls, and one too large to
    /// represent (such as [`Duration::MAX`]) waits without a limit.
    pub timeout: Option<Duration>,
    /// States to wait for; empty = any terminal state.
    pub target_states: Vec<JobState>,
}

impl WaitOptions {
    /// Waits for any terminal state with the service's default timeout.
    pub fn new() -> Self {
        WaitOptions::default()
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Waits for these states instead of any terminal one.
    pub fn until(mut self, states: impl IntoIterator<Item = JobState>) -> Self {
        self.target_states = states.into_iter().collect();
        self
    }
}

impl From<Duration> for WaitOptions {
    fn from(timeout: Duration) -> Self {
        WaitOptions::new().timeout(timeout)
    }
}

/// The answer to a wait.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitResult {
    /// The job's snapshot when the wait ended.
    pub job: Job,
    /// Whether the job is in a target state (false: the timeout passed first).
    pub reached: bool,
}

/// How [`Client::wait_many`](crate::Client::wait_many) combines jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitMode {
    /// Until every job reached a target state.
    All,
    /// Until any job reached a target state.
    Any,
}

/// The answer to a [`Client::wait_many`](crate::Client::wait_many).
#[derive(Debug, Clone, PartialEq)]
pub struct WaitManyResult {
    /// One per requested id, in request order.
    pub results: Vec<WaitResult>,
    /// Whether the mode's condition was met.
    pub reached: bool,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running; its worker was told to stop.
    Requested,
    /// The job was already terminal; nothing changed.
    AlreadyTerminal,
}

impl CancelOutcome {
    /// The outcome's name: `CANCELLED`, `REQUESTED`, `ALREADY_TERMINAL`.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Cancelled => "CANCELLED",
            CancelOutcome::Requested => "REQUESTED",
            CancelOutcome::AlreadyTerminal => "ALREADY_TERMINAL",
        }
    }
}

impl fmt::Display for CancelOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a cancel.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelResult {
    /// The job after the cancel.
    pub job: Job,
    /// What the cancel did.
    pub outcome: CancelOutcome,
}

/// Which stream an output chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for OutputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a job's durable, ordered event log.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    /// Sequence number, from 1, without gaps per job.
    pub seq: u64,
    /// Id of the job.
    pub job_id: String,
    /// When it happened.
    pub time: Option<SystemTime>,
    /// What happened.
    pub kind: EventKind,
}

impl JobEvent {
    /// Whether this is the job's terminal state change (always its last event).
    pub fn is_terminal(&self) -> bool {
        matches!(self.kind, EventKind::State { to, .. } if to.is_terminal())
    }
}

/// What a [`JobEvent`] records.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// The job changed state.
    State {
        /// State before; `None` for the job's creation.
        from: Option<JobState>,
        /// State after.
        to: JobState,
        /// Attempt at the time of the change.
        attempt: u32,
        /// Error, for a failure or retry.
        error: Option<JobError>,
        /// Result, for a change to [`JobState::Succeeded`].
        result: Option<Bytes>,
        /// Why it waits, for a change to [`JobState::Queued`].
        waiting_for: Option<String>,
    },
    /// The worker reported progress.
    Progress {
        /// 0-100.
        percent: f64,
        /// Optional message.
        message: Option<String>,
        /// Attempt that reported it.
        attempt: u32,
    },
    /// The worker produced output.
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        data: Bytes,
        /// Attempt that produced it.
        attempt: u32,
        /// True on the marker chunk that says further output was dropped past the per-job bound.
        truncated: bool,
    },
}

/// A queue's settings. Unset values take the service's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueConfig {
    /// Max attempts running at once across all workers; `None` = unlimited.
    pub max_concurrency: Option<u32>,
    /// Default per-attempt run timeout.
    pub default_run_timeout: Option<Duration>,
    /// Default retry policy.
    pub default_retry_policy: Option<RetryPolicy>,
    /// Max queued jobs; submits past it are refused. `None` = unlimited.
    pub max_depth: Option<u64>,
    /// A paused queue accepts submits but dispatches nothing.
    pub paused: bool,
    /// Default schedule-to-start bound.
    pub default_max_wait: Option<Duration>,
    /// Refuse at submit (`FailedPrecondition`, `NO_WORKER_FITS`) a job whose resources or
    /// selector no connected worker of the queue could ever satisfy.
    pub reject_unplaceable: bool,
}

/// A queue with its live figures.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Settings.
    pub config: QueueConfig,
    /// Jobs queued.
    pub depth: u64,
    /// Jobs leased or running.
    pub running: u64,
    /// Submit time of the oldest queued job that is ready to run.
    pub oldest_queued_at: Option<SystemTime>,
    /// Workers serving it.
    pub workers: u32,
}

/// A worker known to the service.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    /// Worker id.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Queues served.
    pub queues: Vec<String>,
    /// Concurrency.
    pub concurrency: u32,
    /// Attempts it runs now.
    pub running: u32,
    /// Whether it is draining.
    pub draining: bool,
    /// Whether its stream is connected (false while it may still reconnect within its lease).
    pub connected: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// When its lease runs out unless renewed.
    pub lease_expires_at: Option<SystemTime>,
    /// CPU and memory it offers.
    pub resources: Resources,
    /// CPU and memory held by its running attempts.
    pub resources_in_use: Resources,
}

/// A token bucket over one unit of a pool: `amount` tokens per `per`, holding at most `burst`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// The unit it limits.
    pub unit: String,
    /// Tokens added per `per` (at least 1).
    pub amount: u64,
    /// The refill interval (at least 1 ms).
    pub per: Duration,
    /// Most tokens the bucket holds; `None` means `amount`.
    pub burst: Option<u64>,
}

impl RateLimit {
    /// `amount` of `unit` per `per`, with a burst of `amount`.
    pub fn new(unit: impl Into<String>, amount: u64, per: Duration) -> Self {
        RateLimit {
            unit: unit.into(),
            amount,
            per,
            burst: None,
        }
    }

    /// Sets the most tokens the bucket holds.
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }
}

/// A capacity pool's settings: at least one max or one rate limit.
///
/// ```
/// use std::time::Duration;
/// use jobplane::{PoolConfig, RateLimit};
///
/// let config = PoolConfig::new()
///     .max_units("requests", 2)
///     .rate(RateLimit::new("tokens", 90_000, Duration::from_secs(60)));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most units held at once by running attempts, per unit.
    pub max_units: BTreeMap<String, u64>,
    /// Token-bucket rate limits; tokens are taken at dispatch.
    pub rates: Vec<RateLimit>,
    /// Usable by the jobs of every namespace without a pool of this name of their own (only a
    /// pool of the `default` namespace can be shared).
    pub shared: bool,
    /// Shares of a shared pool per namespace (a namespace not listed has weight 1).
    pub weights: BTreeMap<String, u32>,
}

impl PoolConfig {
    /// No limits yet.
    pub fn new() -> Self {
        PoolConfig::default()
    }

    /// Sets the most units of `unit` held at once.
    pub fn max_units(mut self, unit: impl Into<String>, max: u64) -> Self {
        self.max_units.insert(unit.into(), max);
        self
    }

    /// Adds a rate limit.
    pub fn rate(mut self, rate: RateLimit) -> Self {
        self.rates.push(rate);
        self
    }

    /// Shares the pool with every namespace (a pool of the `default` namespace only).
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Sets a namespace's weight in a shared pool (at least 1).
    pub fn weight(mut self, namespace: impl Into<String>, weight: u32) -> Self {
        self.weights.insert(namespace.into(), weight);
        self
    }
}

/// A capacity pool with its live figures.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct PoolInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Settings.
    pub config: PoolConfig,
    /// Units held by running attempts, per unit.
    pub in_use: BTreeMap<String, u64>,
    /// Tokens in each rate limit's bucket now, in the order of `config.rates`.
    pub tokens: Vec<f64>,
    /// Attempts holding units of it.
    pub running: u64,
    /// Queued jobs waiting for it.
    pub waiting: u64,
    /// Nothing is dispatched on it until then, after an upstream rate limit.
    pub cooldown_until: Option<SystemTime>,
    /// Cooldown epoch: one more for every cooldown that starts after the previous one ended.
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_state_round_trips_through_strings() {
        for st in JobState::ALL {
            assert_eq!(st.to_string().parse::<JobState>().unwrap(), st);
        }
        assert_eq!("queued".parse::<JobState>().unwrap(), JobState::Queued);
        assert_eq!(
            "JOB_STATE_TIMED_OUT".parse::<JobState>().unwrap(),
            JobState::TimedOut
        );
        assert_eq!("timed-out".parse::<JobState>().unwrap(), JobState::TimedOut);
        let err = "nope".parse::<JobState>().unwrap_err();
        assert!(err.to_string().contains("unknown job state `nope`"));
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                JobState::Succeeded,
                JobState::Failed,
                JobState::Cancelled,
                JobState::TimedOut,
                JobState::Expired
            ]
        );
    }

    #[test]
    fn spec_builder_sets_fields() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let spec = JobSpec::new("q")
            .json(&serde_json::json!({"a": 1}))
            .unwrap()
            .priority(3)
            .idempotency_key("k")
            .run_timeout(Duration::from_secs(5))
            .max_wait(Duration::from_millis(100))
            .retries(2)
            .label("x", "y")
            .scheduled_at(at)
            .namespace("ns");
        assert_eq!(&spec.payload[..], br#"{"a":1}"#);
        assert_eq!(spec.priority, 3);
        assert_eq!(spec.idempotency_key.as_deref(), Some("k"));
        assert_eq!(spec.retry_policy, Some(RetryPolicy::new(2)));
        assert_eq!(spec.labels.get("x").map(String::as_str), Some("y"));
        assert_eq!(spec.scheduled_at, Some(at));
        assert_eq!(spec.namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn spec_builder_sets_the_demand() {
        let spec = JobSpec::new("q")
            .pool(
                PoolRequest::new("gpt-4o")
                    .units("tokens", 1200)
                    .max_wait(Duration::from_secs(5)),
            )
            .pool(PoolRequest::new("gpt-4o-mini").max_wait(Duration::ZERO))
            .cpu(1.5)
            .memory_bytes(1 << 30)
            .selector("gpu", "a100");
        assert_eq!(spec.pools.len(), 2);
        assert_eq!(spec.pools[0].pool, "gpt-4o");
        assert_eq!(spec.pools[0].units.get("tokens"), Some(&1200));
        assert_eq!(
            spec.pools[1].units.len(),
            0,
            "the service defaults to requests=1"
        );
        assert_eq!(spec.pools[1].max_wait, Some(Duration::ZERO));
        assert_eq!(
            spec.resources,
            Resources {
                cpu: 1.5,
                memory_bytes: 1 << 30
            }
        );
        assert_eq!(spec.selector.get("gpu").map(String::as_str), Some("a100"));
    }

    #[test]
    fn wait_options_from_duration() {
        let o: WaitOptions = Duration::from_secs(3).into();
        assert_eq!(o.timeout, Some(Duration::from_secs(3)));
        assert!(o.target_states.is_empty());
    }

    #[test]
    fn job_error_display() {
        let e = JobError {
            reason: "HANDLER_FAILED".into(),
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "HANDLER_FAILED: boom");
    }
}
