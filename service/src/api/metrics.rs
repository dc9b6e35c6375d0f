//! A tower layer over the gRPC server that records each call's duration and, when it ends with
//! a status other than OK, its error code, per method (the end of a call: [`super::outcome`]).
//! Methods are labelled only if the service serves them (the descriptor sets of its services);
//! any other path is `unknown`, so clients cannot grow the label set.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Body as HttpBody;
use prost::Message as _;
use tonic::codegen::http;
use tonic::Code;
use tower::{Layer, Service};

use super::outcome::{observe, CallEnd, Observed};
use crate::metrics::Metrics;

/// Layer recording RPC metrics.
#[derive(Clone)]
pub(crate) struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
    methods: Arc<HashMap<String, Arc<str>>>,
    unknown: Arc<str>,
}

impl RpcMetricsLayer {
    /// Labels every method of the services described by these encoded descriptor sets.
    pub fn new(metrics: Arc<Metrics>, descriptor_sets: &[&[u8]]) -> Self {
        let mut methods = HashMap::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = match (package.as_str(), service.name.as_deref()) {
                        (_, None) => continue,
                        ("", Some(s)) => s.to_string(),
                        (p, Some(s)) => format!("{p}.{s}"),
                    };
                    for m in service.method {
                        if let Some(name) = m.name {
                            let label = format!("{service_name}/{name}");
                            methods.insert(format!("/{label}"), Arc::from(label));
                        }
                    }
                }
            }
        }
        RpcMetricsLayer {
            metrics,
            methods: Arc::new(methods),
            unknown: Arc::from("unknown"),
        }
    }

    fn label(&self, path: &str) -> Arc<str> {
        self.methods
            .get(path)
            .cloned()
            .unwrap_or_else(|| self.unknown.clone())
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Clone)]
pub(crate) struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<Observed<ResBody, Call>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = Call {
            metrics: self.layer.metrics.clone(),
            method: self.layer.label(req.uri().path()),
            start: Instant::now(),
        };
        // The clone that was made ready is the one that must serve the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(observe(inner.call(req), call))
    }
}

/// One call being timed.
pub(crate) struct Call {
    metrics: Arc<Metrics>,
    method: Arc<str>,
    start: Instant,
}

impl CallEnd for Call {
    fn end(self, code: Code) {
        let code = (code != Code::Ok).then(|| code_name(code));
        self.metrics
            .rpc_finished(&self.method, code, self.start.elapsed());
    }
}

/// The gRPC code as the label value (the names of `google.rpc.Code`, in upper camel case as
/// gRPC's own metrics write them).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_only_served_methods() {
        let layer = RpcMetricsLayer::new(
            Arc::new(Metrics::new()),
            &[jobplane_proto::FILE_DESCRIPTOR_SET],
        );
        assert_eq!(
            &*layer.label("/jobplane.v1.JobService/SubmitJob"),
            "jobplane.v1.JobService/SubmitJob"
        );
        assert_eq!(&*layer.label("/jobplane.v1.JobService/Nope"), "unknown");
        assert_eq!(&*layer.label("/x"), "unknown");
    }
}
