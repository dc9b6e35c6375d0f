//! PostgreSQL backend: a pool of connections, one transaction per batch.
//!
//! A batch is applied as on SQLite: all writes of one job collapse into one row write, and each
//! table gets one statement per batch. Rows travel as one array per column, unpacked with
//! `UNNEST`, so a statement's text (and its prepared plan) is the same whatever the batch size.
//! Updates are guarded by each row's expected version; one miss fails and rolls back the batch.
//!
//! PostgreSQL refuses NUL characters in text and JSONB (SQLite does not): a NUL in a string the
//! engine stores (an error message from a worker, a label) is written as U+FFFD, so such a
//! string cannot fail a commit and stop the service.
//!
//! URL parameters of jobplane's own (the others go to sqlx, e.g. `options[search_path]=s`):
//! `max_connections` (default 10), `statement_timeout` (default `30s`, `0` for none) and
//! `connect_timeout` (default `5s`; also the wait for a free connection of the pool).

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{
    job_column_count, Coordinator, LeaderInfo, LeaderWatch, Leadership, PoolCooldown, Recovered,
    Store, StoreError, Write, JOB_COLUMNS,
};
use crate::engine::model::{
    Event, IdempotencyRecord, Job, JobError, JobFilter, JobId, JobState, Name, PoolConfig, PoolKey,
    QueueConfig, QueueKey, Timestamp, TraceContext, WorkerId,
};

pub(crate) static MIGRATOR: sqlx::migrate::Migrator =
    sqlx::migrate!("src/store/migrations/postgres");

/// Most parameters PostgreSQL binds in one statement.
const MAX_BINDS: usize = 65_535;

/// Most rows per statement: as many jobs as a multi-row `VALUES` could bind (one parameter per
/// column of [`JOB_COLUMNS`]). `UNNEST` binds one array per column, so the bind limit does not
/// bound it; the cut keeps each statement, and each array, a reasonable size.
const ROWS_PER_STATEMENT: usize = MAX_BINDS / job_column_count();

/// About the most bytes of payloads, results and output per statement: far below PostgreSQL's
/// 1 GB bound on one value (an array parameter is one value).
const BYTES_PER_STATEMENT: usize = 64 << 20;

const DEFAULT_MAX_CONNECTIONS: u32 = 10;
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: PgPool,
    /// The leader's epoch every batch checks (`0`: none yet, nothing to check); shared with
    /// the coordinator, which sets it when this instance takes the lead.
    fence: Arc<AtomicU64>,
    coordinator: Arc<PgCoordinator>,
}

/// jobplane's own URL parameters, taken out of the URL.
#[derive(Debug, PartialEq)]
struct Settings {
    url: String,
    max_connections: u32,
    statement_timeout: Option<Duration>,
    connect_timeout: Duration,
}

impl Settings {
    fn parse(url: &str) -> Result<Self, StoreError> {
        let mut settings = Settings {
            url: url.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            statement_timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        let Some((base, query)) = url.split_once('?') else {
            return Ok(settings);
        };
        let duration = |key: &str, v: &str| {
            humantime::parse_duration(v)
                .map_err(|e| StoreError::Config(format!("{key}={v}: {e} (e.g. 30s, 500ms)")))
        };
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("max_connections", v)) => {
                    settings.max_connections =
                        v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            StoreError::Config(format!(
                                "max_connections={v}: expected a number > 0"
                            ))
                        })?;
                }
                Some(("statement_timeout", v)) => {
                    let d = duration("statement_timeout", v)?;
                    settings.statement_timeout = (!d.is_zero()).then_some(d);
                }
                Some(("connect_timeout", v)) => {
                    settings.connect_timeout = duration("connect_timeout", v)?;
                }
                _ => rest.push(pair),
            }
        }
        settings.url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        Ok(settings)
    }
}

/// Classifies a driver error: unique violations, serialization failures and deadlocks are
/// conflicts (another writer won); everything else is the database failing.
fn pg(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        match db.code().as_deref() {
            Some("23505") => {
                return StoreError::Conflict {
                    what: db
                        .constraint()
                        .map_or_else(|| db.message().to_owned(), |c| format!("constraint {c}")),
                }
            }
            Some("40001" | "40P01") => {
                return StoreError::Conflict {
                    what: db.message().to_owned(),
                }
            }
            _ => {}
        }
    }
    StoreError::from(e)
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Text as PostgreSQL accepts it: NUL becomes U+FFFD.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// JSON text as JSONB accepts it: a NUL in any string or key becomes U+FFFD.
fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    let s = serde_json::to_string(value).map_err(corrupt)?;
    if !s.contains("\\u0000") {
        return Ok(s);
    }
    fn clean(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::String(s) => Value::String(text(&s).into_owned()),
            Value::Array(a) => Value::Array(a.into_iter().map(clean).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, v)| (text(&k).into_owned(), clean(v)))
                    .collect(),
            ),
            other => other,
        }
    }
    let v = serde_json::from_str(&s).map_err(corrupt)?;
    serde_json::to_string(&clean(v)).map_err(corrupt)
}

fn us(d: Option<Duration>) -> Option<i64> {
    d.map(|d| d.as_micros().min(i64::MAX as u128) as i64)
}

fn int(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

/// Splits rows into statements of at most [`ROWS_PER_STATEMENT`] rows and, beyond one row,
/// about [`BYTES_PER_STATEMENT`] bytes.
fn statements<T>(rows: &[T], bytes: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let n = bytes(row);
        if i > start && (i - start == ROWS_PER_STATEMENT || size + n > BYTES_PER_STATEMENT) {
            out.push(&rows[start..i]);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

impl PostgresStore {
    /// Connects, runs the embedded migrations and opens the connection pool.
    ///
    /// The migrations run under sqlx's PostgreSQL advisory lock (`pg_advisory_lock`, keyed by
    /// the database), so instances starting together migrate one after the other and the later
    /// ones find nothing to do. An unreachable server fails within `connect_timeout` with an
    /// error naming it.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let settings = Settings::parse(url)?;
        let mut opts = PgConnectOptions::from_str(&settings.url)
            .map_err(|e| StoreError::Config(format!("PostgreSQL URL: {e}")))?;
        // The coordinator's sessions wait on a lock for as long as another instance leads: no
        // statement timeout for them.
        let coordination_opts = opts.clone().application_name("jobplane-leader");
        if let Some(t) = settings.statement_timeout {
            opts = opts.options([("statement_timeout", format!("{}ms", t.as_millis().max(1)))]);
        }
        if opts.get_application_name().is_none() {
            opts = opts.application_name("jobplane");
        }
        // sqlx logs each statement at DEBUG and slow ones at WARN, asking the subscriber after
        // every statement whether that level is on; with the per-layer filters of trace export,
        // that question leaves a stale answer on the thread and the next event of the service
        // is dropped (tokio-rs/tracing#2519).
        opts = opts.disable_statement_logging();
        let server = match opts.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", opts.get_host(), opts.get_port()),
        };
        let database = opts.get_database().unwrap_or("(default)").to_owned();
        let unreachable = |why: String| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {server} (database {database}): {why}"
            ))
        };
        // One connection first, for a clear error (the pool would retry until its timeout and
        // then say only that it timed out), and to run the migrations on.
        let mut conn = tokio::time::timeout(settings.connect_timeout, opts.connect())
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", settings.connect_timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        migrate(&mut conn)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations: {e}")))?;
        conn.close().await.map_err(pg)?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(1)
            .acquire_timeout(settings.connect_timeout)
            .connect_with(opts)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let fence = Arc::new(AtomicU64::new(0));
        let coordinator = Arc::new(PgCoordinator {
            opts: coordination_opts,
            connect_timeout: settings.connect_timeout,
            pool: pool.clone(),
            fence: fence.clone(),
        });
        Ok(PostgresStore {
            pool,
            fence,
            coordinator,
        })
    }
}

/// Runs the migrations on `conn` (`run_direct`: `run`'s `Acquire` bound defeats the compiler's
/// proof that the service's futures are `Send`, so embedders could not spawn them).
async fn migrate(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run_direct(conn).await
}

/// All writes of one job in a batch, collapsed.
struct JobWrite {
    insert: bool,
    expected_version: u64,
    latest: Arc<Job>,
}

fn job_bytes(job: &Job) -> usize {
    job.payload.len() + job.result.as_ref().map_or(0, |r| r.len()) + 256
}

/// The columns of new job rows, one array each.
#[derive(Default)]
struct NewJobs<'a> {
    id: Vec<Uuid>,
    namespace: Vec<&'a str>,
    queue: Vec<&'a str>,
    payload: Vec<&'a [u8]>,
    labels: Vec<String>,
    priority: Vec<i32>,
    idempotency_key: Vec<Option<Cow<'a, str>>>,
    state: Vec<&'static str>,
    attempt: Vec<i64>,
    retries_used: Vec<i64>,
    retry_policy: Vec<String>,
    run_timeout_us: Vec<Option<i64>>,
    max_wait_us: Vec<Option<i64>>,
    result: Vec<Option<&'a [u8]>>,
    error_reason: Vec<Option<Cow<'a, str>>>,
    error_message: Vec<Option<Cow<'a, str>>>,
    waiting_for: Vec<Cow<'a, str>>,
    progress: Vec<f64>,
    worker_id: Vec<Option<Cow<'a, str>>>,
    cancel_requested: Vec<bool>,
    created_at: Vec<i64>,
    scheduled_at: Vec<i64>,
    started_at: Vec<Option<i64>>,
    finished_at: Vec<Option<i64>>,
    updated_at: Vec<i64>,
    last_seq: Vec<i64>,
    version: Vec<i64>,
    output_bytes: Vec<i64>,
    demand: Vec<String>,
    pool: Vec<Option<&'a str>>,
    traceparent: Vec<Option<Cow<'a, str>>>,
    tracestate: Vec<Option<Cow<'a, str>>>,
}

impl<'a> NewJobs<'a> {
    fn push(&mut self, job: &'a Job) -> Result<(), StoreError> {
        self.id.push(job.id.0);
        self.namespace.push(job.namespace.as_str());
        self.queue.push(job.queue.as_str());
        self.payload.push(&job.payload);
        self.labels.push(json(&*job.labels)?);
        self.priority.push(job.priority);
        self.idempotency_key
            .push(job.idempotency_key.as_deref().map(text));
        self.state.push(job.state.as_str());
        self.attempt.push(job.attempt.into());
        self.retries_used.push(job.retries_used.into());
        self.retry_policy.push(json(&job.retry_policy)?);
        self.run_timeout_us.push(us(job.run_timeout));
        self.max_wait_us.push(us(job.max_wait));
        self.result.push(job.result.as_deref());
        self.error_reason
            .push(job.error.as_ref().map(|e| text(&e.reason)));
        self.error_message
            .push(job.error.as_ref().map(|e| text(&e.message)));
        self.waiting_for.push(text(&job.waiting_for));
        self.progress.push(job.progress);
        self.worker_id
            .push(job.worker_id.as_ref().map(|w| text(&w.0)));
        self.cancel_requested.push(job.cancel_requested);
        self.created_at.push(job.created_at.0);
        self.scheduled_at.push(job.scheduled_at.0);
        self.started_at.push(job.started_at.map(|t| t.0));
        self.finished_at.push(job.finished_at.map(|t| t.0));
        self.updated_at.push(job.updated_at.0);
        self.last_seq.push(int(job.last_seq));
        self.version.push(int(job.version));
        self.output_bytes.push(int(job.output_bytes));
        self.demand.push(if job.demand.is_empty() {
            "{}".to_owned()
        } else {
            json(&*job.demand)?
        });
        self.pool.push(job.pool.as_ref().map(|p| p.as_str()));
        self.traceparent
            .push(job.trace.as_ref().map(|t| text(&t.traceparent)));
        self.tracestate
            .push(job.trace.as_ref().map(|t| text(&t.tracestate)));
        Ok(())
    }

    async fn insert(self, conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO jobs ({JOB_COLUMNS}) SELECT * FROM UNNEST($1::uuid[], $2::text[], \
             $3::text[], $4::bytea[], $5::text[]::jsonb[], $6::int4[], $7::text[], $8::text[], \
             $9::int8[], $10::int8[], $11::text[]::jsonb[], $12::int8[], $13::int8[], \
             $14::bytea[], $15::text[], $16::text[], $17::text[], $18::float8[], $19::text[], \
             $20::bool[], $21::int8[], $22::int8[], $23::int8[], $24::int8[], $25::int8[], \
             $26::int8[], $27::int8[], $28::int8[], $29::text[]::jsonb[], $30::text[], \
             $31::text[], $32::text[])"
        );
        sqlx::query(&sql)
            .bind(self.id)
            .bind(self.namespace)
            .bind(self.queue)
            .bind(self.payload)
            .bind(self.labels)
            .bind(self.priority)
            .bind(self.idempotency_key)
            .bind(self.state)
            .bind(self.attempt)
            .bind(self.retries_used)
            .bind(self.retry_policy)
            .bind(self.run_timeout_us)
            .bind(self.max_wait_us)
            .bind(self.result)
            .bind(self.error_reason)
            .bind(self.error_message)
            .bind(self.waiting_for)
            .bind(self.progress)
            .bind(self.worker_id)
            .bind(self.cancel_requested)
            .bind(self.created_at)
            .bind(self.scheduled_at)
            .bind(self.started_at)
            .bind(self.finished_at)
            .bind(self.updated_at)
            .bind(self.last_seq)
            .bind(self.version)
            .bind(self.output_bytes)
            .bind(self.demand)
            .bind(self.pool)
            .bind(self.traceparent)
            .bind(self.tracestate)
            .execute(conn)
            .await
            .map_err(pg)?;
        Ok(())
    }
}

/// The columns a job update changes, one array each, with the version each row must have.
#[derive(Default)]
struct ChangedJobs<'a> {
    id: Vec<Uuid>,
    expected: Vec<i64>,
    state: Vec<&'static str>,
    attempt: Vec<i64>,
    retries_used: Vec<i64>,
    result: Vec<Option<&'a [u8]>>,
    error_reason: Vec<Option<Cow<'a, str>>>,
    error_message: Vec<Option<Cow<'a, str>>>,
    waiting_for: Vec<Cow<'a, str>>,
    progress: Vec<f64>,
    worker_id: Vec<Option<Cow<'a, str>>>,
    cancel_requested: Vec<bool>,
    scheduled_at: Vec<i64>,
    started_at: Vec<Option<i64>>,
    finished_at: Vec<Option<i64>>,
    updated_at: Vec<i64>,
    last_seq: Vec<i64>,
    version: Vec<i64>,
    output_bytes: Vec<i64>,
    pool: Vec<Option<&'a str>>,
}

impl<'a> ChangedJobs<'a> {
    fn push(&mut self, jw: &'a JobWrite) {
        let job = &*jw.latest;
        self.id.push(job.id.0);
        self.expected.push(int(jw.expected_version));
        self.state.push(job.state.as_str());
        self.attempt.push(job.attempt.into());
        self.retries_used.push(job.retries_used.into());
        self.result.push(job.result.as_deref());
        self.error_reason
            .push(job.error.as_ref().map(|e| text(&e.reason)));
        self.error_message
            .push(job.error.as_ref().map(|e| text(&e.message)));
        self.waiting_for.push(text(&job.waiting_for));
        self.progress.push(job.progress);
        self.worker_id
            .push(job.worker_id.as_ref().map(|w| text(&w.0)));
        self.cancel_requested.push(job.cancel_requested);
        self.scheduled_at.push(job.scheduled_at.0);
        self.started_at.push(job.started_at.map(|t| t.0));
        self.finished_at.push(job.finished_at.map(|t| t.0));
        self.updated_at.push(job.updated_at.0);
        self.last_seq.push(int(job.last_seq));
        self.version.push(int(job.version));
        self.output_bytes.push(int(job.output_bytes));
        self.pool.push(job.pool.as_ref().map(|p| p.as_str()));
    }

    /// Applies the updates; every row must be found at its expected version.
    async fn update(self, conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        let rows = self.id.len() as u64;
        let done = sqlx::query(
            "UPDATE jobs SET state = v.state, attempt = v.attempt, \
             retries_used = v.retries_used, result = v.result, error_reason = v.error_reason, \
             error_message = v.error_message, waiting_for = v.waiting_for, \
             progress = v.progress, worker_id = v.worker_id, \
             cancel_requested = v.cancel_requested, scheduled_at = v.scheduled_at, \
             started_at = v.started_at, finished_at = v.finished_at, \
             updated_at = v.updated_at, last_seq = v.last_seq, version = v.version, \
             output_bytes = v.output_bytes, pool = v.pool \
             FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::int8[], \
             $6::bytea[], $7::text[], $8::text[], $9::text[], $10::float8[], $11::text[], \
             $12::bool[], $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[], \
             $18::int8[], $19::int8[], $20::text[]) AS v(id, expected, state, attempt, \
             retries_used, result, error_reason, error_message, waiting_for, progress, \
             worker_id, cancel_requested, scheduled_at, started_at, finished_at, updated_at, \
             last_seq, version, output_bytes, pool) \
             WHERE jobs.id = v.id AND jobs.version = v.expected",
        )
        .bind(self.id)
        .bind(self.expected)
        .bind(self.state)
        .bind(self.attempt)
        .bind(self.retries_used)
        .bind(self.result)
        .bind(self.error_reason)
        .bind(self.error_message)
        .bind(self.waiting_for)
        .bind(self.progress)
        .bind(self.worker_id)
        .bind(self.cancel_requested)
        .bind(self.scheduled_at)
        .bind(self.started_at)
        .bind(self.finished_at)
        .bind(self.updated_at)
        .bind(self.last_seq)
        .bind(self.version)
        .bind(self.output_bytes)
        .bind(self.pool)
        .execute(conn)
        .await
        .map_err(pg)?;
        if done.rows_affected() != rows {
            return Err(StoreError::Conflict {
                what: format!(
                    "{} of {rows} job updates found their expected version",
                    done.rows_affected()
                ),
            });
        }
        Ok(())
    }
}

async fn insert_events(conn: &mut sqlx::PgConnection, events: &[&Event]) -> Result<(), StoreError> {
    let mut job_id = Vec::with_capacity(events.len());
    let mut seq = Vec::with_capacity(events.len());
    let mut time = Vec::with_capacity(events.len());
    let mut detail = Vec::with_capacity(events.len());
    let mut data: Vec<&[u8]> = Vec::with_capacity(events.len());
    for e in events {
        job_id.push(e.job_id.0);
        seq.push(int(e.seq));
        time.push(e.time.0);
        detail.push(json(&e.kind)?);
        data.push(&e.data);
    }
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, time, detail, data) SELECT * FROM \
         UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::text[]::jsonb[], $5::bytea[])",
    )
    .bind(job_id)
    .bind(seq)
    .bind(time)
    .bind(detail)
    .bind(data)
    .execute(conn)
    .await
    .map_err(pg)?;
    Ok(())
}

/// The last write of each key of a keyed table in a batch: a put or a delete. Applying only
/// these leaves the table as applying every write in order would.
struct LastWrites<'a, K, V> {
    order: Vec<K>,
    last: HashMap<K, Option<&'a V>>,
}

impl<'a, K: std::hash::Hash + Eq + Clone, V> LastWrites<'a, K, V> {
    fn new() -> Self {
        LastWrites {
            order: Vec::new(),
            last: HashMap::new(),
        }
    }

    fn set(&mut self, key: K, value: Option<&'a V>) {
        if self.last.insert(key.clone(), value).is_none() {
            self.order.push(key);
        }
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Puts and deletes, each in the order of their keys' first write.
    #[allow(clippy::type_complexity)]
    fn split(&self) -> (Vec<(&K, &'a V)>, Vec<&K>) {
        let (mut puts, mut deletes) = (Vec::new(), Vec::new());
        for k in &self.order {
            match self.last[k] {
                Some(v) => puts.push((k, v)),
                None => deletes.push(k),
            }
        }
        (puts, deletes)
    }
}

/// Upserts and deletes of a `(namespace, name) → config` table (queues, pools) in one statement.
async fn put_configs<V: Serialize>(
    conn: &mut sqlx::PgConnection,
    table: &str,
    writes: &LastWrites<'_, (Name, Name), V>,
) -> Result<(), StoreError> {
    let (puts, deletes) = writes.split();
    let (mut ns, mut name, mut config) = (Vec::new(), Vec::new(), Vec::new());
    for ((n, k), v) in puts {
        ns.push(n.as_str());
        name.push(k.as_str());
        config.push(json(v)?);
    }
    let (del_ns, del_name): (Vec<&str>, Vec<&str>) = deletes
        .iter()
        .map(|(n, k)| (n.as_str(), k.as_str()))
        .unzip();
    sqlx::query(&format!(
        "WITH gone AS (DELETE FROM {table} t USING UNNEST($1::text[], $2::text[]) AS d(ns, name) \
         WHERE t.namespace = d.ns AND t.name = d.name) \
         INSERT INTO {table} (namespace, name, config) \
         SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[]::jsonb[]) \
         ON CONFLICT (namespace, name) DO UPDATE SET config = excluded.config"
    ))
    .bind(del_ns)
    .bind(del_name)
    .bind(ns)
    .bind(name)
    .bind(config)
    .execute(conn)
    .await
    .map_err(pg)?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut order: Vec<JobId> = Vec::new();
        let mut jobs: HashMap<JobId, JobWrite> = HashMap::new();
        let mut events: Vec<&Event> = Vec::new();
        let mut idempotency: LastWrites<(Name, String), IdempotencyRecord> = LastWrites::new();
        let mut queues: LastWrites<(Name, Name), QueueConfig> = LastWrites::new();
        let mut pools: LastWrites<(Name, Name), PoolConfig> = LastWrites::new();
        let mut cooldowns: Vec<(&PoolKey, PoolCooldown)> = Vec::new();
        for w in writes {
            match w {
                Write::InsertJob(job) => {
                    order.push(job.id);
                    jobs.insert(
                        job.id,
                        JobWrite {
                            insert: true,
                            expected_version: 0,
                            latest: job.clone(),
                        },
                    );
                }
                Write::UpdateJob {
                    job,
                    expected_version,
                } => match jobs.get_mut(&job.id) {
                    Some(jw) => {
                        if jw.latest.version != *expected_version {
                            return Err(StoreError::Conflict {
                                what: format!("job {} version in batch", job.id),
                            });
                        }
                        jw.latest = job.clone();
                    }
                    None => {
                        order.push(job.id);
                        jobs.insert(
                            job.id,
                            JobWrite {
                                insert: false,
                                expected_version: *expected_version,
                                latest: job.clone(),
                            },
                        );
                    }
                },
                Write::Event(e) => events.push(e),
                Write::PutIdempotency(r) => {
                    idempotency.set((r.namespace.clone(), r.key.clone()), Some(r));
                }
                Write::DeleteIdempotency { namespace, key } => {
                    idempotency.set((namespace.clone(), key.clone()), None);
                }
                Write::PutQueue { key, config } => {
                    queues.set((key.namespace.clone(), key.name.clone()), Some(config));
                }
                Write::PutPool { key, config } => {
                    pools.set((key.namespace.clone(), key.name.clone()), Some(config));
                }
                Write::DeletePool { key } => {
                    pools.set((key.namespace.clone(), key.name.clone()), None);
                }
                Write::PoolCooldown { key, cooldown } => cooldowns.push((key, *cooldown)),
            }
        }
        let inserts: Vec<&Job> = order
            .iter()
            .filter_map(|id| jobs.get(id))
            .filter(|jw| jw.insert)
            .map(|jw| &*jw.latest)
            .collect();
        let updates: Vec<&JobWrite> = order
            .iter()
            .filter_map(|id| jobs.get(id))
            .filter(|jw| !jw.insert)
            .collect();

        let mut tx = self.pool.begin().await.map_err(pg)?;
        let fence = self.fence.load(Ordering::Acquire);
        if fence != 0 {
            // Holds the leader row against a take-over until this batch commits; a take-over
            // that committed first makes this instance's epoch stale.
            let epoch: i64 =
                sqlx::query_scalar("SELECT epoch FROM jobplane_leader WHERE id = 1 FOR SHARE")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(pg)?;
            if epoch as u64 != fence {
                return Err(StoreError::Fenced(format!(
                    "this instance led in epoch {fence}; epoch {epoch} has begun"
                )));
            }
        }
        for chunk in statements(&inserts, |j| job_bytes(j)) {
            let mut rows = NewJobs::default();
            for job in chunk {
                rows.push(job)?;
            }
            rows.insert(&mut tx).await?;
        }
        for chunk in statements(&updates, |jw| job_bytes(&jw.latest)) {
            let mut rows = ChangedJobs::default();
            for jw in chunk {
                rows.push(jw);
            }
            rows.update(&mut tx).await?;
        }
        for chunk in statements(&events, |e| e.data.len() + 128) {
            insert_events(&mut tx, chunk).await?;
        }
        if !idempotency.is_empty() {
            let (puts, deletes) = idempotency.split();
            let (mut ns, mut key, mut job_id, mut digest, mut expires_at) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (_, r) in puts {
                ns.push(r.namespace.as_str());
                key.push(text(&r.key));
                job_id.push(r.job_id.0);
                digest.push(text(&r.digest));
                expires_at.push(r.expires_at.0);
            }
            let (del_ns, del_key): (Vec<&str>, Vec<Cow<'_, str>>) =
                deletes.iter().map(|(n, k)| (n.as_str(), text(k))).unzip();
            sqlx::query(
                "WITH gone AS (DELETE FROM idempotency_keys t \
                 USING UNNEST($1::text[], $2::text[]) AS d(ns, key) \
                 WHERE t.namespace = d.ns AND t.key = d.key) \
                 INSERT INTO idempotency_keys (namespace, key, job_id, digest, expires_at) \
                 SELECT * FROM UNNEST($3::text[], $4::text[], $5::uuid[], $6::text[], $7::int8[]) \
                 ON CONFLICT (namespace, key) DO UPDATE SET job_id = excluded.job_id, \
                 digest = excluded.digest, expires_at = excluded.expires_at",
            )
            .bind(del_ns)
            .bind(del_key)
            .bind(ns)
            .bind(key)
            .bind(job_id)
            .bind(digest)
            .bind(expires_at)
            .execute(&mut *tx)
            .await
            .map_err(pg)?;
        }
        if !queues.is_empty() {
            put_configs(&mut tx, "queues", &queues).await?;
        }
        if !pools.is_empty() {
            put_configs(&mut tx, "pools", &pools).await?;
        }
        // Rare (an upstream rate limit): one statement each, after the pools they name.
        for (key, cooldown) in cooldowns {
            sqlx::query(
                "UPDATE pools SET cooldown_until = $1, cooldown_epoch = $2 \
                 WHERE namespace = $3 AND name = $4",
            )
            .bind(cooldown.until.0)
            .bind(cooldown.epoch as i64)
            .bind(key.namespace.as_str())
            .bind(key.name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(())
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('QUEUED', 'LEASED', 'RUNNING') \
             ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        let active_jobs = rows.iter().map(job_from_row).collect::<Result<_, _>>()?;
        let queues = configs(&self.pool, "queues")
            .await?
            .into_iter()
            .map(|(namespace, name, config)| (QueueKey { namespace, name }, config))
            .collect();
        let pools = configs(&self.pool, "pools")
            .await?
            .into_iter()
            .map(|(namespace, name, config)| (PoolKey { namespace, name }, config))
            .collect();
        let cooldowns = sqlx::query(
            "SELECT namespace, name, cooldown_until, cooldown_epoch FROM pools \
             WHERE cooldown_until IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            let key = PoolKey {
                namespace: name(r.try_get("namespace")?)?,
                name: name(r.try_get("name")?)?,
            };
            let until: i64 = r.try_get("cooldown_until")?;
            let epoch: i64 = r.try_get("cooldown_epoch")?;
            Ok((
                key,
                PoolCooldown {
                    until: Timestamp(until),
                    epoch: epoch as u64,
                },
            ))
        })
        .collect::<Result<_, StoreError>>()?;
        let idempotency = sqlx::query(
            "SELECT namespace, key, job_id, digest, expires_at FROM idempotency_keys \
             WHERE expires_at > $1",
        )
        .bind(Timestamp::now().0)
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            Ok(IdempotencyRecord {
                namespace: name(r.try_get("namespace")?)?,
                key: r.try_get("key")?,
                job_id: JobId(r.try_get("job_id")?),
                digest: r.try_get("digest")?,
                expires_at: Timestamp(r.try_get("expires_at")?),
            })
        })
        .collect::<Result<_, StoreError>>()?;
        Ok(Recovered {
            active_jobs,
            queues,
            pools,
            cooldowns,
            idempotency,
        })
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1::uuid[])"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        rows.iter().map(job_from_row).collect()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE TRUE"));
        if let Some(ns) = &filter.namespace {
            qb.push(" AND namespace = ")
                .push_bind(ns.as_str().to_owned());
        }
        if let Some(q) = &filter.queue {
            qb.push(" AND queue = ").push_bind(q.as_str().to_owned());
        }
        if !filter.states.is_empty() {
            let states: Vec<&'static str> = filter.states.iter().map(|s| s.as_str()).collect();
            qb.push(" AND state = ANY(")
                .push_bind(states)
                .push("::text[])");
        }
        if !filter.labels.is_empty() {
            qb.push(" AND labels @> ")
                .push_bind(json(&filter.labels)?)
                .push("::jsonb");
        }
        if let Some(t) = filter.created_after {
            qb.push(" AND created_at >= ").push_bind(t.0);
        }
        if let Some(t) = filter.created_before {
            qb.push(" AND created_at < ").push_bind(t.0);
        }
        if let Some(id) = filter.before_id {
            qb.push(" AND id < ").push_bind(id.0);
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(filter.limit.max(1)));
        let rows = qb.build().fetch_all(&self.pool).await.map_err(pg)?;
        rows.iter().map(job_from_row).collect()
    }

    async fn events(
        &self,
        id: JobId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, time, detail, data FROM job_events WHERE job_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(id.0)
        .bind(int(after_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let Json(kind) = r.try_get("detail")?;
                let data: Vec<u8> = r.try_get("data")?;
                Ok(Event {
                    job_id: id,
                    seq: r.try_get::<i64, _>("seq")? as u64,
                    time: Timestamp(r.try_get("time")?),
                    kind,
                    data: Bytes::from(data),
                })
            })
            .collect()
    }

    async fn prune_finished(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        // Ids are UUIDv7: the smallest id of the cut-off's millisecond bounds the key range.
        let ms = (before.0.max(0) / 1000) as u64;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[6] = 0x70;
        let cut = Uuid::from_bytes(bytes);
        // One statement: pick the oldest finished jobs, delete their events, then them.
        let done = sqlx::query(
            "WITH doomed AS (SELECT id FROM jobs WHERE id < $1 AND finished_at < $2 \
             ORDER BY id LIMIT $3 FOR UPDATE), \
             events AS (DELETE FROM job_events WHERE job_id IN (SELECT id FROM doomed)) \
             DELETE FROM jobs WHERE id IN (SELECT id FROM doomed)",
        )
        .bind(cut)
        .bind(before.0)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(pg)?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    fn coordinator(&self) -> Option<Arc<dyn Coordinator>> {
        Some(self.coordinator.clone())
    }
}

/// The advisory lock the leader holds: `(LOCK_SPACE, hashtext(current_schema()))`, so
/// deployments in different schemas of one database elect their leaders apart.
const LOCK_SPACE: i32 = 7741;

/// The channel new leaders are announced on (`NOTIFY`).
const LEADER_CHANNEL: &str = "jobplane_leader";

/// Leadership on PostgreSQL: a session-level advisory lock, held by a dedicated session. A
/// candidate waits in `pg_advisory_lock`, so it takes over the moment the leader's session ends
/// (a killed leader's connection closes with its process). The new leader bumps the epoch in
/// `jobplane_leader` (which waits for the old leader's in-flight commit, holding that row, to
/// end) and announces itself with `NOTIFY`.
struct PgCoordinator {
    opts: PgConnectOptions,
    connect_timeout: Duration,
    /// The store's pool, for reading the leader row.
    pool: PgPool,
    fence: Arc<AtomicU64>,
}

impl PgCoordinator {
    /// A listener on a session of its own (a pool of one that nothing else uses, dropped with
    /// it), so a session-level lock never returns to the store's pool.
    async fn session(&self) -> Result<(PgPool, PgListener), StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(self.connect_timeout)
            .connect_lazy_with(self.opts.clone());
        let listener = PgListener::connect_with(&pool).await.map_err(pg)?;
        Ok((pool, listener))
    }
}

#[async_trait]
impl Coordinator for PgCoordinator {
    async fn lead(&self, addr: &str) -> Result<Box<dyn Leadership>, StoreError> {
        let (pool, mut session) = self.session().await?;
        session.eager_reconnect(false);
        sqlx::query("SELECT pg_advisory_lock($1, hashtext(current_schema()))")
            .bind(LOCK_SPACE)
            .execute(&mut session)
            .await
            .map_err(pg)?;
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE jobplane_leader SET epoch = epoch + 1, addr = $1, since = now()              WHERE id = 1 RETURNING epoch",
        )
        .bind(addr)
        .fetch_one(&mut session)
        .await
        .map_err(pg)?;
        self.fence.store(epoch as u64, Ordering::Release);
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(LEADER_CHANNEL)
            .bind(format!("{epoch} {addr}"))
            .execute(&mut session)
            .await
            .map_err(pg)?;
        Ok(Box::new(PgLeadership {
            epoch: epoch as u64,
            pool,
            session: Some(session),
        }))
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        // A record whose lock nobody holds is stale: its leader is gone and a candidate is
        // about to take over (the two-key advisory lock shows in pg_locks as classid, objid).
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT epoch, addr FROM jobplane_leader WHERE id = 1 AND EXISTS ( \
                SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                AND classid = $1::int4::oid AND objid = hashtext(current_schema())::oid \
                AND objsubid = 2)",
        )
        .bind(LOCK_SPACE)
        .fetch_optional(&self.pool)
        .await
        .map_err(pg)?;
        Ok(row
            .filter(|(epoch, addr)| *epoch > 0 && !addr.is_empty())
            .map(|(epoch, addr)| LeaderInfo {
                epoch: epoch as u64,
                addr,
            }))
    }

    async fn watch(&self) -> Result<Box<dyn LeaderWatch>, StoreError> {
        let (pool, mut session) = self.session().await?;
        session.listen(LEADER_CHANNEL).await.map_err(pg)?;
        Ok(Box::new(PgLeaderWatch {
            _pool: pool,
            session,
        }))
    }
}

struct PgLeadership {
    epoch: u64,
    pool: PgPool,
    session: Option<PgListener>,
}

#[async_trait]
impl Leadership for PgLeadership {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    async fn lost(&mut self) -> String {
        let Some(session) = self.session.as_mut() else {
            return "resigned".into();
        };
        // Nothing is ever sent on this session: the next thing read is its end.
        loop {
            match session.try_recv().await {
                Ok(Some(_)) => continue,
                Ok(None) => return "the session holding the lead closed".into(),
                Err(e) => return format!("the session holding the lead failed: {e}"),
            }
        }
    }

    async fn resign(mut self: Box<Self>) {
        if let Some(mut session) = self.session.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
                .execute(&mut session)
                .await;
            drop(session);
        }
        self.pool.close().await;
    }
}

struct PgLeaderWatch {
    _pool: PgPool,
    session: PgListener,
}

#[async_trait]
impl LeaderWatch for PgLeaderWatch {
    async fn changed(&mut self) -> Result<(), StoreError> {
        // `Ok(None)`: the connection was lost and re-established; something may have been missed.
        self.session.try_recv().await.map_err(pg)?;
        Ok(())
    }
}

/// Every row of a `(namespace, name, config)` table.
async fn configs<V: serde::de::DeserializeOwned + Send + Unpin + 'static>(
    pool: &PgPool,
    table: &str,
) -> Result<Vec<(Name, Name, V)>, StoreError> {
    sqlx::query(&format!("SELECT namespace, name, config FROM {table}"))
        .fetch_all(pool)
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            let Json(config) = r.try_get("config")?;
            Ok((
                name(r.try_get("namespace")?)?,
                name(r.try_get("name")?)?,
                config,
            ))
        })
        .collect()
}

fn name(s: String) -> Result<Name, StoreError> {
    Name::parse(&s).map_err(|e| corrupt(format!("name {s:?}: {e}")))
}

fn duration_us(v: Option<i64>) -> Option<Duration> {
    v.map(|us| Duration::from_micros(us.max(0) as u64))
}

fn job_from_row(r: &PgRow) -> Result<Job, StoreError> {
    let state: String = r.try_get("state")?;
    let Json(labels) = r.try_get("labels")?;
    let Json(retry_policy) = r.try_get("retry_policy")?;
    let Json(demand) = r.try_get("demand")?;
    let error_reason: Option<String> = r.try_get("error_reason")?;
    let error_message: Option<String> = r.try_get("error_message")?;
    let worker_id: Option<String> = r.try_get("worker_id")?;
    let payload: Vec<u8> = r.try_get("payload")?;
    let result: Option<Vec<u8>> = r.try_get("result")?;
    let pool: Option<String> = r.try_get("pool")?;
    let traceparent: Option<String> = r.try_get("traceparent")?;
    let tracestate: Option<String> = r.try_get("tracestate")?;
    Ok(Job {
        id: JobId(r.try_get("id")?),
        namespace: name(r.try_get("namespace")?)?,
        queue: name(r.try_get("queue")?)?,
        payload: Bytes::from(payload),
        labels: Arc::new(labels),
        priority: r.try_get("priority")?,
        idempotency_key: r.try_get("idempotency_key")?,
        state: JobState::from_str(&state).map_err(corrupt)?,
        attempt: u32::try_from(r.try_get::<i64, _>("attempt")?).map_err(corrupt)?,
        retries_used: u32::try_from(r.try_get::<i64, _>("retries_used")?).map_err(corrupt)?,
        retry_policy,
        run_timeout: duration_us(r.try_get("run_timeout_us")?),
        max_wait: duration_us(r.try_get("max_wait_us")?),
        result: result.map(Bytes::from),
        error: error_reason.map(|reason| JobError {
            reason,
            message: error_message.unwrap_or_default(),
        }),
        waiting_for: r.try_get("waiting_for")?,
        progress: r.try_get("progress")?,
        worker_id: worker_id.map(|w| WorkerId(w.into())),
        cancel_requested: r.try_get("cancel_requested")?,
        created_at: Timestamp(r.try_get("created_at")?),
        scheduled_at: Timestamp(r.try_get("scheduled_at")?),
        started_at: r.try_get::<Option<i64>, _>("started_at")?.map(Timestamp),
        finished_at: r.try_get::<Option<i64>, _>("finished_at")?.map(Timestamp),
        updated_at: Timestamp(r.try_get("updated_at")?),
        last_seq: r.try_get::<i64, _>("last_seq")? as u64,
        version: r.try_get::<i64, _>("version")? as u64,
        output_bytes: r.try_get::<i64, _>("output_bytes")? as u64,
        demand: Arc::new(demand),
        pool: pool.map(name).transpose()?,
        trace: traceparent.map(|traceparent| {
            Arc::new(TraceContext {
                traceparent,
                tracestate: tracestate.unwrap_or_default(),
            })
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_out_of_the_url() {
        let s = Settings::parse(
            "postgres://u@h/db?max_connections=4&sslmode=disable&statement_timeout=2s\
             &connect_timeout=500ms&options[search_path]=s1",
        )
        .unwrap();
        assert_eq!(
            s,
            Settings {
                url: "postgres://u@h/db?sslmode=disable&options[search_path]=s1".into(),
                max_connections: 4,
                statement_timeout: Some(Duration::from_secs(2)),
                connect_timeout: Duration::from_millis(500),
            }
        );
        let d = Settings::parse("postgresql://h/db").unwrap();
        assert_eq!(d.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(d.statement_timeout, Some(DEFAULT_STATEMENT_TIMEOUT));
        assert_eq!(
            Settings::parse("postgres://h/db?statement_timeout=0")
                .unwrap()
                .statement_timeout,
            None
        );
        for bad in [
            "max_connections=0",
            "max_connections=x",
            "statement_timeout=soon",
        ] {
            assert!(matches!(
                Settings::parse(&format!("postgres://h/db?{bad}")),
                Err(StoreError::Config(_))
            ));
        }
    }

    #[test]
    fn statements_are_cut_by_rows_and_bytes() {
        let rows = vec![0usize; ROWS_PER_STATEMENT * 2 + 1];
        let cut: Vec<usize> = statements(&rows, |_| 1).iter().map(|c| c.len()).collect();
        assert_eq!(cut, vec![ROWS_PER_STATEMENT, ROWS_PER_STATEMENT, 1]);
        let big = vec![BYTES_PER_STATEMENT / 2 + 1; 3];
        let cut: Vec<usize> = statements(&big, |n| *n).iter().map(|c| c.len()).collect();
        assert_eq!(cut, vec![1, 1, 1]);
        assert!(statements(&[] as &[u8], |_| 1).is_empty());
    }

    #[test]
    fn nul_becomes_a_replacement_character() {
        assert_eq!(text("a\0b"), "a\u{FFFD}b");
        assert!(matches!(text("ab"), Cow::Borrowed(_)));
        let labels: std::collections::BTreeMap<String, String> =
            [("k\0".to_string(), "v\0".to_string())].into();
        assert_eq!(json(&labels).unwrap(), "{\"k\u{FFFD}\":\"v\u{FFFD}\"}");
        // A backslash followed by "u0000" is not a NUL.
        assert_eq!(json("\\u0000").unwrap(), "\"\\\\u0000\"");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named() {
        let err = PostgresStore::open("postgres://postgres@127.0.0.1:1/test?connect_timeout=2s")
            .await
            .err()
            .expect("nothing listens on port 1");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(msg.contains("127.0.0.1:1") && msg.contains("test"), "{msg}");
    }
}
