//! Rust SDK for jobplane: a typed client and a worker runtime.
//!
//! jobplane is a job control plane: one gRPC service owns the state of every job, clients submit
//! jobs, wait for them, cancel them and watch them, and workers connect to lease jobs and report
//! progress, output and results.
//!
//! # Client
//!
//! ```no_run
//! # async fn demo() -> Result<(), jobplane::Error> {
//! use std::time::Duration;
//! use futures::StreamExt;
//! use jobplane::{Client, EventKind, JobSpec, JobState};
//!
//! let client = Client::connect("http://127.0.0.1:7741").await?;
//!
//! let submitted = client
//!     .submit(
//!         JobSpec::new("reports")
//!             .json(&serde_json::json!({"month": "2024-05"}))?
//!             .idempotency_key("report-2024-05")
//!             .run_timeout(Duration::from_secs(600))
//!             .retries(3),
//!     )
//!     .await?;
//!
//! // Follow it live: state changes, progress, output; the stream ends after the terminal event.
//! let mut events = client.watch(&submitted.job.id, 0);
//! while let Some(event) = events.next().await {
//!     match event?.kind {
//!         EventKind::Progress { percent, .. } => println!("{percent:.0}%"),
//!         EventKind::Output { data, .. } => print!("{}", String::from_utf8_lossy(&data)),
//!         EventKind::State { to, .. } => println!("-> {to}"),
//!         _ => {}
//!     }
//! }
//!
//! let done = client.wait(&submitted.job.id, Duration::from_secs(5)).await?;
//! if done.job.state == JobState::Succeeded {
//!     let report: serde_json::Value = done.job.result_json()?;
//!     println!("{report}");
//! }
//! # Ok(()) }
//! ```
//!
//! # Worker
//!
//! ```no_run
//! # async fn demo() -> Result<(), jobplane::Error> {
//! use jobplane::worker::{HandlerError, JobContext, Worker};
//!
//! async fn report(ctx: JobContext) -> Result<Vec<u8>, HandlerError> {
//!     let request: serde_json::Value = ctx.json()?;
//!     for step in 0..10 {
//!         if ctx.is_cancelled() {
//!             return Err(HandlerError::Cancelled);
//!         }
//!         ctx.progress(f64::from(step) * 10.0, "crunching").await;
//!         ctx.stdout(format!("step {step}\n")).await;
//!     }
//!     Ok(serde_json::to_vec(&serde_json::json!({"request": request, "total": 42}))?)
//! }
//!
//! Worker::builder("http://127.0.0.1:7741")
//!     .concurrency(4)
//!     .handler("reports", report)
//!     .build()?
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Tracing
//!
//! Every client call runs in a client span (target [`trace::RPC_TARGET`]) whose W3C context goes
//! to the service as `traceparent`/`tracestate` metadata, continuing the caller's trace (see
//! [`trace`] for which context wins, and [`trace::TraceContext::scope`] for callers without
//! `tracing` spans); waits link to the job's trace; a worker runs each handler in a
//! `process {queue}` span that continues the attempt's context from the service
//! ([`JobContext::span`]). Spans are `tracing` spans: with a `tracing-opentelemetry` layer they
//! become OpenTelemetry spans. The `otlp` feature adds `jobplane::telemetry`: OTLP/gRPC export
//! configured by the standard `OTEL_*` variables, as the service does it, and JSON logs that
//! carry trace ids.
//!
//! # Errors
//!
//! Every call returns [`Error`], whose variants follow the gRPC status codes the service uses;
//! [`Error::reason`] gives the service's stable machine-readable reason (e.g. `JOB_NOT_FOUND`)
//! and [`Error::is_retryable`] says whether trying again may help.

#![warn(missing_docs)]

mod admin;
mod backoff;
mod client;
mod convert;
mod error;
mod rpc;
#[cfg(feature = "otlp")]
pub mod telemetry;
pub mod trace;
mod types;
pub mod worker;

pub use client::{Client, EventStream, ADDR_ENV, DEFAULT_ADDR, DEFAULT_NAMESPACE};
pub use error::{BoxError, Error, Result};
pub use types::{
    CancelOutcome, CancelResult, EventKind, Job, JobError, JobEvent, JobPage, JobSpec, JobState,
    ListFilter, OutputStream, ParseEnumError, PoolConfig, PoolInfo, PoolRequest, QueueConfig,
    QueueInfo, RateLimit, Resources, RetryPolicy, Submitted, WaitManyResult, WaitMode, WaitOptions,
    WaitResult, WorkerInfo,
};
pub use worker::{Handler, HandlerError, JobContext, Worker, WorkerBuilder, WorkerHandle};

/// The README's Rust examples, compiled as doc tests so they cannot drift from the API.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
