//! Several in-process `jobplane_server::serve` instances on one database (issue 7): starting
//! them on a fresh PostgreSQL database, finding the leader, the cross-instance release → wake
//! latency, and the queries an idle cluster costs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use jobplane::worker::{JobContext, Worker};
use jobplane::{Client, JobSpec, PoolConfig, PoolRequest};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::{mpsc, oneshot};

/// A database the bench created for this run (`jp_bench_<uuid>` on the server of `--db`),
/// dropped when this value is (also when the bench fails) unless kept.
pub struct BenchDb {
    /// The URL the instances use.
    pub url: String,
    name: String,
    server: String,
    keep: bool,
}

/// `server` with its database replaced by `database`.
fn database_url(server: &str, database: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut url = format!("{}/{database}", &base[..path]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

impl BenchDb {
    /// Creates a fresh database on the server `server` points at.
    pub async fn create(server: &str, keep: bool) -> anyhow::Result<BenchDb> {
        let mut admin = PgConnection::connect(server)
            .await
            .with_context(|| format!("connect to {server}"))?;
        let name = format!("jp_bench_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        admin.close().await?;
        Ok(BenchDb {
            url: database_url(server, &name),
            name,
            server: server.to_owned(),
            keep,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop may run inside the bench's runtime: a thread with a runtime of its own does the
        // I/O. `WITH (FORCE)` ends whatever still connects (instances of a failed run).
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let mut admin = PgConnection::connect(&server).await?;
                    admin
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await?;
                    admin.close().await?;
                    anyhow::Ok(())
                })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop database {}: {e:#}", self.name),
            Err(_) => eprintln!("could not drop database {}: the thread panicked", self.name),
        }
    }
}

/// In-process instances, each a whole `jobplane_server::serve` on its own port.
pub struct Instances {
    /// `http://127.0.0.1:PORT` of each.
    pub addrs: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), jobplane_server::ServeError>>>,
}

impl Instances {
    /// Starts `n` instances on `db_url` and waits until each answers a call of the job service
    /// (a follower only does once it knows the leader).
    pub async fn start(
        db_url: &str,
        n: usize,
        engine: jobplane_server::EngineConfig,
    ) -> anyhow::Result<Instances> {
        let mut instances = Instances {
            addrs: Vec::new(),
            stops: Vec::new(),
            tasks: Vec::new(),
        };
        for _ in 0..n {
            // What `jobplane_server::serve` does (open, bind, run), in steps: its future cannot
            // be handed to `tokio::spawn` (rustc cannot prove it `Send`: "implementation of
            // `sqlx::Acquire` is not general enough", from the store's open), and this way the
            // bound port is known.
            let store = jobplane_server::store::open(db_url).await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let listen = listener.local_addr()?;
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            instances.tasks.push(tokio::spawn(jobplane_server::run(
                listener,
                store,
                engine.clone(),
                async {
                    let _ = stop_rx.await;
                },
            )));
            instances.stops.push(stop_tx);
            instances.addrs.push(format!("http://{listen}"));
            // One after the other, so that the first one leads.
            ready(instances.addrs.last().expect("addr")).await?;
        }
        Ok(instances)
    }

    /// Stops every instance and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        for s in self.stops {
            let _ = s.send(());
        }
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

/// Waits until the instance at `addr` answers `ListQueues` (bounded: 60 s).
pub async fn ready(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answered = match Client::connect(addr.to_owned()).await {
            Ok(c) => c
                .list_queues()
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match answered {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{addr} did not become ready")))
            }
            // A bench may poll while it starts; nothing is being measured yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The index in `addrs` of the instance `jobplane_leader` names.
pub async fn leader(db_url: &str, addrs: &[String]) -> anyhow::Result<Option<usize>> {
    let mut conn = PgConnection::connect(db_url).await?;
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT epoch, addr FROM jobplane_leader WHERE id = 1")
            .fetch_optional(&mut conn)
            .await?;
    conn.close().await?;
    Ok(row.and_then(|(_, addr)| {
        addrs
            .iter()
            .position(|a| a.trim_start_matches("http://") == addr.trim_start_matches("http://"))
    }))
}

/// Release → wake across instances: a pool of one unit; the holder runs on a worker connected
/// only to instance `b`, the waiter (submitted through `a`) on a worker connected only to `a`.
/// Records the time from the holder's handler returning (its completion report goes out next)
/// to the waiter's handler starting, in microseconds.
pub async fn cross_wake(a: &str, b: &str, rounds: usize) -> anyhow::Result<Histogram<u64>> {
    let client_a = Client::connect(a.to_owned()).await?;
    let client_b = Client::connect(b.to_owned()).await?;
    client_a
        .configure_pool("bench-xwake", PoolConfig::new().max_units("requests", 1))
        .await?;
    let (release_tx, release_rx) = mpsc::unbounded_channel::<oneshot::Sender<Instant>>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    let holder_worker = Worker::builder(b)
        .concurrency(1)
        .handler("bench-xwake-hold", move |_ctx: JobContext| {
            let release_rx = release_rx.clone();
            async move {
                if let Some(done) = release_rx.lock().await.recv().await {
                    let _ = done.send(Instant::now());
                }
                Ok(Vec::new())
            }
        })
        .build()?
        .spawn();
    let started: Arc<Mutex<Option<oneshot::Sender<Instant>>>> = Arc::new(Mutex::new(None));
    let waiter_worker = {
        let started = started.clone();
        Worker::builder(a)
            .concurrency(1)
            .handler("bench-xwake-wait", move |_ctx: JobContext| {
                let now = Instant::now();
                if let Some(tx) = started.lock().expect("started").take() {
                    let _ = tx.send(now);
                }
                async { Ok(Vec::new()) }
            })
            .build()?
            .spawn()
    };
    let spec = |queue: &str| JobSpec::new(queue).pool(PoolRequest::new("bench-xwake"));
    let h = crate::pools::wake_rounds(
        &client_b,
        &client_a,
        || spec("bench-xwake-hold"),
        || spec("bench-xwake-wait"),
        &started,
        &release_tx,
        rounds,
    )
    .await?;
    holder_worker.stop().await?;
    waiter_worker.stop().await?;
    Ok(h)
}

/// Transactions committed in the database per second while nothing is submitted: read from
/// `pg_stat_database.xact_commit` over `windows` consecutive windows of `secs` seconds, after a
/// settling time so that the statistics of earlier work have been flushed (a PostgreSQL 15
/// backend flushes its counters at most once a second, and within 10 s of going idle). The
/// probe's own reads (one transaction each) are subtracted.
pub async fn idle_queries_per_sec(
    db_url: &str,
    secs: u64,
    windows: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut conn = PgConnection::connect(db_url).await?;
    async fn commits(conn: &mut PgConnection) -> anyhow::Result<i64> {
        // A fresh snapshot each time (the statistics are cached within a transaction).
        let n: i64 = sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(n)
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut rates = Vec::with_capacity(windows);
    let mut before = commits(&mut conn).await?;
    for _ in 0..windows.max(1) {
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let after = commits(&mut conn).await?;
        let elapsed = t0.elapsed().as_secs_f64();
        // The previous read's own transaction is counted in between.
        rates.push((after - before - 1).max(0) as f64 / elapsed);
        before = after;
    }
    conn.close().await?;
    Ok(rates)
}
