//! The one generic handler every conformance worker runs: the job's payload chooses what it
//! does (the behaviour protocol of `tests/conformance/README.md`), and every invocation is
//! recorded so that scenarios can check start order, start counts and concurrency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jobplane::worker::{HandlerError, JobContext};
use serde_json::{Map, Value as Json};
use tokio::sync::watch;

use crate::schema::Dur;

/// One handler invocation.
#[derive(Debug, Clone)]
pub struct Start {
    pub job_id: String,
}

/// What the handlers of one scenario share with the driver.
#[derive(Default)]
pub struct Shared {
    signals: Mutex<HashMap<String, watch::Sender<bool>>>,
    starts: Mutex<Vec<Start>>,
    /// Bumped at every handler start, for [`Shared::started`].
    started_tx: watch::Sender<usize>,
    /// Per queue: handlers running now, and the most that ever ran at once.
    running: Mutex<HashMap<String, (usize, usize)>>,
}

impl Shared {
    fn signal(&self, name: &str) -> watch::Receiver<bool> {
        self.signals
            .lock()
            .expect("signals")
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    /// Fires a signal: latched, so a handler that waits for it later passes at once.
    pub fn fire(&self, name: &str) {
        self.signals
            .lock()
            .expect("signals")
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .send_replace(true);
    }

    /// Fires every signal named so far (teardown).
    pub fn fire_all(&self) {
        for tx in self.signals.lock().expect("signals").values() {
            tx.send_replace(true);
        }
    }

    /// Every handler invocation so far, in start order.
    pub fn starts(&self) -> Vec<Start> {
        self.starts.lock().expect("starts").clone()
    }

    /// Waits until the handlers of every job in `ids` have started (the service marks a job
    /// RUNNING when its worker acknowledges it, a moment before the handler is invoked).
    pub async fn started(&self, ids: &[String]) {
        let mut rx = self.started_tx.subscribe();
        loop {
            let all = {
                let starts = self.starts.lock().expect("starts");
                ids.iter().all(|id| starts.iter().any(|s| &s.job_id == id))
            };
            if all || rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The most handlers of `queue` that ran at once.
    pub fn peak(&self, queue: &str) -> usize {
        self.running
            .lock()
            .expect("running")
            .get(queue)
            .map_or(0, |(_, peak)| *peak)
    }

    fn enter(self: &Arc<Self>, ctx: &JobContext) -> Running {
        self.starts.lock().expect("starts").push(Start {
            job_id: ctx.job_id().to_owned(),
        });
        self.started_tx.send_modify(|n| *n += 1);
        let mut running = self.running.lock().expect("running");
        let (now, peak) = running.entry(ctx.queue().to_owned()).or_default();
        *now += 1;
        *peak = (*peak).max(*now);
        Running {
            shared: self.clone(),
            queue: ctx.queue().to_owned(),
        }
    }
}

/// Counts a handler as running until dropped.
struct Running {
    shared: Arc<Shared>,
    queue: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some((now, _)) = self
            .shared
            .running
            .lock()
            .expect("running")
            .get_mut(&self.queue)
        {
            *now -= 1;
        }
    }
}

/// Runs one attempt as its payload says.
pub async fn handle(shared: Arc<Shared>, ctx: JobContext) -> Result<Vec<u8>, HandlerError> {
    let _running = shared.enter(&ctx);
    let spec = match serde_json::from_slice::<Json>(ctx.payload()) {
        Ok(Json::Object(map)) => map,
        // Not a behaviour (empty, or not a JSON object): succeed with an empty result.
        _ => return Ok(Vec::new()),
    };
    behave(&shared, &ctx, &spec).await
}

fn bad(what: impl std::fmt::Display) -> HandlerError {
    HandlerError::fatal(format!("bad behaviour: {what}"))
}

fn get_u64(spec: &Map<String, Json>, key: &str, default: u64) -> Result<u64, HandlerError> {
    match spec.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad(format!("`{key}` must be an integer"))),
    }
}

fn get_str<'a>(spec: &'a Map<String, Json>, key: &str) -> Result<Option<&'a str>, HandlerError> {
    match spec.get(key) {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("`{key}` must be a string"))),
    }
}

fn get_bool(spec: &Map<String, Json>, key: &str) -> Result<bool, HandlerError> {
    match spec.get(key) {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("`{key}` must be a boolean"))),
    }
}

/// The result of a succeeding attempt: the compact JSON of `result`, or nothing.
fn result(spec: &Map<String, Json>) -> Vec<u8> {
    spec.get("result")
        .map(|r| serde_json::to_vec(r).expect("JSON encodes"))
        .unwrap_or_default()
}

async fn behave(
    shared: &Shared,
    ctx: &JobContext,
    spec: &Map<String, Json>,
) -> Result<Vec<u8>, HandlerError> {
    // The prelude: progress, then output lines.
    if let Some(values) = spec.get("progress") {
        let values = values
            .as_array()
            .ok_or_else(|| bad("`progress` must be a list of numbers"))?;
        for v in values {
            let p = v
                .as_f64()
                .ok_or_else(|| bad("`progress` must be a list of numbers"))?;
            ctx.progress(p, "").await;
        }
    }
    for i in 0..get_u64(spec, "lines", 0)? {
        ctx.stdout(format!("line {i}\n")).await;
    }

    // With `do` given, every key must be one the action knows: a typo fails visibly. Without
    // it the payload may be plain data, and keys the prelude does not know are ignored.
    if let Some(action) = get_str(spec, "do")? {
        let fields: &[&str] = match action {
            "succeed" => &["result"],
            "fail" => &["message", "retryable"],
            "fail_times" => &["n", "message", "result"],
            "rate_limited" => &["times", "retry_after", "pool", "result"],
            "hold" => &["until", "ignore_cancel", "result"],
            other => return Err(bad(format!("unknown `do`: {other}"))),
        };
        if let Some(key) = spec.keys().find(|k| {
            !["do", "progress", "lines"].contains(&k.as_str()) && !fields.contains(&k.as_str())
        }) {
            return Err(bad(format!("`{action}` takes no `{key}`")));
        }
    }

    let attempt = u64::from(ctx.attempt());
    match get_str(spec, "do")?.unwrap_or("succeed") {
        "succeed" => Ok(result(spec)),
        "fail" => {
            let message = get_str(spec, "message")?.unwrap_or("failed");
            if get_bool(spec, "retryable")? {
                Err(HandlerError::retryable(message))
            } else {
                Err(HandlerError::fatal(message))
            }
        }
        "fail_times" => {
            if attempt <= get_u64(spec, "n", 1)? {
                let message = match get_str(spec, "message")? {
                    Some(m) => m.to_owned(),
                    None => format!("attempt {attempt} failed"),
                };
                Err(HandlerError::retryable(message))
            } else {
                Ok(result(spec))
            }
        }
        "rate_limited" => {
            if attempt <= get_u64(spec, "times", 1)? {
                let after =
                    Dur::parse(get_str(spec, "retry_after")?.unwrap_or("100ms")).map_err(bad)?;
                let pool = get_str(spec, "pool")?.map(str::to_owned);
                Err(HandlerError::rate_limited(pool, after.0))
            } else {
                Ok(result(spec))
            }
        }
        "hold" => {
            let until = get_str(spec, "until")?;
            let ignore_cancel = get_bool(spec, "ignore_cancel")?;
            match (until, ignore_cancel) {
                (None, true) => Err(bad("`ignore_cancel` needs `until`")),
                (None, false) => {
                    ctx.cancelled().await;
                    Err(HandlerError::cancelled())
                }
                (Some(signal), _) => {
                    let mut rx = shared.signal(signal);
                    let fired = async move {
                        let _ = rx.wait_for(|fired| *fired).await;
                    };
                    if ignore_cancel {
                        fired.await;
                        Ok(result(spec))
                    } else {
                        tokio::select! {
                            _ = fired => Ok(result(spec)),
                            _ = ctx.cancelled() => Err(HandlerError::cancelled()),
                        }
                    }
                }
            }
        }
        other => Err(bad(format!("unknown `do`: {other}"))),
    }
}
