//! How the CLI prints SDK types: JSON values for `--output json`, aligned columns for people.

use std::io::Write;
use std::time::{Duration, SystemTime};

use jobplane::{
    EventKind, Job, JobEvent, PoolInfo, PoolRequest, QueueInfo, Resources, RetryPolicy, WorkerInfo,
};
use serde_json::{json, Map, Value};

/// RFC 3339 with milliseconds, UTC.
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn opt_time(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| Value::String(time(t)))
}

/// A duration as humantime prints it (`1m 30s`).
pub fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn opt_duration(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| Value::String(duration(d)))
}

/// Bytes as JSON: the parsed value when they are JSON, else a (lossy) string.
pub fn bytes_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Bytes for a table cell: text, single line, shortened.
fn bytes_cell(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text.trim().replace(['\n', '\r'], " ");
    if line.chars().count() > max {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        line
    }
}

fn retry_policy_value(p: &RetryPolicy) -> Value {
    json!({
        "max_retries": p.max_retries,
        "initial_backoff": opt_duration(p.initial_backoff),
        "max_backoff": opt_duration(p.max_backoff),
        "multiplier": p.multiplier,
    })
}

/// A pool request as JSON.
fn pool_request_value(r: &PoolRequest) -> Value {
    json!({
        "pool": r.pool,
        "units": r.units,
        "max_wait": opt_duration(r.max_wait),
    })
}

/// A pool request as the `--pool` flag spells it: `gpt-4o:tokens=1200@5s`.
fn pool_request_text(r: &PoolRequest) -> String {
    let mut s = r.pool.clone();
    if !r.units.is_empty() {
        let units: Vec<String> = r.units.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push(':');
        s.push_str(&units.join(","));
    }
    if let Some(w) = r.max_wait {
        s.push('@');
        s.push_str(&duration(w));
    }
    s
}

/// Resources as JSON: `{"cpu": cores, "memory_bytes": n}`.
fn resources_value(r: &Resources) -> Value {
    json!({"cpu": r.cpu, "memory_bytes": r.memory_bytes})
}

/// Resources for people: `cpu=0.5 memory=536870912`.
fn resources_text(r: &Resources) -> String {
    format!("cpu={} memory={}", r.cpu, r.memory_bytes)
}

/// A job as JSON.
pub fn job_value(job: &Job) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(job.id));
    m.insert("namespace".into(), json!(job.namespace));
    m.insert("queue".into(), json!(job.queue));
    m.insert("state".into(), json!(job.state.as_str()));
    m.insert("attempt".into(), json!(job.attempt));
    m.insert("retries_used".into(), json!(job.retries_used));
    m.insert("priority".into(), json!(job.priority));
    m.insert("labels".into(), json!(job.labels));
    m.insert("idempotency_key".into(), json!(job.idempotency_key));
    m.insert("payload".into(), bytes_value(&job.payload));
    m.insert(
        "result".into(),
        job.result.as_deref().map_or(Value::Null, bytes_value),
    );
    m.insert(
        "error".into(),
        job.error.as_ref().map_or(
            Value::Null,
            |e| json!({"reason": e.reason, "message": e.message}),
        ),
    );
    m.insert("waiting_for".into(), json!(job.waiting_for));
    m.insert("pool".into(), json!(job.pool));
    m.insert(
        "pools".into(),
        Value::Array(job.pools.iter().map(pool_request_value).collect()),
    );
    m.insert(
        "resources".into(),
        if job.resources.is_zero() {
            Value::Null
        } else {
            resources_value(&job.resources)
        },
    );
    m.insert("selector".into(), json!(job.selector));
    m.insert("progress".into(), json!(job.progress));
    m.insert("worker_id".into(), json!(job.worker_id));
    m.insert("cancel_requested".into(), json!(job.cancel_requested));
    m.insert(
        "retry_policy".into(),
        job.retry_policy
            .as_ref()
            .map_or(Value::Null, retry_policy_value),
    );
    m.insert("run_timeout".into(), opt_duration(job.run_timeout));
    m.insert("max_wait".into(), opt_duration(job.max_wait));
    m.insert("created_at".into(), opt_time(job.created_at));
    m.insert("scheduled_at".into(), opt_time(job.scheduled_at));
    m.insert("started_at".into(), opt_time(job.started_at));
    m.insert("finished_at".into(), opt_time(job.finished_at));
    m.insert("updated_at".into(), opt_time(job.updated_at));
    m.insert("last_seq".into(), json!(job.last_seq));
    m
}

/// A job as `key  value` lines, followed by `extra` lines.
pub fn job_table(job: &Job, extra: &[(&str, String)]) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("id", job.id.clone()),
        ("state", job.state.to_string()),
        ("queue", job.queue.clone()),
        ("attempt", job.attempt.to_string()),
    ];
    rows.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    if job.namespace != jobplane::DEFAULT_NAMESPACE {
        rows.push(("namespace", job.namespace.clone()));
    }
    if job.priority != 0 {
        rows.push(("priority", job.priority.to_string()));
    }
    if let Some(w) = &job.waiting_for {
        rows.push(("waiting for", w.clone()));
    }
    if !job.pools.is_empty() {
        let pools: Vec<String> = job.pools.iter().map(pool_request_text).collect();
        rows.push(("pools", pools.join(" ")));
    }
    if let Some(p) = &job.pool {
        rows.push(("pool", p.clone()));
    }
    if !job.resources.is_zero() {
        rows.push(("resources", resources_text(&job.resources)));
    }
    if !job.selector.is_empty() {
        let selector: Vec<String> = job
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        rows.push(("selector", selector.join(",")));
    }
    if job.progress > 0.0 && !job.is_terminal() {
        rows.push(("progress", format!("{:.0}%", job.progress)));
    }
    if let Some(r) = &job.result {
        rows.push(("result", bytes_cell(r, 200)));
    }
    if let Some(e) = &job.error {
        rows.push(("error", e.to_string()));
    }
    if !job.labels.is_empty() {
        let labels: Vec<String> = job.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(("labels", labels.join(",")));
    }
    if let Some(k) = &job.idempotency_key {
        rows.push(("idempotency key", k.clone()));
    }
    if let Some(w) = &job.worker_id {
        rows.push(("worker", w.clone()));
    }
    if job.cancel_requested {
        rows.push(("cancel requested", "yes".into()));
    }
    for (k, t) in [
        ("created", job.created_at),
        ("scheduled", job.scheduled_at),
        ("started", job.started_at),
        ("finished", job.finished_at),
    ] {
        if let Some(t) = t {
            rows.push((k, time(t)));
        }
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    out
}

/// One row per job.
pub fn jobs_table(jobs: &[Job]) -> String {
    let rows = jobs
        .iter()
        .map(|j| {
            let detail = match (&j.error, &j.waiting_for) {
                (Some(e), _) if j.is_terminal() || j.state == jobplane::JobState::Queued => {
                    e.to_string()
                }
                (_, Some(w)) => w.clone(),
                _ => String::new(),
            };
            vec![
                j.id.clone(),
                j.state.to_string(),
                j.queue.clone(),
                j.attempt.to_string(),
                j.created_at.map(time).unwrap_or_default(),
                detail,
            ]
        })
        .collect();
    table(
        &["ID", "STATE", "QUEUE", "ATTEMPT", "CREATED", "DETAIL"],
        rows,
    )
}

/// An event as JSON: `seq`, `job_id`, `time`, `kind` and the kind's fields.
pub fn event_value(event: &JobEvent) -> Value {
    let mut m = Map::new();
    m.insert("seq".into(), json!(event.seq));
    m.insert("job_id".into(), json!(event.job_id));
    m.insert("time".into(), opt_time(event.time));
    match &event.kind {
        EventKind::State {
            from,
            to,
            attempt,
            error,
            result,
            waiting_for,
        } => {
            m.insert("kind".into(), json!("state"));
            m.insert("from".into(), json!(from.map(|s| s.as_str())));
            m.insert("to".into(), json!(to.as_str()));
            m.insert("attempt".into(), json!(attempt));
            m.insert(
                "error".into(),
                error.as_ref().map_or(
                    Value::Null,
                    |e| json!({"reason": e.reason, "message": e.message}),
                ),
            );
            m.insert(
                "result".into(),
                result.as_deref().map_or(Value::Null, bytes_value),
            );
            m.insert("waiting_for".into(), json!(waiting_for));
        }
        EventKind::Progress {
            percent,
            message,
            attempt,
        } => {
            m.insert("kind".into(), json!("progress"));
            m.insert("percent".into(), json!(percent));
            m.insert("message".into(), json!(message));
            m.insert("attempt".into(), json!(attempt));
        }
        EventKind::Output {
            stream,
            data,
            attempt,
            truncated,
        } => {
            m.insert("kind".into(), json!("output"));
            m.insert("stream".into(), json!(stream.as_str()));
            m.insert(
                "data".into(),
                json!(String::from_utf8_lossy(data).into_owned()),
            );
            m.insert("attempt".into(), json!(attempt));
            m.insert("truncated".into(), json!(truncated));
        }
        other => {
            m.insert("kind".into(), json!(format!("{other:?}")));
        }
    }
    Value::Object(m)
}

/// A queue as JSON.
pub fn queue_value(q: &QueueInfo) -> Value {
    let c = &q.config;
    json!({
        "namespace": q.namespace,
        "name": q.name,
        "depth": q.depth,
        "running": q.running,
        "workers": q.workers,
        "oldest_queued_at": opt_time(q.oldest_queued_at),
        "config": {
            "max_concurrency": c.max_concurrency,
            "default_run_timeout": opt_duration(c.default_run_timeout),
            "default_max_wait": opt_duration(c.default_max_wait),
            "default_retry_policy": c.default_retry_policy.as_ref().map_or(Value::Null, retry_policy_value),
            "max_depth": c.max_depth,
            "paused": c.paused,
            "reject_unplaceable": c.reject_unplaceable,
        },
    })
}

/// One row per queue.
pub fn queues_table(queues: &[QueueInfo]) -> String {
    let dash = || "-".to_owned();
    let rows = queues
        .iter()
        .map(|q| {
            let c = &q.config;
            vec![
                q.name.clone(),
                q.depth.to_string(),
                q.running.to_string(),
                q.workers.to_string(),
                c.max_concurrency.map_or_else(dash, |n| n.to_string()),
                c.default_run_timeout.map_or_else(dash, duration),
                c.default_max_wait.map_or_else(dash, duration),
                c.default_retry_policy
                    .map_or_else(dash, |p| p.max_retries.to_string()),
                c.max_depth.map_or_else(dash, |n| n.to_string()),
                if c.paused { "yes" } else { "no" }.to_owned(),
                q.oldest_queued_at.map_or_else(dash, time),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "DEPTH",
            "RUNNING",
            "WORKERS",
            "SLOTS",
            "TIMEOUT",
            "MAX-WAIT",
            "RETRIES",
            "MAX-DEPTH",
            "PAUSED",
            "OLDEST",
        ],
        rows,
    )
}

/// A worker as JSON.
pub fn worker_value(w: &WorkerInfo) -> Value {
    json!({
        "id": w.id,
        "namespace": w.namespace,
        "name": w.name,
        "queues": w.queues,
        "concurrency": w.concurrency,
        "running": w.running,
        "draining": w.draining,
        "connected": w.connected,
        "labels": w.labels,
        "lease_expires_at": opt_time(w.lease_expires_at),
        "resources": resources_value(&w.resources),
        "resources_in_use": resources_value(&w.resources_in_use),
    })
}

fn worker_status(w: &WorkerInfo) -> &'static str {
    match (w.connected, w.draining) {
        (true, false) => "connected",
        (true, true) => "draining",
        (false, _) => "disconnected",
    }
}

/// One row per worker.
pub fn workers_table(workers: &[WorkerInfo]) -> String {
    let rows = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.name.clone(),
                w.queues.join(","),
                format!("{}/{}", w.running, w.concurrency),
                worker_status(w).to_owned(),
                w.lease_expires_at.map(time).unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "QUEUES", "RUNNING", "STATUS", "LEASE-EXPIRES"],
        rows,
    )
}

/// A worker as `key  value` lines.
pub fn worker_table(w: &WorkerInfo) -> String {
    let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let rows: Vec<(&str, String)> = vec![
        ("id", w.id.clone()),
        ("name", w.name.clone()),
        ("queues", w.queues.join(",")),
        ("running", format!("{}/{}", w.running, w.concurrency)),
        ("status", worker_status(w).to_owned()),
        ("labels", labels.join(",")),
        (
            "resources",
            if w.resources.is_zero() {
                String::new()
            } else {
                format!(
                    "{} (in use: {})",
                    resources_text(&w.resources),
                    resources_text(&w.resources_in_use)
                )
            },
        ),
        (
            "lease expires",
            w.lease_expires_at.map(time).unwrap_or_default(),
        ),
    ];
    let mut out = String::new();
    for (k, v) in rows.into_iter().filter(|(_, v)| !v.is_empty()) {
        out.push_str(&format!("{k:<13}  {v}\n"));
    }
    out
}

/// A pool as JSON: its limits, units in use, tokens, waiting jobs and cooldown.
pub fn pool_value(p: &PoolInfo) -> Value {
    json!({
        "namespace": p.namespace,
        "name": p.name,
        "config": {
            "max_units": p.config.max_units,
            "rates": p.config.rates.iter().map(|r| json!({
                "unit": r.unit,
                "amount": r.amount,
                "per": duration(r.per),
                "burst": r.burst.unwrap_or(r.amount),
            })).collect::<Vec<_>>(),
            "shared": p.config.shared,
            "weights": p.config.weights,
        },
        "in_use": p.in_use,
        "tokens": p.tokens,
        "running": p.running,
        "waiting": p.waiting,
        "cooldown_until": opt_time(p.cooldown_until),
        "epoch": p.epoch,
    })
}

/// A pool's max units: `requests=2,tokens=50000`.
fn max_units_text(p: &PoolInfo) -> String {
    let v: Vec<String> = p
        .config
        .max_units
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    v.join(",")
}

/// A pool's rates as `pools set --rate` spells them: `tokens=90000/1m:burst=100000`.
fn rates_text(p: &PoolInfo) -> String {
    let v: Vec<String> = p
        .config
        .rates
        .iter()
        .map(|r| {
            let mut s = format!("{}={}/{}", r.unit, r.amount, duration(r.per));
            if let Some(b) = r.burst.filter(|b| *b != r.amount) {
                s.push_str(&format!(":burst={b}"));
            }
            s
        })
        .collect();
    v.join(",")
}

/// Units in use against the max: `requests=1/2,tokens=1200/50000`.
fn in_use_text(p: &PoolInfo) -> String {
    let v: Vec<String> = p
        .in_use
        .iter()
        .map(|(k, n)| match p.config.max_units.get(k) {
            Some(max) => format!("{k}={n}/{max}"),
            None => format!("{k}={n}"),
        })
        .collect();
    v.join(",")
}

/// One row per pool.
pub fn pools_table(pools: &[PoolInfo]) -> String {
    let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    let rows = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                dash(max_units_text(p)),
                dash(rates_text(p)),
                dash(in_use_text(p)),
                p.running.to_string(),
                p.waiting.to_string(),
                p.cooldown_until.map_or_else(|| "-".to_owned(), time),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "MAX-UNITS",
            "RATES",
            "IN-USE",
            "RUNNING",
            "WAITING",
            "COOLDOWN-UNTIL",
        ],
        rows,
    )
}

/// A pool as `key  value` lines.
pub fn pool_table(p: &PoolInfo) -> String {
    let tokens: Vec<String> = p
        .config
        .rates
        .iter()
        .zip(&p.tokens)
        .map(|(r, t)| format!("{}={t:.0}", r.unit))
        .collect();
    let mut rows: Vec<(&str, String)> = vec![
        ("name", p.name.clone()),
        ("max units", max_units_text(p)),
        ("rates", rates_text(p)),
        ("in use", in_use_text(p)),
        ("tokens", tokens.join(",")),
        ("running", p.running.to_string()),
        ("waiting", p.waiting.to_string()),
        (
            "cooldown until",
            p.cooldown_until.map(time).unwrap_or_default(),
        ),
        ("epoch", p.epoch.to_string()),
    ];
    if p.config.shared {
        let weights: Vec<String> = p
            .config
            .weights
            .iter()
            .map(|(k, w)| format!("{k}={w}"))
            .collect();
        rows.push(("shared", "yes".to_owned()));
        rows.push(("weights", weights.join(",")));
    }
    if p.namespace != jobplane::DEFAULT_NAMESPACE {
        rows.push(("namespace", p.namespace.clone()));
    }
    let mut out = String::new();
    for (k, v) in rows.into_iter().filter(|(_, v)| !v.is_empty()) {
        out.push_str(&format!("{k:<14}  {v}\n"));
    }
    out
}

/// Aligned columns separated by two spaces; the last column is not padded.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_cells: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_cells).chain(rows.iter()) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints a JSON value on one line of standard output.
pub fn print_json(value: &Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not worth a panic.
    let _ = serde_json::to_writer(&mut out, value);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Prints text as is on standard output.
pub fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_json_when_they_can_be() {
        assert_eq!(bytes_value(br#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(bytes_value(b"42"), json!(42));
        assert_eq!(bytes_value(b"plain text"), json!("plain text"));
        assert_eq!(bytes_value(b""), json!(""));
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "STATE"],
            vec![
                vec!["a".into(), "QUEUED".into()],
                vec!["long-id".into(), "RUNNING".into()],
            ],
        );
        assert_eq!(t, "ID       STATE\na        QUEUED\nlong-id  RUNNING\n");
    }

    #[test]
    fn times_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(time(t), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn pool_requests_print_as_the_flag_spells_them() {
        let r = PoolRequest::new("gpt-4o")
            .units("tokens", 1200)
            .max_wait(Duration::from_secs(5));
        assert_eq!(pool_request_text(&r), "gpt-4o:tokens=1200@5s");
        assert_eq!(pool_request_text(&PoolRequest::new("p")), "p");
        assert_eq!(
            pool_request_value(&r),
            json!({"pool": "gpt-4o", "units": {"tokens": 1200}, "max_wait": "5s"})
        );
    }

    #[test]
    fn cells_are_shortened() {
        assert_eq!(bytes_cell(b"a\nb", 10), "a b");
        assert_eq!(bytes_cell(b"abcdefghijkl", 5), "abcd…");
    }
}
