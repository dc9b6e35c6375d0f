//! Several `jobplane serve` processes on one PostgreSQL database (issue 7), for the cluster
//! tests: a database of its own per test (`jp_cluster_<uuid>`, dropped with `WITH (FORCE)` when
//! the test ends, also when it fails), the instances as real processes (kill -9 kills one), what
//! their logs and the `jobplane_leader` row say about who leads, health checks, and a PostgreSQL
//! server of the test's own (`initdb` in a temp directory) for the tests that stop the database.
//!
//! The PostgreSQL server is `JOBPLANE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it cannot be reached the tests print
//! "skipping: …" and pass, except under `CI=true`, where they fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use jobplane_server::engine::model::EventKind;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tonic_health::pb::health_check_response::ServingStatus;

pub use super::backend::postgres_server;
use super::backend::PgDatabase;
use super::{guard, serve_command, strip_ansi};
pub use super::{wait_health, JOB_SERVICE, SERVICES};

/// Where the PostgreSQL server binaries are (Debian's layout), for [`PgServer`].
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says why a test does not run and lets it pass; under `CI=true` it fails instead.
pub fn skip(why: &str) {
    if under_ci() {
        panic!("cannot run under CI=true: {why}");
    }
    eprintln!("skipping: {why}");
}

/// A database of the test's own, dropped (`WITH (FORCE)`: the instances' connections too) when
/// this value is dropped, also when the test panics.
pub struct TestDatabase {
    /// Its URL, for `jobplane serve --db`.
    pub url: String,
    _db: PgDatabase,
}

impl TestDatabase {
    /// Creates `jp_cluster_<uuid>` on [`postgres_server`]; `None` (after saying "skipping")
    /// when no server answers, outside CI.
    pub async fn create() -> Option<TestDatabase> {
        let server = postgres_server();
        match Self::create_on(&server).await {
            Ok(db) => Some(db),
            Err(why) => {
                skip(&format!(
                    "no PostgreSQL at {server} ({why}); set JOBPLANE_TEST_POSTGRES"
                ));
                None
            }
        }
    }

    /// Creates `jp_cluster_<uuid>` on the server at `server`.
    pub async fn create_on(server: &str) -> Result<TestDatabase, String> {
        let db = PgDatabase::create_on(server, "jp_cluster").await?;
        Ok(TestDatabase {
            url: db.url.clone(),
            _db: db,
        })
    }

    /// A connection to this database.
    pub async fn connect(&self) -> PgConnection {
        guard(
            "a connection to the test database",
            PgConnection::connect(&self.url),
        )
        .await
        .expect("connect to the test database")
    }

    /// The `jobplane_leader` row: (epoch, addr); `None` while nobody has led yet (epoch 0).
    pub async fn leader_row(&self) -> Option<(i64, String)> {
        let mut conn = self.connect().await;
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT epoch, addr FROM jobplane_leader WHERE id = 1")
                .fetch_optional(&mut conn)
                .await
                .expect("read jobplane_leader");
        let _ = conn.close().await;
        row.filter(|(epoch, addr)| *epoch > 0 && !addr.is_empty())
    }

    /// Every job's stored events, in order, by job id.
    pub async fn events(&self) -> HashMap<String, Vec<(i64, EventKind)>> {
        let mut conn = self.connect().await;
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT job_id::text, seq, detail::text FROM job_events ORDER BY job_id, seq",
        )
        .fetch_all(&mut conn)
        .await
        .expect("read job_events");
        let _ = conn.close().await;
        let mut out: HashMap<String, Vec<(i64, EventKind)>> = HashMap::new();
        for (job, seq, detail) in rows {
            let kind: EventKind = serde_json::from_str(&detail)
                .unwrap_or_else(|e| panic!("event {job}#{seq} {detail}: {e}"));
            out.entry(job).or_default().push((seq, kind));
        }
        out
    }

    /// How many job rows carry each idempotency key (only keys of more than `min` rows).
    pub async fn keys_with_more_rows_than(&self, min: i64) -> Vec<(String, i64)> {
        let mut conn = self.connect().await;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT idempotency_key, count(*) FROM jobs WHERE idempotency_key IS NOT NULL \
             GROUP BY idempotency_key HAVING count(*) > $1",
        )
        .bind(min)
        .fetch_all(&mut conn)
        .await
        .expect("count jobs per key");
        let _ = conn.close().await;
        rows
    }
}

/// The log of a process, line by line, with a way to wait for a line.
#[derive(Clone)]
struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
}

impl Log {
    /// Collects the lines of `child`'s stdout and stderr.
    fn collect(child: &mut tokio::process::Child) -> Log {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let readers: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] = [
            Box::new(child.stderr.take().expect("stderr")),
            Box::new(child.stdout.take().expect("stdout")),
        ];
        for r in readers {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let _ = tx.send(strip_ansi(&l));
                }
            });
        }
        drop(tx);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0usize);
        let l = lines.clone();
        // Ends (and with it `count`'s sender) when both pipes are closed: the process exited.
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                let n = {
                    let mut l = l.lock().expect("log");
                    l.push(line);
                    l.len()
                };
                count_tx.send_replace(n);
            }
        });
        Log { lines, count }
    }

    /// Waits for the first line from `from` on for which `f` gives something; returns it and
    /// the index after that line. Panics if the process exits first.
    async fn wait<T>(&self, from: usize, mut f: impl FnMut(&str) -> Option<T>) -> (T, usize) {
        let mut count = self.count.clone();
        let mut next = from;
        loop {
            {
                let lines = self.lines.lock().expect("log");
                while next < lines.len() {
                    let line = &lines[next];
                    next += 1;
                    if let Some(t) = f(line) {
                        return (t, next);
                    }
                }
            }
            if count.changed().await.is_err() {
                // Closed: the last lines may have come with the close.
                let lines = self.lines.lock().expect("log");
                if next >= lines.len() {
                    panic!("the process exited; its log:\n{}", lines.join("\n"));
                }
            }
        }
    }

    fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("log");
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The value of `key=` in a log line (up to the next space).
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split(&format!(" {key}=")).nth(1)?;
    Some(rest.split_whitespace().next().unwrap_or_default())
}

fn is_leading(line: &str) -> Option<i64> {
    if line.contains(" leading") {
        log_field(line, "epoch")?.trim_matches('"').parse().ok()
    } else {
        None
    }
}

/// One `jobplane serve --db postgres://…` process.
pub struct Instance {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// `127.0.0.1:PORT` (`jobplane_leader.addr` names it, maybe with `http://`).
    pub host_port: String,
    label: String,
    log: Log,
    child: tokio::process::Child,
}

impl Instance {
    /// Starts `jobplane serve --db URL --listen 127.0.0.1:0 --metrics-listen off` and waits for
    /// its "jobplane serving" line to learn the port.
    pub async fn start(db_url: &str, label: &str) -> Instance {
        Instance::start_with_env(db_url, label, &[]).await
    }

    /// [`Instance::start`] with environment variables set (`Some`) or removed (`None`).
    pub async fn start_with_env(
        db_url: &str,
        label: &str,
        env: &[(&str, Option<&str>)],
    ) -> Instance {
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "OTEL_EXPORTER_OTLP_ENDPOINT") {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", None));
        }
        let mut child = serve_command(db_url, "off", &env)
            .spawn()
            .expect("spawn jobplane serve");
        let log = Log::collect(&mut child);
        let (host_port, _) = guard(
            &format!("instance {label}'s serving line"),
            log.wait(0, |line| {
                if line.contains("jobplane serving") {
                    log_field(line, "listen").map(str::to_owned)
                } else {
                    None
                }
            }),
        )
        .await;
        Instance {
            addr: format!("http://{host_port}"),
            host_port,
            label: label.to_owned(),
            log,
            child,
        }
    }

    /// Waits until this instance logs that it leads (a `leading` line with `epoch=N`, `N >=
    /// min_epoch`); returns the epoch.
    pub async fn wait_leading(&self, min_epoch: i64) -> i64 {
        self.log
            .wait(0, |l| is_leading(l).filter(|e| *e >= min_epoch))
            .await
            .0
    }

    /// Kills the process with SIGKILL and reaps it.
    pub async fn kill9(mut self) {
        self.child.start_kill().expect("kill -9");
        let _ = self.child.wait().await;
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of instance {} ({}) ---\n{}",
                self.label,
                self.addr,
                self.log.tail(60)
            );
        }
    }
}

/// Several instances on one database of the test's own.
pub struct Cluster {
    instances: Vec<Option<Instance>>,
    /// The database (declared after the instances: they are killed before it is dropped).
    pub db: TestDatabase,
}

impl Cluster {
    /// Starts `n` instances on a fresh database; `None` when no PostgreSQL is reachable (outside
    /// CI).
    pub async fn start(n: usize) -> Option<Cluster> {
        let db = TestDatabase::create().await?;
        Some(Self::start_on(db, n).await)
    }

    /// Starts `n` instances on `db`, one after the other (the first leads), and waits until one
    /// of them leads and every one serves the jobplane.v1 services (a follower does once it
    /// knows the leader).
    pub async fn start_on(db: TestDatabase, n: usize) -> Cluster {
        let mut instances = Vec::with_capacity(n);
        for i in 0..n {
            instances.push(Some(Instance::start(&db.url, &format!("#{i}")).await));
        }
        let cluster = Cluster { instances, db };
        cluster.leader().await;
        for i in cluster.live() {
            wait_health(cluster.addr(i), JOB_SERVICE, ServingStatus::Serving).await;
        }
        cluster
    }

    /// Instance `i` (panics if it was killed).
    pub fn instance(&self, i: usize) -> &Instance {
        self.instances[i].as_ref().expect("a live instance")
    }

    /// `http://…` of instance `i`.
    pub fn addr(&self, i: usize) -> &str {
        &self.instance(i).addr
    }

    /// The indexes of the live instances.
    pub fn live(&self) -> Vec<usize> {
        (0..self.instances.len())
            .filter(|i| self.instances[*i].is_some())
            .collect()
    }

    /// Every live instance's address, comma-separated (what the SDKs take for several).
    pub fn addrs(&self) -> String {
        self.live()
            .into_iter()
            .map(|i| self.addr(i).to_owned())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client of instance `i` only.
    pub async fn client(&self, i: usize) -> jobplane::Client {
        jobplane::Client::connect(self.addr(i).to_owned())
            .await
            .expect("connect client")
    }

    /// Waits for a live instance to log that it leads, checks that `jobplane_leader` names it,
    /// and returns its index and epoch.
    pub async fn leader(&self) -> (usize, i64) {
        self.leader_after(0).await
    }

    /// [`Cluster::leader`] with an epoch above `epoch` (after the leader was killed).
    pub async fn leader_after(&self, epoch: i64) -> (usize, i64) {
        let live = self.live();
        let waits = live
            .iter()
            .map(|&i| Box::pin(async move { (i, self.instance(i).wait_leading(epoch + 1).await) }));
        let ((i, e), _, _) = guard("an instance to lead", futures::future::select_all(waits)).await;
        let row = self
            .db
            .leader_row()
            .await
            .map(|(epoch, addr)| (epoch, addr.trim_start_matches("http://").to_owned()));
        assert_eq!(
            row,
            Some((e, self.instance(i).host_port.clone())),
            "jobplane_leader names the instance that logged `leading epoch={e}`"
        );
        (i, e)
    }

    /// Kills instance `i` with SIGKILL.
    pub async fn kill9(&mut self, i: usize) {
        let instance = self.instances[i].take().expect("a live instance");
        instance.kill9().await;
    }

    /// Starts one more instance on the same database and waits until it serves; returns its
    /// index.
    pub async fn add(&mut self) -> usize {
        let i = self.instances.len();
        self.instances
            .push(Some(Instance::start(&self.db.url, &format!("#{i}")).await));
        wait_health(self.addr(i), JOB_SERVICE, ServingStatus::Serving).await;
        i
    }
}

/// A PostgreSQL server of the test's own: `initdb` in a temp directory (run as the `postgres`
/// user when the tests run as root), started and stopped with `pg_ctl`; stopped (immediately)
/// and removed when dropped, also when the test fails.
pub struct PgServer {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command running PostgreSQL's `bin`: as the `postgres` user when this process is root
/// (PostgreSQL refuses to run as root).
fn pg_command(bin: &str) -> std::process::Command {
    let path = Path::new(PG_BIN).join(bin);
    if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        std::process::Command::new(path)
    }
}

async fn run_pg(mut command: std::process::Command, what: &str) -> Result<(), String> {
    command.stdin(Stdio::null());
    let out = tokio::process::Command::from(command)
        .output()
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl PgServer {
    /// Creates and starts a server; `None` (after saying "skipping") without the binaries,
    /// outside CI.
    pub async fn start() -> Option<PgServer> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            skip(&format!("no PostgreSQL server binaries in {PG_BIN}"));
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("jp-pg-")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut initdb = pg_command("initdb");
        initdb.arg("-D").arg(dir.path().join("data")).args([
            "--auth=trust",
            "--username=postgres",
            "--no-sync",
        ]);
        run_pg(initdb, "initdb").await.expect("initdb");
        let mut server = PgServer {
            port,
            dir,
            running: false,
        };
        server.start_again().await;
        Some(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Command {
        let mut c = pg_command("pg_ctl");
        c.arg("-D").arg(self.data()).args(args);
        c
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub async fn start_again(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let log = log.to_str().expect("utf-8 path");
        let start = self.pg_ctl(&["-o", &options, "-l", log, "-w", "start"]);
        guard("pg_ctl start", run_pg(start, "pg_ctl start"))
            .await
            .expect("pg_ctl start");
        self.running = true;
    }

    /// Stops the server (`-m fast`: connections are ended at once) and waits until it is down.
    pub async fn stop(&mut self) {
        let stop = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
        guard("pg_ctl stop", run_pg(stop, "pg_ctl stop"))
            .await
            .expect("pg_ctl stop");
        self.running = false;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .pg_ctl(&["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
