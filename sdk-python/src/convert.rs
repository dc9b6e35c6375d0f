//! Conversions between the Rust SDK's types and the plain Python values the `jobplane`
//! package exchanges with this module: dicts of str/int/float/bytes/None, times as seconds
//! since the Unix epoch, durations as seconds.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jobplane::{
    EventKind, Job, JobEvent, JobSpec, JobState, ListFilter, PoolConfig, PoolInfo, PoolRequest,
    QueueConfig, QueueInfo, RateLimit, RetryPolicy, WaitManyResult, WaitResult, WorkerInfo,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::seconds;

type Dict<'py> = Bound<'py, PyDict>;

/// `d[key]`, with a missing key or `None` as `None`.
pub(crate) fn get<'py, T: FromPyObjectOwned<'py>>(d: &Dict<'py>, key: &str) -> PyResult<Option<T>> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => v.extract::<T>().map(Some).map_err(|e| {
            let e: PyErr = e.into();
            PyValueError::new_err(format!("{key}: {}", e.value(d.py())))
        }),
        _ => Ok(None),
    }
}

fn duration_of(d: &Dict<'_>, key: &str) -> PyResult<Option<Duration>> {
    get::<f64>(d, key)?.map(|s| seconds(s, key)).transpose()
}

fn time_of(d: &Dict<'_>, key: &str) -> PyResult<Option<SystemTime>> {
    Ok(get::<f64>(d, key)?.map(|s| {
        let at = Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::ZERO);
        UNIX_EPOCH + at
    }))
}

fn epoch(t: Option<SystemTime>) -> Option<f64> {
    t.map(|t| match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    })
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

/// A job spec from `{"queue", "payload", "priority", "idempotency_key", "timeout",
/// "max_wait", "retries", "retry_policy", "scheduled_at", "labels", "pools", "cpu", "memory",
/// "selector", "namespace", "traceparent", "tracestate"}`.
pub(crate) fn spec(d: &Dict<'_>) -> PyResult<JobSpec> {
    let queue: String =
        get(d, "queue")?.ok_or_else(|| PyValueError::new_err("queue: is required"))?;
    let mut spec = JobSpec::new(queue);
    if let Some(p) = get::<Vec<u8>>(d, "payload")? {
        spec = spec.payload(p);
    }
    if let Some(ns) = get::<String>(d, "namespace")? {
        spec = spec.namespace(ns);
    }
    if let Some(p) = get::<i32>(d, "priority")? {
        spec.priority = p;
    }
    spec.idempotency_key = get(d, "idempotency_key")?;
    if let Some(t) = duration_of(d, "timeout")? {
        spec = spec.run_timeout(t);
    }
    if let Some(t) = duration_of(d, "max_wait")? {
        spec = spec.max_wait(t);
    }
    if let Some(n) = get::<u32>(d, "retries")? {
        spec = spec.retries(n);
    }
    if let Some(rp) = get::<Bound<'_, PyDict>>(d, "retry_policy")? {
        spec = spec.retry_policy(retry_policy(&rp)?);
    }
    if let Some(at) = time_of(d, "scheduled_at")? {
        spec = spec.scheduled_at(at);
    }
    if let Some(labels) = get::<BTreeMap<String, String>>(d, "labels")? {
        spec.labels = labels;
    }
    if let Some(pools) = get::<Vec<Bound<'_, PyDict>>>(d, "pools")? {
        for p in pools {
            spec = spec.pool(pool_request(&p)?);
        }
    }
    if let Some(cpu) = get::<f64>(d, "cpu")? {
        spec = spec.cpu(cpu);
    }
    if let Some(mem) = get::<u64>(d, "memory")? {
        spec = spec.memory_bytes(mem);
    }
    if let Some(sel) = get::<BTreeMap<String, String>>(d, "selector")? {
        spec.selector = sel;
    }
    spec.traceparent = get(d, "traceparent")?;
    spec.tracestate = get(d, "tracestate")?;
    Ok(spec)
}

fn retry_policy(d: &Dict<'_>) -> PyResult<RetryPolicy> {
    let mut policy = RetryPolicy::new(get(d, "max_retries")?.unwrap_or(0));
    policy.initial_backoff = duration_of(d, "initial_backoff")?;
    policy.max_backoff = duration_of(d, "max_backoff")?;
    policy.multiplier = get(d, "multiplier")?;
    Ok(policy)
}

fn pool_request(d: &Dict<'_>) -> PyResult<PoolRequest> {
    let name: String = get(d, "pool")?.ok_or_else(|| PyValueError::new_err("pool: is required"))?;
    let mut r = PoolRequest::new(name);
    for (unit, n) in get::<BTreeMap<String, u64>>(d, "units")?.unwrap_or_default() {
        r = r.units(unit, n);
    }
    if let Some(w) = duration_of(d, "max_wait")? {
        r = r.max_wait(w);
    }
    Ok(r)
}

/// A list filter from `{"queue", "states", "labels", "created_after", "created_before",
/// "page_size", "page_token"}`.
pub(crate) fn list_filter(d: &Dict<'_>) -> PyResult<ListFilter> {
    let mut f = ListFilter::new();
    f.queue = get(d, "queue")?;
    f.states = states(get::<Vec<String>>(d, "states")?.unwrap_or_default())?;
    f.labels = get(d, "labels")?.unwrap_or_default();
    f.created_after = time_of(d, "created_after")?;
    f.created_before = time_of(d, "created_before")?;
    f.page_size = get(d, "page_size")?;
    f.page_token = get(d, "page_token")?;
    Ok(f)
}

/// Job states from their names (`"SUCCEEDED"`, case-insensitive).
pub(crate) fn states(names: Vec<String>) -> PyResult<Vec<JobState>> {
    names
        .iter()
        .map(|s| {
            s.parse::<JobState>()
                .map_err(|e| PyValueError::new_err(e.to_string()))
        })
        .collect()
}

/// A queue config from `{"max_concurrency", "default_timeout", "default_retries",
/// "max_depth", "paused", "default_max_wait", "reject_unplaceable"}`.
pub(crate) fn queue_config(d: &Dict<'_>) -> PyResult<QueueConfig> {
    Ok(QueueConfig {
        max_concurrency: get(d, "max_concurrency")?,
        default_run_timeout: duration_of(d, "default_timeout")?,
        default_retry_policy: match get::<Bound<'_, PyDict>>(d, "default_retry_policy")? {
            Some(rp) => Some(retry_policy(&rp)?),
            None => get::<u32>(d, "default_retries")?.map(RetryPolicy::new),
        },
        max_depth: get(d, "max_depth")?,
        paused: get(d, "paused")?.unwrap_or(false),
        default_max_wait: duration_of(d, "default_max_wait")?,
        reject_unplaceable: get(d, "reject_unplaceable")?.unwrap_or(false),
    })
}

/// A pool config from `{"max_units": {unit: n}, "rates": [{"unit", "amount", "per",
/// "burst"}], "shared", "weights"}`.
pub(crate) fn pool_config(d: &Dict<'_>) -> PyResult<PoolConfig> {
    let mut c = PoolConfig::new();
    for (unit, n) in get::<BTreeMap<String, u64>>(d, "max_units")?.unwrap_or_default() {
        c = c.max_units(unit, n);
    }
    for r in get::<Vec<Bound<'_, PyDict>>>(d, "rates")?.unwrap_or_default() {
        let unit: String = get(&r, "unit")?.ok_or_else(|| PyValueError::new_err("unit"))?;
        let amount: u64 = get(&r, "amount")?.ok_or_else(|| PyValueError::new_err("amount"))?;
        let per = duration_of(&r, "per")?.ok_or_else(|| PyValueError::new_err("per"))?;
        let mut rate = RateLimit::new(unit, amount, per);
        if let Some(b) = get::<u64>(&r, "burst")? {
            rate = rate.burst(b);
        }
        c = c.rate(rate);
    }
    c = c.shared(get(d, "shared")?.unwrap_or(false));
    for (ns, w) in get::<BTreeMap<String, u32>>(d, "weights")?.unwrap_or_default() {
        c = c.weight(ns, w);
    }
    Ok(c)
}

// ---- to Python ----------------------------------------------------------------------------

fn bytes<'py>(py: Python<'py>, b: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, b)
}

fn error_dict<'py>(py: Python<'py>, e: &jobplane::JobError) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("reason", &e.reason)?;
    d.set_item("message", &e.message)?;
    Ok(d)
}

fn pools_list<'py>(py: Python<'py>, pools: &[PoolRequest]) -> PyResult<Bound<'py, PyList>> {
    let l = PyList::empty(py);
    for p in pools {
        let d = PyDict::new(py);
        d.set_item("pool", &p.pool)?;
        d.set_item("units", &p.units)?;
        d.set_item("max_wait", secs(p.max_wait))?;
        l.append(d)?;
    }
    Ok(l)
}

/// A job as a dict (the Python `Job` wraps it).
pub(crate) fn job<'py>(py: Python<'py>, j: &Job) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &j.id)?;
    d.set_item("namespace", &j.namespace)?;
    d.set_item("queue", &j.queue)?;
    d.set_item("payload", bytes(py, &j.payload))?;
    d.set_item("labels", &j.labels)?;
    d.set_item("priority", j.priority)?;
    d.set_item("idempotency_key", &j.idempotency_key)?;
    d.set_item("state", j.state.as_str())?;
    d.set_item("attempt", j.attempt)?;
    d.set_item("retries_used", j.retries_used)?;
    d.set_item(
        "max_retries",
        j.retry_policy.as_ref().map(|p| p.max_retries),
    )?;
    d.set_item("timeout", secs(j.run_timeout))?;
    d.set_item("max_wait", secs(j.max_wait))?;
    d.set_item("result", j.result.as_ref().map(|r| bytes(py, r)))?;
    d.set_item(
        "error",
        j.error.as_ref().map(|e| error_dict(py, e)).transpose()?,
    )?;
    d.set_item("waiting_for", &j.waiting_for)?;
    d.set_item("progress", j.progress)?;
    d.set_item("worker_id", &j.worker_id)?;
    d.set_item("cancel_requested", j.cancel_requested)?;
    d.set_item("created_at", epoch(j.created_at))?;
    d.set_item("scheduled_at", epoch(j.scheduled_at))?;
    d.set_item("started_at", epoch(j.started_at))?;
    d.set_item("finished_at", epoch(j.finished_at))?;
    d.set_item("updated_at", epoch(j.updated_at))?;
    d.set_item("last_seq", j.last_seq)?;
    d.set_item("pools", pools_list(py, &j.pools)?)?;
    d.set_item("cpu", j.resources.cpu)?;
    d.set_item("memory", j.resources.memory_bytes)?;
    d.set_item("selector", &j.selector)?;
    d.set_item("pool", &j.pool)?;
    d.set_item("traceparent", &j.traceparent)?;
    d.set_item("tracestate", &j.tracestate)?;
    Ok(d)
}

pub(crate) fn wait_result<'py>(py: Python<'py>, w: &WaitResult) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("job", job(py, &w.job)?)?;
    d.set_item("reached", w.reached)?;
    Ok(d)
}

pub(crate) fn wait_many_result<'py>(
    py: Python<'py>,
    w: &WaitManyResult,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let results = PyList::empty(py);
    for r in &w.results {
        results.append(wait_result(py, r)?)?;
    }
    d.set_item("results", results)?;
    d.set_item("reached", w.reached)?;
    Ok(d)
}

/// An event as a dict: `seq`, `job_id`, `time`, `kind` (`state`, `progress`, `output`) and
/// the kind's fields.
pub(crate) fn event<'py>(py: Python<'py>, e: &JobEvent) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("seq", e.seq)?;
    d.set_item("job_id", &e.job_id)?;
    d.set_item("time", epoch(e.time))?;
    match &e.kind {
        EventKind::State {
            from,
            to,
            attempt,
            error,
            result,
            waiting_for,
        } => {
            d.set_item("kind", "state")?;
            d.set_item("from_state", from.map(|s| s.as_str()))?;
            d.set_item("state", to.as_str())?;
            d.set_item("attempt", attempt)?;
            d.set_item(
                "error",
                error.as_ref().map(|e| error_dict(py, e)).transpose()?,
            )?;
            d.set_item("result", result.as_ref().map(|r| bytes(py, r)))?;
            d.set_item("waiting_for", waiting_for)?;
        }
        EventKind::Progress {
            percent,
            message,
            attempt,
        } => {
            d.set_item("kind", "progress")?;
            d.set_item("percent", percent)?;
            d.set_item("message", message)?;
            d.set_item("attempt", attempt)?;
        }
        EventKind::Output {
            stream,
            data,
            attempt,
            truncated,
        } => {
            d.set_item("kind", "output")?;
            d.set_item("stream", stream.as_str())?;
            d.set_item("data", bytes(py, data))?;
            d.set_item("attempt", attempt)?;
            d.set_item("truncated", truncated)?;
        }
        _ => {
            d.set_item("kind", "unknown")?;
        }
    }
    Ok(d)
}

pub(crate) fn queue_info<'py>(py: Python<'py>, q: &QueueInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("namespace", &q.namespace)?;
    d.set_item("name", &q.name)?;
    d.set_item("depth", q.depth)?;
    d.set_item("running", q.running)?;
    d.set_item("workers", q.workers)?;
    d.set_item("oldest_queued_at", epoch(q.oldest_queued_at))?;
    let c = &q.config;
    d.set_item("max_concurrency", c.max_concurrency)?;
    d.set_item("default_timeout", secs(c.default_run_timeout))?;
    d.set_item(
        "default_retries",
        c.default_retry_policy.as_ref().map(|p| p.max_retries),
    )?;
    d.set_item("max_depth", c.max_depth)?;
    d.set_item("paused", c.paused)?;
    d.set_item("default_max_wait", secs(c.default_max_wait))?;
    d.set_item("reject_unplaceable", c.reject_unplaceable)?;
    Ok(d)
}

pub(crate) fn worker_info<'py>(py: Python<'py>, w: &WorkerInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &w.id)?;
    d.set_item("namespace", &w.namespace)?;
    d.set_item("name", &w.name)?;
    d.set_item("queues", &w.queues)?;
    d.set_item("concurrency", w.concurrency)?;
    d.set_item("running", w.running)?;
    d.set_item("draining", w.draining)?;
    d.set_item("connected", w.connected)?;
    d.set_item("labels", &w.labels)?;
    Ok(d)
}

pub(crate) fn pool_info<'py>(py: Python<'py>, p: &PoolInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("namespace", &p.namespace)?;
    d.set_item("name", &p.name)?;
    d.set_item("max_units", &p.config.max_units)?;
    let rates = PyList::empty(py);
    for r in &p.config.rates {
        let rd = PyDict::new(py);
        rd.set_item("unit", &r.unit)?;
        rd.set_item("amount", r.amount)?;
        rd.set_item("per", r.per.as_secs_f64())?;
        rd.set_item("burst", r.burst.unwrap_or(r.amount))?;
        rates.append(rd)?;
    }
    d.set_item("rates", rates)?;
    d.set_item("shared", p.config.shared)?;
    d.set_item("weights", &p.config.weights)?;
    d.set_item("in_use", &p.in_use)?;
    d.set_item("tokens", &p.tokens)?;
    d.set_item("running", p.running)?;
    d.set_item("waiting", p.waiting)?;
    d.set_item("cooldown_until", epoch(p.cooldown_until))?;
    d.set_item("epoch", p.epoch)?;
    Ok(d)
}
