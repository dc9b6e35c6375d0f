//! [`JobContext`]: what a handler knows about its attempt and how it reports back.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use jobplane_proto::pb;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use super::outbox::Outbox;
use super::{AttemptKey, HandlerError};
use crate::convert;
use crate::trace::TraceContext;
use crate::types::OutputStream;

/// Output chunks are at most this big on the wire; longer output is split.
pub(crate) const MAX_CHUNK: usize = 64 << 10;

/// One attempt of one job, as handed to a [`Handler`](super::Handler).
///
/// Cloning is cheap; clones refer to the same attempt.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<Inner>,
}

struct Inner {
    key: AttemptKey,
    queue: String,
    payload: Bytes,
    labels: BTreeMap<String, String>,
    priority: i32,
    run_timeout: Option<Duration>,
    trace: Option<TraceContext>,
    pool: Option<String>,
    worker_id: Arc<str>,
    token: CancellationToken,
    cancel_reason: OnceLock<String>,
    outbox: Arc<Outbox>,
    span: Span,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("job_id", &self.job_id())
            .field("attempt", &self.attempt())
            .field("queue", &self.queue())
            .finish_non_exhaustive()
    }
}

impl JobContext {
    pub(crate) fn new(
        assignment: pb::Assignment,
        worker_id: Arc<str>,
        token: CancellationToken,
        outbox: Arc<Outbox>,
        span: Span,
    ) -> Self {
        let key = AttemptKey::new(&assignment.job_id, assignment.attempt);
        JobContext {
            inner: Arc::new(Inner {
                key,
                queue: assignment.queue,
                payload: assignment.payload,
                labels: assignment.labels.into_iter().collect(),
                priority: assignment.priority,
                run_timeout: convert::duration_from_pb(assignment.run_timeout),
                trace: TraceContext::from_parts(&assignment.traceparent, &assignment.tracestate),
                pool: (!assignment.pool.is_empty()).then_some(assignment.pool),
                worker_id,
                token,
                cancel_reason: OnceLock::new(),
                outbox,
                span,
            }),
        }
    }

    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.inner.key.job_id
    }

    /// The attempt number (also its fencing token), from 1.
    pub fn attempt(&self) -> u32 {
        self.inner.key.attempt
    }

    /// The queue the job came from.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// The payload as submitted.
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// The payload as shared bytes.
    pub fn payload_bytes(&self) -> Bytes {
        self.inner.payload.clone()
    }

    /// Decodes the payload as JSON. A payload that does not decode is a fatal (non-retryable)
    /// failure, since retrying cannot fix it.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.inner.payload)
            .map_err(|e| HandlerError::fatal(format!("invalid JSON payload: {e}")))
    }

    /// The job's labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.inner.labels
    }

    /// The job's priority.
    pub fn priority(&self) -> i32 {
        self.inner.priority
    }

    /// The attempt's run timeout, if any: past it the service cancels the attempt.
    pub fn run_timeout(&self) -> Option<Duration> {
        self.inner.run_timeout
    }

    /// The capacity pool the attempt takes its units from, if the job asked for pools.
    pub fn pool(&self) -> Option<&str> {
        self.inner.pool.as_deref()
    }

    /// Reports what the attempt really used of its pool's units (e.g. `[("tokens", 950)]`):
    /// the service settles the pool's token buckets against what it charged at dispatch, giving
    /// back what was not used (or taking what was used beyond). Sent before the outcome; a later
    /// call for the same unit replaces the earlier figure.
    pub async fn report_usage<U: Into<String>>(&self, units: impl IntoIterator<Item = (U, u64)>) {
        let report = self.report(pb::worker_report::Kind::Usage(pb::Usage {
            units: units.into_iter().map(|(u, n)| (u.into(), n)).collect(),
        }));
        self.inner
            .outbox
            .push_bulk(self.inner.key.clone(), report)
            .await;
    }

    /// The attempt's W3C `traceparent` as the service sent it (`Assignment.traceparent`): the
    /// context of the service's `attempt {queue}` span for this attempt, in the job's trace;
    /// `None` when the job has no trace context. The worker's `process {queue}` span, in which
    /// the handler runs, is its child.
    pub fn traceparent(&self) -> Option<&str> {
        self.inner.trace.as_ref().map(|t| t.traceparent.as_str())
    }

    /// The W3C `tracestate` going with [`JobContext::traceparent`], if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.inner
            .trace
            .as_ref()
            .and_then(|t| t.tracestate.as_deref())
    }

    /// The `process {queue}` span the handler runs in (target `jobplane::worker`): `tracing`
    /// spans and events of the handler's future nest under it on their own; work the handler
    /// moves to other tasks or threads can enter it or make it their parent.
    pub fn span(&self) -> &Span {
        &self.inner.span
    }

    /// The trace context the handler's work continues, in W3C form: that of the handler's
    /// span when an OpenTelemetry layer is installed, else the attempt's context from the
    /// service ([`JobContext::traceparent`]). Code without `tracing` spans (a binding, a
    /// subprocess given `TRACEPARENT`) joins the trace through it; SDK calls made inside the
    /// handler's future already do.
    pub fn trace_context(&self) -> Option<TraceContext> {
        TraceContext::of_span(&self.inner.span).or_else(|| self.inner.trace.clone())
    }

    /// The id of the worker running the attempt.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// A token cancelled when the attempt must stop: the job was cancelled, ran past its
    /// timeout, the service gave it to another worker, or the worker is shutting down and its
    /// grace period ended. A handler should then stop and return
    /// [`HandlerError::Cancelled`]; one that does not is aborted after the grace period.
    pub fn cancellation(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    /// Whether the attempt must stop (see [`JobContext::cancellation`]).
    pub fn is_cancelled(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Resolves when the attempt must stop.
    pub async fn cancelled(&self) {
        self.inner.token.cancelled().await;
    }

    /// Why the service asked the attempt to stop (`CANCELLED`, `RUN_TIMEOUT`, …), once it did.
    pub fn cancel_reason(&self) -> Option<&str> {
        self.inner.cancel_reason.get().map(String::as_str)
    }

    pub(crate) fn set_cancel_reason(&self, reason: String) {
        // Only the first reason counts.
        let _ = self.inner.cancel_reason.set(reason);
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.inner.token
    }

    /// Reports progress, 0-100 (clamped), with an optional message (empty for none).
    ///
    /// Waits while the worker's report buffer is full.
    pub async fn progress(&self, percent: f64, message: impl Into<String>) {
        let percent = if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        };
        let report = self.report(pb::worker_report::Kind::Progress(pb::Progress {
            percent,
            message: message.into(),
            attempt: self.attempt(),
        }));
        self.inner
            .outbox
            .push_bulk(self.inner.key.clone(), report)
            .await;
    }

    /// Sends output of the attempt; long output is split into chunks of at most 64 KiB.
    ///
    /// Output is delivered in order and before the attempt's outcome, also across reconnects.
    /// This waits while the worker's report buffer is full, so a handler producing output
    /// faster than it can be sent is slowed down rather than buffered without bound. Once the
    /// service has said the attempt is no longer this worker's (and cancelled the token),
    /// output and progress are dropped.
    pub async fn output(&self, stream: OutputStream, data: impl Into<Bytes>) {
        let mut data: Bytes = data.into();
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_CHUNK));
            let report = self.report(pb::worker_report::Kind::Output(pb::Output {
                stream: convert::stream_to_pb(stream) as i32,
                data: chunk,
                attempt: self.attempt(),
                truncated: false,
            }));
            if !self
                .inner
                .outbox
                .push_bulk(self.inner.key.clone(), report)
                .await
            {
                return;
            }
        }
    }

    /// Sends standard output (see [`JobContext::output`]).
    pub async fn stdout(&self, data: impl Into<Bytes>) {
        self.output(OutputStream::Stdout, data).await;
    }

    /// Sends standard error (see [`JobContext::output`]).
    pub async fn stderr(&self, data: impl Into<Bytes>) {
        self.output(OutputStream::Stderr, data).await;
    }

    fn report(&self, kind: pb::worker_report::Kind) -> pb::WorkerReport {
        pb::WorkerReport {
            job_id: self.job_id().to_owned(),
            attempt: self.attempt(),
            kind: Some(kind),
        }
    }
}
