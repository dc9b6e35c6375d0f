//! The gRPC surface: `jobplane.v1` services, health checking and reflection. Only this module
//! knows tonic.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::metrics::Metrics;
use crate::ServeError;
pub use switch::{Roles, LEADER_HEALTH};

mod admin;
pub mod convert;
pub mod error;
mod job;
mod metrics;
mod outcome;
mod switch;
mod trace;
mod worker;

/// Largest accepted request message (a batch submit of many jobs).
const MAX_MESSAGE: usize = 64 << 20;

/// Serves every service on `listener` until `signal` resolves, then shuts down gracefully.
/// The `jobplane.v1` services follow `roles` (served from this instance's engine while it
/// leads, forwarded to the leader otherwise); health (as `roles` reports it),
/// reflection and metrics are local. Every call's duration and error code are recorded in
/// `metrics`, and every call has a span (exported when trace export is on).
pub async fn serve(
    listener: TcpListener,
    roles: Arc<Roles>,
    metrics: Arc<Metrics>,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let rpc_metrics = metrics::RpcMetricsLayer::new(
        metrics,
        &[
            jobplane_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ],
    );
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(jobplane_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(jobplane_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Config(format!("reflection: {e}")))?;
    let health = tonic_health::pb::health_server::HealthServer::new(roles.health_service());
    let (jobs, workers, admin) = switch::services(&roles);

    // Small messages (acks, assignments) must not wait for Nagle's algorithm.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(rpc_metrics)
        .layer(trace::RpcTraceLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(jobs)
        .add_service(workers)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, signal)
        .await?;
    Ok(())
}

/// The caller's gRPC deadline (`grpc-timeout`), if it sent one.
pub(crate) fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "1500m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(1500)));
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
