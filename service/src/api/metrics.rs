//! A tower layer over the gRPC server that records each call's duration and, when it ends with
//! a status other than OK, its error code, per method.
//!
//! A unary error comes back "trailers-only" (`grpc-status` in the response headers); any other
//! call ends with `grpc-status` in the trailers of the response body, so the body is wrapped and
//! the call is recorded when its trailers pass, when the body ends, or when it is dropped (the
//! client went away: `Cancelled`). Methods are labelled only if the service serves them (the
//! descriptor sets of its services); any other path is `unknown`, so clients cannot grow the
//! label set.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prost::Message as _;
use tonic::codegen::http;
use tonic::Code;
use tower::{Layer, Service};

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
    type Response = http::Response<Recorded<ResBody>>;
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
            done: false,
        };
        // The clone that was made ready is the one that must serve the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut call = call;
            let response = match inner.call(req).await {
                Ok(r) => r,
                Err(e) => {
                    call.finish(Code::Internal);
                    return Err(e);
                }
            };
            if let Some(code) = grpc_status(response.headers()) {
                call.finish(code);
            }
            Ok(response.map(|body| Recorded {
                inner: Box::pin(body),
                call,
            }))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// One call being timed; recorded once.
struct Call {
    metrics: Arc<Metrics>,
    method: Arc<str>,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let code = (code != Code::Ok).then(|| code_name(code));
        self.metrics
            .rpc_finished(&self.method, code, self.start.elapsed());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Dropped before its status passed: the client went away, or the server stopped.
        self.finish(Code::Cancelled);
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

/// A response body that records its call when the status passes.
pub(crate) struct Recorded<B> {
    inner: Pin<Box<B>>,
    call: Call,
}

impl<B: HttpBody<Data = Bytes>> HttpBody for Recorded<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(Code::Internal),
            // Ended without trailers: only a trailers-only response does, and it was recorded.
            Poll::Ready(None) => this.call.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
