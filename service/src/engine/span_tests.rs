//! The spans of a job's life ([`super::spans`]), recorded through a real SDK tracer provider
//! into an in-memory exporter while the core runs a job: waits for a worker, is dispatched,
//! fails once (retried), then fails for good.

use std::time::Duration;

use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::mpsc;

use super::commit::{Effect, Outbox};
use super::core::{Core, Submitted};
use super::model::*;
use super::spans::context_of;
use super::*;

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const ACCEPT_SPAN: &str = "b7ad6b7169203331";

fn spec(trace: Option<TraceContext>, max_retries: u32) -> JobSpec {
    JobSpec {
        namespace: Name::default_namespace(),
        queue: Name::parse("mail").unwrap(),
        payload: Default::default(),
        labels: Default::default(),
        priority: 0,
        idempotency_key: None,
        run_timeout: None,
        max_wait: None,
        retry_policy: Some(RetryPolicy {
            max_retries,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            multiplier: 1.0,
        }),
        scheduled_at: None,
        demand: Default::default(),
        trace: trace.map(Arc::new),
    }
}

fn hello() -> WorkerHello {
    WorkerHello {
        worker_id: WorkerId("w".into()),
        namespace: Name::default_namespace(),
        queues: vec![Name::parse("mail").unwrap()],
        concurrency: 1,
        labels: Default::default(),
        resources: Default::default(),
        name: String::new(),
        running: vec![],
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The assignments an operation sends (after its commit, in the engine): each job and the trace
/// context the worker continues.
fn assignments(out: &mut Outbox) -> Vec<(Arc<Job>, Option<Arc<TraceContext>>)> {
    out.writes.clear();
    out.effects
        .drain(..)
        .filter_map(|e| match e {
            Effect::ToWorker {
                msg: ToWorker::Assign(job, trace),
                ..
            } => Some((job, trace)),
            _ => None,
        })
        .collect()
}

fn fail(core: &mut Core, session: &WorkerSession, job: &Job) -> Outbox {
    let mut out = Outbox::default();
    let report = |kind| Report {
        job_id: job.id,
        attempt: job.attempt,
        kind,
    };
    core.reports(
        session,
        vec![
            report(ReportKind::Ack),
            report(ReportKind::Outcome(Outcome::Failure {
                message: "boom".into(),
                retryable: true,
            })),
        ],
        Timestamp::now(),
        &mut out,
    );
    out
}

#[test]
fn a_jobs_life_is_recorded_in_its_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());

    let mut core = Core::new(EngineConfig {
        job_spans: true,
        ..Default::default()
    });
    let now = Timestamp::now();
    let mut out = Outbox::default();
    let trace = TraceContext {
        traceparent: format!("00-{TRACE_ID}-{ACCEPT_SPAN}-01"),
        tracestate: "vendor=1".into(),
    };
    let submitted = core
        .submit(
            vec![spec(Some(trace.clone()), 1), spec(None, 0)],
            now,
            &mut out,
        )
        .unwrap();
    let [Submitted::Created(job), Submitted::Created(_untraced)] = &submitted[..] else {
        panic!("two new jobs");
    };
    // No worker yet: both wait. Then one connects and takes the traced job.
    assert!(assignments(&mut out).is_empty());
    let (tx, _rx) = mpsc::unbounded_channel();
    let session = core
        .connect_worker(hello(), tx, Timestamp::now(), &mut out)
        .unwrap();
    let [(first, Some(first_trace))] = &assignments(&mut out)[..] else {
        panic!("the traced job is assigned, with a context");
    };
    let (first, first_trace) = (first.clone(), first_trace.clone());
    assert_eq!(first.id, job.id);
    let first_cx = context_of(&first_trace).expect("a valid context for the worker");
    let first_sc = first_cx.span().span_context().clone();
    assert_eq!(first_sc.trace_id().to_string(), TRACE_ID, "the job's trace");
    assert_ne!(
        first_sc.span_id().to_string(),
        ACCEPT_SPAN,
        "the dispatch span's own id"
    );
    assert_eq!(first_trace.tracestate, "vendor=1");

    // The attempt fails and is retried (no backoff): queued again, dispatched again, and this
    // time it fails for good. The untraced job goes after it and is never recorded.
    // The attempt fails and is retried (no backoff). The untraced job, queued before the
    // retry, runs first and fails for good; it is never recorded and hands out no context.
    let [(untraced, untraced_trace)] = &assignments(&mut fail(&mut core, &session, &first))[..]
    else {
        panic!("the untraced job is assigned");
    };
    assert_ne!(untraced.id, job.id);
    assert!(
        untraced_trace.is_none(),
        "a job without a trace hands out none"
    );
    // Then the retry, which fails for good too.
    let [(second, Some(second_trace))] = &assignments(&mut fail(&mut core, &session, untraced))[..]
    else {
        panic!("the retry is assigned, with a context");
    };
    assert_eq!((second.id, second.attempt), (job.id, 2));
    let second_cx = context_of(second_trace).unwrap();
    let second_sc = second_cx.span().span_context().clone();
    assert!(assignments(&mut fail(&mut core, &session, second)).is_empty());
    assert!(core.active_job(job.id).is_none(), "the traced job ended");

    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    assert!(spans
        .iter()
        .all(|s| s.span_context.trace_id().to_string() == TRACE_ID));
    let attempts = named(&spans, "attempt mail");
    assert_eq!(
        (attempts.len(), spans.len()),
        (2, 2),
        "one span per attempt, nothing else: {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let mut attempts = attempts;
    attempts.sort_by_key(|d| attr(d, "jobplane.attempt"));
    for s in &attempts {
        assert_eq!(
            s.parent_span_id.to_string(),
            ACCEPT_SPAN,
            "under the submit"
        );
        assert_eq!(s.span_kind, SpanKind::Producer);
        assert_eq!(attr(s, "jobplane.job_id"), Some(job.id.to_string()));
        assert_eq!(
            attr(s, "messaging.destination.name").as_deref(),
            Some("mail")
        );
        assert_eq!(attr(s, "jobplane.worker_id").as_deref(), Some("w"));
        assert!(s.end_time >= s.start_time);
        assert!(matches!(&s.status, Status::Error { description } if description.contains("boom")));
    }
    assert_eq!(
        attempts
            .iter()
            .map(|d| (
                attr(d, "jobplane.attempt").unwrap(),
                attr(d, "jobplane.outcome").unwrap()
            ))
            .collect::<Vec<_>>(),
        [("1".into(), "QUEUED".into()), ("2".into(), "FAILED".into())]
    );
    // Their contexts are what the workers got.
    for (d, sc) in attempts.iter().zip([&first_sc, &second_sc]) {
        assert_eq!(d.span_context.span_id(), sc.span_id());
    }
    // The first attempt waited for a worker, and says so, then was dispatched.
    let first_span = attempts[0];
    assert_eq!(
        first_span
            .events
            .iter()
            .map(|e| e.name.as_ref())
            .collect::<Vec<_>>(),
        ["waiting", "dispatched"]
    );
    assert_eq!(
        attr(first_span, "jobplane.waiting_for").as_deref(),
        Some("worker(queue=mail)")
    );
}

#[test]
fn a_job_that_expires_waiting_is_an_error_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let mut core = Core::new(EngineConfig {
        job_spans: true,
        ..Default::default()
    });
    let mut out = Outbox::default();
    let mut s = spec(
        Some(TraceContext {
            traceparent: format!("00-{TRACE_ID}-{ACCEPT_SPAN}-01"),
            tracestate: String::new(),
        }),
        0,
    );
    s.max_wait = Some(Duration::from_secs(1));
    let [Submitted::Created(job)] = &core.submit(vec![s], Timestamp::now(), &mut out).unwrap()[..]
    else {
        panic!("a new job");
    };
    core.fire(
        super::timers::Timer::MaxWait(job.id),
        Timestamp::now(),
        &mut out,
    );
    assert!(core.active_job(job.id).is_none(), "expired");
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let [span] = &spans[..] else {
        panic!("one span: {spans:#?}");
    };
    assert_eq!(span.name, "attempt mail");
    assert_eq!(attr(span, "jobplane.outcome").as_deref(), Some("EXPIRED"));
    assert_eq!(
        attr(span, "jobplane.waiting_for").as_deref(),
        Some("worker(queue=mail)")
    );
    assert!(matches!(&span.status, Status::Error { .. }));
    assert!(span.events.iter().all(|e| e.name != "dispatched"));
}
