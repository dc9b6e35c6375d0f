//! The spans of a job's life, in the job's own trace (its [`TraceContext`]: the context of the
//! service's span for the submit call that accepted it). One span per attempt, `attempt {queue}`
//! (kind producer): from when the job began waiting in QUEUED (submit, retry, requeue) to the
//! attempt's end, with a `waiting` event per `waiting_for` reason it waited on, a `dispatched`
//! event when it was handed to a worker, and the outcome; status ERROR when the attempt failed
//! (error, timeout, lost worker) or the job expired waiting. Its context goes to the worker in
//! the assignment, so the worker's `process {queue}` span is its child. A stay in the queue that
//! ends without a dispatch (cancel, expiry) is a span of its own kind too, with that outcome.
//!
//! The span is built with the OpenTelemetry API and explicit times when the job leaves the queue
//! (start: when it began waiting) and stays open in memory while the attempt runs: the global
//! tracer provider, which trace export installs, exports it. Only made when export is on
//! ([`super::EngineConfig::job_spans`]) and the job has a trace; the sampler decides per trace
//! (parent based by default: a job whose submitter did not sample is not recorded).

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::global::BoxedSpan;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::model::{Job, JobState, Timestamp, TraceContext};

/// Most `waiting` events kept for one stay in the queue (the first ones, then the last).
pub(crate) const MAX_WAIT_REASONS: usize = 16;

/// The `waiting_for` reasons of a job's current stay in QUEUED.
#[derive(Debug)]
pub(crate) struct Queued {
    pub since: Timestamp,
    pub reasons: Vec<(Timestamp, String)>,
}

impl Queued {
    pub fn new(since: Timestamp) -> Self {
        Queued {
            since,
            reasons: Vec::new(),
        }
    }

    /// Records a reason if it differs from the last one (bounded: past the limit the last
    /// entry is replaced, so the first reasons and the latest are kept).
    pub fn note(&mut self, at: Timestamp, reason: String) {
        if reason.is_empty() || self.reasons.last().is_some_and(|(_, r)| *r == reason) {
            return;
        }
        if self.reasons.len() >= MAX_WAIT_REASONS {
            self.reasons.pop();
        }
        self.reasons.push((at, reason));
    }
}

struct Fields<'a>(&'a TraceContext);

impl Extractor for Fields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(&self.0.traceparent),
            "tracestate" if !self.0.tracestate.is_empty() => Some(&self.0.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The context a W3C trace context names, if it is valid.
pub(crate) fn context_of(trace: &TraceContext) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(&Fields(trace));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The W3C form of a span context.
pub(crate) fn trace_context(sc: &SpanContext) -> Option<TraceContext> {
    sc.is_valid().then(|| TraceContext {
        traceparent: format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
        tracestate: sc.trace_state().header(),
    })
}

fn time(t: Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(t.0.max(0) as u64)
}

/// Attributes every span of the job carries.
fn job_attributes(job: &Job) -> Vec<KeyValue> {
    vec![
        KeyValue::new("messaging.system", "jobplane"),
        KeyValue::new("messaging.destination.name", job.queue.to_string()),
        KeyValue::new("messaging.message.id", job.id.to_string()),
        KeyValue::new("jobplane.job_id", job.id.to_string()),
        KeyValue::new("jobplane.queue", job.queue.to_string()),
        KeyValue::new("jobplane.namespace", job.namespace.to_string()),
    ]
}

fn tracer() -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer_provider().tracer("jobplane")
}

/// A job left QUEUED at `now` for state `to`: opens the span of the attempt that waited
/// (`attempt {queue}`, from when it began waiting, with a `waiting` event per reason) and, if it
/// was dispatched (`to` is LEASED), adds the `dispatched` event and returns the open span with
/// the context the worker gets. Otherwise (cancelled or expired while queued) the span ends now.
pub(crate) fn left_queue(
    job: &Job,
    queued: &Queued,
    to: JobState,
    now: Timestamp,
) -> Option<(Attempt, TraceContext)> {
    let trace = job.trace.as_deref()?;
    let parent = context_of(trace)?;
    let dispatched = to == JobState::Leased;
    let mut attributes = job_attributes(job);
    attributes.push(KeyValue::new("messaging.operation.type", "send"));
    if let Some((_, last)) = queued.reasons.last() {
        attributes.push(KeyValue::new("jobplane.waiting_for", last.clone()));
    }
    attributes.push(KeyValue::new(
        "jobplane.queued_ms",
        now.since(queued.since).as_secs_f64() * 1e3,
    ));
    let mut events: Vec<opentelemetry::trace::Event> = queued
        .reasons
        .iter()
        .map(|(at, reason)| {
            opentelemetry::trace::Event::new(
                "waiting",
                time(*at),
                vec![KeyValue::new("jobplane.waiting_for", reason.clone())],
                0,
            )
        })
        .collect();
    if dispatched {
        attributes.push(KeyValue::new("jobplane.attempt", i64::from(job.attempt)));
        let mut at = Vec::new();
        if let Some(w) = &job.worker_id {
            attributes.push(KeyValue::new("jobplane.worker_id", w.0.to_string()));
            at.push(KeyValue::new("jobplane.worker_id", w.0.to_string()));
        }
        if let Some(p) = &job.pool {
            attributes.push(KeyValue::new("jobplane.pool", p.to_string()));
            at.push(KeyValue::new("jobplane.pool", p.to_string()));
        }
        events.push(opentelemetry::trace::Event::new(
            "dispatched",
            time(now),
            at,
            0,
        ));
    }
    let tracer = tracer();
    let builder = tracer
        .span_builder(format!("attempt {}", job.queue))
        .with_kind(SpanKind::Producer)
        .with_start_time(time(queued.since))
        .with_attributes(attributes)
        .with_events(events);
    let mut span = tracer.build_with_context(builder, &parent);
    if dispatched {
        let sc = span.span_context().clone();
        let worker_context = trace_context(&sc).unwrap_or_else(|| trace.clone());
        return Some((Attempt { span }, worker_context));
    }
    span.set_attribute(KeyValue::new("jobplane.outcome", to.as_str()));
    if to == JobState::Expired {
        span.set_status(Status::error(error_text(job)));
    }
    span.end_with_timestamp(time(now));
    None
}

/// The open span of a dispatched attempt, until the attempt ends.
pub(crate) struct Attempt {
    span: BoxedSpan,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt").finish_non_exhaustive()
    }
}

/// Ends an attempt's span at `now` with its outcome, state `to` (`failed`: by its own failure —
/// error, timeout, lost worker — rather than success, cancel or a rate limit). `attempt` is
/// `None` for an attempt dispatched before the service restarted: its span is then made now,
/// from the attempt's start.
pub(crate) fn complete(
    job: &Job,
    attempt: Option<Attempt>,
    to: JobState,
    failed: bool,
    started: Option<Timestamp>,
    now: Timestamp,
) {
    let mut span = match attempt {
        Some(a) => a.span,
        None => {
            // Dispatched before the service restarted: recorded from its start.
            let Some(parent) = job.trace.as_deref().and_then(context_of) else {
                return;
            };
            let mut attributes = job_attributes(job);
            attributes.push(KeyValue::new("messaging.operation.type", "send"));
            attributes.push(KeyValue::new("jobplane.attempt", i64::from(job.attempt)));
            if let Some(w) = &job.worker_id {
                attributes.push(KeyValue::new("jobplane.worker_id", w.0.to_string()));
            }
            if let Some(p) = &job.pool {
                attributes.push(KeyValue::new("jobplane.pool", p.to_string()));
            }
            let tracer = tracer();
            let builder = tracer
                .span_builder(format!("attempt {}", job.queue))
                .with_kind(SpanKind::Producer)
                .with_start_time(time(started.unwrap_or(now)))
                .with_attributes(attributes);
            tracer.build_with_context(builder, &parent)
        }
    };
    if !span.is_recording() {
        return;
    }
    span.set_attribute(KeyValue::new("jobplane.outcome", to.as_str()));
    if let Some(started) = started {
        span.set_attribute(KeyValue::new(
            "jobplane.run_time_ms",
            now.since(started).as_secs_f64() * 1e3,
        ));
    }
    if let Some(e) = &job.error {
        span.set_attribute(KeyValue::new("jobplane.error.reason", e.reason.clone()));
    }
    if failed {
        span.set_status(Status::error(error_text(job)));
    }
    span.end_with_timestamp(time(now));
}

fn error_text(job: &Job) -> Cow<'static, str> {
    match &job.error {
        Some(e) if e.message.is_empty() => Cow::Owned(e.reason.clone()),
        Some(e) => Cow::Owned(format!("{}: {}", e.reason, e.message)),
        None => Cow::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_contexts_round_trip() {
        let t = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "vendor=x".into(),
        };
        let cx = context_of(&t).expect("valid");
        assert_eq!(trace_context(cx.span().span_context()), Some(t));
        assert!(context_of(&TraceContext {
            traceparent: "junk".into(),
            tracestate: String::new()
        })
        .is_none());
    }

    #[test]
    fn reasons_are_kept_once_and_bounded() {
        let mut q = Queued::new(Timestamp(0));
        q.note(Timestamp(1), "worker(queue=a)".into());
        q.note(Timestamp(2), "worker(queue=a)".into());
        q.note(Timestamp(3), String::new());
        assert_eq!(q.reasons.len(), 1);
        for i in 0..40 {
            q.note(Timestamp(10 + i), format!("pool(name=p{i})"));
        }
        assert_eq!(q.reasons.len(), MAX_WAIT_REASONS);
        assert_eq!(q.reasons[0].1, "worker(queue=a)");
        assert_eq!(q.reasons.last().unwrap().1, "pool(name=p39)");
    }
}
