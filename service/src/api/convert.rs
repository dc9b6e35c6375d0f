//! Wire ↔ domain conversion, with validation. Generated types stop here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jobplane_proto::pb;
use uuid::Uuid;

use crate::engine::model::*;
use crate::engine::{
    CancelOutcome, EngineError, Outcome, PoolInfo, QueueInfo, Report, ReportKind, WorkerHello,
    WorkerInfo,
};

/// Largest accepted payload or result.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Most labels per job or worker.
pub const MAX_LABELS: usize = 32;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 128;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Largest output chunk.
pub const MAX_OUTPUT_CHUNK: usize = 64 << 10;
/// Most jobs per batch submit or multi-wait.
pub const MAX_BATCH: usize = 10_000;
/// Longest wait a rate-limit report can impose.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted duration (run timeout, max wait, back-off).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Most pools in one job's capacity request.
pub const MAX_POOL_REQUESTS: usize = 16;
/// Most units per pool request, per usage report, and per pool's `max_units`.
pub const MAX_UNITS: usize = 16;
/// Most rate limits per pool.
pub const MAX_RATES: usize = 16;
/// Largest CPU a job can ask for or a worker can offer, in cores.
pub const MAX_CPU: f64 = 1_000_000.0;
/// Shortest refill interval of a rate limit.
pub const MIN_RATE_PER: Duration = Duration::from_millis(1);

type R<T> = Result<T, EngineError>;

fn inv(field: &str, message: impl Into<String>) -> EngineError {
    EngineError::invalid(field, message)
}

/// Parses a namespace; empty means `default`.
pub fn namespace(s: &str, field: &str) -> R<Name> {
    if s.is_empty() {
        Ok(Name::default_namespace())
    } else {
        Name::parse(s).map_err(|m| inv(field, m))
    }
}

/// Parses a required name.
pub fn name(s: &str, field: &str) -> R<Name> {
    Name::parse(s).map_err(|m| inv(field, m))
}

/// Parses a job id.
pub fn job_id(s: &str, field: &str) -> R<JobId> {
    if s.is_empty() {
        return Err(inv(field, "must not be empty"));
    }
    Uuid::parse_str(s)
        .map(JobId)
        .map_err(|_| inv(field, format!("{s:?} is not a job id (a UUID)")))
}

/// Parses a duration field.
pub fn duration(d: Option<&prost_types::Duration>, field: &str) -> R<Option<Duration>> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(inv(field, "must not be negative"));
    }
    let d = Duration::try_from(*d).map_err(|e| inv(field, e.to_string()))?;
    if d > MAX_DURATION {
        return Err(inv(field, "must be at most 366 days"));
    }
    Ok(Some(d))
}

/// A duration as a wire value.
pub fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

/// A timestamp field.
pub fn timestamp(t: Option<&prost_types::Timestamp>, field: &str) -> R<Option<Timestamp>> {
    let Some(t) = t else { return Ok(None) };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(inv(field, "nanos out of range"));
    }
    let us = t
        .seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(t.nanos as i64 / 1000))
        .ok_or_else(|| inv(field, "out of range"))?;
    Ok(Some(Timestamp(us)))
}

/// A timestamp as a wire value.
pub fn pb_timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1_000_000),
        nanos: (t.0.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Parses a job state; UNSPECIFIED is rejected.
pub fn state(v: i32, field: &str) -> R<JobState> {
    match pb::JobState::try_from(v) {
        Ok(pb::JobState::Queued) => Ok(JobState::Queued),
        Ok(pb::JobState::Leased) => Ok(JobState::Leased),
        Ok(pb::JobState::Running) => Ok(JobState::Running),
        Ok(pb::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(pb::JobState::Failed) => Ok(JobState::Failed),
        Ok(pb::JobState::Cancelled) => Ok(JobState::Cancelled),
        Ok(pb::JobState::TimedOut) => Ok(JobState::TimedOut),
        Ok(pb::JobState::Expired) => Ok(JobState::Expired),
        Ok(pb::JobState::Unspecified) => Err(inv(field, "JOB_STATE_UNSPECIFIED is not a state")),
        Err(_) => Err(inv(field, format!("unknown job state {v}"))),
    }
}

/// A job state as a wire value.
pub fn pb_state(s: JobState) -> pb::JobState {
    match s {
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

/// Validates labels.
pub fn labels(
    map: std::collections::HashMap<String, String>,
    field: &str,
) -> R<BTreeMap<String, String>> {
    if map.len() > MAX_LABELS {
        return Err(inv(field, format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in &map {
        if k.is_empty() || k.len() > MAX_LABEL_LEN {
            return Err(inv(
                &format!("{field}[{k:?}]"),
                format!("label keys must be 1-{MAX_LABEL_LEN} bytes"),
            ));
        }
        if v.len() > MAX_LABEL_LEN {
            return Err(inv(
                &format!("{field}[{k:?}]"),
                format!("label values must be at most {MAX_LABEL_LEN} bytes"),
            ));
        }
    }
    Ok(map.into_iter().collect())
}

/// Validates a retry policy.
pub fn retry_policy(p: Option<pb::RetryPolicy>, field: &str) -> R<Option<RetryPolicy>> {
    let Some(p) = p else { return Ok(None) };
    let d = RetryPolicy::default();
    if p.max_retries > 1000 {
        return Err(inv(&format!("{field}.max_retries"), "must be at most 1000"));
    }
    let multiplier = if p.multiplier == 0.0 {
        d.multiplier
    } else {
        p.multiplier
    };
    if !(1.0..=100.0).contains(&multiplier) {
        return Err(inv(
            &format!("{field}.multiplier"),
            "must be between 1 and 100",
        ));
    }
    let initial = duration(
        p.initial_backoff.as_ref(),
        &format!("{field}.initial_backoff"),
    )?
    .unwrap_or(d.initial_backoff);
    let max = duration(p.max_backoff.as_ref(), &format!("{field}.max_backoff"))?
        .unwrap_or(d.max_backoff.max(initial));
    if max < initial {
        return Err(inv(
            &format!("{field}.max_backoff"),
            "must not be below initial_backoff",
        ));
    }
    Ok(Some(RetryPolicy {
        max_retries: p.max_retries,
        initial_backoff: initial,
        max_backoff: max,
        multiplier,
    }))
}

/// A retry policy as a wire value.
pub fn pb_retry_policy(p: &RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_retries: p.max_retries,
        initial_backoff: Some(pb_duration(p.initial_backoff)),
        max_backoff: Some(pb_duration(p.max_backoff)),
        multiplier: p.multiplier,
    }
}

/// Validates a job spec; `f` is the field path of the spec (`spec`, `specs[3]`).
pub fn spec(s: Option<pb::JobSpec>, f: &str) -> R<JobSpec> {
    let s = s.ok_or_else(|| inv(f, "is required"))?;
    if s.payload.len() > MAX_PAYLOAD {
        return Err(inv(
            &format!("{f}.payload"),
            format!(
                "{} bytes is over the limit of {MAX_PAYLOAD}",
                s.payload.len()
            ),
        ));
    }
    if s.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(inv(
            &format!("{f}.idempotency_key"),
            format!("must be at most {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    let run_timeout = duration(s.run_timeout.as_ref(), &format!("{f}.run_timeout"))?;
    if run_timeout == Some(Duration::ZERO) {
        return Err(inv(
            &format!("{f}.run_timeout"),
            "must be positive (unset = none)",
        ));
    }
    let demand = Demand {
        pools: pool_requests(s.pools, &format!("{f}.pools"))?,
        resources: resources(s.resources.as_ref(), &format!("{f}.resources"))?,
        selector: labels(s.selector, &format!("{f}.selector"))?,
    };
    Ok(JobSpec {
        namespace: namespace(&s.namespace, &format!("{f}.namespace"))?,
        queue: name(&s.queue, &format!("{f}.queue"))?,
        payload: s.payload,
        labels: Arc::new(labels(s.labels, &format!("{f}.labels"))?),
        priority: s.priority,
        idempotency_key: (!s.idempotency_key.is_empty()).then_some(s.idempotency_key),
        demand: Arc::new(demand),
        run_timeout,
        max_wait: duration(s.max_wait.as_ref(), &format!("{f}.max_wait"))?,
        retry_policy: retry_policy(s.retry_policy, &format!("{f}.retry_policy"))?,
        scheduled_at: match timestamp(s.scheduled_at.as_ref(), &format!("{f}.scheduled_at"))? {
            Some(t) if t > Timestamp::now().plus(MAX_DURATION) => {
                return Err(inv(
                    &format!("{f}.scheduled_at"),
                    "must be at most 366 days ahead",
                ))
            }
            other => other,
        },
        trace: None,
    })
}

/// A job as a wire value.
pub fn pb_job(j: &Job) -> pb::Job {
    pb::Job {
        id: j.id.to_string(),
        namespace: j.namespace.to_string(),
        queue: j.queue.to_string(),
        payload: j.payload.clone(),
        labels: j
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        priority: j.priority,
        idempotency_key: j.idempotency_key.clone().unwrap_or_default(),
        state: pb_state(j.state) as i32,
        attempt: j.attempt,
        retries_used: j.retries_used,
        retry_policy: Some(pb_retry_policy(&j.retry_policy)),
        run_timeout: j.run_timeout.map(pb_duration),
        max_wait: j.max_wait.map(pb_duration),
        result: j.result.clone().unwrap_or_default(),
        error: j.error.as_ref().map(pb_error),
        waiting_for: j.waiting_for.clone(),
        progress: j.progress,
        worker_id: j
            .worker_id
            .as_ref()
            .map(|w| w.to_string())
            .unwrap_or_default(),
        cancel_requested: j.cancel_requested,
        created_at: Some(pb_timestamp(j.created_at)),
        scheduled_at: Some(pb_timestamp(j.scheduled_at)),
        started_at: j.started_at.map(pb_timestamp),
        finished_at: j.finished_at.map(pb_timestamp),
        updated_at: Some(pb_timestamp(j.updated_at)),
        last_seq: j.last_seq,
        pools: j.demand.pools.iter().map(pb_pool_request).collect(),
        resources: (!j.demand.resources.is_zero()).then(|| pb_resources(&j.demand.resources)),
        selector: j
            .demand
            .selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        pool: j.pool.as_ref().map(ToString::to_string).unwrap_or_default(),
        traceparent: j
            .trace
            .as_ref()
            .map(|t| t.traceparent.clone())
            .unwrap_or_default(),
        tracestate: j
            .trace
            .as_ref()
            .map(|t| t.tracestate.clone())
            .unwrap_or_default(),
    }
}

/// Validates a unit map (`units` of a pool request, `max_units`, usage); `f` is the map's field
/// path, each entry is named `f["unit"]`. `min` is the smallest accepted amount.
fn units(map: std::collections::HashMap<String, u64>, f: &str, min: u64) -> R<BTreeMap<Unit, u64>> {
    if map.len() > MAX_UNITS {
        return Err(inv(f, format!("at most {MAX_UNITS} units")));
    }
    let map: BTreeMap<Unit, u64> = map.into_iter().collect();
    for (unit, amount) in &map {
        let field = format!("{f}[{unit:?}]");
        validate_unit(unit).map_err(|m| inv(&field, format!("unit name {m}")))?;
        if *amount < min {
            return Err(inv(&field, format!("must be at least {min}")));
        }
    }
    Ok(map)
}

/// Validates a capacity request; `f` is its field path (`spec.pools`).
pub fn pool_requests(reqs: Vec<pb::PoolRequest>, f: &str) -> R<Vec<PoolRequest>> {
    if reqs.len() > MAX_POOL_REQUESTS {
        return Err(inv(f, format!("at most {MAX_POOL_REQUESTS} pools per job")));
    }
    let mut out: Vec<PoolRequest> = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.into_iter().enumerate() {
        let pf = format!("{f}[{i}]");
        let pool = name(&r.pool, &format!("{pf}.pool"))?;
        if let Some(j) = out.iter().position(|p| p.pool == pool) {
            return Err(inv(
                &format!("{pf}.pool"),
                format!("pool {pool} is already requested by {f}[{j}]"),
            ));
        }
        let mut units = units(r.units, &format!("{pf}.units"), 1)?;
        // Every attempt is one request unless the request says otherwise.
        units.entry(DEFAULT_UNIT.to_owned()).or_insert(1);
        out.push(PoolRequest {
            pool,
            units,
            max_wait: duration(r.max_wait.as_ref(), &format!("{pf}.max_wait"))?,
        });
    }
    Ok(out)
}

/// A pool request as a wire value.
fn pb_pool_request(r: &PoolRequest) -> pb::PoolRequest {
    pb::PoolRequest {
        pool: r.pool.to_string(),
        units: pb_units(&r.units),
        max_wait: r.max_wait.map(pb_duration),
    }
}

fn pb_units(units: &BTreeMap<Unit, u64>) -> std::collections::HashMap<String, u64> {
    units.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// Validates resources (unset = none); CPU in cores becomes thousandths, rounded up.
pub fn resources(r: Option<&pb::Resources>, f: &str) -> R<Resources> {
    let Some(r) = r else {
        return Ok(Resources::default());
    };
    Ok(Resources {
        cpu_millis: cpu_millis(r.cpu).map_err(|m| inv(&format!("{f}.cpu"), m))?,
        memory_bytes: r.memory_bytes,
    })
}

/// Cores as thousandths of a core, rounded up (`0.0001` is one milli); a value within float
/// error of a whole milli is that milli (`1.1` is 1100, not 1101).
fn cpu_millis(cpu: f64) -> Result<u64, String> {
    if !cpu.is_finite() || cpu < 0.0 {
        return Err("must be a finite number of cores, not negative".into());
    }
    if cpu > MAX_CPU {
        return Err(format!("must be at most {MAX_CPU} cores"));
    }
    let m = cpu * 1000.0;
    let nearest = m.round();
    let millis = if (m - nearest).abs() < 1e-6 {
        nearest
    } else {
        m.ceil()
    };
    // Bounded by MAX_CPU * 1000 above, so the cast is exact.
    Ok(millis as u64)
}

/// Resources as a wire value.
pub fn pb_resources(r: &Resources) -> pb::Resources {
    pb::Resources {
        cpu: r.cpu_millis as f64 / 1000.0,
        memory_bytes: r.memory_bytes,
    }
}

/// Validates a pool's settings; `f` is its field path (`config`).
pub fn pool_config(c: Option<pb::PoolConfig>, f: &str) -> R<PoolConfig> {
    let c = c.unwrap_or_default();
    if c.max_units.is_empty() && c.rates.is_empty() {
        return Err(inv(
            f,
            "must set at least one of max_units and rates (a pool limits something)",
        ));
    }
    let max_units = units(c.max_units, &format!("{f}.max_units"), 1)?;
    if c.rates.len() > MAX_RATES {
        return Err(inv(
            &format!("{f}.rates"),
            format!("at most {MAX_RATES} rate limits"),
        ));
    }
    let rates = c
        .rates
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let rf = format!("{f}.rates[{i}]");
            validate_unit(&r.unit).map_err(|m| inv(&format!("{rf}.unit"), m))?;
            if r.amount == 0 {
                return Err(inv(&format!("{rf}.amount"), "must be at least 1"));
            }
            let per = duration(r.per.as_ref(), &format!("{rf}.per"))?
                .ok_or_else(|| inv(&format!("{rf}.per"), "is required"))?;
            if per < MIN_RATE_PER {
                return Err(inv(&format!("{rf}.per"), "must be at least 1ms"));
            }
            Ok(RateLimit {
                unit: r.unit,
                amount: r.amount,
                per,
                burst: if r.burst == 0 { r.amount } else { r.burst },
            })
        })
        .collect::<R<Vec<_>>>()?;
    let weights = c
        .weights
        .into_iter()
        .map(|(ns, w)| {
            let wf = format!("{f}.weights[{ns:?}]");
            let ns = name(&ns, &wf)?;
            if w == 0 {
                return Err(inv(&wf, "must be at least 1"));
            }
            Ok((ns, w))
        })
        .collect::<R<BTreeMap<_, _>>>()?;
    if !weights.is_empty() && !c.shared {
        return Err(inv(
            &format!("{f}.weights"),
            "only a shared pool has weights (set shared)",
        ));
    }
    Ok(PoolConfig {
        max_units,
        rates,
        shared: c.shared,
        weights,
    })
}

/// A pool's settings as a wire value.
pub fn pb_pool_config(c: &PoolConfig) -> pb::PoolConfig {
    pb::PoolConfig {
        max_units: pb_units(&c.max_units),
        rates: c
            .rates
            .iter()
            .map(|r| pb::RateLimit {
                unit: r.unit.clone(),
                amount: r.amount,
                per: Some(pb_duration(r.per)),
                burst: r.burst,
            })
            .collect(),
        shared: c.shared,
        weights: c
            .weights
            .iter()
            .map(|(ns, w)| (ns.to_string(), *w))
            .collect(),
    }
}

/// A pool as a wire value.
pub fn pb_pool(p: &PoolInfo) -> pb::PoolInfo {
    pb::PoolInfo {
        namespace: p.key.namespace.to_string(),
        name: p.key.name.to_string(),
        config: Some(pb_pool_config(&p.config)),
        in_use: pb_units(&p.in_use),
        tokens: p.tokens.clone(),
        running: p.running,
        waiting: p.waiting,
        cooldown_until: p.cooldown_until.map(pb_timestamp),
        epoch: p.epoch,
    }
}

fn pb_error(e: &JobError) -> pb::JobError {
    pb::JobError {
        reason: e.reason.clone(),
        message: e.message.clone(),
    }
}

/// An event as a wire value.
pub fn pb_event(e: &Event) -> pb::JobEvent {
    let kind = match &e.kind {
        EventKind::State {
            from,
            to,
            attempt,
            error,
            waiting_for,
        } => pb::job_event::Kind::State(pb::StateChange {
            from: from.map_or(pb::JobState::Unspecified, pb_state) as i32,
            to: pb_state(*to) as i32,
            attempt: *attempt,
            error: error.as_ref().map(pb_error),
            result: e.data.clone(),
            waiting_for: waiting_for.clone(),
        }),
        EventKind::Progress {
            percent,
            message,
            attempt,
        } => pb::job_event::Kind::Progress(pb::Progress {
            percent: *percent,
            message: message.clone(),
            attempt: *attempt,
        }),
        EventKind::Output {
            stream,
            attempt,
            truncated,
        } => pb::job_event::Kind::Output(pb::Output {
            stream: match stream {
                OutputStream::Stdout => pb::OutputStream::Stdout,
                OutputStream::Stderr => pb::OutputStream::Stderr,
            } as i32,
            data: e.data.clone(),
            attempt: *attempt,
            truncated: *truncated,
        }),
    };
    pb::JobEvent {
        seq: e.seq,
        job_id: e.job_id.to_string(),
        time: Some(pb_timestamp(e.time)),
        kind: Some(kind),
    }
}

/// What a cancel did, as a wire value.
pub fn pb_cancel_outcome(o: CancelOutcome) -> pb::CancelOutcome {
    match o {
        CancelOutcome::Cancelled => pb::CancelOutcome::Cancelled,
        CancelOutcome::Requested => pb::CancelOutcome::Requested,
        CancelOutcome::AlreadyTerminal => pb::CancelOutcome::AlreadyTerminal,
    }
}

/// Validates a queue config.
pub fn queue_config(c: Option<pb::QueueConfig>, f: &str) -> R<QueueConfig> {
    let c = c.unwrap_or_default();
    let run = duration(
        c.default_run_timeout.as_ref(),
        &format!("{f}.default_run_timeout"),
    )?;
    if run == Some(Duration::ZERO) {
        return Err(inv(
            &format!("{f}.default_run_timeout"),
            "must be positive (unset = none)",
        ));
    }
    Ok(QueueConfig {
        max_concurrency: c.max_concurrency,
        default_run_timeout: run,
        default_retry_policy: retry_policy(
            c.default_retry_policy,
            &format!("{f}.default_retry_policy"),
        )?,
        max_depth: c.max_depth,
        paused: c.paused,
        default_max_wait: duration(
            c.default_max_wait.as_ref(),
            &format!("{f}.default_max_wait"),
        )?,
        reject_unplaceable: c.reject_unplaceable,
    })
}

/// A queue as a wire value.
pub fn pb_queue(q: &QueueInfo) -> pb::QueueInfo {
    pb::QueueInfo {
        namespace: q.key.namespace.to_string(),
        name: q.key.name.to_string(),
        config: Some(pb::QueueConfig {
            max_concurrency: q.config.max_concurrency,
            default_run_timeout: q.config.default_run_timeout.map(pb_duration),
            default_retry_policy: q.config.default_retry_policy.as_ref().map(pb_retry_policy),
            max_depth: q.config.max_depth,
            paused: q.config.paused,
            default_max_wait: q.config.default_max_wait.map(pb_duration),
            reject_unplaceable: q.config.reject_unplaceable,
        }),
        depth: q.depth,
        running: q.running,
        oldest_queued_at: q.oldest_queued_at.map(pb_timestamp),
        workers: q.workers,
    }
}

/// A worker as a wire value.
pub fn pb_worker(w: &WorkerInfo) -> pb::WorkerInfo {
    pb::WorkerInfo {
        id: w.id.to_string(),
        namespace: w.namespace.to_string(),
        name: w.name.clone(),
        queues: w.queues.iter().map(|q| q.to_string()).collect(),
        concurrency: w.concurrency,
        running: w.running,
        draining: w.draining,
        connected: w.connected,
        labels: w
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        lease_expires_at: Some(pb_timestamp(w.lease_expires_at)),
        resources: Some(pb_resources(&w.resources)),
        resources_in_use: Some(pb_resources(&w.resources_in_use)),
    }
}

/// Validates a worker hello.
pub fn hello(h: pb::WorkerHello) -> R<WorkerHello> {
    if h.worker_id.is_empty() || h.worker_id.len() > 128 {
        return Err(inv("hello.worker_id", "must be 1-128 bytes"));
    }
    if h.queues.is_empty() {
        return Err(inv("hello.queues", "must name at least one queue"));
    }
    if h.queues.len() > 256 {
        return Err(inv("hello.queues", "at most 256 queues"));
    }
    if !(1..=10_000).contains(&h.concurrency) {
        return Err(inv("hello.concurrency", "must be 1-10000"));
    }
    let queues = h
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| name(q, &format!("hello.queues[{i}]")))
        .collect::<R<Vec<_>>>()?;
    let running = h
        .running
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok((
                job_id(&r.job_id, &format!("hello.running[{i}].job_id"))?,
                r.attempt,
            ))
        })
        .collect::<R<Vec<_>>>()?;
    Ok(WorkerHello {
        worker_id: WorkerId(h.worker_id.into()),
        namespace: namespace(&h.namespace, "hello.namespace")?,
        queues,
        concurrency: h.concurrency,
        labels: labels(h.labels, "hello.labels")?,
        resources: resources(h.resources.as_ref(), "hello.resources")?,
        name: h.name.chars().take(256).collect(),
        running,
    })
}

/// Validates one worker report.
pub fn report(r: pb::WorkerReport, i: usize) -> R<Report> {
    let f = format!("reports[{i}]");
    let job_id = job_id(&r.job_id, &format!("{f}.job_id"))?;
    let kind = match r.kind {
        None => return Err(inv(&format!("{f}.kind"), "is required")),
        Some(pb::worker_report::Kind::Ack(_)) => ReportKind::Ack,
        Some(pb::worker_report::Kind::Progress(p)) => {
            if !(0.0..=100.0).contains(&p.percent) {
                return Err(inv(&format!("{f}.progress.percent"), "must be 0-100"));
            }
            ReportKind::Progress {
                percent: p.percent,
                message: p.message.chars().take(1024).collect(),
            }
        }
        Some(pb::worker_report::Kind::Output(o)) => {
            if o.data.len() > MAX_OUTPUT_CHUNK {
                return Err(inv(
                    &format!("{f}.output.data"),
                    format!("chunks must be at most {MAX_OUTPUT_CHUNK} bytes"),
                ));
            }
            let stream = match pb::OutputStream::try_from(o.stream) {
                Ok(pb::OutputStream::Stdout) => OutputStream::Stdout,
                Ok(pb::OutputStream::Stderr) => OutputStream::Stderr,
                _ => {
                    return Err(inv(
                        &format!("{f}.output.stream"),
                        "must be STDOUT or STDERR",
                    ))
                }
            };
            ReportKind::Output {
                stream,
                data: o.data,
            }
        }
        Some(pb::worker_report::Kind::Outcome(o)) => {
            let outcome = match o.kind {
                None => return Err(inv(&format!("{f}.outcome.kind"), "is required")),
                Some(pb::attempt_outcome::Kind::Success(s)) => {
                    if s.result.len() > MAX_PAYLOAD {
                        // The attempt ended either way: record why its result was refused
                        // rather than leaving the job running.
                        Outcome::Failure {
                            message: format!(
                                "the result of {} bytes is over the limit of {MAX_PAYLOAD}",
                                s.result.len()
                            ),
                            retryable: false,
                        }
                    } else {
                        Outcome::Success(s.result)
                    }
                }
                Some(pb::attempt_outcome::Kind::Failure(e)) => Outcome::Failure {
                    message: e.message.chars().take(4096).collect(),
                    retryable: e.retryable,
                },
                Some(pb::attempt_outcome::Kind::Cancelled(_)) => Outcome::Cancelled,
                Some(pb::attempt_outcome::Kind::RateLimited(rl)) => Outcome::RateLimited {
                    pool: (!rl.pool.is_empty()).then_some(rl.pool.chars().take(128).collect()),
                    // Whatever the upstream said, the job comes back within a day.
                    retry_after: rl
                        .retry_after
                        .and_then(|d| Duration::try_from(d).ok())
                        .unwrap_or(Duration::from_secs(1))
                        .min(MAX_RETRY_AFTER),
                },
            };
            ReportKind::Outcome(outcome)
        }
        Some(pb::worker_report::Kind::Usage(u)) => {
            // Actual usage may be zero (nothing was used after all).
            ReportKind::Usage(units(u.units, &format!("{f}.usage.units"), 0)?)
        }
    };
    Ok(Report {
        job_id,
        attempt: r.attempt,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: EngineError) -> String {
        match e {
            EngineError::InvalidArgument { field, .. } => field,
            other => panic!("not an invalid argument: {other:?}"),
        }
    }

    fn req(pool: &str, units: &[(&str, u64)], max_wait_ms: Option<u64>) -> pb::PoolRequest {
        pb::PoolRequest {
            pool: pool.into(),
            units: units.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            max_wait: max_wait_ms.map(|ms| pb_duration(Duration::from_millis(ms))),
        }
    }

    fn spec_with(f: impl FnOnce(&mut pb::JobSpec)) -> R<JobSpec> {
        let mut s = pb::JobSpec {
            queue: "q".into(),
            ..Default::default()
        };
        f(&mut s);
        spec(Some(s), "spec")
    }

    #[test]
    fn demand_is_validated_and_defaulted() {
        let s = spec_with(|s| {
            s.pools = vec![
                req("gpt-4o", &[("tokens", 1200)], Some(5000)),
                req("gpt-4o-mini", &[], Some(0)),
                req("slow", &[], None),
            ];
            s.resources = Some(pb::Resources {
                cpu: 1.1,
                memory_bytes: 512 << 20,
            });
            s.selector = [("gpu".to_owned(), "a100".to_owned())].into();
        })
        .unwrap();
        let d = &s.demand;
        assert_eq!(d.pools.len(), 3);
        assert_eq!(d.pools[0].pool.as_str(), "gpt-4o");
        assert_eq!(
            d.pools[0].units,
            [("requests".to_owned(), 1), ("tokens".to_owned(), 1200)].into(),
            "every attempt is one request"
        );
        assert_eq!(d.pools[0].max_wait, Some(Duration::from_secs(5)));
        assert_eq!(
            d.pools[1].units,
            [(DEFAULT_UNIT.to_owned(), 1)].into(),
            "no units means requests=1"
        );
        assert_eq!(
            d.pools[1].max_wait,
            Some(Duration::ZERO),
            "zero is fail fast"
        );
        assert_eq!(d.pools[2].max_wait, None, "unset waits without bound");
        assert_eq!(
            d.resources,
            Resources {
                cpu_millis: 1100,
                memory_bytes: 512 << 20
            }
        );
        assert_eq!(d.selector.get("gpu").map(String::as_str), Some("a100"));
        assert!(spec_with(|_| {}).unwrap().demand.is_empty());
    }

    type Edit = Box<dyn FnOnce(&mut pb::JobSpec)>;

    #[test]
    fn bad_demands_name_the_field() {
        let cases: Vec<(&str, Edit)> = vec![
            (
                "spec.pools[1].pool",
                Box::new(|s| s.pools = vec![req("a", &[], None), req("bad pool", &[], None)]),
            ),
            (
                "spec.pools[0].pool",
                Box::new(|s| s.pools = vec![req("", &[], None)]),
            ),
            (
                "spec.pools[1].pool",
                Box::new(|s| s.pools = vec![req("a", &[], None), req("a", &[], Some(0))]),
            ),
            (
                "spec.pools[1].units[\"tokens\"]",
                Box::new(|s| s.pools = vec![req("a", &[], None), req("b", &[("tokens", 0)], None)]),
            ),
            (
                "spec.pools[0].units[\"Tokens\"]",
                Box::new(|s| s.pools = vec![req("a", &[("Tokens", 1)], None)]),
            ),
            (
                "spec.pools[0].units",
                Box::new(|s| {
                    let units: Vec<(String, u64)> = (0..17).map(|i| (format!("u{i}"), 1)).collect();
                    s.pools = vec![pb::PoolRequest {
                        pool: "a".into(),
                        units: units.into_iter().collect(),
                        max_wait: None,
                    }];
                }),
            ),
            (
                "spec.pools",
                Box::new(|s| s.pools = (0..17).map(|i| req(&format!("p{i}"), &[], None)).collect()),
            ),
            (
                "spec.pools[0].max_wait",
                Box::new(|s| {
                    s.pools = vec![pb::PoolRequest {
                        pool: "a".into(),
                        units: Default::default(),
                        max_wait: Some(prost_types::Duration {
                            seconds: -1,
                            nanos: 0,
                        }),
                    }]
                }),
            ),
            (
                "spec.resources.cpu",
                Box::new(|s| {
                    s.resources = Some(pb::Resources {
                        cpu: -0.5,
                        memory_bytes: 0,
                    })
                }),
            ),
            (
                "spec.resources.cpu",
                Box::new(|s| {
                    s.resources = Some(pb::Resources {
                        cpu: f64::NAN,
                        memory_bytes: 0,
                    })
                }),
            ),
            (
                "spec.resources.cpu",
                Box::new(|s| {
                    s.resources = Some(pb::Resources {
                        cpu: f64::INFINITY,
                        memory_bytes: 0,
                    })
                }),
            ),
            (
                "spec.selector[\"\"]",
                Box::new(|s| s.selector = [(String::new(), "x".to_owned())].into()),
            ),
        ];
        for (want, f) in cases {
            assert_eq!(field(spec_with(f).unwrap_err()), want);
        }
    }

    #[test]
    fn cpu_rounds_up_to_a_milli_but_not_for_float_error() {
        for (cores, millis) in [
            (0.0, 0),
            (0.5, 500),
            (1.1, 1100),
            (0.3, 300),
            (2.0, 2000),
            (0.0001, 1),
            (0.0015, 2),
            (MAX_CPU, 1_000_000_000),
        ] {
            assert_eq!(cpu_millis(cores), Ok(millis), "{cores}");
        }
        assert!(cpu_millis(MAX_CPU * 2.0).is_err());
        assert_eq!(
            pb_resources(&Resources {
                cpu_millis: 1500,
                memory_bytes: 7
            }),
            pb::Resources {
                cpu: 1.5,
                memory_bytes: 7
            }
        );
    }

    fn rate(unit: &str, amount: u64, per_ms: Option<u64>, burst: u64) -> pb::RateLimit {
        pb::RateLimit {
            unit: unit.into(),
            amount,
            per: per_ms.map(|ms| pb_duration(Duration::from_millis(ms))),
            burst,
        }
    }

    #[test]
    fn pool_config_is_validated_and_burst_defaults_to_amount() {
        let c = pool_config(
            Some(pb::PoolConfig {
                max_units: [("requests".to_owned(), 2)].into(),
                rates: vec![
                    rate("tokens", 90_000, Some(60_000), 0),
                    rate("requests", 10, Some(1000), 20),
                ],
                ..Default::default()
            }),
            "config",
        )
        .unwrap();
        assert_eq!(c.max_units, [("requests".to_owned(), 2)].into());
        assert_eq!(
            c.rates,
            [
                RateLimit {
                    unit: "tokens".into(),
                    amount: 90_000,
                    per: Duration::from_secs(60),
                    burst: 90_000
                },
                RateLimit {
                    unit: "requests".into(),
                    amount: 10,
                    per: Duration::from_secs(1),
                    burst: 20
                }
            ]
        );
        // Back to the wire unchanged (burst now explicit).
        let raw = pb_pool_config(&c);
        assert_eq!(pool_config(Some(raw), "config").unwrap(), c);

        let bad = |c: pb::PoolConfig| field(pool_config(Some(c), "config").unwrap_err());
        assert_eq!(bad(pb::PoolConfig::default()), "config");
        assert_eq!(
            field(pool_config(None, "config").unwrap_err()),
            "config",
            "a pool limits something"
        );
        assert_eq!(
            bad(pb::PoolConfig {
                max_units: [("requests".to_owned(), 0)].into(),
                rates: vec![],
                ..Default::default()
            }),
            "config.max_units[\"requests\"]"
        );
        assert_eq!(
            bad(pb::PoolConfig {
                max_units: [("no spaces".to_owned(), 1)].into(),
                rates: vec![],
                ..Default::default()
            }),
            "config.max_units[\"no spaces\"]"
        );
        for (r, want) in [
            (rate("", 1, Some(1000), 0), "config.rates[1].unit"),
            (rate("tokens", 0, Some(1000), 0), "config.rates[1].amount"),
            (rate("tokens", 1, None, 0), "config.rates[1].per"),
            (rate("tokens", 1, Some(0), 0), "config.rates[1].per"),
        ] {
            assert_eq!(
                bad(pb::PoolConfig {
                    max_units: Default::default(),
                    rates: vec![rate("requests", 1, Some(1), 0), r],
                    ..Default::default()
                }),
                want
            );
        }
        assert_eq!(
            bad(pb::PoolConfig {
                max_units: Default::default(),
                rates: (0..17)
                    .map(|_| rate("requests", 1, Some(1000), 0))
                    .collect(),
                ..Default::default()
            }),
            "config.rates"
        );
        let one = || pb::PoolConfig {
            max_units: [("requests".to_owned(), 1)].into(),
            ..Default::default()
        };
        assert_eq!(
            bad(pb::PoolConfig {
                weights: [("team".to_owned(), 2)].into(),
                ..one()
            }),
            "config.weights"
        );
        assert_eq!(
            bad(pb::PoolConfig {
                shared: true,
                weights: [("team".to_owned(), 0)].into(),
                ..one()
            }),
            "config.weights[\"team\"]"
        );
        assert_eq!(
            bad(pb::PoolConfig {
                shared: true,
                weights: [("no spaces".to_owned(), 1)].into(),
                ..one()
            }),
            "config.weights[\"no spaces\"]"
        );
        let c = pool_config(
            Some(pb::PoolConfig {
                shared: true,
                weights: [("team".to_owned(), 3)].into(),
                ..one()
            }),
            "config",
        )
        .unwrap();
        assert_eq!(c.weight(&Name::parse("team").unwrap()), 3);
        assert_eq!(c.weight(&Name::parse("other").unwrap()), 1);
    }

    #[test]
    fn usage_reports_and_hello_resources() {
        let usage = |units: &[(&str, u64)]| pb::WorkerReport {
            job_id: "0190f1c2-0000-7000-8000-000000000000".into(),
            attempt: 1,
            kind: Some(pb::worker_report::Kind::Usage(pb::Usage {
                units: units.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            })),
        };
        let r = report(usage(&[("tokens", 800), ("requests", 0)]), 0).unwrap();
        match r.kind {
            ReportKind::Usage(units) => assert_eq!(
                units,
                [("requests".to_owned(), 0), ("tokens".to_owned(), 800)].into()
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            field(report(usage(&[("Bad", 1)]), 2).unwrap_err()),
            "reports[2].usage.units[\"Bad\"]"
        );

        let h = |resources| pb::WorkerHello {
            worker_id: "w".into(),
            queues: vec!["q".into()],
            concurrency: 1,
            resources,
            ..Default::default()
        };
        assert_eq!(hello(h(None)).unwrap().resources, Resources::default());
        assert_eq!(
            hello(h(Some(pb::Resources {
                cpu: 4.0,
                memory_bytes: 8 << 30
            })))
            .unwrap()
            .resources,
            Resources {
                cpu_millis: 4000,
                memory_bytes: 8 << 30
            }
        );
        assert_eq!(
            field(
                hello(h(Some(pb::Resources {
                    cpu: -1.0,
                    memory_bytes: 0
                })))
                .unwrap_err()
            ),
            "hello.resources.cpu"
        );
    }
}
