//! How a server call ended, for the layers that observe calls (RPC metrics, RPC spans).
//!
//! A unary error comes back "trailers-only" (`grpc-status` in the response headers); any other
//! call ends with `grpc-status` in the trailers of the response body. [`observe`] wraps the
//! call's future and body so that its [`CallEnd`] learns the status exactly once: from the
//! headers, from the trailers, when the body ends or fails, or when the response is dropped
//! before any of that (the client went away, or the server stopped: `Cancelled`). The observer
//! is dropped as soon as it is told, so what it holds (a span) ends with the call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::codegen::http;
use tonic::Code;

/// Told how a call ended.
pub(crate) trait CallEnd: Send + 'static {
    fn end(self, code: Code);
}

/// An observer that has not been told yet; told `Cancelled` if dropped untold.
struct Pending<E: CallEnd>(Option<E>);

impl<E: CallEnd> Pending<E> {
    fn finish(&mut self, code: Code) {
        if let Some(end) = self.0.take() {
            end.end(code);
        }
    }
}

impl<E: CallEnd> Drop for Pending<E> {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// Runs the call and hands its end to `end`.
pub(crate) async fn observe<F, B, Err, E>(
    call: F,
    end: E,
) -> Result<http::Response<Observed<B, E>>, Err>
where
    F: Future<Output = Result<http::Response<B>, Err>>,
    E: CallEnd,
{
    let mut pending = Pending(Some(end));
    let response = match call.await {
        Ok(r) => r,
        Err(e) => {
            pending.finish(Code::Internal);
            return Err(e);
        }
    };
    if let Some(code) = grpc_status(response.headers()) {
        pending.finish(code);
    }
    Ok(response.map(|body| Observed {
        inner: Box::pin(body),
        pending,
    }))
}

/// A response body that tells its call's observer when the status passes.
pub(crate) struct Observed<B, E: CallEnd> {
    inner: Pin<Box<B>>,
    pending: Pending<E>,
}

impl<B: HttpBody<Data = Bytes>, E: CallEnd> HttpBody for Observed<B, E> {
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
                    this.pending.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.pending.finish(Code::Internal),
            // Ended without trailers: only a trailers-only response does, and it was told.
            Poll::Ready(None) => this.pending.finish(Code::Unknown),
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

// `Observed` holds its body pinned in a box: it is `Unpin` whatever `B` is.
impl<B, E: CallEnd> Unpin for Observed<B, E> {}
