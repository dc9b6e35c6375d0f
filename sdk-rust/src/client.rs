//! The client: submit, inspect, wait for, cancel and watch jobs, and administer queues and
//! workers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use jobplane_proto::pb;
use jobplane_proto::pb::admin_service_client::AdminServiceClient;
use jobplane_proto::pb::job_service_client::JobServiceClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument as _;

use crate::convert;
use crate::error::{is_transport_failure, Error, Result};
use crate::rpc::{self, ServerAddr, ADMIN_SERVICE, JOB_SERVICE};
use crate::trace::TraceContext;
use crate::types::{
    CancelResult, Job, JobEvent, JobPage, JobSpec, ListFilter, QueueConfig, QueueInfo, Submitted,
    WaitManyResult, WaitMode, WaitOptions, WaitResult, WorkerInfo,
};

/// Address used when none is given: the service's default loopback listener.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7741";
/// Environment variable read by [`Client::from_env`].
pub const ADDR_ENV: &str = "JOBPLANE_ADDR";
/// Namespace used when none is set.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How much longer than a wait's own timeout the gRPC deadline is, so that the service answers
/// "not reached" before the transport gives up.
const WAIT_DEADLINE_MARGIN: Duration = Duration::from_secs(10);
/// The service's default wait timeout when the request leaves it unset.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest one `WaitJob`/`WaitJobs` call waits on the service (its `MAX_WAIT`): longer
/// waits are made of several calls.
const SERVICE_MAX_WAIT: Duration = Duration::from_secs(3600);
/// A call that comes back sooner than this without reaching its target, although it asked to
/// wait longer, is the service's final answer: it is not repeated.
const MIN_WAIT_ROUND: Duration = Duration::from_secs(1);
/// How many times in a row a broken watch stream is resumed before the error is returned.
const WATCH_MAX_RESUMES: u32 = 8;

/// A connection to a jobplane service, scoped to one namespace.
///
/// Cloning is cheap: clones share the underlying HTTP/2 connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), jobplane::Error> {
/// use std::time::Duration;
/// use jobplane::{Client, JobSpec, JobState};
///
/// let client = Client::connect("http://127.0.0.1:7741").await?;
/// let submitted = client.submit(JobSpec::new("thumbnails").payload("cat.png")).await?;
/// let done = client.wait(&submitted.job.id, Duration::from_secs(60)).await?;
/// if done.reached && done.job.state == JobState::Succeeded {
///     println!("result: {:?}", done.job.result);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    namespace: Arc<str>,
    /// The one address connected to, for the spans' `server.address`; `None` for several
    /// addresses or a channel made elsewhere.
    server: Option<Arc<ServerAddr>>,
}

/// Normalises an address: `host:port` gets an `http://` scheme.
fn normalise_addr(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Builds the endpoint of one address with the SDK's transport settings.
pub(crate) fn endpoint(addr: &str) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(normalise_addr(addr))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Detects a dead peer on long-lived streams (watch, worker sessions).
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// How long one instance of several may take to accept a connection before the next is tried.
const INSTANCE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One endpoint for several instances (its settings, and the first address as the HTTP/2
/// authority) and a connector that opens a TCP connection to the first instance that accepts
/// one, starting at a random one (so clients spread over the instances) and going round the
/// list. Each reconnect (the instance died, the connection broke) goes through it again.
fn failover(
    endpoints: Vec<Endpoint>,
) -> (
    Endpoint,
    impl tower::Service<
            tonic::codegen::http::Uri,
            Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
            Error = std::io::Error,
            Future = impl Send,
        > + Send
        + Clone
        + 'static,
) {
    let authorities: Arc<[String]> = endpoints
        .iter()
        .filter_map(|e| {
            let uri = e.uri();
            let host = uri.host()?;
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            Some(format!("{host}:{port}"))
        })
        .collect();
    let start = Arc::new(std::sync::atomic::AtomicUsize::new(rand::random_range(
        0..authorities.len().max(1),
    )));
    let endpoint = endpoints
        .into_iter()
        .next()
        .expect("at least one endpoint")
        .connect_timeout(INSTANCE_CONNECT_TIMEOUT * authorities.len() as u32);
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let (authorities, start) = (authorities.clone(), start.clone());
        async move {
            let n = authorities.len();
            let first = start.load(std::sync::atomic::Ordering::Relaxed);
            let mut last = std::io::Error::other("no instance address");
            for i in 0..n {
                let at = (first + i) % n;
                let connect = tokio::net::TcpStream::connect(authorities[at].as_str());
                match tokio::time::timeout(INSTANCE_CONNECT_TIMEOUT, connect).await {
                    Ok(Ok(stream)) => {
                        // Small messages (acks, reports) must not wait for Nagle's algorithm.
                        stream.set_nodelay(true)?;
                        start.store(at, std::sync::atomic::Ordering::Relaxed);
                        return Ok(hyper_util::rt::TokioIo::new(stream));
                    }
                    Ok(Err(e)) => {
                        last = std::io::Error::new(e.kind(), format!("{}: {e}", authorities[at]))
                    }
                    Err(_) => {
                        last = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "{}: no answer within {INSTANCE_CONNECT_TIMEOUT:?}",
                                authorities[at]
                            ),
                        )
                    }
                }
            }
            Err(last)
        }
    });
    (endpoint, connector)
}

/// `server.address` and `server.port` of an endpoint.
fn server_addr(endpoint: &Endpoint) -> Option<Arc<ServerAddr>> {
    let uri = endpoint.uri();
    Some(Arc::new(ServerAddr {
        host: uri.host()?.trim_matches(['[', ']']).to_owned(),
        port: uri.port_u16(),
    }))
}

/// Parses `addr`, which may list several addresses separated by commas.
fn endpoints(addr: &str) -> Result<Vec<Endpoint>> {
    let endpoints: Vec<Endpoint> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(endpoint)
        .collect::<Result<_>>()?;
    if endpoints.is_empty() {
        return Err(Error::InvalidConfig("empty service address".into()));
    }
    Ok(endpoints)
}

impl Client {
    /// Connects to the service at `addr`, e.g. `http://127.0.0.1:7741` (`127.0.0.1:7741` works
    /// too). Several addresses separated by commas name instances of one service (on one
    /// PostgreSQL database): the client holds one connection, to an instance chosen at random,
    /// and when it cannot be reached or its connection breaks, connects to the next one that
    /// answers.
    pub async fn connect(addr: impl Into<String>) -> Result<Client> {
        let mut endpoints = endpoints(&addr.into())?;
        if endpoints.len() == 1 {
            let endpoint = endpoints.remove(0);
            let server = server_addr(&endpoint);
            let channel = endpoint.connect().await?;
            return Ok(Client {
                server,
                ..Client::from_channel(channel)
            });
        }
        let (endpoint, connector) = failover(endpoints);
        Ok(Client::from_channel(
            endpoint.connect_with_connector(connector).await?,
        ))
    }

    /// Like [`Client::connect`], but connects on first use instead of now; must be called within
    /// a Tokio runtime.
    pub fn connect_lazy(addr: impl Into<String>) -> Result<Client> {
        let mut endpoints = endpoints(&addr.into())?;
        if endpoints.len() == 1 {
            let endpoint = endpoints.remove(0);
            let server = server_addr(&endpoint);
            return Ok(Client {
                server,
                ..Client::from_channel(endpoint.connect_lazy())
            });
        }
        let (endpoint, connector) = failover(endpoints);
        Ok(Client::from_channel(
            endpoint.connect_with_connector_lazy(connector),
        ))
    }

    /// Connects to the address in `JOBPLANE_ADDR`, or to `http://127.0.0.1:7741`.
    pub async fn from_env() -> Result<Client> {
        let addr = std::env::var(ADDR_ENV).unwrap_or_else(|_| DEFAULT_ADDR.to_owned());
        Client::connect(addr).await
    }

    /// Wraps an existing channel (e.g. one configured with TLS).
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            channel,
            namespace: Arc::from(DEFAULT_NAMESPACE),
            server: None,
        }
    }

    /// A client for another namespace on the same connection.
    pub fn with_namespace(&self, namespace: impl Into<String>) -> Client {
        Client {
            channel: self.channel.clone(),
            namespace: Arc::from(namespace.into()),
            server: self.server.clone(),
        }
    }

    /// The namespace every call is scoped to (default `default`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel.clone())
    }

    fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// The client span of one call of the job API (see [`crate::trace`]).
    pub(crate) fn job_span(&self, method: &'static str) -> tracing::Span {
        rpc::span(JOB_SERVICE, method, self.server.as_deref())
    }

    /// The client span of one call of the admin API.
    pub(crate) fn admin_span(&self, method: &'static str) -> tracing::Span {
        rpc::span(ADMIN_SERVICE, method, self.server.as_deref())
    }

    /// Submits one job. Returns once it is committed; `created` is false when its idempotency key
    /// matched an existing job with the same spec.
    ///
    /// The job's trace continues this call's: the spec's own
    /// [`traceparent`](JobSpec::traceparent) if it has one, else the task's scoped
    /// [`TraceContext`], else the current span (see [`crate::trace`]).
    pub async fn submit(&self, spec: JobSpec) -> Result<Submitted> {
        let span = self.job_span("SubmitJob");
        rpc::on_queue(&span, &spec.queue);
        let explicit = spec.explicit_trace();
        let req = rpc::request(
            &span,
            pb::SubmitJobRequest {
                spec: Some(convert::spec_to_pb(spec, &self.namespace)),
            },
            explicit,
        )?;
        let resp = rpc::traced(&span, self.jobs().submit_job(req))
            .await?
            .into_inner();
        let submitted = convert::submitted_from_pb(resp)?;
        rpc::on_job(&span, &submitted.job.id);
        Ok(submitted)
    }

    /// Submits many jobs in one transaction: all are accepted or none. Results are in order.
    ///
    /// The batch is one call with one client span, so it carries one trace context and all its
    /// jobs share one trace: the context of the first spec that has a
    /// [`traceparent`](JobSpec::traceparent), else the task's scoped [`TraceContext`], else the
    /// current span, as for [`Client::submit`].
    pub async fn submit_batch(&self, specs: Vec<JobSpec>) -> Result<Vec<Submitted>> {
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let span = self.job_span("SubmitJobs");
        if specs.iter().all(|s| s.queue == specs[0].queue) {
            rpc::on_queue(&span, &specs[0].queue);
        }
        let explicit = specs.iter().find_map(JobSpec::explicit_trace);
        let req = rpc::request(
            &span,
            pb::SubmitJobsRequest {
                specs: specs
                    .into_iter()
                    .map(|s| convert::spec_to_pb(s, &self.namespace))
                    .collect(),
            },
            explicit,
        )?;
        let resp = rpc::traced(&span, self.jobs().submit_jobs(req))
            .await?
            .into_inner();
        resp.results
            .into_iter()
            .map(convert::submitted_from_pb)
            .collect()
    }

    /// Returns a job's committed snapshot.
    pub async fn get(&self, id: &str) -> Result<Job> {
        let span = self.job_span("GetJob");
        rpc::on_job(&span, id);
        let req = rpc::request(
            &span,
            pb::GetJobRequest {
                namespace: self.namespace.to_string(),
                id: id.to_owned(),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.jobs().get_job(req))
            .await?
            .into_inner();
        convert::job_from_pb(resp.job.ok_or_else(|| Error::missing("job"))?)
    }

    /// Lists jobs, newest first, one page at a time.
    pub async fn list(&self, filter: ListFilter) -> Result<JobPage> {
        let span = self.job_span("ListJobs");
        if let Some(queue) = &filter.queue {
            rpc::on_queue(&span, queue);
        }
        let req = rpc::request(
            &span,
            convert::list_filter_to_pb(filter, &self.namespace),
            None,
        )?;
        let resp = rpc::traced(&span, self.jobs().list_jobs(req))
            .await?
            .into_inner();
        convert::page_from_pb(resp)
    }

    /// Waits until a job reaches a target state (by default any terminal state) or the timeout
    /// passes; `options` is a [`WaitOptions`] or just a [`Duration`].
    ///
    /// A timeout is not an error: the result then says `reached: false` with the job's current
    /// snapshot. So is a job that ended in a state that is not a target: the wait returns at
    /// once. The service bounds one wait (1h); a longer timeout is waited out in several calls,
    /// and one too large to represent (such as [`Duration::MAX`]) waits without a limit.
    ///
    /// Each call's client span links to the job's trace (the job's
    /// [`traceparent`](Job::traceparent) in the answer), so a trace backend leads from the
    /// waiter to the job.
    pub async fn wait(&self, id: &str, options: impl Into<WaitOptions>) -> Result<WaitResult> {
        let options = options.into();
        let target_states: Vec<i32> = options
            .target_states
            .iter()
            .map(|s| convert::state_to_pb(*s) as i32)
            .collect();
        wait_in_rounds(options.timeout, SERVICE_MAX_WAIT, |timeout| {
            let span = self.job_span("WaitJob");
            rpc::on_job(&span, id);
            let req = rpc::request(
                &span,
                pb::WaitJobRequest {
                    namespace: self.namespace.to_string(),
                    id: id.to_owned(),
                    target_states: target_states.clone(),
                    timeout: timeout.map(convert::duration_to_pb),
                },
                None,
            );
            async move {
                let mut req = req?;
                req.set_timeout(timeout.unwrap_or(DEFAULT_WAIT) + WAIT_DEADLINE_MARGIN);
                let resp = rpc::traced(&span, self.jobs().wait_job(req))
                    .await?
                    .into_inner();
                let result = convert::wait_from_pb(resp)?;
                rpc::link_job(
                    &span,
                    result.job.traceparent.as_deref(),
                    result.job.tracestate.as_deref(),
                );
                // A terminal job that is not in a target state never will be.
                let settled = result.reached || result.job.is_terminal();
                Ok((result, settled))
            }
        })
        .await
    }

    /// Waits for several jobs: until all of them ([`WaitMode::All`]) or any of them
    /// ([`WaitMode::Any`]) reached a target state, or the timeout passes (long timeouts as in
    /// [`Client::wait`]). Each call's client span links to the traces of the jobs.
    pub async fn wait_many<I, S>(
        &self,
        ids: I,
        mode: WaitMode,
        options: impl Into<WaitOptions>,
    ) -> Result<WaitManyResult>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let options = options.into();
        let ids: Vec<String> = ids.into_iter().map(Into::into).collect();
        let target_states: Vec<i32> = options
            .target_states
            .iter()
            .map(|s| convert::state_to_pb(*s) as i32)
            .collect();
        wait_in_rounds(options.timeout, SERVICE_MAX_WAIT, |timeout| {
            let span = self.job_span("WaitJobs");
            let req = rpc::request(
                &span,
                pb::WaitJobsRequest {
                    namespace: self.namespace.to_string(),
                    ids: ids.clone(),
                    target_states: target_states.clone(),
                    timeout: timeout.map(convert::duration_to_pb),
                    mode: convert::wait_mode_to_pb(mode) as i32,
                },
                None,
            );
            async move {
                let mut req = req?;
                req.set_timeout(timeout.unwrap_or(DEFAULT_WAIT) + WAIT_DEADLINE_MARGIN);
                let resp = rpc::traced(&span, self.jobs().wait_jobs(req))
                    .await?
                    .into_inner();
                let result = convert::wait_many_from_pb(resp)?;
                for r in &result.results {
                    rpc::link_job(
                        &span,
                        r.job.traceparent.as_deref(),
                        r.job.tracestate.as_deref(),
                    );
                }
                let settled = result.reached || hopeless(&result, mode);
                Ok((result, settled))
            }
        })
        .await
    }

    /// Cancels a job: a queued one at once, a running one after its worker stops or `grace`
    /// (default 10s) ends. Idempotent; cancelling a terminal job changes nothing and says so.
    pub async fn cancel(&self, id: &str, grace: Option<Duration>) -> Result<CancelResult> {
        self.cancel_with_reason(id, grace, "").await
    }

    /// Like [`Client::cancel`], recording `reason` in the job's error.
    pub async fn cancel_with_reason(
        &self,
        id: &str,
        grace: Option<Duration>,
        reason: &str,
    ) -> Result<CancelResult> {
        let span = self.job_span("CancelJob");
        rpc::on_job(&span, id);
        let req = rpc::request(
            &span,
            pb::CancelJobRequest {
                namespace: self.namespace.to_string(),
                id: id.to_owned(),
                grace: grace.map(convert::duration_to_pb),
                reason: reason.to_owned(),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.jobs().cancel_job(req))
            .await?
            .into_inner();
        convert::cancel_from_pb(resp)
    }

    /// Streams a job's events with `seq > from_seq` (0 = from the start). The stream ends after
    /// the job's terminal state event.
    ///
    /// If the connection breaks mid-stream, the watch is resumed from the last event received
    /// (a bounded number of times, with back-off), so the stream has neither gaps nor
    /// duplicates. Other errors end the stream after being yielded.
    ///
    /// ```no_run
    /// # async fn demo(client: jobplane::Client) -> Result<(), jobplane::Error> {
    /// use futures::StreamExt;
    /// let mut events = client.watch("0190f1c2-…", 0);
    /// while let Some(event) = events.next().await {
    ///     println!("{:?}", event?.kind);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// Each `WatchJob` call has its own client span, in the span (and the scoped
    /// [`TraceContext`]) current when `watch` is called; it lasts until its stream ends.
    pub fn watch(&self, id: &str, from_seq: u64) -> EventStream {
        let client = self.clone();
        let id = id.to_owned();
        let parent = tracing::Span::current();
        let scoped = TraceContext::scoped();
        let stream = async_stream::stream! {
            let mut last_seq = from_seq;
            let mut failures = 0u32;
            'resume: loop {
                let span = parent.in_scope(|| client.job_span("WatchJob"));
                rpc::on_job(&span, &id);
                let req = rpc::request(
                    &span,
                    pb::WatchJobRequest {
                        namespace: client.namespace.to_string(),
                        id: id.clone(),
                        from_seq: last_seq,
                    },
                    scoped.clone(),
                );
                let req = match req {
                    Ok(req) => req,
                    Err(err) => {
                        yield Err(err);
                        return;
                    }
                };
                let opened = client.jobs().watch_job(req).instrument(span.clone()).await;
                let mut inner = match opened {
                    Ok(resp) => resp.into_inner(),
                    Err(status) => {
                        rpc::ended(&span, status.code());
                        if is_transport_failure(&status) && failures < WATCH_MAX_RESUMES {
                            failures += 1;
                            tokio::time::sleep(resume_backoff(failures)).await;
                            continue 'resume;
                        }
                        yield Err(Error::from_status(status));
                        return;
                    }
                };
                loop {
                    match inner.message().await {
                        Ok(Some(msg)) => {
                            let Some(raw) = msg.event else {
                                yield Err(Error::missing("event"));
                                return;
                            };
                            // A resumed stream never repeats what was already yielded.
                            if raw.seq <= last_seq {
                                continue;
                            }
                            match convert::event_from_pb(raw) {
                                Ok(event) => {
                                    last_seq = event.seq;
                                    failures = 0;
                                    let terminal = event.is_terminal();
                                    yield Ok(event);
                                    if terminal {
                                        rpc::ended(&span, tonic::Code::Ok);
                                        return;
                                    }
                                }
                                Err(err) => {
                                    yield Err(err);
                                    return;
                                }
                            }
                        }
                        // The service ended the stream: after the terminal event, or because
                        // there is nothing after `from_seq` of a finished job.
                        Ok(None) => {
                            rpc::ended(&span, tonic::Code::Ok);
                            return;
                        }
                        Err(status) => {
                            rpc::ended(&span, status.code());
                            if is_transport_failure(&status) && failures < WATCH_MAX_RESUMES {
                                failures += 1;
                                tracing::debug!(job_id = %id, last_seq, %status, "watch stream broke; resuming");
                                tokio::time::sleep(resume_backoff(failures)).await;
                                continue 'resume;
                            }
                            yield Err(Error::from_status(status));
                            return;
                        }
                    }
                }
            }
        };
        EventStream {
            inner: Box::pin(stream),
        }
    }

    /// Creates or updates a queue's settings (the whole settings are replaced).
    pub async fn configure_queue(&self, name: &str, config: QueueConfig) -> Result<QueueInfo> {
        let span = self.admin_span("ConfigureQueue");
        rpc::on_queue(&span, name);
        let req = rpc::request(
            &span,
            pb::ConfigureQueueRequest {
                namespace: self.namespace.to_string(),
                name: name.to_owned(),
                config: Some(convert::queue_config_to_pb(&config)),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.admin().configure_queue(req))
            .await?
            .into_inner();
        Ok(convert::queue_from_pb(
            resp.queue.ok_or_else(|| Error::missing("queue"))?,
        ))
    }

    /// Lists the namespace's queues, by name.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>> {
        let span = self.admin_span("ListQueues");
        let req = rpc::request(
            &span,
            pb::ListQueuesRequest {
                namespace: self.namespace.to_string(),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.admin().list_queues(req))
            .await?
            .into_inner();
        Ok(resp
            .queues
            .into_iter()
            .map(convert::queue_from_pb)
            .collect())
    }

    /// Lists the namespace's workers.
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        let span = self.admin_span("ListWorkers");
        let req = rpc::request(
            &span,
            pb::ListWorkersRequest {
                namespace: self.namespace.to_string(),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.admin().list_workers(req))
            .await?
            .into_inner();
        Ok(resp
            .workers
            .into_iter()
            .map(convert::worker_from_pb)
            .collect())
    }

    /// Drains a worker: it gets no new assignments and its in-flight work finishes.
    pub async fn drain_worker(&self, id: &str) -> Result<WorkerInfo> {
        let span = self.admin_span("DrainWorker");
        let req = rpc::request(
            &span,
            pb::DrainWorkerRequest {
                namespace: self.namespace.to_string(),
                id: id.to_owned(),
            },
            None,
        )?;
        let resp = rpc::traced(&span, self.admin().drain_worker(req))
            .await?
            .into_inner();
        Ok(convert::worker_from_pb(
            resp.worker.ok_or_else(|| Error::missing("worker"))?,
        ))
    }
}

/// Whether a multi-job wait can no longer be met: a job that ended outside the target states
/// never reaches one.
fn hopeless(result: &WaitManyResult, mode: WaitMode) -> bool {
    let mut dead = result
        .results
        .iter()
        .map(|r| r.job.is_terminal() && !r.reached);
    match mode {
        WaitMode::All => dead.any(|d| d),
        WaitMode::Any => !result.results.is_empty() && dead.all(|d| d),
    }
}

/// Runs a wait of `timeout` as calls of at most `cap` each (`None`: one call with the service's
/// default). `call` gets the timeout of one call and returns its answer and whether that answer
/// is final (target reached, or never reachable); calls are repeated until then or until the
/// timeout has passed. A timeout past what `Instant` can represent waits without a limit.
async fn wait_in_rounds<T, F, Fut>(
    timeout: Option<Duration>,
    cap: Duration,
    mut call: F,
) -> Result<T>
where
    F: FnMut(Option<Duration>) -> Fut,
    Fut: Future<Output = Result<(T, bool)>>,
{
    let Some(timeout) = timeout else {
        return call(None).await.map(|(answer, _)| answer);
    };
    let deadline = Instant::now().checked_add(timeout);
    loop {
        let started = Instant::now();
        let remaining = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(started));
        let this = remaining.min(cap);
        let (answer, settled) = call(Some(this)).await?;
        let last = this >= remaining;
        let early = started.elapsed() < this.min(MIN_WAIT_ROUND);
        if settled || last || early {
            return Ok(answer);
        }
    }
}

/// Back-off before resuming a broken watch: 50ms doubling per failure, capped at 2s, jittered.
fn resume_backoff(failures: u32) -> Duration {
    crate::backoff::jittered(
        Duration::from_millis(50),
        Duration::from_secs(2),
        failures.saturating_sub(1),
    )
}

/// The stream of a job's events returned by [`Client::watch`].
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = Result<JobEvent>> + Send>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl Stream for EventStream {
    type Item = Result<JobEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec's request as `Client::submit` builds it, with no OpenTelemetry layer installed.
    fn submit_request(spec: &JobSpec) -> Result<tonic::Request<()>> {
        rpc::request(
            &rpc::span(JOB_SERVICE, "SubmitJob", None),
            (),
            spec.explicit_trace(),
        )
    }

    #[test]
    fn traceparent_travels_as_metadata() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let req = submit_request(&JobSpec::new("q").traceparent(tp)).unwrap();
        assert_eq!(req.metadata().get("traceparent").unwrap(), tp);
        assert!(req.metadata().get("tracestate").is_none());
        let req = submit_request(&JobSpec::new("q").traceparent(tp).tracestate("k=v")).unwrap();
        assert_eq!(req.metadata().get("tracestate").unwrap(), "k=v");
        assert!(submit_request(&JobSpec::new("q"))
            .unwrap()
            .metadata()
            .get("traceparent")
            .is_none());
        assert!(submit_request(&JobSpec::new("q").traceparent("bad\nvalue")).is_err());
    }

    #[test]
    fn one_address_names_the_server() {
        let server = |a: &str| server_addr(&endpoint(a).unwrap()).map(|s| (*s).clone());
        assert_eq!(
            server("127.0.0.1:7741"),
            Some(ServerAddr {
                host: "127.0.0.1".into(),
                port: Some(7741)
            })
        );
        assert_eq!(
            server("http://[::1]:80"),
            Some(ServerAddr {
                host: "::1".into(),
                port: Some(80)
            })
        );
    }

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(normalise_addr("127.0.0.1:7741"), "http://127.0.0.1:7741");
        assert_eq!(normalise_addr(" https://x:1 "), "https://x:1");
    }

    #[tokio::test]
    async fn lazy_client_has_default_namespace() {
        let client = Client::connect_lazy("127.0.0.1:1").unwrap();
        assert_eq!(client.namespace(), "default");
        assert_eq!(client.with_namespace("t1").namespace(), "t1");
        assert!(Client::connect_lazy(" , ").is_err());
    }

    /// Runs `wait_in_rounds` against a fake service that waits out each call and answers
    /// "settled" on call `settle_on` (1-based; 0 = never); returns the timeouts asked for.
    async fn rounds(timeout: Option<Duration>, settle_on: usize) -> Vec<Option<Duration>> {
        let mut asked = Vec::new();
        wait_in_rounds(timeout, SERVICE_MAX_WAIT, |t| {
            asked.push(t);
            let settled = asked.len() == settle_on;
            async move {
                tokio::time::sleep(t.unwrap_or(DEFAULT_WAIT)).await;
                Ok(((), settled))
            }
        })
        .await
        .unwrap();
        asked
    }

    #[tokio::test(start_paused = true)]
    async fn waits_longer_than_the_service_allows_are_split_into_rounds() {
        let hour = SERVICE_MAX_WAIT;
        let tail = Duration::from_secs(10);
        let started = Instant::now();
        assert_eq!(
            rounds(Some(3 * hour + tail), 0).await,
            [Some(hour), Some(hour), Some(hour), Some(tail)]
        );
        assert_eq!(started.elapsed(), 3 * hour + tail);
        // Short waits and the default are one call.
        assert_eq!(rounds(Some(tail), 0).await, [Some(tail)]);
        assert_eq!(rounds(None, 0).await, [None]);
    }

    #[tokio::test(start_paused = true)]
    async fn rounds_stop_once_the_answer_is_final() {
        assert_eq!(rounds(Some(5 * SERVICE_MAX_WAIT), 2).await.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unrepresentable_timeouts_wait_without_a_limit() {
        // Past `Instant`'s range: no panic, and calls go on until the answer is final.
        let asked = rounds(Some(Duration::MAX), 4).await;
        assert_eq!(asked, [Some(SERVICE_MAX_WAIT); 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_answer_is_not_repeated() {
        let mut calls = 0;
        wait_in_rounds(Some(Duration::from_secs(7200)), SERVICE_MAX_WAIT, |_| {
            calls += 1;
            async { Ok(((), false)) }
        })
        .await
        .unwrap();
        assert_eq!(calls, 1);
    }

    fn wait_results(jobs: &[(pb::JobState, bool)]) -> WaitManyResult {
        let results = jobs
            .iter()
            .map(|&(state, reached)| WaitResult {
                job: convert::job_from_pb(pb::Job {
                    id: "j".into(),
                    namespace: "default".into(),
                    queue: "q".into(),
                    state: state as i32,
                    attempt: 1,
                    ..Default::default()
                })
                .unwrap(),
                reached,
            })
            .collect();
        WaitManyResult {
            results,
            reached: false,
        }
    }

    #[test]
    fn a_job_that_ended_elsewhere_makes_a_multi_wait_hopeless() {
        use pb::JobState::{Cancelled, Failed, Running, Succeeded};
        let ended = wait_results(&[(Failed, false), (Running, false)]);
        assert!(hopeless(&ended, WaitMode::All));
        assert!(!hopeless(&ended, WaitMode::Any));
        let all_ended = wait_results(&[(Failed, false), (Cancelled, false)]);
        assert!(hopeless(&all_ended, WaitMode::Any));
        let going = wait_results(&[(Succeeded, true), (Running, false)]);
        assert!(!hopeless(&going, WaitMode::All));
    }

    #[tokio::test]
    async fn connect_to_nothing_is_a_transport_error() {
        let err = Client::connect("http://127.0.0.1:1").await.unwrap_err();
        assert!(matches!(err, Error::Transport(_)), "{err}");
        assert!(err.is_retryable());
    }
}
