//! The worker's run loop: one task that owns the session state (the attempts in flight, the
//! connection) and reacts to the service's messages, finished handlers, the shutdown signal and
//! timers. Handlers run on their own tasks and talk back through a channel (outcomes) and the
//! outbox (progress, output), so the loop itself never waits on them.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::stream::{self, BoxStream, PollNext, Stream, StreamExt};
use futures::FutureExt;
use jobplane_proto::pb;
use jobplane_proto::pb::worker_service_client::WorkerServiceClient;
use opentelemetry::trace::TraceContextExt as _;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tracing::{debug, info, warn, Instrument};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::outbox::{Outbox, Queued};
use super::{AttemptKey, HandlerError, JobContext, WorkerConfig};
use crate::backoff;
use crate::convert;
use crate::error::{Error, Result};
use crate::trace::TraceContext;

/// Target of the span each handler runs in (`process {queue}`).
pub(crate) const PROCESS_TARGET: &str = "jobplane::worker";

/// Largest result the service accepts.
const MAX_RESULT: usize = 1 << 20;
/// After aborting the handlers, how long a shutdown keeps trying to deliver their outcomes.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new session may take to be welcomed.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing waits for the service to end its side of the stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Grace of a cancel that does not state one (the service's default).
const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(10);
/// Largest message accepted from the service (assignments carry payloads of up to 1 MiB each).
const MAX_MESSAGE: usize = 256 << 20;
/// How long a shutting-down worker with nothing left to do waits for the service to confirm its
/// drain (from the drain request, or from the shutdown while the session is not welcomed yet)
/// before closing the stream anyway. Until the confirmation, an assignment may still come.
const DRAIN_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of the heartbeat interval, whatever the welcome suggests.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// Heartbeat interval when the welcome suggests none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Stands for "never" where an `Instant` is needed (what Tokio itself uses for far deadlines).
const FAR_FUTURE: Duration = Duration::from_secs(86400 * 365 * 30);

/// How a handler task ended.
#[derive(Debug)]
pub(crate) enum Ended {
    Returned(std::result::Result<Vec<u8>, HandlerError>),
    Panicked(String),
    Aborted,
}

/// A handler task's report to the run loop.
struct Finished {
    key: AttemptKey,
    ended: Ended,
    /// Whether the attempt's token was cancelled when the handler ended.
    cancelled: bool,
}

/// Why an attempt's token was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The service asked (client cancel, run timeout).
    Server,
    /// The worker's shutdown timeout passed.
    Shutdown,
    /// The service rejected a report of the attempt while it ran: it is not this worker's any
    /// more, but the service may still count it against the worker's and the queue's slots
    /// until the worker says it stopped, so a `Cancelled` outcome is still reported.
    Rejected,
    /// After a reconnect, the welcome did not keep the attempt: the service already freed
    /// everything it held for it, so nothing is reported.
    Lost,
}

impl Cause {
    /// Whether the service no longer considers the attempt this worker's.
    fn disowned(cause: Option<Cause>) -> bool {
        matches!(cause, Some(Cause::Rejected | Cause::Lost))
    }
}

struct Attempt {
    ctx: Option<JobContext>,
    abort: Option<AbortHandle>,
    running: bool,
    cause: Option<Cause>,
    /// Set once the handler ended; kept until the service confirms or rejects it.
    outcome: Option<pb::AttemptOutcome>,
}

/// The parts of the current session the run loop talks to.
struct Session {
    control: mpsc::UnboundedSender<pb::ConnectRequest>,
    ready: watch::Sender<Option<Duration>>,
    close: CancellationToken,
    welcomed: bool,
}

type ConnectFuture =
    BoxFuture<'static, std::result::Result<Streaming<pb::ConnectResponse>, tonic::Status>>;

enum Conn {
    /// Disconnected; the next attempt to connect is at `retry_at`.
    Idle { retry_at: Instant },
    /// Opening the stream.
    Connecting { fut: ConnectFuture },
    /// The stream is open; `welcome_by` is set until the welcome arrived.
    Connected {
        inbound: Streaming<pb::ConnectResponse>,
        welcome_by: Option<Instant>,
    },
    /// The worker ended its side and waits for the service to end its own.
    Closing {
        inbound: Streaming<pb::ConnectResponse>,
        until: Instant,
    },
}

enum ConnEvent {
    Retry,
    Opened(std::result::Result<Streaming<pb::ConnectResponse>, tonic::Status>),
    Message(pb::connect_response::Msg),
    Empty,
    Broken(tonic::Status),
    Ended,
    WelcomeTimeout,
    Closed,
}

/// Runs a worker until it has shut down.
pub(crate) async fn run(
    config: Arc<WorkerConfig>,
    channel: Channel,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
    let outbox = Arc::new(Outbox::new(config.output_buffer));
    let mut rt = Runtime {
        config,
        channel,
        outbox,
        finished_tx,
        attempts: HashMap::new(),
        session: None,
        failures: 0,
        shutdown_at: None,
        handlers_cancelled: false,
        handlers_aborted: false,
        server_drained: false,
        drain_sent_at: None,
    };
    info!(worker_id = %rt.config.id, queues = ?rt.queues(), "worker starting");
    let mut conn = rt.connect();
    tokio::pin!(shutdown);
    let mut shutdown_seen = false;
    loop {
        if let Some(result) = rt.check_exit(&mut conn) {
            return result;
        }
        let deadline = rt.next_deadline();
        tokio::select! {
            Some(finished) = finished_rx.recv() => rt.on_finished(finished),
            () = &mut shutdown, if !shutdown_seen => {
                shutdown_seen = true;
                rt.begin_shutdown();
            }
            () = sleep_until_opt(deadline) => {
                if rt.on_deadline() {
                    return Ok(());
                }
            }
            event = next_event(&mut conn) => {
                if let Some(result) = rt.on_conn_event(event, &mut conn) {
                    return result;
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn next_event(conn: &mut Conn) -> ConnEvent {
    match conn {
        Conn::Idle { retry_at } => {
            tokio::time::sleep_until(*retry_at).await;
            ConnEvent::Retry
        }
        Conn::Connecting { fut } => ConnEvent::Opened(fut.await),
        Conn::Connected {
            inbound,
            welcome_by,
        } => {
            let received = match *welcome_by {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, inbound.message()).await {
                        Ok(received) => received,
                        Err(_) => return ConnEvent::WelcomeTimeout,
                    }
                }
                None => inbound.message().await,
            };
            match received {
                Ok(Some(resp)) => resp.msg.map_or(ConnEvent::Empty, ConnEvent::Message),
                Ok(None) => ConnEvent::Ended,
                Err(status) => ConnEvent::Broken(status),
            }
        }
        Conn::Closing { inbound, until } => {
            let drain = async {
                while let Ok(Some(resp)) = inbound.message().await {
                    if let Some(pb::connect_response::Msg::Assignments(batch)) = resp.msg {
                        // Only when the service did not confirm the drain in time.
                        warn!(
                            assignments = batch.assignments.len(),
                            "assignments arrived after the worker closed its stream; the service reassigns them once the worker's lease ends"
                        );
                    }
                }
            };
            let _ = tokio::time::timeout_at(*until, drain).await;
            ConnEvent::Closed
        }
    }
}

struct Runtime {
    config: Arc<WorkerConfig>,
    channel: Channel,
    outbox: Arc<Outbox>,
    finished_tx: mpsc::UnboundedSender<Finished>,
    attempts: HashMap<AttemptKey, Attempt>,
    session: Option<Session>,
    /// Connection failures in a row, for the back-off.
    failures: u32,
    shutdown_at: Option<Instant>,
    handlers_cancelled: bool,
    handlers_aborted: bool,
    server_drained: bool,
    /// When a drain was last asked for on the current session (during a shutdown).
    drain_sent_at: Option<Instant>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Handlers never outlive the worker, even when `run` is dropped mid-way.
        for attempt in self.attempts.values() {
            if let Some(abort) = &attempt.abort {
                abort.abort();
            }
        }
        self.outbox.close();
        if let Some(session) = &self.session {
            session.close.cancel();
        }
    }
}

impl Runtime {
    fn queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self.config.handlers.keys().cloned().collect();
        queues.sort_unstable();
        queues
    }

    fn exiting(&self) -> bool {
        self.shutdown_at.is_some() || self.server_drained
    }

    /// Opens a new session: the stream starts with `hello` listing the attempts still held.
    fn connect(&mut self) -> Conn {
        let epoch = self.outbox.next_epoch();
        let mut running: Vec<pb::AttemptRef> = self
            .attempts
            .iter()
            .filter(|(_, a)| !Cause::disowned(a.cause))
            .map(|(k, _)| pb::AttemptRef {
                job_id: k.job_id.to_string(),
                attempt: k.attempt,
            })
            .collect();
        running.sort_by(|a, b| (&a.job_id, a.attempt).cmp(&(&b.job_id, b.attempt)));
        let hello = pb::ConnectRequest {
            msg: Some(pb::connect_request::Msg::Hello(pb::WorkerHello {
                worker_id: self.config.id.to_string(),
                namespace: self.config.namespace.clone(),
                queues: self.queues(),
                concurrency: self.config.concurrency,
                labels: self
                    .config
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                name: self.config.name.clone(),
                running,
                resources: convert::resources_to_pb(self.config.resources),
            })),
        };
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = watch::channel(None);
        let close = CancellationToken::new();
        let requests = outbound(
            hello,
            control_rx,
            ready_rx,
            self.outbox.clone(),
            epoch,
            close.clone(),
        );
        let mut client = WorkerServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let fut = async move {
            match tokio::time::timeout(WELCOME_TIMEOUT, client.connect(requests)).await {
                Ok(Ok(resp)) => Ok(resp.into_inner()),
                Ok(Err(status)) => Err(status),
                Err(_) => Err(tonic::Status::deadline_exceeded(
                    "the service did not answer the worker's hello",
                )),
            }
        };
        if let Some(old) = self.session.replace(Session {
            control: control_tx,
            ready: ready_tx,
            close,
            welcomed: false,
        }) {
            old.close.cancel();
        }
        debug!(worker_id = %self.config.id, "connecting");
        Conn::Connecting { fut: Box::pin(fut) }
    }

    /// Returns the run's result once there is nothing left to do.
    fn check_exit(&mut self, conn: &mut Conn) -> Option<Result<()>> {
        if !self.exiting() || !self.attempts.is_empty() {
            return None;
        }
        let welcomed = self.session.as_ref().is_some_and(|s| s.welcomed);
        match conn {
            Conn::Closing { .. } => return None,
            // Once the service may have seen the hello, and until it confirmed the drain, an
            // assignment may be on its way: it must be run, not dropped with the stream.
            Conn::Connecting { .. } | Conn::Connected { .. }
                if !self.drain_settled(Instant::now()) =>
            {
                return None
            }
            _ => {}
        }
        let placeholder = Conn::Idle {
            retry_at: Instant::now(),
        };
        match std::mem::replace(conn, placeholder) {
            Conn::Connected { inbound, .. } if welcomed => {
                // Ending our side of the stream; the service ends its own in turn.
                if let Some(session) = &self.session {
                    session.close.cancel();
                }
                debug!(worker_id = %self.config.id, "all work delivered; closing the stream");
                *conn = Conn::Closing {
                    inbound,
                    until: Instant::now() + CLOSE_TIMEOUT,
                };
                None
            }
            _ => {
                info!(worker_id = %self.config.id, "worker stopped");
                Some(Ok(()))
            }
        }
    }

    fn on_conn_event(&mut self, event: ConnEvent, conn: &mut Conn) -> Option<Result<()>> {
        match event {
            ConnEvent::Retry => {
                *conn = self.connect();
                None
            }
            ConnEvent::Opened(Ok(inbound)) => {
                self.drain_sent_at = None;
                *conn = Conn::Connected {
                    inbound,
                    welcome_by: Some(Instant::now() + WELCOME_TIMEOUT),
                };
                None
            }
            ConnEvent::Opened(Err(status)) | ConnEvent::Broken(status) => {
                self.disconnected(Some(status), conn)
            }
            ConnEvent::Ended => {
                debug!(worker_id = %self.config.id, "the service ended the stream");
                self.disconnected(None, conn)
            }
            ConnEvent::WelcomeTimeout => {
                warn!(worker_id = %self.config.id, "no welcome from the service; reconnecting");
                self.disconnected(None, conn)
            }
            ConnEvent::Message(msg) => {
                self.on_message(msg, conn);
                None
            }
            ConnEvent::Empty => None,
            ConnEvent::Closed => {
                info!(worker_id = %self.config.id, "worker stopped");
                Some(Ok(()))
            }
        }
    }

    fn disconnected(
        &mut self,
        status: Option<tonic::Status>,
        conn: &mut Conn,
    ) -> Option<Result<()>> {
        if let Some(session) = self.session.take() {
            session.close.cancel();
        }
        // The dead session's stream must not take reports the next session has to send.
        self.outbox.next_epoch();
        if let Some(status) = status {
            if is_fatal(&status) {
                warn!(worker_id = %self.config.id, %status, "the service refused the worker");
                return Some(Err(Error::from_status(status)));
            }
            warn!(worker_id = %self.config.id, code = ?status.code(), message = status.message(), "worker stream failed");
        }
        if self.exiting() && self.attempts.is_empty() {
            return Some(Ok(()));
        }
        let delay = backoff::jittered(
            self.config.reconnect_min,
            self.config.reconnect_max,
            self.failures,
        );
        self.failures = self.failures.saturating_add(1);
        debug!(worker_id = %self.config.id, ?delay, in_flight = self.attempts.len(), "reconnecting after back-off");
        *conn = Conn::Idle {
            retry_at: instant_after(Instant::now(), delay),
        };
        None
    }

    fn on_message(&mut self, msg: pb::connect_response::Msg, conn: &mut Conn) {
        use pb::connect_response::Msg;
        match msg {
            Msg::Welcome(welcome) => self.on_welcome(welcome, conn),
            Msg::Assignments(batch) => {
                for assignment in batch.assignments {
                    self.on_assignment(assignment);
                }
            }
            Msg::Cancel(cancel) => self.on_cancel(cancel),
            Msg::Rejected(rejected) => self.on_rejected(rejected),
            Msg::Accepted(accepted) => self.on_accepted(accepted),
            Msg::Drained(_) => {
                if !self.server_drained {
                    if self.shutdown_at.is_some() {
                        debug!(worker_id = %self.config.id, "drain confirmed");
                    } else {
                        info!(worker_id = %self.config.id, in_flight = self.attempts.len(), "worker drained by the service: finishing in-flight work, then stopping");
                    }
                    self.server_drained = true;
                }
            }
        }
    }

    fn on_welcome(&mut self, welcome: pb::Welcome, conn: &mut Conn) {
        self.failures = 0;
        if let Conn::Connected { welcome_by, .. } = conn {
            *welcome_by = None;
        }
        let kept: HashSet<AttemptKey> = welcome
            .kept
            .iter()
            .map(|r| AttemptKey::new(&r.job_id, r.attempt))
            .collect();
        // Attempts the service no longer considers ours: stop running ones, forget finished
        // ones (their outcome was committed, or the attempt was given away).
        let mut lost = Vec::new();
        let mut dropped = Vec::new();
        self.attempts.retain(|key, attempt| {
            if kept.contains(key) {
                true
            } else if attempt.running {
                lost.push(key.clone());
                true
            } else {
                debug!(job_id = %key.job_id, attempt = key.attempt, "outcome not kept by the service; dropping it");
                dropped.push(key.clone());
                false
            }
        });
        for key in &dropped {
            self.outbox.unmute(key);
        }
        for key in lost {
            self.stop(
                &key,
                Cause::Lost,
                "the service did not keep the attempt after a reconnect",
            );
        }
        // What the previous session may not have delivered is sent again, in order: first the
        // kept attempts' acks (the service takes a repeated ack as a no-op, a lost one would
        // leave the attempt unacknowledged), then their progress and output still queued or
        // in flight, then their unconfirmed outcomes.
        let mut live: Vec<AttemptKey> = self
            .attempts
            .iter()
            .filter(|(_, a)| !Cause::disowned(a.cause))
            .map(|(k, _)| k.clone())
            .collect();
        live.sort_unstable();
        let acks = live
            .iter()
            .map(|k| {
                Queued::control(
                    k.clone(),
                    report(k, pb::worker_report::Kind::Ack(pb::Ack {})),
                )
            })
            .collect();
        let mut outcomes: Vec<(AttemptKey, pb::AttemptOutcome)> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.cause != Some(Cause::Lost))
            .filter_map(|(k, a)| a.outcome.clone().map(|o| (k.clone(), o)))
            .collect();
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        let outcomes = outcomes
            .into_iter()
            .map(|(k, o)| Queued::control(k.clone(), outcome_report(&k, o)))
            .collect();
        let live: HashSet<AttemptKey> = live.into_iter().collect();
        self.outbox.reconcile(
            |q| !q.is_outcome && !q.is_ack() && live.contains(&q.key),
            acks,
            outcomes,
        );

        let heartbeat = heartbeat_interval(&welcome);
        let exiting = self.exiting();
        if let Some(session) = &mut self.session {
            session.welcomed = true;
            if exiting {
                let _ = session.control.send(drain_request());
                self.drain_sent_at = Some(Instant::now());
            }
            // Starts the heartbeats and the reports.
            let _ = session.ready.send(Some(heartbeat));
        }
        info!(worker_id = %self.config.id, kept = kept.len(), ?heartbeat, "connected to the service");
    }

    fn on_assignment(&mut self, assignment: pb::Assignment) {
        let key = AttemptKey::new(&assignment.job_id, assignment.attempt);
        if self.attempts.contains_key(&key) {
            warn!(job_id = %key.job_id, attempt = key.attempt, "duplicate assignment ignored");
            return;
        }
        // The ack is queued before the handler can produce output, so it precedes it.
        self.outbox.push(Queued::control(
            key.clone(),
            report(&key, pb::worker_report::Kind::Ack(pb::Ack {})),
        ));
        let Some(handler) = self.config.handlers.get(&assignment.queue).cloned() else {
            let outcome = pb::AttemptOutcome {
                // Retryable: another worker may serve the queue.
                kind: Some(failure(
                    format!("worker has no handler for queue {}", assignment.queue),
                    true,
                )),
            };
            self.outbox.push(Queued::control(
                key.clone(),
                outcome_report(&key, outcome.clone()),
            ));
            self.attempts.insert(
                key,
                Attempt {
                    ctx: None,
                    abort: None,
                    running: false,
                    cause: None,
                    outcome: Some(outcome),
                },
            );
            return;
        };
        let token = CancellationToken::new();
        let span = process_span(&assignment);
        let ctx = JobContext::new(
            assignment,
            self.config.id.clone(),
            token.clone(),
            self.outbox.clone(),
            span.clone(),
        );
        let (abort, registration) = AbortHandle::new_pair();
        let task_ctx = ctx.clone();
        let end_ctx = ctx.clone();
        let task_key = key.clone();
        let finished = self.finished_tx.clone();
        tokio::spawn(
            async move {
                let run =
                    Abortable::new(async move { handler.handle(task_ctx).await }, registration);
                let ended = match AssertUnwindSafe(run).catch_unwind().await {
                    Ok(Ok(result)) => Ended::Returned(result),
                    Ok(Err(_aborted)) => Ended::Aborted,
                    Err(panic) => Ended::Panicked(panic_message(panic.as_ref())),
                };
                record_end(end_ctx.span(), &ended, end_ctx.cancel_reason());
                let _ = finished.send(Finished {
                    key: task_key,
                    ended,
                    cancelled: token.is_cancelled(),
                });
            }
            .instrument(span),
        );
        debug!(job_id = %key.job_id, attempt = key.attempt, "attempt started");
        let mut attempt = Attempt {
            ctx: Some(ctx),
            abort: Some(abort),
            running: true,
            cause: None,
            outcome: None,
        };
        if self.handlers_cancelled {
            // Arrived after the shutdown timeout: stop it at once.
            attempt.cause = Some(Cause::Shutdown);
            if let Some(ctx) = &attempt.ctx {
                ctx.token().cancel();
            }
        }
        self.attempts.insert(key, attempt);
        let running = self.attempts.values().filter(|a| a.running).count();
        if running > self.config.concurrency as usize {
            debug!(
                running,
                concurrency = self.config.concurrency,
                "more attempts running than the concurrency"
            );
        }
    }

    fn on_cancel(&mut self, cancel: pb::CancelAttempt) {
        let key = AttemptKey::new(&cancel.job_id, cancel.attempt);
        let Some(attempt) = self.attempts.get_mut(&key) else {
            debug!(job_id = %key.job_id, attempt = key.attempt, "cancel for an unknown attempt");
            return;
        };
        if !attempt.running
            || matches!(
                attempt.cause,
                Some(Cause::Server | Cause::Rejected | Cause::Lost)
            )
        {
            return;
        }
        attempt.cause = Some(Cause::Server);
        let reason = if cancel.reason.is_empty() {
            "CANCELLED".to_owned()
        } else {
            cancel.reason
        };
        info!(job_id = %key.job_id, attempt = key.attempt, %reason, "attempt cancelled by the service");
        if let Some(ctx) = &attempt.ctx {
            ctx.set_cancel_reason(reason);
            ctx.token().cancel();
        }
        let grace = convert::duration_from_pb(cancel.grace).unwrap_or(DEFAULT_CANCEL_GRACE);
        abort_after(attempt.abort.clone(), grace);
    }

    fn on_rejected(&mut self, rejected: pb::ReportRejected) {
        let key = AttemptKey::new(&rejected.job_id, rejected.attempt);
        let Some(attempt) = self.attempts.get(&key) else {
            return;
        };
        if attempt.running {
            // A report of a running attempt was refused: it is not ours any more. Its handler
            // is stopped, and its outcome still reported when it ends (see `Cause::Rejected`).
            self.stop(
                &key,
                Cause::Rejected,
                &format!("report rejected: {}", rejected.reason),
            );
        } else {
            // Usually the answer to the outcome. It may also answer an earlier report of an
            // attempt the service had already ended; the outcome then is still queued and goes
            // out all the same, which is all the service needs to release the attempt's slot.
            if attempt.cause == Some(Cause::Rejected) {
                debug!(job_id = %key.job_id, attempt = key.attempt, reason = %rejected.reason, "report of a rejected attempt rejected");
            } else {
                warn!(job_id = %key.job_id, attempt = key.attempt, reason = %rejected.reason, "outcome rejected by the service");
            }
            self.forget(&key);
        }
    }

    fn on_accepted(&mut self, accepted: pb::OutcomeAccepted) {
        let key = AttemptKey::new(&accepted.job_id, accepted.attempt);
        match self.attempts.get(&key) {
            Some(attempt) if !attempt.running => {
                debug!(job_id = %key.job_id, attempt = key.attempt, state = accepted.state, "outcome accepted");
                self.forget(&key);
            }
            Some(_) => {
                warn!(job_id = %key.job_id, attempt = key.attempt, "outcome accepted for an attempt still running");
            }
            None => {}
        }
    }

    fn on_finished(&mut self, finished: Finished) {
        let Some(attempt) = self.attempts.get_mut(&finished.key) else {
            return;
        };
        attempt.running = false;
        attempt.abort = None;
        attempt.ctx = None;
        let key = finished.key;
        match outcome_for(finished.ended, attempt.cause, finished.cancelled) {
            None => {
                debug!(job_id = %key.job_id, attempt = key.attempt, "lost attempt ended; nothing reported");
                self.forget(&key);
            }
            Some(kind) => {
                let outcome = pb::AttemptOutcome { kind: Some(kind) };
                attempt.outcome = Some(outcome.clone());
                self.outbox
                    .push(Queued::control(key.clone(), outcome_report(&key, outcome)));
            }
        }
    }

    /// Stops an attempt the service no longer considers this worker's (`cause` is `Rejected`
    /// or `Lost`): its handler is cancelled, then aborted after the abort grace, and its
    /// reports other than the outcome are no longer sent.
    fn stop(&mut self, key: &AttemptKey, cause: Cause, why: &str) {
        debug_assert!(Cause::disowned(Some(cause)));
        let Some(attempt) = self.attempts.get_mut(key) else {
            return;
        };
        // `Lost` is final; `Rejected` only gives way to it.
        match (attempt.cause, cause) {
            (Some(Cause::Lost), _) | (Some(Cause::Rejected), Cause::Rejected) => return,
            _ => {}
        }
        let was_stopping = Cause::disowned(attempt.cause);
        attempt.cause = Some(cause);
        self.outbox.mute(key);
        if was_stopping {
            return;
        }
        warn!(job_id = %key.job_id, attempt = key.attempt, why, "attempt no longer this worker's; stopping it");
        if let Some(ctx) = &attempt.ctx {
            ctx.token().cancel();
        }
        abort_after(attempt.abort.clone(), self.config.abort_grace);
    }

    /// Drops an attempt from the books once nothing more is to be sent or heard about it.
    fn forget(&mut self, key: &AttemptKey) {
        self.attempts.remove(key);
        self.outbox.unmute(key);
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        self.shutdown_at = Some(Instant::now());
        info!(worker_id = %self.config.id, in_flight = self.attempts.len(), "shutting down: draining");
        if let Some(session) = &self.session {
            if session.welcomed {
                let _ = session.control.send(drain_request());
                self.drain_sent_at = Some(Instant::now());
            }
        }
    }

    /// Until when a shutting-down worker waits for the service to confirm its drain; `None`
    /// when it does not wait (no shutdown, or the service confirmed).
    fn drain_deadline(&self) -> Option<Instant> {
        if self.server_drained {
            return None;
        }
        let since = self.drain_sent_at.or(self.shutdown_at)?;
        Some(instant_after(since, DRAIN_CONFIRM_TIMEOUT))
    }

    /// Whether a shutting-down worker may close its stream as far as the drain is concerned:
    /// the service confirmed it (no assignment can come any more), or it did not in time.
    fn drain_settled(&self, now: Instant) -> bool {
        self.drain_deadline().is_none_or(|d| now >= d)
    }

    /// The next deadline of the shutdown: cancelling the handlers, aborting them, giving up on
    /// their outcomes. `None` when there is none (no shutdown, or a timeout too large to end).
    fn shutdown_deadline(&self) -> Option<Instant> {
        let cancel_at = self
            .shutdown_at?
            .checked_add(self.config.shutdown_timeout)?;
        if !self.handlers_cancelled {
            return Some(cancel_at);
        }
        let abort_at = cancel_at.checked_add(self.config.abort_grace)?;
        if !self.handlers_aborted {
            return Some(abort_at);
        }
        abort_at.checked_add(DELIVERY_TIMEOUT)
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Waking up for the drain confirmation matters only once nothing else holds the exit.
        let drain = self
            .drain_deadline()
            .filter(|d| self.attempts.is_empty() && *d > Instant::now());
        match (self.shutdown_deadline(), drain) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances the shutdown; returns true when it is time to give up.
    fn on_deadline(&mut self) -> bool {
        if self.shutdown_deadline().is_none_or(|d| d > Instant::now()) {
            // Another deadline (the drain confirmation): `check_exit` handles it.
            return false;
        }
        if !self.handlers_cancelled {
            self.handlers_cancelled = true;
            let mut n = 0;
            for attempt in self.attempts.values_mut().filter(|a| a.running) {
                if attempt.cause.is_none() {
                    attempt.cause = Some(Cause::Shutdown);
                }
                if let Some(ctx) = &attempt.ctx {
                    ctx.token().cancel();
                }
                n += 1;
            }
            if n > 0 {
                warn!(
                    handlers = n,
                    "shutdown timeout passed: cancelling the remaining handlers"
                );
            }
            return false;
        }
        if !self.handlers_aborted {
            self.handlers_aborted = true;
            for attempt in self.attempts.values().filter(|a| a.running) {
                if let Some(abort) = &attempt.abort {
                    warn!("aborting a handler that ignored its cancellation");
                    abort.abort();
                }
            }
            return false;
        }
        warn!(
            unconfirmed = self.attempts.len(),
            "giving up on delivering the remaining outcomes"
        );
        true
    }
}

/// Statuses after which reconnecting cannot help.
fn is_fatal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::Unimplemented
    )
}

/// `at + d`, or a far future when that is not representable.
fn instant_after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// The heartbeat interval suggested by the welcome (or a third of the lease), kept within
/// bounds: never slower than half the lease, so that a bogus suggestion does not lose it, and
/// never so large that computing the next tick overflows.
fn heartbeat_interval(welcome: &pb::Welcome) -> Duration {
    let ttl = convert::duration_from_pb(welcome.lease_ttl).filter(|d| !d.is_zero());
    let suggested = convert::duration_from_pb(welcome.heartbeat_interval)
        .filter(|d| !d.is_zero())
        .or_else(|| ttl.map(|ttl| ttl / 3))
        .unwrap_or(DEFAULT_HEARTBEAT);
    let within_lease = ttl.map_or(suggested, |ttl| suggested.min(ttl / 2));
    within_lease.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

fn abort_after(abort: Option<AbortHandle>, after: Duration) {
    if let Some(abort) = abort {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            abort.abort();
        });
    }
}

fn drain_request() -> pb::ConnectRequest {
    pb::ConnectRequest {
        msg: Some(pb::connect_request::Msg::Drain(pb::Drain {})),
    }
}

fn report(key: &AttemptKey, kind: pb::worker_report::Kind) -> pb::WorkerReport {
    pb::WorkerReport {
        job_id: key.job_id.to_string(),
        attempt: key.attempt,
        kind: Some(kind),
    }
}

fn outcome_report(key: &AttemptKey, outcome: pb::AttemptOutcome) -> pb::WorkerReport {
    report(key, pb::worker_report::Kind::Outcome(outcome))
}

fn failure(message: impl Into<String>, retryable: bool) -> pb::attempt_outcome::Kind {
    pb::attempt_outcome::Kind::Failure(pb::Failure {
        message: message.into(),
        retryable,
    })
}

/// The span one attempt's handler runs in: `process {queue}`, kind consumer, a child of the
/// attempt's context from the service (its `attempt {queue}` span) or a new root if it has
/// none; never a child of whatever span the worker's run loop is in.
fn process_span(a: &pb::Assignment) -> tracing::Span {
    let span = tracing::info_span!(
        target: PROCESS_TARGET,
        parent: None,
        "process",
        otel.name = %format_args!("process {}", a.queue),
        otel.kind = "consumer",
        jobplane.job_id = %a.job_id,
        jobplane.queue = %a.queue,
        // i64: an integer attribute (tracing-opentelemetry records unsigned values as text).
        jobplane.attempt = i64::from(a.attempt),
        jobplane.pool = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    if !a.pool.is_empty() {
        span.record("jobplane.pool", a.pool.as_str());
    }
    // The messaging conventions' attributes go to the exported span only, not to log lines.
    span.set_attribute("messaging.system", "jobplane");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.destination.name", a.queue.clone());
    span.set_attribute("messaging.message.id", a.job_id.clone());
    if let Some(parent) = TraceContext::from_parts(&a.traceparent, &a.tracestate) {
        let cx = parent.to_otel();
        if cx.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer, when there is nothing to parent.
            let _ = span.set_parent(cx);
        }
    }
    span
}

/// Marks the handler's span as failed when the attempt did not succeed (see [`handler_error`]).
fn record_end(span: &tracing::Span, ended: &Ended, cancel_reason: Option<&str>) {
    if let Some(error) = handler_error(ended, cancel_reason) {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", error.as_str());
    }
}

/// Why a handler's run counts as an error, if it does: it failed, panicked, was rate limited,
/// produced a result too large, or stopped for any reason but a client's cancel (a run timeout,
/// the worker's shutdown).
fn handler_error(ended: &Ended, cancel_reason: Option<&str>) -> Option<String> {
    const CLIENT_CANCEL: &str = "CANCELLED";
    let stopped = |what: &str| match cancel_reason {
        Some(CLIENT_CANCEL) => None,
        Some(reason) => Some(format!("{what}: {reason}")),
        None => Some(format!("{what} without a cancel request from the service")),
    };
    match ended {
        Ended::Returned(Ok(result)) if result.len() > MAX_RESULT => {
            Some(format!("result too large: {} bytes", result.len()))
        }
        Ended::Returned(Ok(_)) => None,
        Ended::Returned(Err(HandlerError::Failed { message, .. })) => Some(message.clone()),
        Ended::Returned(Err(HandlerError::RateLimited { pool, .. })) => Some(match pool {
            Some(pool) => format!("rate limited by pool {pool}"),
            None => "rate limited".to_owned(),
        }),
        Ended::Returned(Err(HandlerError::Cancelled)) => stopped("cancelled"),
        Ended::Panicked(message) => Some(format!("handler panicked: {message}")),
        Ended::Aborted => stopped("aborted"),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// What to report for an attempt that ended; `None` for nothing (the attempt was lost on a
/// reconnect).
pub(crate) fn outcome_for(
    ended: Ended,
    cause: Option<Cause>,
    cancelled_before_end: bool,
) -> Option<pb::attempt_outcome::Kind> {
    use pb::attempt_outcome::Kind;
    const SHUT_DOWN: &str = "the worker shut down before the attempt finished";
    match cause {
        Some(Cause::Lost) => return None,
        // Whatever the handler returned, the service had already ended the attempt; the outcome
        // only tells it that the worker stopped, so it frees the attempt's slot.
        Some(Cause::Rejected) => return Some(Kind::Cancelled(pb::Cancelled {})),
        Some(Cause::Server) if cancelled_before_end || matches!(ended, Ended::Aborted) => {
            // Whatever the handler returned after the cancel, the attempt stopped because of it.
            return Some(Kind::Cancelled(pb::Cancelled {}));
        }
        _ => {}
    }
    let shutting_down = cause == Some(Cause::Shutdown);
    Some(match ended {
        Ended::Aborted => failure(SHUT_DOWN, true),
        Ended::Panicked(message) => failure(format!("handler panicked: {message}"), true),
        Ended::Returned(Ok(result)) if result.len() > MAX_RESULT => failure(
            format!(
                "result too large: {} bytes (at most {MAX_RESULT})",
                result.len()
            ),
            false,
        ),
        Ended::Returned(Ok(result)) => Kind::Success(pb::Success {
            result: result.into(),
        }),
        Ended::Returned(Err(HandlerError::Failed { message, retryable })) => {
            failure(message, retryable)
        }
        Ended::Returned(Err(HandlerError::RateLimited { pool, retry_after })) => {
            Kind::RateLimited(pb::RateLimited {
                pool: pool.unwrap_or_default(),
                retry_after: Some(convert::duration_to_pb(retry_after)),
            })
        }
        Ended::Returned(Err(HandlerError::Cancelled)) if shutting_down => failure(SHUT_DOWN, true),
        Ended::Returned(Err(HandlerError::Cancelled)) => failure(
            "the handler returned Cancelled without a cancel request",
            false,
        ),
    })
}

/// The requests of one session: `hello`, then control messages and heartbeats (a lane that is
/// always polled first), then batches of reports from the outbox. Heartbeats and reports start
/// once the session is welcomed (`ready` carries the heartbeat interval). The stream ends when
/// `close` is cancelled.
fn outbound(
    hello: pb::ConnectRequest,
    control: mpsc::UnboundedReceiver<pb::ConnectRequest>,
    ready: watch::Receiver<Option<Duration>>,
    outbox: Arc<Outbox>,
    epoch: u64,
    close: CancellationToken,
) -> impl Stream<Item = pb::ConnectRequest> + Send + 'static {
    let mut hb_ready = ready.clone();
    let heartbeats = async_stream::stream! {
        let Some(period) = wait_ready(&mut hb_ready).await else { return };
        let mut ticks = tokio::time::interval_at(instant_after(Instant::now(), period), period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            yield pb::ConnectRequest {
                msg: Some(pb::connect_request::Msg::Heartbeat(pb::Heartbeat {})),
            };
        }
    };
    let mut reports_ready = ready;
    let handover_outbox = outbox.clone();
    let reports = async_stream::stream! {
        if wait_ready(&mut reports_ready).await.is_none() {
            return;
        }
        while let Some(reports) = outbox.next_batch(epoch).await {
            yield pb::ConnectRequest {
                msg: Some(pb::connect_request::Msg::Reports(pb::WorkerReports { reports })),
            };
        }
    };
    let priority = stream::select(UnboundedReceiverStream::new(control), heartbeats);
    let merged = stream::select_with_strategy(priority, reports, |_: &mut ()| PollNext::Left);
    let requests = stream::once(async move { hello })
        .chain(merged)
        .take_until(close.cancelled_owned());
    HandOver {
        inner: requests.boxed(),
        outbox: handover_outbox,
        epoch,
        flush: false,
        after_pending: false,
    }
}

/// Tells the outbox when the reports a session's stream yielded have been handed to the
/// transport, so that only reports still in our hands are sent again after a broken stream.
///
/// tonic encodes what the stream yields into a buffer and gives that buffer to hyper when the
/// stream returns `Pending`; hyper polls the body for more only once it has passed the previous
/// chunk to HTTP/2. So when the stream is polled after it returned `Pending`, everything it
/// yielded before has been handed over. After each batch of reports the stream returns
/// `Pending` once (waking itself at once), so that a batch is handed over before the next one
/// is taken and never waits behind a busy outbox.
struct HandOver {
    inner: BoxStream<'static, pb::ConnectRequest>,
    outbox: Arc<Outbox>,
    epoch: u64,
    /// A batch of reports was just yielded: return `Pending` once before anything else.
    flush: bool,
    /// The last poll returned `Pending`.
    after_pending: bool,
}

impl Stream for HandOver {
    type Item = pb::ConnectRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if std::mem::take(&mut this.after_pending) {
            this.outbox.handed_over(this.epoch);
        }
        if std::mem::take(&mut this.flush) {
            this.after_pending = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Pending => {
                this.after_pending = true;
                Poll::Pending
            }
            Poll::Ready(Some(req)) => {
                this.flush = matches!(req.msg, Some(pb::connect_request::Msg::Reports(_)));
                Poll::Ready(Some(req))
            }
            Poll::Ready(None) => Poll::Ready(None),
        }
    }
}

async fn wait_ready(ready: &mut watch::Receiver<Option<Duration>>) -> Option<Duration> {
    let value = ready.wait_for(Option::is_some).await.ok()?;
    *value
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::attempt_outcome::Kind;

    fn ok(bytes: &[u8]) -> Ended {
        Ended::Returned(Ok(bytes.to_vec()))
    }

    #[test]
    fn plain_results_map_to_outcomes() {
        assert_eq!(
            outcome_for(ok(b"r"), None, false),
            Some(Kind::Success(pb::Success {
                result: bytes::Bytes::from_static(b"r")
            }))
        );
        assert_eq!(
            outcome_for(
                Ended::Returned(Err(HandlerError::fatal("bad"))),
                None,
                false
            ),
            Some(failure("bad", false))
        );
        assert_eq!(
            outcome_for(
                Ended::Returned(Err(HandlerError::rate_limited(
                    Some("gpt".into()),
                    Duration::from_secs(3)
                ))),
                None,
                false
            ),
            Some(Kind::RateLimited(pb::RateLimited {
                pool: "gpt".into(),
                retry_after: Some(convert::duration_to_pb(Duration::from_secs(3))),
            }))
        );
        let Some(Kind::Failure(f)) = outcome_for(Ended::Panicked("boom".into()), None, false)
        else {
            panic!("a panic is a failure");
        };
        assert!(f.retryable && f.message.contains("boom"));
    }

    #[test]
    fn results_after_a_server_cancel_are_cancelled() {
        for ended in [
            ok(b"late"),
            Ended::Returned(Err(HandlerError::Cancelled)),
            Ended::Returned(Err(HandlerError::retryable("x"))),
            Ended::Aborted,
        ] {
            assert_eq!(
                outcome_for(ended, Some(Cause::Server), true),
                Some(Kind::Cancelled(pb::Cancelled {}))
            );
        }
        // The cancel came after the handler had returned: its result stands.
        assert!(matches!(
            outcome_for(ok(b"r"), Some(Cause::Server), false),
            Some(Kind::Success(_))
        ));
    }

    #[test]
    fn lost_attempts_report_nothing() {
        assert_eq!(outcome_for(ok(b"r"), Some(Cause::Lost), true), None);
        assert_eq!(outcome_for(Ended::Aborted, Some(Cause::Lost), true), None);
    }

    #[test]
    fn rejected_attempts_report_cancelled_whatever_the_handler_did() {
        let endings = || {
            [
                ok(b"r"),
                Ended::Returned(Err(HandlerError::Cancelled)),
                Ended::Returned(Err(HandlerError::fatal("x"))),
                Ended::Panicked("boom".into()),
                Ended::Aborted,
            ]
        };
        for cancelled in [true, false] {
            for ended in endings() {
                assert_eq!(
                    outcome_for(ended, Some(Cause::Rejected), cancelled),
                    Some(Kind::Cancelled(pb::Cancelled {}))
                );
            }
        }
    }

    /// A welcome; `Duration::MAX` goes on the wire as the largest protobuf duration.
    fn welcome(heartbeat: Option<Duration>, ttl: Option<Duration>) -> pb::Welcome {
        pb::Welcome {
            heartbeat_interval: heartbeat.map(convert::duration_to_pb),
            lease_ttl: ttl.map(convert::duration_to_pb),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn heartbeat_interval_is_kept_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(heartbeat_interval(&welcome(Some(s(2)), Some(s(10)))), s(2));
        assert_eq!(heartbeat_interval(&welcome(None, Some(s(9)))), s(3));
        assert_eq!(heartbeat_interval(&welcome(None, None)), DEFAULT_HEARTBEAT);
        // Never slower than half the lease, never faster than the floor.
        assert_eq!(heartbeat_interval(&welcome(Some(s(60)), Some(s(10)))), s(5));
        assert_eq!(
            heartbeat_interval(&welcome(Some(Duration::from_nanos(1)), None)),
            MIN_HEARTBEAT
        );
        // Absurd values are clamped instead of overflowing later.
        for (hb, ttl) in [
            (Some(Duration::MAX), None),
            (Some(Duration::MAX), Some(Duration::MAX)),
            (None, Some(Duration::MAX)),
        ] {
            let d = heartbeat_interval(&welcome(hb, ttl));
            assert_eq!(d, MAX_HEARTBEAT, "{hb:?} {ttl:?}");
            let _ = tokio::time::interval_at(instant_after(Instant::now(), d), d);
        }
    }

    #[tokio::test]
    async fn instants_saturate() {
        let now = Instant::now();
        assert_eq!(
            instant_after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(instant_after(now, Duration::MAX) >= now + Duration::from_secs(86400 * 365));
    }

    fn reports_request(id: &str) -> pb::ConnectRequest {
        pb::ConnectRequest {
            msg: Some(pb::connect_request::Msg::Reports(pb::WorkerReports {
                reports: vec![report(
                    &AttemptKey::new(id, 1),
                    pb::worker_report::Kind::Ack(pb::Ack {}),
                )],
            })),
        }
    }

    #[tokio::test]
    async fn reports_are_handed_over_once_polled_after_pending() {
        use futures::task::noop_waker_ref;
        let outbox = Arc::new(Outbox::new(1 << 20));
        let epoch = outbox.next_epoch();
        outbox.push(Queued::control(
            AttemptKey::new("a", 1),
            report(
                &AttemptKey::new("a", 1),
                pb::worker_report::Kind::Ack(pb::Ack {}),
            ),
        ));
        // What the transport takes from the stream: the batch the outbox gave out, then more.
        assert_eq!(outbox.next_batch(epoch).await.unwrap().len(), 1);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(reports_request("a")).unwrap();
        tx.send(reports_request("b")).unwrap();
        let mut stream = HandOver {
            inner: UnboundedReceiverStream::new(rx).boxed(),
            outbox: outbox.clone(),
            epoch,
            flush: false,
            after_pending: false,
        };
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(
            stream.poll_next_unpin(&mut cx),
            Poll::Ready(Some(_))
        ));
        // After a batch, the stream lets the transport send it before anything else...
        assert!(stream.poll_next_unpin(&mut cx).is_pending());
        // ...and only polled again is it handed over: a session ending now sends nothing again.
        assert!(matches!(
            stream.poll_next_unpin(&mut cx),
            Poll::Ready(Some(_))
        ));
        outbox.next_epoch();
        assert_eq!(outbox.len(), 0);
    }

    #[tokio::test]
    async fn reports_not_handed_over_are_sent_again() {
        use futures::task::noop_waker_ref;
        let outbox = Arc::new(Outbox::new(1 << 20));
        let epoch = outbox.next_epoch();
        let key = AttemptKey::new("a", 1);
        outbox.push(Queued::control(
            key.clone(),
            report(&key, pb::worker_report::Kind::Ack(pb::Ack {})),
        ));
        assert_eq!(outbox.next_batch(epoch).await.unwrap().len(), 1);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(reports_request("a")).unwrap();
        let mut stream = HandOver {
            inner: UnboundedReceiverStream::new(rx).boxed(),
            outbox: outbox.clone(),
            epoch,
            flush: false,
            after_pending: false,
        };
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(
            stream.poll_next_unpin(&mut cx),
            Poll::Ready(Some(_))
        ));
        assert!(stream.poll_next_unpin(&mut cx).is_pending());
        // The transport never came back for more (say the stream was reset): the session ends
        // with the batch still in flight, and it is queued again.
        drop(stream);
        outbox.next_epoch();
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn shutdown_cancellation_is_a_retryable_failure() {
        for ended in [
            Ended::Aborted,
            Ended::Returned(Err(HandlerError::Cancelled)),
        ] {
            let Some(Kind::Failure(f)) = outcome_for(ended, Some(Cause::Shutdown), true) else {
                panic!("expected a failure");
            };
            assert!(f.retryable);
        }
        // A handler that finished its work during shutdown still succeeds.
        assert!(matches!(
            outcome_for(ok(b"r"), Some(Cause::Shutdown), true),
            Some(Kind::Success(_))
        ));
    }

    #[test]
    fn unrequested_cancel_and_huge_results_are_fatal() {
        let Some(Kind::Failure(f)) =
            outcome_for(Ended::Returned(Err(HandlerError::Cancelled)), None, false)
        else {
            panic!("expected a failure");
        };
        assert!(!f.retryable);
        let Some(Kind::Failure(f)) =
            outcome_for(Ended::Returned(Ok(vec![0; MAX_RESULT + 1])), None, false)
        else {
            panic!("expected a failure");
        };
        assert!(!f.retryable && f.message.contains("too large"));
    }

    #[test]
    fn only_failures_and_unrequested_stops_are_errors() {
        let failed = |m: &str| Ended::Returned(Err(HandlerError::retryable(m)));
        assert_eq!(handler_error(&ok(b"x"), None), None);
        assert_eq!(
            handler_error(&failed("boom"), None).as_deref(),
            Some("boom")
        );
        assert_eq!(
            handler_error(&Ended::Panicked("oops".into()), None).as_deref(),
            Some("handler panicked: oops")
        );
        let cancelled = || Ended::Returned(Err(HandlerError::Cancelled));
        // A client's cancel is what the client asked for; a run timeout is a failure.
        assert_eq!(handler_error(&cancelled(), Some("CANCELLED")), None);
        assert_eq!(handler_error(&Ended::Aborted, Some("CANCELLED")), None);
        assert_eq!(
            handler_error(&cancelled(), Some("RUN_TIMEOUT")).as_deref(),
            Some("cancelled: RUN_TIMEOUT")
        );
        assert!(handler_error(&Ended::Aborted, None).is_some());
        assert!(handler_error(&ok(&vec![0; MAX_RESULT + 1]), None).is_some());
        let limited = Ended::Returned(Err(HandlerError::RateLimited {
            pool: Some("gpt".into()),
            retry_after: Duration::from_secs(1),
        }));
        assert_eq!(
            handler_error(&limited, None).as_deref(),
            Some("rate limited by pool gpt")
        );
    }

    #[test]
    fn the_handler_span_continues_the_attempts_context() {
        use crate::trace::testing::{attr, install};
        use opentelemetry::trace::{SpanKind, Status};
        let (_guard, finished) = install(true);
        let dispatch = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let assignment = |job_id: &str, pool: &str| pb::Assignment {
            job_id: job_id.into(),
            attempt: 2,
            queue: "thumbnails".into(),
            traceparent: dispatch.into(),
            tracestate: "k=v".into(),
            pool: pool.into(),
            ..Default::default()
        };
        // Made inside another span (the run loop's), which it must not be a child of.
        let outer = tracing::info_span!("run loop");
        let span = outer.in_scope(|| process_span(&assignment("j1", "gpt")));
        span.in_scope(|| tracing::info_span!("user work").in_scope(|| {}));
        record_end(&span, &ok(b""), None);
        drop(span);
        let failed = process_span(&assignment("j2", ""));
        record_end(
            &failed,
            &Ended::Returned(Err(HandlerError::fatal("bad input"))),
            None,
        );
        drop(failed);

        let all = finished.named("process thumbnails");
        assert_eq!(all.len(), 2);
        let parent = TraceContext::new(dispatch)
            .to_otel()
            .span()
            .span_context()
            .clone();
        let by_job = |id: &str| {
            all.iter()
                .find(|s| attr(s, "jobplane.job_id").map(|v| v.to_string()).as_deref() == Some(id))
                .unwrap()
                .clone()
        };
        let ok_span = by_job("j1");
        assert_eq!(ok_span.span_kind, SpanKind::Consumer);
        assert_eq!(ok_span.span_context.trace_id(), parent.trace_id());
        assert_eq!(ok_span.parent_span_id, parent.span_id());
        assert_eq!(ok_span.span_context.trace_state().header(), "k=v");
        assert_eq!(ok_span.status, Status::Unset);
        let a = |k| attr(&ok_span, k).map(|v| v.to_string());
        assert_eq!(a("messaging.system").as_deref(), Some("jobplane"));
        assert_eq!(a("messaging.operation.type").as_deref(), Some("process"));
        assert_eq!(
            a("messaging.destination.name").as_deref(),
            Some("thumbnails")
        );
        assert_eq!(a("messaging.message.id").as_deref(), Some("j1"));
        assert_eq!(a("jobplane.queue").as_deref(), Some("thumbnails"));
        assert_eq!(
            attr(&ok_span, "jobplane.attempt"),
            Some(opentelemetry::Value::I64(2))
        );
        assert_eq!(a("jobplane.pool").as_deref(), Some("gpt"));
        let user = finished.one("user work");
        assert_eq!(user.parent_span_id, ok_span.span_context.span_id());

        let failed = by_job("j2");
        assert_eq!(attr(&failed, "jobplane.pool"), None);
        assert_eq!(
            failed.status,
            Status::Error {
                description: "bad input".into()
            }
        );
    }
}
