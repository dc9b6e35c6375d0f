//! `jobplane.v1.WorkerService`: one bidirectional stream per worker.
//!
//! Inbound messages are handled strictly in order: the engine enqueues their writes in that order,
//! so output reported before an outcome is always committed before it (in the same transaction
//! or an earlier one). Reports are pipelined: up to `MAX_PENDING_COMMITS` messages may wait for
//! their commit while the next ones are read, which is the stream's back-pressure. Outbound, consecutive assignments
//! are coalesced into one message.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use jobplane_proto::pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::error::{invalid, to_status};
use crate::engine::{CommitTicket, Engine, ToWorker};

/// Messages of one stream whose reports may wait for their commit at the same time.
const MAX_PENDING_COMMITS: usize = 64;

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most assignments coalesced into one message.
const MAX_ASSIGNMENTS_PER_MESSAGE: usize = 512;

pub(crate) struct Workers {
    engine: Arc<Engine>,
}

impl Workers {
    pub fn new(engine: Arc<Engine>) -> Self {
        Workers { engine }
    }
}

fn assignment(
    job: &crate::engine::model::Job,
    trace: Option<&crate::engine::model::TraceContext>,
) -> pb::Assignment {
    pb::Assignment {
        job_id: job.id.to_string(),
        attempt: job.attempt,
        queue: job.queue.to_string(),
        payload: job.payload.clone(),
        labels: job
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        run_timeout: job.run_timeout.map(convert::pb_duration),
        priority: job.priority,
        traceparent: trace.map(|t| t.traceparent.clone()).unwrap_or_default(),
        pool: job.pool.as_ref().map(|p| p.to_string()).unwrap_or_default(),
        tracestate: trace.map(|t| t.tracestate.clone()).unwrap_or_default(),
    }
}

fn message(m: ToWorker) -> pb::ConnectResponse {
    use pb::connect_response::Msg;
    let msg = match m {
        ToWorker::Welcome {
            worker_id,
            lease_ttl,
            heartbeat_interval,
            kept,
        } => Msg::Welcome(pb::Welcome {
            worker_id: worker_id.to_string(),
            lease_ttl: Some(convert::pb_duration(lease_ttl)),
            heartbeat_interval: Some(convert::pb_duration(heartbeat_interval)),
            kept: kept
                .into_iter()
                .map(|(id, attempt)| pb::AttemptRef {
                    job_id: id.to_string(),
                    attempt,
                })
                .collect(),
        }),
        ToWorker::Assign(job, trace) => Msg::Assignments(pb::Assignments {
            assignments: vec![assignment(&job, trace.as_deref())],
        }),
        ToWorker::Cancel {
            job_id,
            attempt,
            grace,
            reason,
        } => Msg::Cancel(pb::CancelAttempt {
            job_id: job_id.to_string(),
            attempt,
            grace: Some(convert::pb_duration(grace)),
            reason,
        }),
        ToWorker::Rejected {
            job_id,
            attempt,
            reason,
        } => Msg::Rejected(pb::ReportRejected {
            job_id: job_id.to_string(),
            attempt,
            reason: reason.to_string(),
        }),
        ToWorker::Accepted {
            job_id,
            attempt,
            state,
        } => Msg::Accepted(pb::OutcomeAccepted {
            job_id: job_id.to_string(),
            attempt,
            state: convert::pb_state(state) as i32,
        }),
        ToWorker::Drained => Msg::Drained(pb::Drained {}),
    };
    pb::ConnectResponse { msg: Some(msg) }
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ConnectResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for Workers {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        req: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = req.into_inner();
        let stopping = self.engine.stopping();
        let first = tokio::select! {
            m = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => match m {
                Ok(m) => m?.ok_or_else(|| invalid("msg", "the stream ended before hello"))?,
                Err(_) => return Err(invalid("msg", "no hello within 10s")),
            },
            _ = stopping.cancelled() => {
                return Err(Status::unavailable("the service is shutting down"));
            }
        };
        let hello = match first.msg {
            Some(pb::connect_request::Msg::Hello(h)) => convert::hello(h).map_err(to_status)?,
            _ => return Err(invalid("msg", "the first message must be hello")),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = self.engine.connect_worker(hello, tx).map_err(to_status)?;
        tracing::info!(worker = %session.worker_id, session = session.session, "worker connected");

        let engine = self.engine.clone();
        let s = session.clone();
        let stop_inbound = stopping.clone();
        tokio::spawn(async move {
            let mut pending: VecDeque<CommitTicket> = VecDeque::new();
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = stop_inbound.cancelled() => break,
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(worker = %s.worker_id, error = %e, "worker stream error");
                        break;
                    }
                };
                match msg.msg {
                    Some(pb::connect_request::Msg::Reports(r)) => {
                        let mut reports = Vec::with_capacity(r.reports.len());
                        for (i, rep) in r.reports.into_iter().enumerate() {
                            match convert::report(rep, i) {
                                Ok(rep) => reports.push(rep),
                                Err(e) => {
                                    tracing::warn!(worker = %s.worker_id, error = %e, "invalid report dropped");
                                }
                            }
                        }
                        match engine.reports(&s, reports) {
                            Ok(ticket) => pending.push_back(ticket),
                            Err(e) => {
                                tracing::warn!(worker = %s.worker_id, error = %e, "reports failed");
                                break;
                            }
                        }
                        // Back-pressure: at most MAX_PENDING_COMMITS messages of this stream
                        // wait for their commit before the next message is read.
                        let mut failed = false;
                        while pending.len() > MAX_PENDING_COMMITS {
                            let ticket = pending.pop_front().expect("pending");
                            if let Err(e) = ticket.committed().await {
                                tracing::warn!(worker = %s.worker_id, error = %e, "commit failed");
                                failed = true;
                                break;
                            }
                        }
                        if failed {
                            break;
                        }
                    }
                    Some(pb::connect_request::Msg::Heartbeat(_)) => engine.heartbeat(&s),
                    Some(pb::connect_request::Msg::Drain(_)) => {
                        let _ = engine.drain_worker(&s.namespace, &s.worker_id).await;
                    }
                    Some(pb::connect_request::Msg::Hello(_)) | None => {
                        tracing::warn!(worker = %s.worker_id, "unexpected message; closing stream");
                        break;
                    }
                }
                if !engine.is_current(&s) {
                    break;
                }
            }
            engine.disconnect_worker(&s);
            tracing::info!(worker = %s.worker_id, session = s.session, "worker stream ended");
        });

        let outbound = async_stream::stream! {
            let mut held: Option<ToWorker> = None;
            loop {
                let next = match held.take() {
                    Some(m) => Some(m),
                    None => tokio::select! {
                        m = rx.recv() => m,
                        _ = stopping.cancelled() => {
                            yield Err(Status::unavailable("the service is shutting down"));
                            break;
                        }
                    },
                };
                let Some(m) = next else { break };
                match m {
                    ToWorker::Assign(job, trace) => {
                        let mut batch = vec![assignment(&job, trace.as_deref())];
                        while batch.len() < MAX_ASSIGNMENTS_PER_MESSAGE {
                            match rx.try_recv() {
                                Ok(ToWorker::Assign(job, trace)) => {
                                    batch.push(assignment(&job, trace.as_deref()))
                                }
                                Ok(other) => {
                                    held = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        yield Ok(pb::ConnectResponse {
                            msg: Some(pb::connect_response::Msg::Assignments(pb::Assignments {
                                assignments: batch,
                            })),
                        });
                    }
                    other => yield Ok(message(other)),
                }
            }
        };
        Ok(Response::new(Box::pin(outbound)))
    }
}
