//! `NativeClient` and `NativeWatch`: every client call of the Rust SDK, started from Python and
//! completed through a `done(result, error)` callback (see the crate documentation).

use std::sync::Arc;

use futures::StreamExt;
use jobplane::{Client, EventStream, WaitMode, WaitOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tokio::sync::Mutex;

use crate::{convert, runtime, seconds, start, trace_context, Task, Trace};

/// A connection to the service, scoped to a namespace. Connecting is lazy: the first call
/// connects, and a broken connection is re-established by the next call.
#[pyclass(module = "jobplane._native", frozen)]
pub(crate) struct NativeClient {
    client: Client,
}

fn wait_options(timeout: Option<f64>, until: Option<Vec<String>>) -> PyResult<WaitOptions> {
    let mut o = WaitOptions::new();
    if let Some(t) = timeout {
        o = o.timeout(seconds(t, "timeout")?);
    }
    if let Some(states) = until {
        o = o.until(convert::states(states)?);
    }
    Ok(o)
}

fn list_of<'py, T>(
    py: Python<'py>,
    items: &[T],
    f: impl Fn(Python<'py>, &T) -> PyResult<Bound<'py, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let l = PyList::empty(py);
    for item in items {
        l.append(f(py, item)?)?;
    }
    Ok(l.into_any().unbind())
}

#[pymethods]
impl NativeClient {
    #[new]
    fn new(addr: &str, namespace: &str) -> PyResult<Self> {
        let _rt = runtime().enter();
        let client = Client::connect_lazy(addr)
            .map_err(|e| PyValueError::new_err(format!("address {addr:?}: {e}")))?
            .with_namespace(namespace);
        Ok(NativeClient { client })
    }

    #[getter]
    fn namespace(&self) -> String {
        self.client.namespace().to_owned()
    }

    /// Submits one job: `done({"job": …, "created": bool}, None)`.
    #[pyo3(signature = (spec, done, trace=None))]
    fn submit(&self, spec: &Bound<'_, PyDict>, done: Py<PyAny>, trace: Trace) -> PyResult<Task> {
        let spec = convert::spec(spec)?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.submit(spec).await },
            |py, s| {
                let d = PyDict::new(py);
                d.set_item("job", convert::job(py, &s.job)?)?;
                d.set_item("created", s.created)?;
                Ok(d.into_any().unbind())
            },
        ))
    }

    /// Submits jobs in one call, all or none: `done([{"job", "created"}, …], None)`.
    #[pyo3(signature = (specs, done, trace=None))]
    fn submit_batch(
        &self,
        specs: Vec<Bound<'_, PyDict>>,
        done: Py<PyAny>,
        trace: Trace,
    ) -> PyResult<Task> {
        let specs = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                convert::spec(s).map_err(|e| {
                    let py = s.py();
                    PyValueError::new_err(format!("specs[{i}]: {}", e.value(py)))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.submit_batch(specs).await },
            |py, subs| {
                list_of(py, &subs, |py, s| {
                    let d = PyDict::new(py);
                    d.set_item("job", convert::job(py, &s.job)?)?;
                    d.set_item("created", s.created)?;
                    Ok(d)
                })
            },
        ))
    }

    #[pyo3(signature = (id, done, trace=None))]
    fn get(&self, id: String, done: Py<PyAny>, trace: Trace) -> Task {
        let c = self.client.clone();
        start(done, trace, async move { c.get(&id).await }, |py, j| {
            Ok(convert::job(py, &j)?.into_any().unbind())
        })
    }

    /// One page of jobs: `done({"jobs": [...], "next_page_token": str | None}, None)`.
    #[pyo3(signature = (filter, done, trace=None))]
    fn list(&self, filter: &Bound<'_, PyDict>, done: Py<PyAny>, trace: Trace) -> PyResult<Task> {
        let filter = convert::list_filter(filter)?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.list(filter).await },
            |py, page| {
                let d = PyDict::new(py);
                d.set_item("jobs", list_of(py, &page.jobs, convert::job)?)?;
                d.set_item("next_page_token", page.next_page_token)?;
                Ok(d.into_any().unbind())
            },
        ))
    }

    #[pyo3(signature = (id, timeout, until, done, trace=None))]
    fn wait(
        &self,
        id: String,
        timeout: Option<f64>,
        until: Option<Vec<String>>,
        done: Py<PyAny>,
        trace: Trace,
    ) -> PyResult<Task> {
        let options = wait_options(timeout, until)?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.wait(&id, options).await },
            |py, w| Ok(convert::wait_result(py, &w)?.into_any().unbind()),
        ))
    }

    #[pyo3(signature = (ids, mode, timeout, until, done, trace=None))]
    fn wait_many(
        &self,
        ids: Vec<String>,
        mode: &str,
        timeout: Option<f64>,
        until: Option<Vec<String>>,
        done: Py<PyAny>,
        trace: Trace,
    ) -> PyResult<Task> {
        let mode = match mode.to_ascii_lowercase().as_str() {
            "all" => WaitMode::All,
            "any" => WaitMode::Any,
            other => {
                return Err(PyValueError::new_err(format!(
                    "mode: expected \"all\" or \"any\", got {other:?}"
                )))
            }
        };
        let options = wait_options(timeout, until)?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.wait_many(ids, mode, options).await },
            |py, w| Ok(convert::wait_many_result(py, &w)?.into_any().unbind()),
        ))
    }

    /// Cancels a job: `done({"job": …, "outcome": "CANCELLED" | "REQUESTED" |
    /// "ALREADY_TERMINAL"}, None)`.
    #[pyo3(signature = (id, grace, reason, done, trace=None))]
    fn cancel(
        &self,
        id: String,
        grace: Option<f64>,
        reason: String,
        done: Py<PyAny>,
        trace: Trace,
    ) -> PyResult<Task> {
        let grace = grace.map(|g| seconds(g, "grace")).transpose()?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.cancel_with_reason(&id, grace, &reason).await },
            |py, r| {
                let d = PyDict::new(py);
                d.set_item("job", convert::job(py, &r.job)?)?;
                d.set_item("outcome", r.outcome.as_str())?;
                Ok(d.into_any().unbind())
            },
        ))
    }

    /// The job's events from `from_seq` on (0: all), ending after its terminal state; the
    /// stream's calls carry `trace`.
    #[pyo3(signature = (id, from_seq, trace=None))]
    fn watch(&self, id: String, from_seq: u64, trace: Trace) -> NativeWatch {
        let _rt = runtime().enter();
        let open = || self.client.watch(&id, from_seq);
        let stream = match trace_context(trace) {
            Some(trace) => trace.sync_scope(open),
            None => open(),
        };
        NativeWatch {
            stream: Arc::new(Mutex::new(Some(stream))),
        }
    }

    #[pyo3(signature = (name, config, done, trace=None))]
    fn configure_queue(
        &self,
        name: String,
        config: &Bound<'_, PyDict>,
        done: Py<PyAny>,
        trace: Trace,
    ) -> PyResult<Task> {
        let config = convert::queue_config(config)?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.configure_queue(&name, config).await },
            |py, q| Ok(convert::queue_info(py, &q)?.into_any().unbind()),
        ))
    }

    #[pyo3(signature = (done, trace=None))]
    fn list_queues(&self, done: Py<PyAny>, trace: Trace) -> Task {
        let c = self.client.clone();
        start(
            done,
            trace,
            async move { c.list_queues().await },
            |py, qs| list_of(py, &qs, convert::queue_info),
        )
    }

    #[pyo3(signature = (done, trace=None))]
    fn list_workers(&self, done: Py<PyAny>, trace: Trace) -> Task {
        let c = self.client.clone();
        start(
            done,
            trace,
            async move { c.list_workers().await },
            |py, ws| list_of(py, &ws, convert::worker_info),
        )
    }

    #[pyo3(signature = (name, config, done, trace=None))]
    fn configure_pool(
        &self,
        name: String,
        config: &Bound<'_, PyDict>,
        done: Py<PyAny>,
        trace: Trace,
    ) -> PyResult<Task> {
        let config = convert::pool_config(config)?;
        let c = self.client.clone();
        Ok(start(
            done,
            trace,
            async move { c.configure_pool(&name, config).await },
            |py, p| Ok(convert::pool_info(py, &p)?.into_any().unbind()),
        ))
    }

    #[pyo3(signature = (name, done, trace=None))]
    fn get_pool(&self, name: String, done: Py<PyAny>, trace: Trace) -> Task {
        let c = self.client.clone();
        start(
            done,
            trace,
            async move { c.get_pool(&name).await },
            |py, p| Ok(convert::pool_info(py, &p)?.into_any().unbind()),
        )
    }

    #[pyo3(signature = (done, trace=None))]
    fn list_pools(&self, done: Py<PyAny>, trace: Trace) -> Task {
        let c = self.client.clone();
        start(
            done,
            trace,
            async move { c.list_pools().await },
            |py, ps| list_of(py, &ps, convert::pool_info),
        )
    }

    #[pyo3(signature = (name, done, trace=None))]
    fn delete_pool(&self, name: String, done: Py<PyAny>, trace: Trace) -> Task {
        let c = self.client.clone();
        start(
            done,
            trace,
            async move { c.delete_pool(&name).await },
            |py, ()| Ok(py.None()),
        )
    }
}

/// A job's event stream; `next(done)` gets the next event (`None` after the last).
#[pyclass(module = "jobplane._native", frozen)]
pub(crate) struct NativeWatch {
    stream: Arc<Mutex<Option<EventStream>>>,
}

#[pymethods]
impl NativeWatch {
    fn next(&self, done: Py<PyAny>) -> Task {
        let stream = self.stream.clone();
        start(
            done,
            None,
            async move {
                let mut guard = stream.lock().await;
                let Some(s) = guard.as_mut() else {
                    return Ok(None);
                };
                match s.next().await {
                    Some(Ok(e)) => Ok(Some(e)),
                    Some(Err(e)) => {
                        *guard = None;
                        Err(e)
                    }
                    None => {
                        *guard = None;
                        Ok(None)
                    }
                }
            },
            |py, e| match e {
                Some(e) => Ok(convert::event(py, &e)?.into_any().unbind()),
                None => Ok(py.None()),
            },
        )
    }

    /// Ends the stream.
    fn close(&self) {
        let stream = self.stream.clone();
        runtime().spawn(async move {
            stream.lock().await.take();
        });
    }
}
