//! End-to-end tests: a real server on `127.0.0.1:0` with a temp SQLite database, driven through
//! the Rust SDK, the raw worker protocol and the `jobplane` binary. No sleeps: every wait is on
//! an event, with a generous timeout only as a guard.

mod cancel;
mod capacity;
mod cli;
mod cluster;
mod faults;
mod grpc_tooling;
mod idempotency;
mod lifecycle;
mod otel;
mod pools;
mod retries;
mod slots;
mod validation;
mod watch;

use std::time::Duration;

use jobplane::worker::{Handler, Worker, WorkerHandle};

/// Starts an SDK worker on one queue.
pub fn spawn_worker(
    addr: &str,
    queue: &str,
    concurrency: u32,
    handler: impl Handler,
) -> WorkerHandle {
    Worker::builder(addr)
        .concurrency(concurrency)
        .shutdown_timeout(Duration::from_secs(5))
        .handler(queue, handler)
        .build()
        .expect("build worker")
        .spawn()
}
