//! Prometheus metrics: the only module that knows `prometheus-client` and the HTTP server of the
//! `/metrics` endpoint.
//!
//! Counters and histograms are recorded where things happen (submits and completions in the
//! engine, commit batches in the committer, RPCs in a tower layer of the gRPC server): each is an
//! atomic update behind a read lock of its label family, with no lock held across an await.
//! Figures that describe the present (queue depth and oldest wait, pool units, cooldowns,
//! connected workers) are read from the engine at scrape time by a [`Collector`], so they cost
//! nothing between scrapes. Labels are namespaces, queues, pools, units, RPC methods (only the
//! service's own; anything else is `unknown`) and status codes: bounded by configuration, never
//! by job.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::engine::model::{JobState, Name, QueueKey, Timestamp};
use crate::engine::{Engine, PoolInfo};

/// The media type of the OpenMetrics text format that `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Default address of the metrics endpoint.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9741);

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct QueueLabels {
    namespace: Name,
    queue: Name,
}

impl EncodeLabelSet for QueueLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [
            ("namespace", self.namespace.as_str()),
            ("queue", self.queue.as_str()),
        ]
        .encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct OutcomeLabels {
    namespace: Name,
    queue: Name,
    outcome: &'static str,
}

impl EncodeLabelSet for OutcomeLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [
            ("namespace", self.namespace.as_str()),
            ("queue", self.queue.as_str()),
            ("outcome", self.outcome),
        ]
        .encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct MethodLabels {
    method: Arc<str>,
}

impl EncodeLabelSet for MethodLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [("method", &*self.method)].encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RpcErrorLabels {
    method: Arc<str>,
    code: &'static str,
}

impl EncodeLabelSet for RpcErrorLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [("method", &*self.method), ("code", self.code)].encode(encoder)
    }
}

/// Seconds from 1 ms to about 9 h (factor 2.5): job waits and run times.
fn job_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 18))
}

/// Seconds from 100 µs to about 26 s (factor 2): RPCs (a stream's whole life for streams).
fn rpc_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of the service, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    submitted: Family<QueueLabels, Counter>,
    completed: Family<OutcomeLabels, Counter>,
    schedule_to_start: HistogramFamily<QueueLabels>,
    run_time: HistogramFamily<QueueLabels>,
    rpc_duration: HistogramFamily<MethodLabels>,
    rpc_errors: Family<RpcErrorLabels, Counter>,
    commit_batch: Histogram,
    engine: Arc<RwLock<Weak<Engine>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric; live figures appear once [`Metrics::attach`] names the
    /// engine.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let submitted = Family::<QueueLabels, Counter>::default();
        registry.register(
            "jobplane_jobs_submitted",
            "Jobs created by submits (idempotent duplicates not counted)",
            submitted.clone(),
        );
        let completed = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobplane_jobs_completed",
            "Jobs that reached a terminal state, by outcome (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, EXPIRED)",
            completed.clone(),
        );
        let schedule_to_start: HistogramFamily<QueueLabels> =
            Family::new_with_constructor(job_seconds);
        registry.register_with_unit(
            "jobplane_schedule_to_start",
            "Time from when an attempt could run (submit, scheduled time or end of back-off) to its start on a worker",
            Unit::Seconds,
            schedule_to_start.clone(),
        );
        let run_time: HistogramFamily<QueueLabels> = Family::new_with_constructor(job_seconds);
        registry.register_with_unit(
            "jobplane_run",
            "Run time of attempts, from start on a worker to their end (whatever the outcome)",
            Unit::Seconds,
            run_time.clone(),
        );
        let rpc_duration: HistogramFamily<MethodLabels> = Family::new_with_constructor(rpc_seconds);
        registry.register_with_unit(
            "jobplane_rpc_duration",
            "gRPC call duration by method (for streams, the stream's life)",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let rpc_errors = Family::<RpcErrorLabels, Counter>::default();
        registry.register(
            "jobplane_rpc_errors",
            "gRPC calls that ended with a status other than OK, by method and code",
            rpc_errors.clone(),
        );
        let commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "jobplane_commit_batch_writes",
            "Writes per database transaction of the group committer",
            commit_batch.clone(),
        );
        let engine = Arc::new(RwLock::new(Weak::new()));
        registry.register_collector(Box::new(EngineCollector {
            engine: engine.clone(),
        }));
        Metrics {
            registry,
            submitted,
            completed,
            schedule_to_start,
            run_time,
            rpc_duration,
            rpc_errors,
            commit_batch,
            engine,
        }
    }

    /// Names the engine whose live figures are read at scrape time: the latest one started
    /// (an instance starts a new one each time it takes the lead).
    pub fn attach(&self, engine: &Arc<Engine>) {
        *self.engine.write().expect("metrics lock poisoned") = Arc::downgrade(engine);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    pub(crate) fn job_submitted(&self, queue: &QueueKey) {
        self.submitted.get_or_create(&queue_labels(queue)).inc();
    }

    pub(crate) fn job_completed(&self, namespace: &Name, queue: &Name, outcome: JobState) {
        self.completed
            .get_or_create(&OutcomeLabels {
                namespace: namespace.clone(),
                queue: queue.clone(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) fn attempt_started(&self, namespace: &Name, queue: &Name, waited: Duration) {
        self.schedule_to_start
            .get_or_create(&QueueLabels {
                namespace: namespace.clone(),
                queue: queue.clone(),
            })
            .observe(waited.as_secs_f64());
    }

    pub(crate) fn attempt_ended(&self, namespace: &Name, queue: &Name, ran: Duration) {
        self.run_time
            .get_or_create(&QueueLabels {
                namespace: namespace.clone(),
                queue: queue.clone(),
            })
            .observe(ran.as_secs_f64());
    }

    pub(crate) fn commit_batch(&self, writes: usize) {
        self.commit_batch.observe(writes as f64);
    }

    /// Records a finished RPC; `code` is `None` for OK.
    pub(crate) fn rpc_finished(
        &self,
        method: &Arc<str>,
        code: Option<&'static str>,
        duration: Duration,
    ) {
        self.rpc_duration
            .get_or_create(&MethodLabels {
                method: method.clone(),
            })
            .observe(duration.as_secs_f64());
        if let Some(code) = code {
            self.rpc_errors
                .get_or_create(&RpcErrorLabels {
                    method: method.clone(),
                    code,
                })
                .inc();
        }
    }
}

fn queue_labels(q: &QueueKey) -> QueueLabels {
    QueueLabels {
        namespace: q.namespace.clone(),
        queue: q.name.clone(),
    }
}

/// Figures of the present, read from the engine on each scrape.
#[derive(Debug)]
struct EngineCollector {
    engine: Arc<RwLock<Weak<Engine>>>,
}

fn gauge<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m =
        encoder.encode_descriptor(name, help, unit, ConstGauge::<f64>::new(0.0).metric_type())?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(engine) = self.engine.read().expect("metrics lock poisoned").upgrade() else {
            return Ok(());
        };
        let s = engine.live_figures();
        let now = s.now;
        gauge(
            &mut encoder,
            "jobplane_queue_depth",
            "Jobs queued (waiting to run, including scheduled and backing-off ones).",
            None,
            s.queues.iter().map(|q| (ql(&q.key), q.depth as f64)),
        )?;
        gauge(
            &mut encoder,
            "jobplane_queue_running",
            "Jobs leased or running.",
            None,
            s.queues.iter().map(|q| (ql(&q.key), q.running as f64)),
        )?;
        gauge(
            &mut encoder,
            "jobplane_queue_oldest_wait",
            "Age of the oldest queued job (0 when none is queued).",
            Some(&Unit::Seconds),
            s.queues.iter().map(|q| {
                let age = q.oldest_queued_at.map_or(0.0, |t| wait_seconds(now, t));
                (ql(&q.key), age)
            }),
        )?;
        let unit_rows = |pick: fn(&PoolInfo, &str) -> Option<u64>| {
            s.pools.iter().flat_map(move |p| {
                p.in_use
                    .keys()
                    .chain(p.config.max_units.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .filter_map(move |u| {
                        pick(p, u.as_str()).map(|v| {
                            (
                                [
                                    ("namespace", p.key.namespace.as_str()),
                                    ("pool", p.key.name.as_str()),
                                    ("unit", u.as_str()),
                                ],
                                v as f64,
                            )
                        })
                    })
            })
        };
        gauge(
            &mut encoder,
            "jobplane_pool_units_in_use",
            "Units of a pool held by running attempts.",
            None,
            unit_rows(|p, u| Some(p.in_use.get(u).copied().unwrap_or(0))),
        )?;
        gauge(
            &mut encoder,
            "jobplane_pool_units_max",
            "Most units of a pool held at once (for units with a limit).",
            None,
            unit_rows(|p, u| p.config.max_units.get(u).copied()),
        )?;
        gauge(
            &mut encoder,
            "jobplane_pool_waiting_jobs",
            "Queued jobs waiting for a pool.",
            None,
            s.pools.iter().map(|p| (pl(p), p.waiting as f64)),
        )?;
        gauge(
            &mut encoder,
            "jobplane_pool_cooling_down",
            "1 while a pool cools down after an upstream rate limit, else 0.",
            None,
            s.pools
                .iter()
                .map(|p| (pl(p), f64::from(u8::from(p.cooldown_until.is_some())))),
        )?;
        let mut m = encoder.encode_descriptor(
            "jobplane_pool_cooldowns",
            "Cooldowns a pool started after upstream rate limits (since the service started).",
            None,
            ConstCounter::<u64>::new(0).metric_type(),
        )?;
        for p in &s.pools {
            let labels = pl(p);
            ConstCounter::new(p.epoch).encode(m.encode_family(&labels)?)?;
        }
        gauge(
            &mut encoder,
            "jobplane_workers_connected",
            "Workers with an open stream.",
            None,
            s.workers_connected
                .iter()
                .map(|(ns, n)| ([("namespace", ns.as_str())], *n as f64)),
        )?;
        Ok(())
    }
}

fn ql(k: &QueueKey) -> [(&'static str, &str); 2] {
    [
        ("namespace", k.namespace.as_str()),
        ("queue", k.name.as_str()),
    ]
}

fn pl(p: &PoolInfo) -> [(&'static str, &str); 2] {
    [
        ("namespace", p.key.namespace.as_str()),
        ("pool", p.key.name.as_str()),
    ]
}

fn wait_seconds(now: Timestamp, since: Timestamp) -> f64 {
    (now.0 - since.0).max(0) as f64 / 1e6
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode()) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name(Arc::from(s))
    }

    #[test]
    fn encodes_counters_and_histograms_with_their_labels() {
        let m = Metrics::new();
        let q = QueueKey {
            namespace: name("default"),
            name: name("emails"),
        };
        m.job_submitted(&q);
        m.job_submitted(&q);
        m.job_completed(&q.namespace, &q.name, JobState::Succeeded);
        m.attempt_started(&q.namespace, &q.name, Duration::from_millis(3));
        m.attempt_ended(&q.namespace, &q.name, Duration::from_millis(20));
        m.commit_batch(5);
        let method: Arc<str> = Arc::from("jobplane.v1.JobService/GetJob");
        m.rpc_finished(&method, Some("NotFound"), Duration::from_millis(1));
        let text = m.encode();
        for line in [
            "# TYPE jobplane_jobs_submitted counter",
            r#"jobplane_jobs_submitted_total{namespace="default",queue="emails"} 2"#,
            r#"jobplane_jobs_completed_total{namespace="default",queue="emails",outcome="SUCCEEDED"} 1"#,
            "# TYPE jobplane_schedule_to_start_seconds histogram",
            r#"jobplane_schedule_to_start_seconds_count{namespace="default",queue="emails"} 1"#,
            r#"jobplane_run_seconds_count{namespace="default",queue="emails"} 1"#,
            "jobplane_commit_batch_writes_sum 5.0",
            r#"jobplane_rpc_errors_total{method="jobplane.v1.JobService/GetJob",code="NotFound"} 1"#,
            r#"jobplane_rpc_duration_seconds_count{method="jobplane.v1.JobService/GetJob"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
