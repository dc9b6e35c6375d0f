//! Group commit: one task turns everything enqueued while the previous transaction ran into the
//! next transaction, then carries out the post-commit effects in enqueue order.
//!
//! The engine enqueues while it holds its state lock, so the order of writes and effects is the
//! order of the in-memory changes. Effects (replies, assignments pushed to workers, hub
//! publications) happen only after their writes are durable: nothing is acknowledged or handed
//! out before it is committed.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::hub::Hub;
use super::model::{Event, EventKind, Job};
use super::EngineError;
use super::ToWorker;
use crate::metrics::Metrics;
use crate::store::{Store, Write};
use crate::telemetry::JOB_LOG_TARGET;

/// Writes to commit together and what to do once they are.
#[derive(Default)]
pub(crate) struct Outbox {
    pub writes: Vec<Write>,
    pub effects: Vec<Effect>,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.effects.is_empty()
    }
}

/// Something to do after a commit.
pub(crate) enum Effect {
    /// Tell waiters and watchers.
    Publish {
        job: Option<Arc<Job>>,
        events: Vec<Arc<Event>>,
    },
    /// Send a message to a worker's stream.
    ToWorker {
        tx: mpsc::UnboundedSender<ToWorker>,
        msg: ToWorker,
    },
}

struct Pending {
    outbox: Outbox,
    done: Option<oneshot::Sender<Result<(), EngineError>>>,
}

/// Handle of the commit task.
#[derive(Clone)]
pub(crate) struct Committer {
    tx: mpsc::UnboundedSender<Pending>,
}

/// Batch statistics, for the benchmark and metrics.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: std::sync::atomic::AtomicU64,
    /// Writes committed.
    pub writes: std::sync::atomic::AtomicU64,
}

impl Committer {
    /// Starts the commit task. `fatal` is cancelled if a commit fails: the in-memory state is
    /// then ahead of the database, and the service must stop and recover from the database.
    pub fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        fatal: CancellationToken,
        stats: Arc<CommitStats>,
        metrics: Arc<Metrics>,
        max_writes: usize,
        stop: CancellationToken,
    ) -> (Committer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(rx, store, hub, fatal, stats, metrics, max_writes, stop));
        (Committer { tx }, task)
    }

    /// Enqueues writes and effects; the receiver resolves once they are committed and carried
    /// out. Call with the engine lock held to keep the order.
    pub fn enqueue(&self, outbox: Outbox) -> oneshot::Receiver<Result<(), EngineError>> {
        let (done, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(p)) = self.tx.send(Pending {
            outbox,
            done: Some(done),
        }) {
            if let Some(done) = p.done {
                let _ = done.send(Err(EngineError::Unavailable("shutting down".into())));
            }
        }
        rx
    }

    /// Enqueues without waiting for the outcome.
    pub fn enqueue_detached(&self, outbox: Outbox) {
        if outbox.is_empty() {
            return;
        }
        let _ = self.tx.send(Pending { outbox, done: None });
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    fatal: CancellationToken,
    stats: Arc<CommitStats>,
    metrics: Arc<Metrics>,
    max_writes: usize,
    stop: CancellationToken,
) {
    let mut batch: Vec<Pending> = Vec::new();
    let mut writes: Vec<Write> = Vec::new();
    loop {
        // `stop` comes after the engine's final flush; anything enqueued later is answered
        // "unavailable" when its reply sender is dropped.
        let first = tokio::select! {
            biased;
            p = rx.recv() => match p {
                Some(p) => p,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        batch.push(first);
        let mut n = batch[0].outbox.writes.len();
        while n < max_writes {
            match rx.try_recv() {
                Ok(p) => {
                    n += p.outbox.writes.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        for p in &mut batch {
            writes.append(&mut p.outbox.writes);
        }
        let result = if writes.is_empty() {
            Ok(())
        } else if fatal.is_cancelled() {
            Err(EngineError::Unavailable(
                "this instance is recovering from a database failure; try again".into(),
            ))
        } else {
            match store.apply(&writes).await {
                Ok(()) => {
                    use std::sync::atomic::Ordering::Relaxed;
                    stats.commits.fetch_add(1, Relaxed);
                    stats.writes.fetch_add(writes.len() as u64, Relaxed);
                    metrics.commit_batch(writes.len());
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(error = %e, writes = writes.len(), "commit failed; stepping down to recover from the database");
                    fatal.cancel();
                    Err(EngineError::Unavailable(
                        "the database failed; try again".into(),
                    ))
                }
            }
        };
        writes.clear();
        for p in batch.drain(..) {
            if result.is_ok() {
                for effect in p.outbox.effects {
                    match effect {
                        Effect::Publish { job, events } => {
                            log_state_changes(job.as_deref(), &events);
                            hub.publish(job.as_ref(), &events)
                        }
                        Effect::ToWorker { tx, msg } => {
                            // A closed stream means the worker is gone; its lease handles it.
                            let _ = tx.send(msg);
                        }
                    }
                }
            }
            if let Some(done) = p.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// One log line per committed state change (target `jobplane::job`, level INFO): job, queue,
/// from→to, attempt, and the error of a failure.
fn log_state_changes(job: Option<&Job>, events: &[Arc<Event>]) {
    let Some(job) = job else { return };
    if !tracing::enabled!(target: JOB_LOG_TARGET, tracing::Level::INFO) {
        return;
    }
    // The job's trace, to find its spans from the line (`00-<trace id>-<span id>-<flags>`).
    let trace_id = job
        .trace
        .as_ref()
        .and_then(|t| t.traceparent.get(3..35))
        .unwrap_or("");
    for e in events {
        if let EventKind::State {
            from,
            to,
            attempt,
            error,
            ..
        } = &e.kind
        {
            let from = from.map_or("NEW", |f| f.as_str());
            match error {
                Some(err) => tracing::info!(
                    target: JOB_LOG_TARGET,
                    job = %job.id, queue = %job.queue, namespace = %job.namespace,
                    from, to = to.as_str(), attempt, error = %err.reason, job_trace_id = trace_id,
                    "job {from}→{}", to.as_str()
                ),
                None => tracing::info!(
                    target: JOB_LOG_TARGET,
                    job = %job.id, queue = %job.queue, namespace = %job.namespace,
                    from, to = to.as_str(), attempt, job_trace_id = trace_id,
                    "job {from}→{}", to.as_str()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::engine::core::Core;
    use crate::engine::model::{JobSpec, Name, Timestamp};

    /// A log writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_state_change_logs_one_line() {
        let mut core = Core::new(Default::default());
        let mut out = Outbox::default();
        let spec = JobSpec {
            namespace: Name::default_namespace(),
            queue: Name::parse("mail").unwrap(),
            payload: Default::default(),
            labels: Default::default(),
            priority: 0,
            idempotency_key: None,
            run_timeout: None,
            max_wait: None,
            retry_policy: None,
            scheduled_at: None,
            demand: Default::default(),
            trace: Some(Arc::new(crate::engine::model::TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: String::new(),
            })),
        };
        core.submit(vec![spec], Timestamp::now(), &mut out).unwrap();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for e in &out.effects {
                if let Effect::Publish { job, events } = e {
                    log_state_changes(job.as_deref(), events);
                }
            }
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        let f = &lines[0]["fields"];
        assert_eq!(lines[0]["target"], "jobplane::job");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(f["message"], "job NEW→QUEUED");
        assert_eq!((&f["from"], &f["to"]), (&"NEW".into(), &"QUEUED".into()));
        assert_eq!(f["queue"], "mail");
        assert_eq!(f["attempt"], 0);
        assert!(f["job"].as_str().is_some_and(|j| j.len() == 36));
        assert_eq!(f["job_trace_id"], "0af7651916cd43dd8448eb211c80319c");
    }
}
