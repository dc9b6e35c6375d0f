//! jobplane server: one gRPC service that owns every job's state in a database.
//!
//! - [`engine`]: the state machine, dispatch, timers, waiters (no tonic, no sqlx);
//! - [`store`]: the storage seam, its SQLite and PostgreSQL backends and the election of a leader
//!   among instances on one database (the only place that knows sqlx);
//! - [`api`]: the tonic services, proto ↔ domain conversion and error mapping;
//! - [`metrics`]: the Prometheus metrics and their `/metrics` endpoint;
//! - [`telemetry`]: OpenTelemetry trace export, configured by the `OTEL_*` variables.
//!
//! [`run`] is the seam tests use: it serves on a listener they bound (`127.0.0.1:0`) until a
//! shutdown future resolves ([`run_with_metrics`] also serves `/metrics` on a second listener).
//! [`serve`] is what `jobplane serve` calls; [`run_instance`] is [`run_with_metrics`] with the
//! address other instances reach this one at. The instance's life (lead or forward, step down
//! and recover) is `cluster.rs`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod api;
mod cluster;
pub mod engine;
pub mod metrics;
pub mod store;
pub mod telemetry;

pub use engine::EngineConfig;

/// How long a shutdown waits for calls still open after worker streams, waits and watches
/// were ended.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Settings of `jobplane serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Database URL (`sqlite://PATH` or `postgres://…`).
    pub db_url: String,
    /// Where other instances on the same database reach this one (`HOST:PORT`); default: the
    /// listening address.
    pub advertise: Option<String>,
    /// Allow listening on a non-loopback address without authentication.
    pub allow_non_loopback: bool,
    /// Where to serve the Prometheus metrics endpoint (`GET /metrics`); `None`: nowhere.
    pub metrics: Option<MetricsListen>,
    /// Engine tunables.
    pub engine: EngineConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7741)),
            db_url: "sqlite://jobplane.db".into(),
            advertise: None,
            allow_non_loopback: false,
            metrics: Some(MetricsListen {
                addr: metrics::DEFAULT_LISTEN,
                required: false,
            }),
            engine: EngineConfig::default(),
        }
    }
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen {
    /// Address.
    pub addr: SocketAddr,
    /// Whether failing to bind it stops the service. The default address is not required: when
    /// it is taken (say, by a second service on the same machine) the service logs a warning and
    /// runs without metrics; an address given explicitly must be bound.
    pub required: bool,
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is unsafe or invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] store::StoreError),
    /// The gRPC transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Opens the database, binds the address and serves until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if !config.listen.ip().is_loopback() {
        if !config.allow_non_loopback {
            return Err(ServeError::Config(format!(
                "refusing to listen on non-loopback address {} without authentication; \
                 pass --allow-insecure-non-loopback to do it anyway",
                config.listen
            )));
        }
        tracing::warn!(listen = %config.listen, "listening on a non-loopback address without authentication");
    } else {
        tracing::warn!("authentication is off (loopback only)");
    }
    if let Some(m) = &config.metrics {
        if !m.addr.ip().is_loopback() && !config.allow_non_loopback {
            return Err(ServeError::Config(format!(
                "refusing to serve metrics on non-loopback address {} without authentication; \
                 pass --allow-insecure-non-loopback to do it anyway",
                m.addr
            )));
        }
    }
    let store = store::open(&config.db_url).await?;
    let bind_error = |addr| move |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(bind_error(config.listen))?;
    let metrics_listener = match config.metrics {
        None => None,
        Some(m) => match metrics::bind(m.addr).await {
            Ok(l) => Some(l),
            Err(e) if !m.required => {
                tracing::warn!(addr = %m.addr, error = %e, "cannot serve metrics on the default address; running without them (set --metrics-listen)");
                None
            }
            Err(source) => {
                return Err(ServeError::Bind {
                    addr: m.addr,
                    source,
                })
            }
        },
    };
    let listen = listener.local_addr().map_err(bind_error(config.listen))?;
    let metrics_addr = match &metrics_listener {
        Some(l) => l
            .local_addr()
            .map_err(bind_error(config.listen))?
            .to_string(),
        None => "off".to_string(),
    };
    tracing::info!(%listen, metrics = %metrics_addr, db = %config.db_url, "jobplane serving");
    run_instance(
        listener,
        metrics_listener,
        store,
        config.engine,
        config.advertise,
        shutdown,
    )
    .await
}

/// Serves the API on `listener` with `store` until `shutdown` resolves, then stops accepting,
/// ends worker streams, lets in-flight requests finish and flushes the commit queue.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn store::Store>,
    config: EngineConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_metrics(listener, None, store, config, shutdown).await
}

/// [`run`], also serving the Prometheus metrics (`GET /metrics`) on `metrics_listener` if given.
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    store: Arc<dyn store::Store>,
    config: EngineConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_instance(listener, metrics_listener, store, config, None, shutdown).await
}

/// [`run_with_metrics`] as one of several instances on one database: `advertise` is where the
/// others reach this one while it leads (default: `http://` and the listener's address).
pub async fn run_instance(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    store: Arc<dyn store::Store>,
    config: EngineConfig,
    advertise: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let advertise = match advertise {
        Some(a) if a.contains("://") => a,
        Some(a) => format!("http://{a}"),
        None if local.ip().is_unspecified() && store.coordinator().is_some() => {
            return Err(ServeError::Config(format!(
                "listening on {local}: other instances cannot reach an unspecified address; \
                 pass --advertise HOST:PORT"
            )))
        }
        None => format!("http://{local}"),
    };
    let stop = CancellationToken::new();
    let api_done = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::new());
    let roles = api::Roles::new();
    let instance = tokio::spawn(cluster::run(
        store.clone(),
        advertise,
        config,
        metrics.clone(),
        roles.clone(),
        stop.clone(),
        api_done.clone(),
    ));
    let metrics_task = metrics_listener.map(|l| {
        let stopped = stop.clone().cancelled_owned();
        tokio::spawn(metrics::serve(l, metrics.clone(), stopped))
    });
    let stop2 = stop.clone();
    let signal_task = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        stop2.cancel();
    });
    let signal = stop.clone().cancelled_owned();
    // Accept calls once the instance leads or follows (clients connecting meanwhile wait in the
    // listen backlog), unless it is told to stop first.
    tokio::select! {
        _ = roles.settled() => {}
        _ = stop.cancelled() => {}
    }
    // Graceful: in-flight calls finish (worker streams, waits and watches end with `stop`); a
    // call that still holds on after SHUTDOWN_GRACE (a health watch, say) is cut.
    let serving = api::serve(listener, roles, metrics, signal);
    let overdue = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = serving => r,
        _ = overdue => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still open after the shutdown grace; closing them");
            Ok(())
        }
    };
    stop.cancel();
    signal_task.abort();
    api_done.cancel();
    if let Err(e) = instance.await {
        tracing::warn!(error = %e, "the instance loop panicked");
    }
    if let Some(t) = metrics_task {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the metrics endpoint failed"),
            Err(e) => tracing::warn!(error = %e, "the metrics endpoint panicked"),
        }
    }
    store.close().await;
    result
}

#[cfg(test)]
mod tests {
    /// Embedders spawn the service on their runtime: its futures must be `Send`.
    #[allow(dead_code)]
    fn serving_futures_are_send() {
        fn spawnable<T: Send + 'static>(_: T) {}
        spawnable(super::serve(super::ServeConfig::default(), async {}));
    }
}
