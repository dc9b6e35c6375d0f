//! `jobplane.v1.AdminService`.

use std::sync::Arc;

use jobplane_proto::pb;
use tonic::{Request, Response, Status};

use super::convert;
use super::error::{invalid, to_status};
use crate::engine::model::{QueueKey, WorkerId};
use crate::engine::Engine;

pub(crate) struct Admin {
    engine: Arc<Engine>,
}

impl Admin {
    pub fn new(engine: Arc<Engine>) -> Self {
        Admin { engine }
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Admin {
    async fn configure_queue(
        &self,
        req: Request<pb::ConfigureQueueRequest>,
    ) -> Result<Response<pb::ConfigureQueueResponse>, Status> {
        let r = req.into_inner();
        let key = QueueKey {
            namespace: convert::namespace(&r.namespace, "namespace").map_err(to_status)?,
            name: convert::name(&r.name, "name").map_err(to_status)?,
        };
        let config = convert::queue_config(r.config, "config").map_err(to_status)?;
        let info = self
            .engine
            .configure_queue(key, config)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ConfigureQueueResponse {
            queue: Some(convert::pb_queue(&info)),
        }))
    }

    async fn list_queues(
        &self,
        req: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let ns = convert::namespace(&req.get_ref().namespace, "namespace").map_err(to_status)?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues: self
                .engine
                .list_queues(&ns)
                .iter()
                .map(convert::pb_queue)
                .collect(),
        }))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let ns = convert::namespace(&req.get_ref().namespace, "namespace").map_err(to_status)?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: self
                .engine
                .list_workers(&ns)
                .iter()
                .map(convert::pb_worker)
                .collect(),
        }))
    }

    async fn drain_worker(
        &self,
        req: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let r = req.into_inner();
        let ns = convert::namespace(&r.namespace, "namespace").map_err(to_status)?;
        if r.id.is_empty() {
            return Err(invalid("id", "must not be empty"));
        }
        let info = self
            .engine
            .drain_worker(&ns, &WorkerId(r.id.into()))
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DrainWorkerResponse {
            worker: Some(convert::pb_worker(&info)),
        }))
    }
}
