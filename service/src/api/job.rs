//! `jobplane.v1.JobService`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use jobplane_proto::pb;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::convert::{self, MAX_BATCH};
use super::error::{invalid, to_status};
use super::grpc_timeout;
use super::trace;
use crate::engine::model::{JobFilter, JobId, JobState};
use crate::engine::{Engine, WaitMode};

/// Default wait when the request names no timeout.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Longest wait.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Margin kept before the caller's gRPC deadline, so the answer arrives in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

pub(crate) struct Jobs {
    engine: Arc<Engine>,
}

impl Jobs {
    pub fn new(engine: Arc<Engine>) -> Self {
        Jobs { engine }
    }
}

fn wait_deadline(
    meta: &tonic::metadata::MetadataMap,
    timeout: Option<&prost_types::Duration>,
) -> Result<Instant, Status> {
    let asked = convert::duration(timeout, "timeout")
        .map_err(to_status)?
        .unwrap_or(DEFAULT_WAIT)
        .min(MAX_WAIT);
    let bound = grpc_timeout(meta)
        .map(|d| d.saturating_sub(DEADLINE_MARGIN))
        .map_or(asked, |d| d.min(asked));
    Ok(Instant::now() + bound)
}

fn states(v: &[i32], field: &str) -> Result<Vec<JobState>, Status> {
    v.iter()
        .enumerate()
        .map(|(i, s)| convert::state(*s, &format!("{field}[{i}]")))
        .collect::<Result<_, _>>()
        .map_err(to_status)
}

/// Cursor of a job listing: the last job id of the page.
fn page_token(t: &str) -> Result<Option<JobId>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    convert::job_id(t, "page_token")
        .map(Some)
        .map_err(to_status)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for Jobs {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let (meta, _, msg) = req.into_parts();
        let mut spec = convert::spec(msg.spec, "spec").map_err(to_status)?;
        spec.trace = trace::job_trace(&meta);
        let mut out = self.engine.submit(vec![spec]).await.map_err(to_status)?;
        let s = out.pop().ok_or_else(|| Status::internal("no result"))?;
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some(convert::pb_job(&s.job)),
            created: s.created,
        }))
    }

    async fn submit_jobs(
        &self,
        req: Request<pb::SubmitJobsRequest>,
    ) -> Result<Response<pb::SubmitJobsResponse>, Status> {
        let (meta, _, msg) = req.into_parts();
        let specs = msg.specs;
        if specs.is_empty() {
            return Err(invalid("specs", "must hold at least one job"));
        }
        if specs.len() > MAX_BATCH {
            return Err(invalid(
                "specs",
                format!("at most {MAX_BATCH} jobs per batch"),
            ));
        }
        let mut specs = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| convert::spec(Some(s), &format!("specs[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_status)?;
        let job_trace = trace::job_trace(&meta);
        for s in &mut specs {
            s.trace = job_trace.clone();
        }
        let out = self.engine.submit(specs).await.map_err(to_status)?;
        Ok(Response::new(pb::SubmitJobsResponse {
            results: out
                .iter()
                .map(|s| pb::SubmitJobResponse {
                    job: Some(convert::pb_job(&s.job)),
                    created: s.created,
                })
                .collect(),
        }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let r = req.into_inner();
        let ns = convert::namespace(&r.namespace, "namespace").map_err(to_status)?;
        let id = convert::job_id(&r.id, "id").map_err(to_status)?;
        let job = self.engine.get(&ns, id).await.map_err(to_status)?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(convert::pb_job(&job)),
        }))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n,
            _ => return Err(invalid("page_size", "must be 1-1000")),
        };
        let filter = JobFilter {
            namespace: Some(convert::namespace(&r.namespace, "namespace").map_err(to_status)?),
            queue: if r.queue.is_empty() {
                None
            } else {
                Some(convert::name(&r.queue, "queue").map_err(to_status)?)
            },
            states: states(&r.states, "states")?,
            labels: convert::labels(r.labels, "labels").map_err(to_status)?,
            created_after: convert::timestamp(r.created_after.as_ref(), "created_after")
                .map_err(to_status)?,
            created_before: convert::timestamp(r.created_before.as_ref(), "created_before")
                .map_err(to_status)?,
            limit,
            before_id: page_token(&r.page_token)?,
        };
        let jobs = self.engine.list(&filter).await.map_err(to_status)?;
        let next = if jobs.len() as u32 == limit {
            jobs.last().map(|j| j.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(convert::pb_job).collect(),
            next_page_token: next,
        }))
    }

    async fn wait_job(
        &self,
        req: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::WaitJobResponse>, Status> {
        let deadline = wait_deadline(req.metadata(), req.get_ref().timeout.as_ref())?;
        let r = req.into_inner();
        let ns = convert::namespace(&r.namespace, "namespace").map_err(to_status)?;
        let id = convert::job_id(&r.id, "id").map_err(to_status)?;
        let targets = states(&r.target_states, "target_states")?;
        let (mut jobs, reached) = self
            .engine
            .wait(&ns, &[id], &targets, WaitMode::All, deadline)
            .await
            .map_err(to_status)?;
        let (job, _) = jobs.pop().ok_or_else(|| Status::internal("no result"))?;
        Ok(Response::new(pb::WaitJobResponse {
            job: Some(convert::pb_job(&job)),
            reached,
        }))
    }

    async fn wait_jobs(
        &self,
        req: Request<pb::WaitJobsRequest>,
    ) -> Result<Response<pb::WaitJobsResponse>, Status> {
        let deadline = wait_deadline(req.metadata(), req.get_ref().timeout.as_ref())?;
        let r = req.into_inner();
        let ns = convert::namespace(&r.namespace, "namespace").map_err(to_status)?;
        if r.ids.is_empty() {
            return Err(invalid("ids", "must name at least one job"));
        }
        if r.ids.len() > MAX_BATCH {
            return Err(invalid("ids", format!("at most {MAX_BATCH} jobs")));
        }
        let ids = r
            .ids
            .iter()
            .enumerate()
            .map(|(i, s)| convert::job_id(s, &format!("ids[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_status)?;
        let mode = match pb::WaitMode::try_from(r.mode) {
            Ok(pb::WaitMode::All) => WaitMode::All,
            Ok(pb::WaitMode::Any) => WaitMode::Any,
            _ => return Err(invalid("mode", "must be WAIT_MODE_ALL or WAIT_MODE_ANY")),
        };
        let targets = states(&r.target_states, "target_states")?;
        let (jobs, reached) = self
            .engine
            .wait(&ns, &ids, &targets, mode, deadline)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::WaitJobsResponse {
            results: jobs
                .iter()
                .map(|(j, r)| pb::WaitJobResponse {
                    job: Some(convert::pb_job(j)),
                    reached: *r,
                })
                .collect(),
            reached,
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let r = req.into_inner();
        let ns = convert::namespace(&r.namespace, "namespace").map_err(to_status)?;
        let id = convert::job_id(&r.id, "id").map_err(to_status)?;
        let grace = convert::duration(r.grace.as_ref(), "grace").map_err(to_status)?;
        if r.reason.len() > 1024 {
            return Err(invalid("reason", "must be at most 1024 bytes"));
        }
        let (job, outcome) = self
            .engine
            .cancel(&ns, id, grace, &r.reason)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(convert::pb_job(&job)),
            outcome: convert::pb_cancel_outcome(outcome) as i32,
        }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let r = req.into_inner();
        let ns = convert::namespace(&r.namespace, "namespace").map_err(to_status)?;
        let id = convert::job_id(&r.id, "id").map_err(to_status)?;
        let events = self
            .engine
            .watch(&ns, id, r.from_seq)
            .await
            .map_err(to_status)?;
        let stream = events.map(|r| {
            r.map(|e| pb::WatchJobResponse {
                event: Some(convert::pb_event(&e)),
            })
            .map_err(to_status)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
