//! Conversions between the wire types (`jobplane_proto::pb`) and the SDK's types. This is the
//! only module that knows both; responses are checked here once (a missing required field or an
//! unspecified enum is a [`Error::Decode`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use jobplane_proto::pb;

use crate::error::{Error, Result};
use crate::types::{
    CancelOutcome, CancelResult, EventKind, Job, JobError, JobEvent, JobPage, JobSpec, JobState,
    ListFilter, OutputStream, PoolConfig, PoolInfo, PoolRequest, QueueConfig, QueueInfo, RateLimit,
    Resources, RetryPolicy, Submitted, WaitManyResult, WaitMode, WaitResult, WorkerInfo,
};

// ---- well-known types -------------------------------------------------------------------------

/// Converts a duration to the wire type, saturating at the largest representable one.
pub(crate) fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Always < 1e9, so it fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a wire duration; a negative or malformed one is treated as unset.
pub(crate) fn duration_from_pb(d: Option<prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(d).ok())
}

/// Converts a time to the wire type.
pub(crate) fn time_to_pb(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// Converts a wire timestamp; an unrepresentable one is treated as unset.
pub(crate) fn time_from_pb(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

fn sorted(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

// ---- enums ------------------------------------------------------------------------------------

/// Converts a job state to the wire enum.
pub(crate) fn state_to_pb(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Leased => pb::JobState::Leased,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::TimedOut => pb::JobState::TimedOut,
        JobState::Expired => pb::JobState::Expired,
    }
}

/// Converts a wire job state; `UNSPECIFIED` and unknown values are `None`.
pub(crate) fn state_from_pb_opt(value: i32) -> Option<JobState> {
    match pb::JobState::try_from(value).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Leased => Some(JobState::Leased),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
        pb::JobState::TimedOut => Some(JobState::TimedOut),
        pb::JobState::Expired => Some(JobState::Expired),
    }
}

/// Converts a wire job state that must be set.
pub(crate) fn state_from_pb(value: i32, what: &str) -> Result<JobState> {
    state_from_pb_opt(value).ok_or_else(|| Error::decode(format!("invalid {what}: {value}")))
}

/// Converts an output stream to the wire enum.
pub(crate) fn stream_to_pb(stream: OutputStream) -> pb::OutputStream {
    match stream {
        OutputStream::Stdout => pb::OutputStream::Stdout,
        OutputStream::Stderr => pb::OutputStream::Stderr,
    }
}

fn stream_from_pb(value: i32) -> Result<OutputStream> {
    match pb::OutputStream::try_from(value) {
        Ok(pb::OutputStream::Stdout) => Ok(OutputStream::Stdout),
        Ok(pb::OutputStream::Stderr) => Ok(OutputStream::Stderr),
        Ok(pb::OutputStream::Unspecified) | Err(_) => {
            Err(Error::decode(format!("invalid output stream: {value}")))
        }
    }
}

pub(crate) fn wait_mode_to_pb(mode: WaitMode) -> pb::WaitMode {
    match mode {
        WaitMode::All => pb::WaitMode::All,
        WaitMode::Any => pb::WaitMode::Any,
    }
}

fn cancel_outcome_from_pb(value: i32) -> Result<CancelOutcome> {
    match pb::CancelOutcome::try_from(value) {
        Ok(pb::CancelOutcome::Cancelled) => Ok(CancelOutcome::Cancelled),
        Ok(pb::CancelOutcome::Requested) => Ok(CancelOutcome::Requested),
        Ok(pb::CancelOutcome::AlreadyTerminal) => Ok(CancelOutcome::AlreadyTerminal),
        Ok(pb::CancelOutcome::Unspecified) | Err(_) => {
            Err(Error::decode(format!("invalid cancel outcome: {value}")))
        }
    }
}

// ---- requests ---------------------------------------------------------------------------------

pub(crate) fn retry_policy_to_pb(p: &RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_retries: p.max_retries,
        initial_backoff: p.initial_backoff.map(duration_to_pb),
        max_backoff: p.max_backoff.map(duration_to_pb),
        multiplier: p.multiplier.unwrap_or(0.0),
    }
}

pub(crate) fn retry_policy_from_pb(p: pb::RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        max_retries: p.max_retries,
        initial_backoff: duration_from_pb(p.initial_backoff),
        max_backoff: duration_from_pb(p.max_backoff),
        multiplier: (p.multiplier != 0.0).then_some(p.multiplier),
    }
}

/// Converts a spec, filling in `namespace` when the spec does not name one.
pub(crate) fn spec_to_pb(spec: JobSpec, namespace: &str) -> pb::JobSpec {
    pb::JobSpec {
        namespace: spec.namespace.unwrap_or_else(|| namespace.to_owned()),
        queue: spec.queue,
        payload: spec.payload,
        labels: spec.labels.into_iter().collect(),
        priority: spec.priority,
        idempotency_key: spec.idempotency_key.unwrap_or_default(),
        run_timeout: spec.run_timeout.map(duration_to_pb),
        max_wait: spec.max_wait.map(duration_to_pb),
        retry_policy: spec.retry_policy.as_ref().map(retry_policy_to_pb),
        scheduled_at: spec.scheduled_at.map(time_to_pb),
        pools: spec.pools.into_iter().map(pool_request_to_pb).collect(),
        resources: resources_to_pb(spec.resources),
        selector: spec.selector.into_iter().collect(),
    }
}

fn pool_request_to_pb(r: PoolRequest) -> pb::PoolRequest {
    pb::PoolRequest {
        pool: r.pool,
        units: r.units.into_iter().collect(),
        max_wait: r.max_wait.map(duration_to_pb),
    }
}

/// Converts resources; zero is unset.
pub(crate) fn resources_to_pb(r: Resources) -> Option<pb::Resources> {
    (!r.is_zero()).then_some(pb::Resources {
        cpu: r.cpu,
        memory_bytes: r.memory_bytes,
    })
}

pub(crate) fn pool_config_to_pb(c: &PoolConfig) -> pb::PoolConfig {
    pb::PoolConfig {
        max_units: c.max_units.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        rates: c
            .rates
            .iter()
            .map(|r| pb::RateLimit {
                unit: r.unit.clone(),
                amount: r.amount,
                per: Some(duration_to_pb(r.per)),
                burst: r.burst.unwrap_or(0),
            })
            .collect(),
        shared: c.shared,
        weights: c.weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}

pub(crate) fn list_filter_to_pb(filter: ListFilter, namespace: &str) -> pb::ListJobsRequest {
    pb::ListJobsRequest {
        namespace: namespace.to_owned(),
        queue: filter.queue.unwrap_or_default(),
        states: filter
            .states
            .into_iter()
            .map(|s| state_to_pb(s) as i32)
            .collect(),
        labels: filter.labels.into_iter().collect(),
        created_after: filter.created_after.map(time_to_pb),
        created_before: filter.created_before.map(time_to_pb),
        page_size: filter.page_size.unwrap_or(0),
        page_token: filter.page_token.unwrap_or_default(),
    }
}

pub(crate) fn queue_config_to_pb(c: &QueueConfig) -> pb::QueueConfig {
    pb::QueueConfig {
        max_concurrency: c.max_concurrency.unwrap_or(0),
        default_run_timeout: c.default_run_timeout.map(duration_to_pb),
        default_retry_policy: c.default_retry_policy.as_ref().map(retry_policy_to_pb),
        max_depth: c.max_depth.unwrap_or(0),
        paused: c.paused,
        default_max_wait: c.default_max_wait.map(duration_to_pb),
        reject_unplaceable: c.reject_unplaceable,
    }
}

// ---- responses --------------------------------------------------------------------------------

fn job_error_from_pb(e: pb::JobError) -> Option<JobError> {
    if e.reason.is_empty() && e.message.is_empty() {
        None
    } else {
        Some(JobError {
            reason: e.reason,
            message: e.message,
        })
    }
}

pub(crate) fn job_from_pb(j: pb::Job) -> Result<Job> {
    let state = state_from_pb(j.state, "job state")?;
    let result = if state == JobState::Succeeded || !j.result.is_empty() {
        Some(j.result)
    } else {
        None
    };
    Ok(Job {
        id: j.id,
        namespace: j.namespace,
        queue: j.queue,
        payload: j.payload,
        labels: sorted(j.labels),
        priority: j.priority,
        idempotency_key: non_empty(j.idempotency_key),
        state,
        attempt: j.attempt,
        retries_used: j.retries_used,
        retry_policy: j.retry_policy.map(retry_policy_from_pb),
        run_timeout: duration_from_pb(j.run_timeout),
        max_wait: duration_from_pb(j.max_wait),
        result,
        error: j.error.and_then(job_error_from_pb),
        waiting_for: non_empty(j.waiting_for),
        progress: j.progress,
        worker_id: non_empty(j.worker_id),
        cancel_requested: j.cancel_requested,
        created_at: time_from_pb(j.created_at),
        scheduled_at: time_from_pb(j.scheduled_at),
        started_at: time_from_pb(j.started_at),
        finished_at: time_from_pb(j.finished_at),
        updated_at: time_from_pb(j.updated_at),
        last_seq: j.last_seq,
        pools: j.pools.into_iter().map(pool_request_from_pb).collect(),
        resources: resources_from_pb(j.resources),
        selector: sorted(j.selector),
        pool: non_empty(j.pool),
        traceparent: non_empty(j.traceparent),
        tracestate: non_empty(j.tracestate),
    })
}

fn pool_request_from_pb(r: pb::PoolRequest) -> PoolRequest {
    PoolRequest {
        pool: r.pool,
        units: r.units.into_iter().collect(),
        max_wait: duration_from_pb(r.max_wait),
    }
}

/// Converts resources; unset is zero.
pub(crate) fn resources_from_pb(r: Option<pb::Resources>) -> Resources {
    r.map(|r| Resources {
        cpu: r.cpu,
        memory_bytes: r.memory_bytes,
    })
    .unwrap_or_default()
}

fn required_job(j: Option<pb::Job>) -> Result<Job> {
    job_from_pb(j.ok_or_else(|| Error::missing("job"))?)
}

pub(crate) fn submitted_from_pb(r: pb::SubmitJobResponse) -> Result<Submitted> {
    Ok(Submitted {
        job: required_job(r.job)?,
        created: r.created,
    })
}

pub(crate) fn page_from_pb(r: pb::ListJobsResponse) -> Result<JobPage> {
    Ok(JobPage {
        jobs: r.jobs.into_iter().map(job_from_pb).collect::<Result<_>>()?,
        next_page_token: non_empty(r.next_page_token),
    })
}

pub(crate) fn wait_from_pb(r: pb::WaitJobResponse) -> Result<WaitResult> {
    Ok(WaitResult {
        job: required_job(r.job)?,
        reached: r.reached,
    })
}

pub(crate) fn wait_many_from_pb(r: pb::WaitJobsResponse) -> Result<WaitManyResult> {
    Ok(WaitManyResult {
        results: r
            .results
            .into_iter()
            .map(wait_from_pb)
            .collect::<Result<_>>()?,
        reached: r.reached,
    })
}

pub(crate) fn cancel_from_pb(r: pb::CancelJobResponse) -> Result<CancelResult> {
    Ok(CancelResult {
        job: required_job(r.job)?,
        outcome: cancel_outcome_from_pb(r.outcome)?,
    })
}

pub(crate) fn event_from_pb(e: pb::JobEvent) -> Result<JobEvent> {
    let kind = match e.kind.ok_or_else(|| Error::missing("event.kind"))? {
        pb::job_event::Kind::State(s) => {
            let to = state_from_pb(s.to, "state change target")?;
            let result = if to == JobState::Succeeded || !s.result.is_empty() {
                Some(s.result)
            } else {
                None
            };
            EventKind::State {
                from: state_from_pb_opt(s.from),
                to,
                attempt: s.attempt,
                error: s.error.and_then(job_error_from_pb),
                result,
                waiting_for: non_empty(s.waiting_for),
            }
        }
        pb::job_event::Kind::Progress(p) => EventKind::Progress {
            percent: p.percent,
            message: non_empty(p.message),
            attempt: p.attempt,
        },
        pb::job_event::Kind::Output(o) => EventKind::Output {
            stream: stream_from_pb(o.stream)?,
            data: o.data,
            attempt: o.attempt,
            truncated: o.truncated,
        },
    };
    Ok(JobEvent {
        seq: e.seq,
        job_id: e.job_id,
        time: time_from_pb(e.time),
        kind,
    })
}

pub(crate) fn queue_config_from_pb(c: pb::QueueConfig) -> QueueConfig {
    QueueConfig {
        max_concurrency: (c.max_concurrency != 0).then_some(c.max_concurrency),
        default_run_timeout: duration_from_pb(c.default_run_timeout),
        default_retry_policy: c.default_retry_policy.map(retry_policy_from_pb),
        max_depth: (c.max_depth != 0).then_some(c.max_depth),
        paused: c.paused,
        default_max_wait: duration_from_pb(c.default_max_wait),
        reject_unplaceable: c.reject_unplaceable,
    }
}

pub(crate) fn queue_from_pb(q: pb::QueueInfo) -> QueueInfo {
    QueueInfo {
        namespace: q.namespace,
        name: q.name,
        config: q.config.map(queue_config_from_pb).unwrap_or_default(),
        depth: q.depth,
        running: q.running,
        oldest_queued_at: time_from_pb(q.oldest_queued_at),
        workers: q.workers,
    }
}

pub(crate) fn worker_from_pb(w: pb::WorkerInfo) -> WorkerInfo {
    WorkerInfo {
        id: w.id,
        namespace: w.namespace,
        name: w.name,
        queues: w.queues,
        concurrency: w.concurrency,
        running: w.running,
        draining: w.draining,
        connected: w.connected,
        labels: sorted(w.labels),
        lease_expires_at: time_from_pb(w.lease_expires_at),
        resources: resources_from_pb(w.resources),
        resources_in_use: resources_from_pb(w.resources_in_use),
    }
}

pub(crate) fn pool_config_from_pb(c: pb::PoolConfig) -> PoolConfig {
    PoolConfig {
        max_units: c.max_units.into_iter().collect(),
        rates: c
            .rates
            .into_iter()
            .map(|r| RateLimit {
                unit: r.unit,
                amount: r.amount,
                per: duration_from_pb(r.per).unwrap_or_default(),
                burst: (r.burst != 0).then_some(r.burst),
            })
            .collect(),
        shared: c.shared,
        weights: c.weights.into_iter().collect(),
    }
}

pub(crate) fn pool_from_pb(p: pb::PoolInfo) -> PoolInfo {
    PoolInfo {
        namespace: p.namespace,
        name: p.name,
        config: p.config.map(pool_config_from_pb).unwrap_or_default(),
        in_use: p.in_use.into_iter().collect(),
        tokens: p.tokens,
        running: p.running,
        waiting: p.waiting,
        cooldown_until: time_from_pb(p.cooldown_until),
        epoch: p.epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ts(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 5,
        })
    }

    fn pb_job(state: pb::JobState) -> pb::Job {
        pb::Job {
            id: "j1".into(),
            namespace: "default".into(),
            queue: "q".into(),
            payload: Bytes::from_static(b"{}"),
            labels: [("a".to_owned(), "b".to_owned())].into_iter().collect(),
            priority: 2,
            idempotency_key: String::new(),
            state: state as i32,
            attempt: 1,
            retries_used: 0,
            retry_policy: Some(pb::RetryPolicy {
                max_retries: 3,
                initial_backoff: Some(duration_to_pb(Duration::from_millis(1500))),
                max_backoff: None,
                multiplier: 0.0,
            }),
            run_timeout: Some(duration_to_pb(Duration::from_secs(10))),
            max_wait: None,
            result: Bytes::new(),
            error: Some(pb::JobError::default()),
            waiting_for: "capacity(pool=gpt-4o)".into(),
            progress: 50.0,
            worker_id: String::new(),
            cancel_requested: false,
            created_at: ts(1_700_000_000),
            scheduled_at: None,
            started_at: None,
            finished_at: None,
            updated_at: ts(1_700_000_001),
            last_seq: 7,
            pools: vec![pb::PoolRequest {
                pool: "gpt-4o".into(),
                units: [("tokens".to_owned(), 1200)].into_iter().collect(),
                max_wait: Some(duration_to_pb(Duration::from_secs(5))),
            }],
            resources: Some(pb::Resources {
                cpu: 0.5,
                memory_bytes: 1 << 20,
            }),
            selector: [("gpu".to_owned(), "a100".to_owned())]
                .into_iter()
                .collect(),
            pool: String::new(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        }
    }

    #[test]
    fn job_converts_with_rust_types() {
        let job = job_from_pb(pb_job(pb::JobState::Queued)).unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.idempotency_key, None);
        assert_eq!(job.result, None);
        assert_eq!(job.error, None, "an empty JobError is no error");
        assert_eq!(job.waiting_for.as_deref(), Some("capacity(pool=gpt-4o)"));
        assert_eq!(job.worker_id, None);
        assert_eq!(job.run_timeout, Some(Duration::from_secs(10)));
        let policy = job.retry_policy.unwrap();
        assert_eq!(policy.max_retries, 3);
        assert_eq!(policy.initial_backoff, Some(Duration::from_millis(1500)));
        assert_eq!(policy.multiplier, None);
        assert_eq!(
            job.created_at,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(job.labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(job.last_seq, 7);
        assert_eq!(job.pool, None, "an empty pool is none");
        assert_eq!(
            job.pools,
            [PoolRequest::new("gpt-4o")
                .units("tokens", 1200)
                .max_wait(Duration::from_secs(5))]
        );
        assert_eq!(
            job.resources,
            Resources {
                cpu: 0.5,
                memory_bytes: 1 << 20
            }
        );
        assert_eq!(job.selector.get("gpu").map(String::as_str), Some("a100"));
    }

    #[test]
    fn demand_converts_to_the_wire() {
        let spec = JobSpec::new("q")
            .pool(PoolRequest::new("a").units("tokens", 5))
            .pool(PoolRequest::new("b").max_wait(Duration::ZERO))
            .selector("k", "v");
        let raw = spec_to_pb(spec, "default");
        assert_eq!(raw.pools.len(), 2);
        assert_eq!(raw.pools[0].units.get("tokens"), Some(&5));
        assert_eq!(raw.pools[0].max_wait, None);
        assert!(raw.pools[1].units.is_empty());
        assert_eq!(
            raw.pools[1].max_wait,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 0
            })
        );
        assert_eq!(raw.resources, None, "no resources are unset");
        assert_eq!(raw.selector.get("k").map(String::as_str), Some("v"));
        let raw = spec_to_pb(JobSpec::new("q").cpu(0.25), "default");
        assert_eq!(
            raw.resources,
            Some(pb::Resources {
                cpu: 0.25,
                memory_bytes: 0
            })
        );
    }

    #[test]
    fn pool_config_round_trips_with_zero_burst_as_none() {
        let config = PoolConfig::new()
            .max_units("requests", 2)
            .rate(RateLimit::new("tokens", 90_000, Duration::from_secs(60)))
            .rate(RateLimit::new("requests", 10, Duration::from_secs(1)).burst(20));
        let raw = pool_config_to_pb(&config);
        assert_eq!(raw.rates[0].burst, 0);
        assert_eq!(raw.rates[1].burst, 20);
        assert_eq!(pool_config_from_pb(raw), config);
    }

    #[test]
    fn succeeded_job_always_has_a_result() {
        let job = job_from_pb(pb_job(pb::JobState::Succeeded)).unwrap();
        assert_eq!(job.result, Some(Bytes::new()));
        let mut raw = pb_job(pb::JobState::Succeeded);
        raw.result = Bytes::from_static(br#"{"n":4}"#);
        let job = job_from_pb(raw).unwrap();
        let v: serde_json::Value = job.result_json().unwrap();
        assert_eq!(v["n"], 4);
    }

    #[test]
    fn unspecified_state_is_a_decode_error() {
        let err = job_from_pb(pb_job(pb::JobState::Unspecified)).unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
        let mut raw = pb_job(pb::JobState::Queued);
        raw.state = 99;
        assert!(job_from_pb(raw).is_err());
    }

    #[test]
    fn states_round_trip() {
        for st in JobState::ALL {
            assert_eq!(state_from_pb_opt(state_to_pb(st) as i32), Some(st));
        }
        assert_eq!(state_from_pb_opt(0), None);
    }

    #[test]
    fn spec_fills_namespace_and_optional_fields() {
        let spec = JobSpec::new("q")
            .payload(&b"x"[..])
            .retry_policy(RetryPolicy::new(2).multiplier(3.0))
            .max_wait(Duration::from_millis(250))
            .label("k", "v");
        let raw = spec_to_pb(spec.clone(), "tenant");
        assert_eq!(raw.namespace, "tenant");
        assert_eq!(raw.queue, "q");
        assert_eq!(&raw.payload[..], b"x");
        assert_eq!(raw.idempotency_key, "");
        assert_eq!(raw.run_timeout, None);
        assert_eq!(
            raw.max_wait,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 250_000_000
            })
        );
        let policy = raw.retry_policy.unwrap();
        assert_eq!((policy.max_retries, policy.multiplier), (2, 3.0));
        assert_eq!(raw.labels.get("k").map(String::as_str), Some("v"));
        let raw = spec_to_pb(spec.namespace("own"), "tenant");
        assert_eq!(raw.namespace, "own");
    }

    #[test]
    fn events_convert() {
        let state = event_from_pb(pb::JobEvent {
            seq: 1,
            job_id: "j".into(),
            time: ts(10),
            kind: Some(pb::job_event::Kind::State(pb::StateChange {
                from: 0,
                to: pb::JobState::Queued as i32,
                attempt: 0,
                error: None,
                result: Bytes::new(),
                waiting_for: "queue_slot(queue=q)".into(),
            })),
        })
        .unwrap();
        assert_eq!(
            state.kind,
            EventKind::State {
                from: None,
                to: JobState::Queued,
                attempt: 0,
                error: None,
                result: None,
                waiting_for: Some("queue_slot(queue=q)".into()),
            }
        );
        assert!(!state.is_terminal());

        let done = event_from_pb(pb::JobEvent {
            seq: 5,
            job_id: "j".into(),
            time: None,
            kind: Some(pb::job_event::Kind::State(pb::StateChange {
                from: pb::JobState::Running as i32,
                to: pb::JobState::Succeeded as i32,
                attempt: 1,
                error: None,
                result: Bytes::from_static(b"ok"),
                waiting_for: String::new(),
            })),
        })
        .unwrap();
        assert!(done.is_terminal());

        let out = event_from_pb(pb::JobEvent {
            seq: 3,
            job_id: "j".into(),
            time: None,
            kind: Some(pb::job_event::Kind::Output(pb::Output {
                stream: pb::OutputStream::Stderr as i32,
                data: Bytes::from_static(b"line\n"),
                attempt: 1,
                truncated: false,
            })),
        })
        .unwrap();
        assert!(matches!(
            out.kind,
            EventKind::Output {
                stream: OutputStream::Stderr,
                ..
            }
        ));

        let progress = event_from_pb(pb::JobEvent {
            seq: 4,
            job_id: "j".into(),
            time: None,
            kind: Some(pb::job_event::Kind::Progress(pb::Progress {
                percent: 42.0,
                message: String::new(),
                attempt: 1,
            })),
        })
        .unwrap();
        assert_eq!(
            progress.kind,
            EventKind::Progress {
                percent: 42.0,
                message: None,
                attempt: 1
            }
        );

        let empty = pb::JobEvent {
            seq: 9,
            job_id: "j".into(),
            time: None,
            kind: None,
        };
        assert!(event_from_pb(empty).is_err());
    }

    #[test]
    fn queue_config_round_trips_with_zero_as_unlimited() {
        let config = QueueConfig {
            max_concurrency: Some(4),
            default_run_timeout: Some(Duration::from_secs(60)),
            default_retry_policy: Some(RetryPolicy::new(1)),
            max_depth: None,
            paused: true,
            default_max_wait: None,
            reject_unplaceable: true,
        };
        let raw = queue_config_to_pb(&config);
        assert_eq!(raw.max_depth, 0);
        assert_eq!(queue_config_from_pb(raw), config);
    }

    #[test]
    fn cancel_outcome_and_missing_job() {
        let err = cancel_from_pb(pb::CancelJobResponse {
            job: None,
            outcome: pb::CancelOutcome::Requested as i32,
        })
        .unwrap_err();
        assert!(err.to_string().contains("no `job`"));
        let ok = cancel_from_pb(pb::CancelJobResponse {
            job: Some(pb_job(pb::JobState::Running)),
            outcome: pb::CancelOutcome::Requested as i32,
        })
        .unwrap();
        assert_eq!(ok.outcome, CancelOutcome::Requested);
        assert!(cancel_from_pb(pb::CancelJobResponse {
            job: Some(pb_job(pb::JobState::Running)),
            outcome: 0,
        })
        .is_err());
    }

    #[test]
    fn durations_saturate_and_reject_negatives() {
        let d = duration_to_pb(Duration::MAX);
        assert_eq!(d.seconds, i64::MAX);
        assert_eq!(
            duration_from_pb(Some(prost_types::Duration {
                seconds: -1,
                nanos: 0
            })),
            None
        );
    }
}
