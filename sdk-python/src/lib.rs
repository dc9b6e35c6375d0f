//! `jobplane._native`: the Rust SDK (`jobplane` crate) for the Python package.
//!
//! The public Python API (`jobplane.Client`, `jobplane.AsyncClient`, `jobplane.Worker`) is pure
//! Python on top of this module. The split:
//!
//! - One tokio runtime per process, shared by every client and worker, runs all I/O. Python
//!   threads never block inside it.
//! - Every remote call is *started* here and completes through a callback: `done(result,
//!   error)` is called once, on a runtime thread, with the converted result or an error tuple
//!   (see [`error_tuple`]). The Python side turns that into a `concurrent.futures.Future` (the
//!   blocking client: waiting on it releases the GIL and is interruptible by Ctrl-C) or an
//!   asyncio future (the asyncio client). The returned [`Task`] cancels the call.
//! - Tracing is the Python side's: it makes the OpenTelemetry spans and passes each call the
//!   W3C context to carry (a [`Trace`]), which the call's SDK requests send as metadata.
//! - A worker's handler is a Python callable the runtime hands each attempt to (see
//!   [`worker`]); the Python side runs it on a thread pool or an event loop and reports the
//!   outcome through a [`worker::Done`].

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use jobplane::trace::TraceContext;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

mod client;
mod convert;
mod worker;

/// The process's runtime: two worker threads do the SDK's I/O for every client and worker.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("jobplane-io")
            .on_thread_start(keep_signals_for_python)
            .enable_all()
            .build()
            .expect("the jobplane runtime starts")
    })
}

/// Blocks the process's asynchronous signals on the calling (SDK) thread. A signal sent to the
/// process goes to one thread that does not block it; CPython runs Python signal handlers only
/// on the main thread and only notices a signal promptly if the main thread itself was
/// interrupted — a Ctrl-C taken by an SDK thread would leave a blocking `wait` asleep.
fn keep_signals_for_python() {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGCHLD,
        Signal::SIGWINCH,
    ] {
        set.add(sig);
    }
    // Failing to block leaves the thread as it was: signals still work, only less promptly.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

/// Runs `fut` to completion on the runtime from a Python thread, with the interpreter released.
/// Refuses to run on one of the runtime's own threads (that would deadlock it).
pub(crate) fn block_on<F: Future + Send>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(PyRuntimeError::new_err(
            "a blocking jobplane call was made from inside the SDK's own I/O thread",
        ));
    }
    Ok(py.detach(|| runtime().block_on(fut)))
}

/// A call in flight; `cancel()` abandons it (its callback is then never called).
#[pyclass(module = "jobplane._native", frozen)]
pub(crate) struct Task {
    abort: tokio::task::AbortHandle,
}

#[pymethods]
impl Task {
    /// Abandons the call.
    fn cancel(&self) {
        self.abort.abort();
    }
}

/// A W3C trace context from Python, `(traceparent, tracestate)`: the context a call carries
/// to the service (the Python client span's, made by the `jobplane` package).
pub(crate) type Trace = Option<(String, Option<String>)>;

/// The Rust SDK's form of a [`Trace`].
pub(crate) fn trace_context(trace: Trace) -> Option<TraceContext> {
    trace.map(|(tp, ts)| TraceContext::new(tp).with_tracestate(ts.unwrap_or_default()))
}

/// Starts `fut` on the runtime, every SDK call in it carrying `trace`; `done(result, None)` or
/// `done(None, error)` is called when it ends, with `convert` turning its value into a Python
/// object.
pub(crate) fn start<T, F, C>(done: Py<PyAny>, trace: Trace, fut: F, convert: C) -> Task
where
    T: Send + 'static,
    F: Future<Output = Result<T, jobplane::Error>> + Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    let trace = trace_context(trace);
    let handle = runtime().spawn(async move {
        let outcome = match trace {
            Some(trace) => trace.scope(fut).await,
            None => fut.await,
        };
        Python::attach(|py| {
            let args = match outcome.map(|v| convert(py, v)) {
                Ok(Ok(value)) => (value, py.None()),
                Ok(Err(e)) => (py.None(), e.into_value(py).into_any()),
                Err(e) => (py.None(), error_tuple(py, &e)),
            };
            if let Err(e) = done.call1(py, args) {
                e.write_unraisable(py, Some(done.bind(py)));
            }
        });
    });
    Task {
        abort: handle.abort_handle(),
    }
}

/// An SDK error as `(kind, message, field, reason, retry_after_seconds, code)`; the Python side
/// raises the exception class named `kind` (`InvalidArgument`, `NotFound`, …).
pub(crate) fn error_tuple(py: Python<'_>, e: &jobplane::Error) -> Py<PyAny> {
    use jobplane::Error as E;
    let kind = match e {
        E::InvalidArgument { .. } => "InvalidArgument",
        E::NotFound { .. } => "NotFound",
        E::AlreadyExists { .. } => "AlreadyExists",
        E::FailedPrecondition { .. } => "FailedPrecondition",
        E::ResourceExhausted { .. } => "ResourceExhausted",
        E::Unauthenticated { .. } => "Unauthenticated",
        E::PermissionDenied { .. } => "PermissionDenied",
        E::DeadlineExceeded { .. } => "DeadlineExceeded",
        E::Unavailable { .. } | E::Transport(_) => "Unavailable",
        E::Cancelled { .. } => "Cancelled",
        E::Internal { .. } => "Internal",
        E::Decode { .. } => "Internal",
        E::InvalidConfig(_) => "InvalidConfig",
        _ => "Error",
    };
    let message = match e {
        E::InvalidArgument { message, .. }
        | E::NotFound { message, .. }
        | E::AlreadyExists { message, .. }
        | E::FailedPrecondition { message, .. }
        | E::ResourceExhausted { message, .. }
        | E::Unauthenticated { message, .. }
        | E::PermissionDenied { message, .. }
        | E::DeadlineExceeded { message, .. }
        | E::Unavailable { message, .. }
        | E::Cancelled { message, .. }
        | E::Internal { message, .. } => message.clone(),
        other => other.to_string(),
    };
    let tuple = (
        kind,
        message,
        e.field().map(str::to_owned),
        e.reason().map(str::to_owned),
        e.retry_after().map(|d| d.as_secs_f64()),
        e.code().map(code_name),
    );
    match tuple.into_pyobject(py) {
        Ok(t) => t.into_any().unbind(),
        Err(_) => PyTuple::empty(py).into_any().unbind(),
    }
}

/// A status code's canonical name: `InvalidArgument` → `INVALID_ARGUMENT`.
fn code_name(code: impl std::fmt::Debug) -> String {
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// Seconds (a non-negative float; infinity for "no limit") as a duration.
pub(crate) fn seconds(value: f64, field: &str) -> PyResult<Duration> {
    if value.is_nan() || value < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{field}: must be a number of seconds >= 0, got {value}"
        )));
    }
    Ok(Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_ADDR", jobplane::DEFAULT_ADDR)?;
    m.add("ADDR_ENV", jobplane::ADDR_ENV)?;
    m.add("DEFAULT_NAMESPACE", jobplane::DEFAULT_NAMESPACE)?;
    m.add_class::<Task>()?;
    m.add_class::<client::NativeClient>()?;
    m.add_class::<client::NativeWatch>()?;
    m.add_class::<worker::NativeWorker>()?;
    m.add_class::<worker::NativeContext>()?;
    m.add_class::<worker::Done>()?;
    Ok(())
}
