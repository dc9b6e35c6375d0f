//! Capacity pool administration: create or update, inspect, list and delete pools.

use jobplane_proto::pb;
use jobplane_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use crate::client::Client;
use crate::convert;
use crate::error::{Error, Result};
use crate::rpc;
use crate::types::{PoolConfig, PoolInfo};

impl Client {
    fn pools_admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().clone())
    }

    /// Creates a capacity pool or replaces its settings whole.
    ///
    /// ```no_run
    /// # async fn demo(client: jobplane::Client) -> Result<(), jobplane::Error> {
    /// use std::time::Duration;
    /// use jobplane::{PoolConfig, RateLimit};
    ///
    /// let pool = client
    ///     .configure_pool(
    ///         "gpt-4o",
    ///         PoolConfig::new()
    ///             .max_units("requests", 8)
    ///             .rate(RateLimit::new("tokens", 90_000, Duration::from_secs(60))),
    ///     )
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn configure_pool(&self, name: &str, config: PoolConfig) -> Result<PoolInfo> {
        let span = self.admin_span("ConfigurePool");
        let req = rpc::request(
            &span,
            pb::ConfigurePoolRequest {
                namespace: self.namespace().to_owned(),
                name: name.to_owned(),
                config: Some(convert::pool_config_to_pb(&config)),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.pools_admin().configure_pool(req))
            .await?
            .into_inner();
        Ok(convert::pool_from_pb(
            resp.pool.ok_or_else(|| Error::missing("pool"))?,
        ))
    }

    /// A capacity pool with its live figures; [`Error::NotFound`] (`POOL_NOT_FOUND`) if none.
    pub async fn get_pool(&self, name: &str) -> Result<PoolInfo> {
        let span = self.admin_span("GetPool");
        let req = rpc::request(
            &span,
            pb::GetPoolRequest {
                namespace: self.namespace().to_owned(),
                name: name.to_owned(),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.pools_admin().get_pool(req))
            .await?
            .into_inner();
        Ok(convert::pool_from_pb(
            resp.pool.ok_or_else(|| Error::missing("pool"))?,
        ))
    }

    /// Lists the namespace's capacity pools, by name.
    pub async fn list_pools(&self) -> Result<Vec<PoolInfo>> {
        let span = self.admin_span("ListPools");
        let req = rpc::request(
            &span,
            pb::ListPoolsRequest {
                namespace: self.namespace().to_owned(),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.pools_admin().list_pools(req))
            .await?
            .into_inner();
        Ok(resp.pools.into_iter().map(convert::pool_from_pb).collect())
    }

    /// Deletes a capacity pool: [`Error::NotFound`] if there is none,
    /// [`Error::FailedPrecondition`] (`POOL_IN_USE`) while it is in use.
    pub async fn delete_pool(&self, name: &str) -> Result<()> {
        let span = self.admin_span("DeletePool");
        let req = rpc::request(
            &span,
            pb::DeletePoolRequest {
                namespace: self.namespace().to_owned(),
                name: name.to_owned(),
            },
            None,
        )?;
        rpc::traced(&span, self.pools_admin().delete_pool(req)).await?;
        Ok(())
    }
}
