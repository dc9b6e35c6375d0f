//! The worker runtime: serve queues with handlers, with bounded concurrency, progress and
//! output, cancellation, reconnection and graceful shutdown.
//!
//! ```no_run
//! # async fn demo() -> Result<(), jobplane::Error> {
//! use jobplane::worker::{HandlerError, JobContext, Worker};
//!
//! async fn shout(ctx: JobContext) -> Result<Vec<u8>, HandlerError> {
//!     let text = std::str::from_utf8(ctx.payload()).map_err(|e| HandlerError::fatal(e.to_string()))?;
//!     ctx.stdout(format!("shouting {} bytes\n", text.len())).await;
//!     Ok(text.to_uppercase().into_bytes())
//! }
//!
//! let worker = Worker::builder("http://127.0.0.1:7741")
//!     .concurrency(8)
//!     .handler("shout", shout)
//!     .build()?;
//! // Runs until Ctrl-C, then drains: in-flight jobs finish and their outcomes are delivered.
//! worker.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! A worker holds one `WorkerService.Connect` stream. The service pushes assignments within the
//! worker's free slots; the worker acknowledges each at once, runs its handler on a task, and
//! reports progress, output and finally the outcome, all through one ordered queue so an
//! attempt's output always precedes its outcome. Heartbeats travel on a separate lane that bulk
//! output never delays. When the stream breaks, the worker reconnects with jittered exponential
//! back-off under the same worker id, lists the attempts it still has and, for those the service
//! kept, sends again their ack, the progress and output that were queued or not yet handed to
//! the transport, and outcomes the service has not confirmed. An attempt stays in the worker's
//! books until the service confirmed (or rejected) its outcome.
//!
//! When the service rejects a report of a running attempt, the attempt is no longer the
//! worker's: its handler is cancelled, its further progress and output are dropped, and once it
//! ends a `Cancelled` outcome tells the service the worker stopped, which frees the slot the
//! service kept for it meanwhile. An attempt the service did not keep across a reconnect is
//! stopped the same way but reports nothing: the service has already let it go.
//!
//! A shutdown drains the worker and waits for the service's confirmation before closing the
//! stream, so an assignment that crossed the drain request is run rather than dropped.

mod context;
mod handler;
mod outbox;
mod runtime;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use context::JobContext;
pub use handler::{Handler, HandlerError, HandlerFuture};

use crate::client::Client;
use crate::error::{Error, Result};

/// Identifies one attempt: job id and fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct AttemptKey {
    pub(crate) job_id: Arc<str>,
    pub(crate) attempt: u32,
}

impl AttemptKey {
    pub(crate) fn new(job_id: &str, attempt: u32) -> Self {
        AttemptKey {
            job_id: Arc::from(job_id),
            attempt,
        }
    }
}

/// Where a worker connects: an address or an existing [`Client`]'s connection.
#[derive(Debug, Clone)]
pub enum WorkerTarget {
    /// A service address, e.g. `http://127.0.0.1:7741` (several separated by commas).
    Addr(String),
    /// The connection and namespace of a client.
    Client(Client),
}

impl From<&str> for WorkerTarget {
    fn from(addr: &str) -> Self {
        WorkerTarget::Addr(addr.to_owned())
    }
}

impl From<String> for WorkerTarget {
    fn from(addr: String) -> Self {
        WorkerTarget::Addr(addr)
    }
}

impl From<Client> for WorkerTarget {
    fn from(client: Client) -> Self {
        WorkerTarget::Client(client)
    }
}

impl From<&Client> for WorkerTarget {
    fn from(client: &Client) -> Self {
        WorkerTarget::Client(client.clone())
    }
}

/// Settings shared by the runtime's parts.
pub(crate) struct WorkerConfig {
    pub(crate) id: Arc<str>,
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) concurrency: u32,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) resources: crate::Resources,
    pub(crate) handlers: HashMap<String, Arc<dyn Handler>>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) abort_grace: Duration,
    pub(crate) output_buffer: usize,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
}

/// Builds a [`Worker`]; see [`Worker::builder`].
pub struct WorkerBuilder {
    target: WorkerTarget,
    namespace: Option<String>,
    concurrency: u32,
    handlers: HashMap<String, Arc<dyn Handler>>,
    labels: BTreeMap<String, String>,
    resources: crate::Resources,
    name: Option<String>,
    id: Option<String>,
    shutdown_timeout: Duration,
    abort_grace: Duration,
    output_buffer: usize,
    reconnect_min: Duration,
    reconnect_max: Duration,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut queues: Vec<_> = self.handlers.keys().collect();
        queues.sort();
        f.debug_struct("WorkerBuilder")
            .field("target", &self.target)
            .field("namespace", &self.namespace)
            .field("concurrency", &self.concurrency)
            .field("queues", &queues)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// Sets the namespace (default: the client's, or `default`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sets how many attempts run at once (1-10,000; default 10).
    pub fn concurrency(mut self, concurrency: u32) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Serves `queue` with `handler`. Call once per queue.
    pub fn handler(mut self, queue: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(queue.into(), Arc::new(handler));
        self
    }

    /// Serves `queue` with a shared handler.
    pub fn shared_handler(mut self, queue: impl Into<String>, handler: Arc<dyn Handler>) -> Self {
        self.handlers.insert(queue.into(), handler);
        self
    }

    /// Adds labels of the worker.
    pub fn labels<K, V>(mut self, labels: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.labels
            .extend(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Adds one label of the worker.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the CPU (in cores, fractions allowed) the worker offers to jobs that declare theirs:
    /// the service places such a job only where its CPU and memory fit, and holds them while it
    /// runs. Default: none (only jobs that declare no resources are placed here).
    pub fn cpu(mut self, cores: f64) -> Self {
        self.resources.cpu = cores;
        self
    }

    /// Sets the memory, in bytes, the worker offers (see [`WorkerBuilder::cpu`]).
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.resources.memory_bytes = bytes;
        self
    }

    /// Sets the human-readable name (default: host name and process id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the worker id (default: a new UUID). Reconnects always reuse the id; set it only to
    /// resume a worker's identity across processes.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// How long a graceful shutdown waits for in-flight handlers before cancelling them
    /// (default 30s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long a handler whose token was cancelled by the worker itself (shutdown timeout
    /// passed, or the service gave the attempt away) may keep running before its task is
    /// aborted (default 5s). After a cancel from the service, the service's grace applies.
    pub fn abort_grace(mut self, grace: Duration) -> Self {
        self.abort_grace = grace;
        self
    }

    /// Bytes of progress and output buffered before handlers wait (default 1 MiB, at least
    /// 64 KiB).
    pub fn output_buffer(mut self, bytes: usize) -> Self {
        self.output_buffer = bytes;
        self
    }

    /// Bounds of the jittered exponential back-off between reconnects (default 50ms to 5s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Checks the settings and builds the worker. Connecting happens in [`Worker::run`].
    pub fn build(self) -> Result<Worker> {
        if self.handlers.is_empty() {
            return Err(Error::InvalidConfig(
                "a worker needs at least one handler".into(),
            ));
        }
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(Error::InvalidConfig(format!(
                "concurrency must be 1-10000, not {}",
                self.concurrency
            )));
        }
        if let WorkerTarget::Addr(addr) = &self.target {
            for a in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                crate::client::endpoint(a)?;
            }
        }
        let namespace = self.namespace.unwrap_or_else(|| match &self.target {
            WorkerTarget::Client(c) => c.namespace().to_owned(),
            WorkerTarget::Addr(_) => crate::client::DEFAULT_NAMESPACE.to_owned(),
        });
        let id: Arc<str> = Arc::from(
            self.id
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
                .as_str(),
        );
        let config = WorkerConfig {
            id,
            name: self.name.unwrap_or_else(default_name),
            namespace,
            concurrency: self.concurrency,
            labels: self.labels,
            resources: self.resources,
            handlers: self.handlers,
            shutdown_timeout: self.shutdown_timeout,
            abort_grace: self.abort_grace,
            output_buffer: self.output_buffer.max(context::MAX_CHUNK + 1024),
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max.max(self.reconnect_min),
        };
        Ok(Worker {
            config: Arc::new(config),
            target: self.target,
        })
    }
}

fn default_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}:{}", std::process::id())
}

/// A worker: serves queues with handlers until shut down. Build one with [`Worker::builder`].
pub struct Worker {
    config: Arc<WorkerConfig>,
    target: WorkerTarget,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.config.id)
            .field("name", &self.config.name)
            .field("namespace", &self.config.namespace)
            .field("concurrency", &self.config.concurrency)
            .field("queues", &self.queues())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts building a worker that connects to `target`: an address such as
    /// `"http://127.0.0.1:7741"`, or a [`Client`].
    pub fn builder(target: impl Into<WorkerTarget>) -> WorkerBuilder {
        WorkerBuilder {
            target: target.into(),
            namespace: None,
            concurrency: 10,
            handlers: HashMap::new(),
            labels: BTreeMap::new(),
            resources: crate::Resources::default(),
            name: None,
            id: None,
            shutdown_timeout: Duration::from_secs(30),
            abort_grace: Duration::from_secs(5),
            output_buffer: 1 << 20,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
        }
    }

    /// The worker's id: chosen once per worker and kept across reconnects.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The queues it serves, sorted.
    pub fn queues(&self) -> Vec<&str> {
        let mut queues: Vec<&str> = self.config.handlers.keys().map(String::as_str).collect();
        queues.sort_unstable();
        queues
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully: asks the service for no more
    /// work, lets in-flight handlers finish (cancelling them after the shutdown timeout),
    /// delivers their outcomes and closes the stream.
    ///
    /// Also returns `Ok` once an administrator drained the worker and its in-flight work is
    /// done. Returns an error if the service refuses the worker (bad settings, no permission).
    /// Must be called within a Tokio runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let channel = match self.target {
            WorkerTarget::Client(client) => client.channel().clone(),
            WorkerTarget::Addr(addr) => Client::connect_lazy(addr)?.channel().clone(),
        };
        runtime::run(self.config, channel, shutdown).await
    }

    /// Runs the worker on a new task; the handle shuts it down.
    pub fn spawn(self) -> WorkerHandle {
        let id = self.config.id.to_string();
        let token = CancellationToken::new();
        let shutdown = token.clone().cancelled_owned();
        let join = tokio::spawn(self.run(shutdown));
        WorkerHandle { id, token, join }
    }
}

/// A worker running on its own task (see [`Worker::spawn`]).
#[derive(Debug)]
pub struct WorkerHandle {
    id: String,
    token: CancellationToken,
    join: JoinHandle<Result<()>>,
}

impl WorkerHandle {
    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts a graceful shutdown; [`WorkerHandle::join`] waits for it to complete.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// A token that starts a graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Whether the worker has stopped.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Waits until the worker stops.
    pub async fn join(self) -> Result<()> {
        match self.join.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Ok(()),
        }
    }

    /// Shuts down gracefully and waits until the worker stopped.
    pub async fn stop(self) -> Result<()> {
        self.shutdown();
        self.join().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn noop(_ctx: JobContext) -> std::result::Result<Vec<u8>, HandlerError> {
        Ok(Vec::new())
    }

    #[test]
    fn build_checks_settings() {
        let err = Worker::builder("http://127.0.0.1:7741")
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)));
        let err = Worker::builder("http://127.0.0.1:7741")
            .handler("q", noop)
            .concurrency(0)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("concurrency"));
        let worker = Worker::builder("127.0.0.1:7741")
            .handler("b", noop)
            .handler("a", noop)
            .namespace("ns")
            .build()
            .unwrap();
        assert_eq!(worker.queues(), ["a", "b"]);
        assert_eq!(worker.config.namespace, "ns");
        assert!(uuid::Uuid::parse_str(worker.id()).is_ok());
    }
}
