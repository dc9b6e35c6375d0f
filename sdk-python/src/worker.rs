//! `NativeWorker`: the Rust SDK's worker runtime with Python handlers.
//!
//! For each attempt the runtime calls the Python `dispatch(ctx, done)` callable (on one of its
//! own threads, so `dispatch` must only schedule the handler — on a thread pool or an event
//! loop — never run it). The handler's outcome comes back through the [`Done`] object; until
//! then the attempt runs, with its progress, output, cancellation and usage going through the
//! [`NativeContext`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use jobplane::worker::{HandlerError, JobContext, Worker};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::convert::get;
use crate::{block_on, runtime, seconds, start, Task};

type Outcome = Result<Vec<u8>, HandlerError>;

/// How a Python handler ended; each method may be called once (later calls are ignored).
#[pyclass(module = "jobplane._native", frozen)]
pub(crate) struct Done {
    tx: Mutex<Option<oneshot::Sender<Outcome>>>,
}

impl Done {
    fn send(&self, outcome: Outcome) {
        if let Some(tx) = self.tx.lock().expect("done lock").take() {
            let _ = tx.send(outcome);
        }
    }
}

#[pymethods]
impl Done {
    /// The handler returned `result`.
    fn ok(&self, result: Vec<u8>) {
        self.send(Ok(result));
    }

    /// The handler failed; `retryable` says whether the retry policy applies.
    fn fail(&self, message: String, retryable: bool) {
        self.send(Err(if retryable {
            HandlerError::retryable(message)
        } else {
            HandlerError::fatal(message)
        }));
    }

    /// The handler hit an upstream rate limit.
    #[pyo3(signature = (retry_after, pool=None))]
    fn rate_limited(&self, retry_after: f64, pool: Option<String>) -> PyResult<()> {
        let after = seconds(retry_after, "retry_after")?;
        self.send(Err(HandlerError::rate_limited(pool, after)));
        Ok(())
    }

    /// The handler stopped because the attempt was cancelled.
    fn cancelled(&self) {
        self.send(Err(HandlerError::cancelled()));
    }
}

/// What a handler knows of and can do for its attempt.
#[pyclass(module = "jobplane._native", frozen)]
pub(crate) struct NativeContext {
    ctx: JobContext,
}

#[pymethods]
impl NativeContext {
    #[getter]
    fn job_id(&self) -> &str {
        self.ctx.job_id()
    }

    #[getter]
    fn attempt(&self) -> u32 {
        self.ctx.attempt()
    }

    #[getter]
    fn queue(&self) -> &str {
        self.ctx.queue()
    }

    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.ctx.payload())
    }

    #[getter]
    fn labels(&self) -> BTreeMap<String, String> {
        self.ctx.labels().clone()
    }

    #[getter]
    fn priority(&self) -> i32 {
        self.ctx.priority()
    }

    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.ctx.run_timeout().map(|d| d.as_secs_f64())
    }

    #[getter]
    fn pool(&self) -> Option<&str> {
        self.ctx.pool()
    }

    #[getter]
    fn worker_id(&self) -> &str {
        self.ctx.worker_id()
    }

    #[getter]
    fn traceparent(&self) -> Option<&str> {
        self.ctx.traceparent()
    }

    #[getter]
    fn tracestate(&self) -> Option<&str> {
        self.ctx.tracestate()
    }

    #[getter]
    fn cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }

    #[getter]
    fn cancel_reason(&self) -> Option<&str> {
        self.ctx.cancel_reason()
    }

    /// Reports progress (blocks while the worker's report buffer is full).
    #[pyo3(signature = (percent, message=String::new()))]
    fn progress(&self, py: Python<'_>, percent: f64, message: String) -> PyResult<()> {
        let ctx = self.ctx.clone();
        block_on(py, async move { ctx.progress(percent, message).await })
    }

    /// Sends output to `stream` (`stdout` or `stderr`), in order, before the outcome.
    fn output(&self, py: Python<'_>, data: Vec<u8>, stream: &str) -> PyResult<()> {
        let ctx = self.ctx.clone();
        match stream {
            "stdout" => block_on(py, async move { ctx.stdout(data).await }),
            "stderr" => block_on(py, async move { ctx.stderr(data).await }),
            other => Err(PyValueError::new_err(format!(
                "stream: expected \"stdout\" or \"stderr\", got {other:?}"
            ))),
        }
    }

    /// Reports what the attempt really used of its pool's units.
    fn report_usage(&self, py: Python<'_>, units: BTreeMap<String, u64>) -> PyResult<()> {
        let ctx = self.ctx.clone();
        block_on(py, async move { ctx.report_usage(units).await })
    }

    /// Blocks until the attempt must stop or `timeout` seconds pass; true if it must stop.
    #[pyo3(signature = (timeout=None))]
    fn wait_cancelled(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let token = self.ctx.cancellation();
        let limit = timeout.map(|t| seconds(t, "timeout")).transpose()?;
        block_on(py, async move {
            match limit {
                Some(limit) => tokio::time::timeout(limit, token.cancelled()).await.is_ok(),
                None => {
                    token.cancelled().await;
                    true
                }
            }
        })
    }

    /// Calls `callback()` (on an SDK thread) once the attempt must stop.
    fn on_cancel(&self, callback: Py<PyAny>) {
        let token = self.ctx.cancellation();
        runtime().spawn(async move {
            token.cancelled().await;
            Python::attach(|py| {
                if let Err(e) = callback.call0(py) {
                    e.write_unraisable(py, Some(callback.bind(py)));
                }
            });
        });
    }
}

/// A worker: `run(done)` runs it until `stop()` and its drain end, then calls `done`.
#[pyclass(module = "jobplane._native", frozen)]
pub(crate) struct NativeWorker {
    worker: Mutex<Option<Worker>>,
    id: String,
    stop: CancellationToken,
}

fn handler(
    dispatch: Arc<Py<PyAny>>,
) -> impl Fn(JobContext) -> futures::future::BoxFuture<'static, Outcome> + Send + Sync + 'static {
    move |ctx: JobContext| {
        let dispatch = dispatch.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let handed = Python::attach(|py| -> PyResult<()> {
                let c = Py::new(py, NativeContext { ctx })?;
                let d = Py::new(
                    py,
                    Done {
                        tx: Mutex::new(Some(tx)),
                    },
                )?;
                dispatch.call1(py, (c, d))?;
                Ok(())
            });
            if let Err(e) = handed {
                return Err(HandlerError::retryable(format!(
                    "the Python handler could not be started: {e}"
                )));
            }
            rx.await.unwrap_or_else(|_| {
                Err(HandlerError::retryable(
                    "the Python handler ended without an outcome",
                ))
            })
        })
    }
}

#[pymethods]
impl NativeWorker {
    /// `options`: `namespace`, `concurrency`, `labels`, `cpu`, `memory`, `name`, `id`,
    /// `shutdown_timeout`, `abort_grace`. One `dispatch(ctx, done)` serves every queue.
    #[new]
    fn new(
        addr: &str,
        queues: Vec<String>,
        dispatch: Py<PyAny>,
        options: &Bound<'_, PyDict>,
    ) -> PyResult<Self> {
        if queues.is_empty() {
            return Err(PyValueError::new_err("queues: at least one queue"));
        }
        let mut b = Worker::builder(addr);
        if let Some(ns) = get::<String>(options, "namespace")? {
            b = b.namespace(ns);
        }
        if let Some(n) = get::<u32>(options, "concurrency")? {
            b = b.concurrency(n);
        }
        if let Some(labels) = get::<BTreeMap<String, String>>(options, "labels")? {
            b = b.labels(labels);
        }
        if let Some(cpu) = get::<f64>(options, "cpu")? {
            b = b.cpu(cpu);
        }
        if let Some(mem) = get::<u64>(options, "memory")? {
            b = b.memory_bytes(mem);
        }
        if let Some(name) = get::<String>(options, "name")? {
            b = b.name(name);
        }
        if let Some(id) = get::<String>(options, "id")? {
            b = b.id(id);
        }
        if let Some(t) = get::<f64>(options, "shutdown_timeout")? {
            b = b.shutdown_timeout(seconds(t, "shutdown_timeout")?);
        }
        if let Some(t) = get::<f64>(options, "abort_grace")? {
            b = b.abort_grace(seconds(t, "abort_grace")?);
        }
        let dispatch = Arc::new(dispatch);
        let h: Arc<dyn jobplane::Handler> = Arc::new(handler(dispatch));
        for q in queues {
            b = b.shared_handler(q, h.clone());
        }
        let worker = b
            .build()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(NativeWorker {
            id: worker.id().to_owned(),
            worker: Mutex::new(Some(worker)),
            stop: CancellationToken::new(),
        })
    }

    #[getter]
    fn id(&self) -> &str {
        &self.id
    }

    /// Runs the worker; `done(None, None)` after a clean stop, `done(None, error)` if the
    /// service refused it.
    fn run(&self, done: Py<PyAny>) -> PyResult<Task> {
        let worker = self
            .worker
            .lock()
            .expect("worker lock")
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the worker runs already (or ran)"))?;
        let stop = self.stop.clone();
        Ok(start(
            done,
            None,
            async move { worker.run(stop.cancelled_owned()).await },
            |py, ()| Ok(py.None()),
        ))
    }

    /// Starts a graceful shutdown: no new attempts; running ones finish (or are cancelled
    /// after the shutdown timeout).
    fn stop(&self) {
        self.stop.cancel();
    }
}
