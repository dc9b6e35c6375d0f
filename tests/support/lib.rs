//! Shared helpers of the end-to-end tests: a real server on `127.0.0.1:0` with a fresh database
//! (in-process through `jobplane_server::run`, or as a real `jobplane` process), SDK workers, and
//! a raw protocol worker for the tests that must misbehave on purpose. The database is SQLite or
//! PostgreSQL as `JOBPLANE_TEST_BACKEND` says (see [`backend`]).

pub mod backend;
pub mod cluster;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use jobplane_proto::pb;
use jobplane_server::engine::model::{Event, Job, JobFilter, JobId, Timestamp};
use jobplane_server::store::{Coordinator, Recovered, Store, StoreError, Write};
use jobplane_server::EngineConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic_health::pb::health_check_response::ServingStatus;

pub use backend::{Backend, TestDir};

/// Generous guard for anything a test waits on; never a timing target.
pub const GUARD: Duration = Duration::from_secs(30);

/// Engine settings that make timeouts observable within a test.
pub fn fast_config() -> EngineConfig {
    EngineConfig {
        ack_timeout: Duration::from_millis(500),
        worker_lease_ttl: Duration::from_millis(1500),
        heartbeat_interval: Duration::from_millis(300),
        default_cancel_grace: Duration::from_secs(5),
        ..EngineConfig::default()
    }
}

/// Awaits `f`, failing the test if it takes longer than [`GUARD`].
pub async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(GUARD, f).await {
        Ok(t) => t,
        Err(_) => panic!("timed out after {GUARD:?} waiting for {what}"),
    }
}

/// The job service's name, for health checks.
pub const JOB_SERVICE: &str = "jobplane.v1.JobService";

/// Every `jobplane.v1` service, as the health service names them.
pub const SERVICES: [&str; 3] = [
    JOB_SERVICE,
    "jobplane.v1.WorkerService",
    "jobplane.v1.AdminService",
];

/// Waits (on the health Watch streams, no polling) until the server at `addr` serves every
/// `jobplane.v1` service (an instance accepts calls once it leads or follows).
pub async fn wait_serving(addr: &str) {
    for service in SERVICES {
        wait_health(addr, service, ServingStatus::Serving).await;
    }
}

/// Waits (on the health Watch stream, no polling) until the server at `addr` leads: its
/// `jobplane.leader` health entry is SERVING. For a server started again on its database: on
/// PostgreSQL it may follow its previous run's record for a moment (until PostgreSQL has ended
/// that run's session) before it takes the lead and recovers.
pub async fn wait_leading(addr: &str) {
    wait_health(
        addr,
        jobplane_server::api::LEADER_HEALTH,
        ServingStatus::Serving,
    )
    .await
}

/// Waits (on the health Watch stream, with the test's guard) until `service` at `addr` is
/// `want`.
pub async fn wait_health(addr: &str, service: &str, want: ServingStatus) {
    guard(&format!("{service} at {addr} to be {want:?}"), async {
        let mut statuses = health_watch(addr, service)
            .await
            .unwrap_or_else(|e| panic!("health watch of {service} at {addr}: {e}"));
        while let Some(msg) = statuses.message().await.expect("health watch message") {
            if msg.status() == want {
                return;
            }
        }
        panic!("the health watch ended before {service} was {want:?}");
    })
    .await
}

/// Resolves once one of `addrs` leads (its `jobplane.leader` health entry is SERVING), passing
/// over instances that cannot be reached: the event a client retrying through a fail-over
/// waits for. Returns at once if none can be reached.
pub async fn one_leads(addrs: &[String]) {
    let watches = addrs.iter().map(|addr| {
        Box::pin(async move {
            let mut statuses = health_watch(addr, jobplane_server::api::LEADER_HEALTH).await?;
            while let Some(msg) = statuses.message().await? {
                if msg.status() == ServingStatus::Serving {
                    return Ok(());
                }
            }
            Err("the health watch ended".into())
        })
    });
    let _: Result<_, Box<dyn std::error::Error + Send + Sync>> =
        futures::future::select_ok(watches).await;
}

/// A health Watch stream of `service` at `addr`.
async fn health_watch(
    addr: &str,
    service: &str,
) -> Result<
    tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_owned())?
        .connect()
        .await?;
    Ok(tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner())
}

/// `jobplane serve --db DB --listen 127.0.0.1:0 --metrics-listen METRICS`, logging at `info`
/// without colours to piped output, killed when dropped, with `env` set (`Some`) or removed
/// (`None`).
pub fn serve_command(
    db: &str,
    metrics: &str,
    env: &[(&str, Option<&str>)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(jobplane_bin());
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            metrics,
            "--db",
            db,
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in env {
        match value {
            Some(v) => command.env(name, v),
            None => command.env_remove(name),
        };
    }
    command
}

/// A server running in this process.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// Database URL.
    pub db_url: String,
    dir: Arc<TestDir>,
    config: EngineConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), jobplane_server::ServeError>>>,
}

impl TestServer {
    /// Starts a server on a fresh database with [`fast_config`]; returns once it serves.
    pub async fn start() -> TestServer {
        Self::start_with(fast_config()).await
    }

    /// Starts a server on a fresh database.
    pub async fn start_with(config: EngineConfig) -> TestServer {
        let dir = Arc::new(TestDir::new().await);
        Self::start_on(dir, config).await
    }

    async fn start_on(dir: Arc<TestDir>, config: EngineConfig) -> TestServer {
        Self::start_wrapped(dir, config, |s| s).await
    }

    /// Starts a server whose store counts its reads (see [`CountingStore`]).
    pub async fn start_counting() -> (TestServer, Arc<CountingStore>) {
        let dir = Arc::new(TestDir::new().await);
        let counting = Arc::new(std::sync::Mutex::new(None));
        let c = counting.clone();
        let server = Self::start_wrapped(dir, fast_config(), move |inner| {
            let store = Arc::new(CountingStore::new(inner));
            *c.lock().expect("lock") = Some(store.clone());
            store
        })
        .await;
        let store = counting.lock().expect("lock").take().expect("store");
        (server, store)
    }

    async fn start_wrapped(
        dir: Arc<TestDir>,
        config: EngineConfig,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestServer {
        let db_url = dir.db_url().to_owned();
        let store = wrap(
            jobplane_server::store::open(&db_url)
                .await
                .expect("open store"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(jobplane_server::run(
            listener,
            store,
            config.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        wait_serving(&addr).await;
        TestServer {
            addr,
            db_url,
            dir,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A client of this server.
    pub async fn client(&self) -> jobplane::Client {
        jobplane::Client::connect(self.addr.clone())
            .await
            .expect("connect client")
    }

    /// The test's directory (holding the database with SQLite).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            guard("server shutdown", task)
                .await
                .expect("server task")
                .expect("server result");
        }
    }

    /// Stops and starts again on the same database (on a new port); returns once the new
    /// server answers calls itself (see [`wait_leading`]).
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        let server = Self::start_on(self.dir.clone(), self.config.clone()).await;
        wait_leading(&server.addr).await;
        server
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A store that counts the reads the engine makes, to show what costs a query and what does not.
pub struct CountingStore {
    inner: Arc<dyn Store>,
    reads: tokio::sync::watch::Sender<u64>,
}

impl CountingStore {
    fn new(inner: Arc<dyn Store>) -> Self {
        CountingStore {
            inner,
            reads: tokio::sync::watch::channel(0).0,
        }
    }

    fn read(&self) {
        self.reads.send_modify(|n| *n += 1);
    }

    /// Reads so far.
    pub fn reads(&self) -> u64 {
        *self.reads.borrow()
    }

    /// Waits until at least `n` reads happened.
    pub async fn wait_reads(&self, n: u64) {
        let mut rx = self.reads.subscribe();
        rx.wait_for(|r| *r >= n).await.expect("counter alive");
    }
}

#[async_trait::async_trait]
impl Store for CountingStore {
    async fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        self.inner.apply(writes).await
    }
    async fn recover(&self) -> Result<Recovered, StoreError> {
        self.inner.recover().await
    }
    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.read();
        self.inner.get_job(id).await
    }
    async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        self.read();
        self.inner.get_jobs(ids).await
    }
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        self.read();
        self.inner.list_jobs(filter).await
    }
    async fn events(&self, id: JobId, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.read();
        self.inner.events(id, after, limit).await
    }
    async fn prune_finished(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.inner.prune_finished(before, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    fn coordinator(&self) -> Option<Arc<dyn Coordinator>> {
        self.inner.coordinator()
    }
}

/// Path of the `jobplane` binary built alongside the tests.
pub fn jobplane_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_jobplane") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/e2e-HASH → target/<profile>/jobplane
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join(format!("jobplane{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p jobplane-server` (nextest --workspace does)",
        bin.display()
    );
    bin
}

/// A `jobplane serve` child process.
pub struct ServerProcess {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// `http://127.0.0.1:PORT` of the Prometheus endpoint (`/metrics`).
    pub metrics: String,
    child: tokio::process::Child,
    /// The database of a server started on a bare directory with PostgreSQL: dropped with it
    /// (after the child, declared before it, is killed).
    _db: Option<backend::PgDatabase>,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl ServerProcess {
    /// Starts `jobplane serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --db URL` and
    /// waits for its "serving" log line to learn the ports. The database is
    /// `sqlite://DIR/jobplane.db`, or with `JOBPLANE_TEST_BACKEND=postgres` a database of this
    /// server's own, dropped with it: a test that restarts a server on the same database starts
    /// it with [`ServerProcess::start_in`].
    pub async fn start(dir: &Path) -> ServerProcess {
        Self::start_with_env(dir, &[]).await
    }

    /// [`ServerProcess::start`] with these environment variables set (`Some`) or removed
    /// (`None`).
    pub async fn start_with_env(dir: &Path, env: &[(&str, Option<&str>)]) -> ServerProcess {
        match Backend::from_env() {
            Backend::Sqlite => Self::spawn(&backend::sqlite_url(dir), env, None).await,
            Backend::Postgres => {
                // A second server on this directory would find an empty database, not the
                // first one's: say so rather than let a restart test pass or fail for nothing.
                let marker = dir.join("jobplane.postgres");
                assert!(
                    !marker.exists(),
                    "a server already ran on {} with a database of its own, dropped with it: \
                     restart on the same database with a TestDir and ServerProcess::start_in",
                    dir.display()
                );
                std::fs::write(&marker, b"").expect("write the marker");
                let db = backend::PgDatabase::create().await;
                Self::spawn(&db.url.clone(), env, Some(db)).await
            }
        }
    }

    /// Starts `jobplane serve` on the database of `dir` (see [`ServerProcess::start`]); the
    /// database stays with `dir`, so a server started again on it finds the same one. Returns
    /// once the server answers calls itself (see [`wait_leading`]).
    pub async fn start_in(dir: &TestDir) -> ServerProcess {
        Self::start_in_with_env(dir, &[]).await
    }

    /// [`ServerProcess::start_in`] with these environment variables set (`Some`) or removed
    /// (`None`).
    pub async fn start_in_with_env(dir: &TestDir, env: &[(&str, Option<&str>)]) -> ServerProcess {
        let server = Self::spawn(dir.db_url(), env, None).await;
        wait_leading(&server.addr).await;
        server
    }

    async fn spawn(
        db: &str,
        env: &[(&str, Option<&str>)],
        own_db: Option<backend::PgDatabase>,
    ) -> ServerProcess {
        let mut child = serve_command(db, "127.0.0.1:0", env)
            .spawn()
            .expect("spawn jobplane serve");
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        for r in [
            Box::new(stderr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stdout),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let _ = tx.send(l);
                }
            });
        }
        let field = |line: &str, key: &str| {
            let rest = line.split(key).nth(1)?;
            Some(format!(
                "http://{}",
                rest.split_whitespace().next().unwrap_or_default()
            ))
        };
        let (addr, metrics) = guard("the server's serving line", async {
            while let Some(line) = rx.recv().await {
                let line = strip_ansi(&line);
                if line.contains("jobplane serving") {
                    if let (Some(a), Some(m)) = (field(&line, "listen="), field(&line, "metrics="))
                    {
                        return (a, m);
                    }
                }
            }
            panic!("jobplane serve exited before serving");
        })
        .await;
        wait_serving(&addr).await;
        ServerProcess {
            addr,
            metrics,
            child,
            _db: own_db,
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited with 0.
    pub async fn terminate(mut self) -> bool {
        let pid = self.child.id().expect("running").to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill -TERM");
        assert!(status.success());
        guard("graceful exit", self.child.wait())
            .await
            .expect("wait")
            .success()
    }

    /// Kills the process with SIGKILL.
    pub async fn kill9(mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }
}

/// A worker speaking the raw protocol, to misbehave on purpose (no acks, no heartbeats,
/// zombie reports).
pub struct RawWorker {
    /// Sends messages on the stream.
    pub tx: mpsc::UnboundedSender<pb::ConnectRequest>,
    /// Messages from the service.
    pub rx: tonic::Streaming<pb::ConnectResponse>,
    /// The welcome.
    pub welcome: pb::Welcome,
}

impl RawWorker {
    /// Connects and says hello.
    pub async fn connect(addr: &str, id: &str, queues: &[&str], concurrency: u32) -> RawWorker {
        Self::connect_with(addr, id, queues, concurrency, vec![]).await
    }

    /// Connects and says hello, claiming attempts from an earlier session.
    pub async fn connect_with(
        addr: &str,
        id: &str,
        queues: &[&str],
        concurrency: u32,
        running: Vec<pb::AttemptRef>,
    ) -> RawWorker {
        Self::connect_hello(
            addr,
            pb::WorkerHello {
                worker_id: id.to_string(),
                namespace: String::new(),
                queues: queues.iter().map(|q| q.to_string()).collect(),
                concurrency,
                labels: Default::default(),
                name: "raw".into(),
                running,
                resources: None,
            },
        )
        .await
    }

    /// Connects and sends this hello (resources, labels…).
    pub async fn connect_hello(addr: &str, hello: pb::WorkerHello) -> RawWorker {
        let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = pb::worker_service_client::WorkerServiceClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(pb::ConnectRequest {
            msg: Some(pb::connect_request::Msg::Hello(hello)),
        })
        .expect("send hello");
        let mut rx_stream = client
            .connect(UnboundedReceiverStream::new(rx))
            .await
            .expect("open stream")
            .into_inner();
        let first = guard("welcome", rx_stream.message())
            .await
            .expect("stream")
            .expect("welcome");
        let welcome = match first.msg {
            Some(pb::connect_response::Msg::Welcome(w)) => w,
            other => panic!("expected welcome, got {other:?}"),
        };
        RawWorker {
            tx,
            rx: rx_stream,
            welcome,
        }
    }

    /// Waits for the next message.
    pub async fn next(&mut self) -> pb::connect_response::Msg {
        guard("a message from the service", self.rx.message())
            .await
            .expect("stream ok")
            .expect("stream open")
            .msg
            .expect("msg")
    }

    /// Waits for the next assignments, skipping other messages.
    pub async fn assignments(&mut self) -> Vec<pb::Assignment> {
        loop {
            if let pb::connect_response::Msg::Assignments(a) = self.next().await {
                return a.assignments;
            }
        }
    }

    /// Sends one report.
    pub fn report(&self, job_id: &str, attempt: u32, kind: pb::worker_report::Kind) {
        self.tx
            .send(pb::ConnectRequest {
                msg: Some(pb::connect_request::Msg::Reports(pb::WorkerReports {
                    reports: vec![pb::WorkerReport {
                        job_id: job_id.to_string(),
                        attempt,
                        kind: Some(kind),
                    }],
                })),
            })
            .expect("send report");
    }

    /// Acknowledges an assignment.
    pub fn ack(&self, job_id: &str, attempt: u32) {
        self.report(job_id, attempt, pb::worker_report::Kind::Ack(pb::Ack {}));
    }

    /// Reports success.
    pub fn succeed(&self, job_id: &str, attempt: u32, result: &[u8]) {
        self.report(
            job_id,
            attempt,
            pb::worker_report::Kind::Outcome(pb::AttemptOutcome {
                kind: Some(pb::attempt_outcome::Kind::Success(pb::Success {
                    result: result.to_vec().into(),
                })),
            }),
        );
    }

    /// Sends a heartbeat.
    pub fn heartbeat(&self) {
        let _ = self.tx.send(pb::ConnectRequest {
            msg: Some(pb::connect_request::Msg::Heartbeat(pb::Heartbeat {})),
        });
    }
}
