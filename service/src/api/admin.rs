//! `jobplane.v1.AdminService`.

use std::sync::Arc;

use jobplane_proto::pb;
use tonic::{Request, Response, Status};

use super::convert;
use super::error::{invalid, to_status};
use crate::engine::model::{Name, PoolKey, QueueKey, WorkerId};
use crate::engine::Engine;

pub(crate) struct Admin {
    engine: Arc<Engine>,
}

impl Admin {
    pub fn new(engine: Arc<Engine>) -> Self {
        Admin { engine }
    }
}

/// The pool a request names.
fn pool_key(namespace: &str, name: &str) -> Result<PoolKey, Status> {
    Ok(PoolKey {
        namespace: convert::namespace(namespace, "namespace").map_err(to_status)?,
        name: convert::name(name, "name").map_err(to_status)?,
    })
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

    async fn configure_pool(
        &self,
        req: Request<pb::ConfigurePoolRequest>,
    ) -> Result<Response<pb::ConfigurePoolResponse>, Status> {
        let r = req.into_inner();
        let key = pool_key(&r.namespace, &r.name)?;
        let config = convert::pool_config(r.config, "config").map_err(to_status)?;
        if config.shared && key.namespace != Name::default_namespace() {
            return Err(invalid(
                "config.shared",
                "only a pool of the \"default\" namespace can be shared",
            ));
        }
        let info = self
            .engine
            .configure_pool(key, config)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ConfigurePoolResponse {
            pool: Some(convert::pb_pool(&info)),
        }))
    }

    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::GetPoolResponse>, Status> {
        let r = req.get_ref();
        let key = pool_key(&r.namespace, &r.name)?;
        let info = self.engine.get_pool(&key).map_err(to_status)?;
        Ok(Response::new(pb::GetPoolResponse {
            pool: Some(convert::pb_pool(&info)),
        }))
    }

    async fn list_pools(
        &self,
        req: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let ns = convert::namespace(&req.get_ref().namespace, "namespace").map_err(to_status)?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: self
                .engine
                .list_pools(&ns)
                .iter()
                .map(convert::pb_pool)
                .collect(),
        }))
    }

    async fn delete_pool(
        &self,
        req: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let r = req.get_ref();
        let key = pool_key(&r.namespace, &r.name)?;
        self.engine.delete_pool(key).await.map_err(to_status)?;
        Ok(Response::new(pb::DeletePoolResponse {}))
    }
}
