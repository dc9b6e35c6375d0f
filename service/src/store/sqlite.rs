//! SQLite backend: WAL mode, one writer connection, a small pool of readers.
//!
//! A batch is applied in one transaction with as few statements as possible: all writes of one
//! job in the batch collapse into one row write (a job submitted and dispatched in the same batch
//! is inserted once, already leased), new rows and events go in multi-row `INSERT`s, and updates
//! in multi-row `UPDATE … FROM (VALUES …)` statements guarded by each row's expected version.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::ConnectOptions;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{job_column_count, PoolCooldown, Recovered, Store, StoreError, Write, JOB_COLUMNS};
use crate::engine::model::{
    Event, EventKind, IdempotencyRecord, Job, JobError, JobFilter, JobId, JobState, Name,
    PoolConfig, PoolKey, QueueConfig, QueueKey, Timestamp, TraceContext, WorkerId,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/sqlite");

/// Most parameters SQLite binds in one statement.
const MAX_BINDS: usize = 32_766;

/// Most rows per multi-row statement: as many jobs as SQLite can bind in one insert (the widest
/// statement: one parameter per column of [`JOB_COLUMNS`]). Few, large statements per
/// transaction: each statement is a round trip to sqlx's SQLite thread, which costs more than
/// parsing a statement text the cache has not seen.
const ROWS_PER_STATEMENT: usize = MAX_BINDS / job_column_count();

/// The SQLite store.
pub struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Configuration(e) => StoreError::Config(e.to_string()),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(e.to_string())
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database and runs the embedded migrations.
    ///
    /// Besides sqlx's own URL parameters, `synchronous=full|normal` chooses the durability of a
    /// commit: `full` (the default) survives power loss, `normal` survives a crash of the
    /// process (`kill -9`) but may lose the last commits on power loss.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let (url, synchronous) = split_synchronous(url)?;
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(|e| StoreError::Config(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-65536")
            // No per-statement log checks: they can drop the service's own events
            // (tokio-rs/tracing#2519; see postgres.rs).
            .disable_statement_logging();
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await?;
        // `run_direct` on a connection: `run`'s `Acquire` bound defeats the compiler's proof
        // that the service's futures are `Send`.
        let mut conn = writer.acquire().await?;
        MIGRATOR
            .run_direct(&mut *conn)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations: {e}")))?;
        drop(conn);
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.read_only(true))
            .await?;
        Ok(SqliteStore { writer, readers })
    }
}

/// All writes of one job in a batch, collapsed.
struct JobWrite {
    insert: bool,
    expected_version: u64,
    latest: Arc<Job>,
}

fn us(d: Option<Duration>) -> Option<i64> {
    d.map(|d| d.as_micros().min(i64::MAX as u128) as i64)
}

fn labels_json(job: &Job) -> String {
    serde_json::to_string(&*job.labels).unwrap_or_else(|_| "{}".into())
}

fn demand_json(job: &Job) -> String {
    if job.demand.is_empty() {
        "{}".into()
    } else {
        serde_json::to_string(&*job.demand).unwrap_or_else(|_| "{}".into())
    }
}

fn policy_json(job: &Job) -> String {
    serde_json::to_string(&job.retry_policy).unwrap_or_else(|_| "{}".into())
}

#[async_trait]
impl Store for SqliteStore {
    async fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut order: Vec<JobId> = Vec::new();
        let mut jobs: HashMap<JobId, JobWrite> = HashMap::new();
        let mut events: Vec<&Event> = Vec::new();
        let mut others: Vec<&Write> = Vec::new();
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
                other => others.push(other),
            }
        }

        let mut tx = self.writer.begin().await?;
        let inserts: Vec<&Job> = order
            .iter()
            .filter_map(|id| jobs.get(id))
            .filter(|jw| jw.insert)
            .map(|jw| &*jw.latest)
            .collect();
        for chunk in inserts.chunks(ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new(format!("INSERT INTO jobs ({JOB_COLUMNS}) "));
            qb.push_values(chunk, |mut b, job| {
                b.push_bind(job.id.0.to_string())
                    .push_bind(job.namespace.as_str().to_owned())
                    .push_bind(job.queue.as_str().to_owned())
                    .push_bind(job.payload.to_vec())
                    .push_bind(labels_json(job))
                    .push_bind(job.priority)
                    .push_bind(job.idempotency_key.clone())
                    .push_bind(job.state.as_str())
                    .push_bind(job.attempt as i64)
                    .push_bind(job.retries_used as i64)
                    .push_bind(policy_json(job))
                    .push_bind(us(job.run_timeout))
                    .push_bind(us(job.max_wait))
                    .push_bind(job.result.as_ref().map(|r| r.to_vec()))
                    .push_bind(job.error.as_ref().map(|e| e.reason.clone()))
                    .push_bind(job.error.as_ref().map(|e| e.message.clone()))
                    .push_bind(job.waiting_for.clone())
                    .push_bind(job.progress)
                    .push_bind(job.worker_id.as_ref().map(|w| w.0.to_string()))
                    .push_bind(job.cancel_requested)
                    .push_bind(job.created_at.0)
                    .push_bind(job.scheduled_at.0)
                    .push_bind(job.started_at.map(|t| t.0))
                    .push_bind(job.finished_at.map(|t| t.0))
                    .push_bind(job.updated_at.0)
                    .push_bind(job.last_seq as i64)
                    .push_bind(job.version as i64)
                    .push_bind(job.output_bytes as i64)
                    .push_bind(demand_json(job))
                    .push_bind(job.pool.as_ref().map(|p| p.as_str().to_owned()))
                    .push_bind(job.trace.as_ref().map(|t| t.traceparent.clone()))
                    .push_bind(job.trace.as_ref().map(|t| t.tracestate.clone()));
            });
            qb.build().execute(&mut *tx).await?;
        }
        let updates: Vec<&JobWrite> = order
            .iter()
            .filter_map(|id| jobs.get(id))
            .filter(|jw| !jw.insert)
            .collect();
        for chunk in updates.chunks(ROWS_PER_STATEMENT) {
            // One statement per chunk: a VALUES table of new rows joined on id and expected
            // version. Every row must match, or the batch is a conflict and rolls back.
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "WITH v(id, expected, state, attempt, retries_used, result, error_reason, \
                 error_message, waiting_for, progress, worker_id, cancel_requested, scheduled_at, \
                 started_at, finished_at, updated_at, last_seq, version, output_bytes, pool) AS (",
            );
            qb.push_values(chunk, |mut b, jw| {
                let job = &*jw.latest;
                b.push_bind(job.id.0.to_string())
                    .push_bind(jw.expected_version as i64)
                    .push_bind(job.state.as_str())
                    .push_bind(job.attempt as i64)
                    .push_bind(job.retries_used as i64)
                    .push_bind(job.result.as_ref().map(|r| r.to_vec()))
                    .push_bind(job.error.as_ref().map(|e| e.reason.clone()))
                    .push_bind(job.error.as_ref().map(|e| e.message.clone()))
                    .push_bind(job.waiting_for.clone())
                    .push_bind(job.progress)
                    .push_bind(job.worker_id.as_ref().map(|w| w.0.to_string()))
                    .push_bind(job.cancel_requested)
                    .push_bind(job.scheduled_at.0)
                    .push_bind(job.started_at.map(|t| t.0))
                    .push_bind(job.finished_at.map(|t| t.0))
                    .push_bind(job.updated_at.0)
                    .push_bind(job.last_seq as i64)
                    .push_bind(job.version as i64)
                    .push_bind(job.output_bytes as i64)
                    .push_bind(job.pool.as_ref().map(|p| p.as_str().to_owned()));
            });
            qb.push(
                ") UPDATE jobs SET state = v.state, attempt = v.attempt, \
                 retries_used = v.retries_used, result = v.result, error_reason = v.error_reason, \
                 error_message = v.error_message, waiting_for = v.waiting_for, \
                 progress = v.progress, worker_id = v.worker_id, \
                 cancel_requested = v.cancel_requested, scheduled_at = v.scheduled_at, \
                 started_at = v.started_at, finished_at = v.finished_at, \
                 updated_at = v.updated_at, last_seq = v.last_seq, version = v.version, \
                 output_bytes = v.output_bytes, pool = v.pool \
                 FROM v WHERE jobs.id = v.id AND jobs.version = v.expected",
            );
            let done = qb.build().execute(&mut *tx).await?;
            if done.rows_affected() != chunk.len() as u64 {
                return Err(StoreError::Conflict {
                    what: format!(
                        "{} of {} job updates found their expected version",
                        done.rows_affected(),
                        chunk.len()
                    ),
                });
            }
        }
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO job_events (job_id, seq, time, detail, data) ");
            qb.push_values(chunk, |mut b, e| {
                b.push_bind(e.job_id.0.to_string())
                    .push_bind(e.seq as i64)
                    .push_bind(e.time.0)
                    .push_bind(serde_json::to_string(&e.kind).unwrap_or_default())
                    .push_bind(e.data.to_vec());
            });
            qb.build().execute(&mut *tx).await?;
        }
        for w in others {
            match w {
                Write::PutIdempotency(r) => {
                    sqlx::query(
                        "INSERT INTO idempotency_keys (namespace, key, job_id, digest, expires_at) \
                         VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, key) DO UPDATE SET \
                         job_id = excluded.job_id, digest = excluded.digest, \
                         expires_at = excluded.expires_at",
                    )
                    .bind(r.namespace.as_str())
                    .bind(&r.key)
                    .bind(r.job_id.0.to_string())
                    .bind(&r.digest)
                    .bind(r.expires_at.0)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::DeleteIdempotency { namespace, key } => {
                    sqlx::query("DELETE FROM idempotency_keys WHERE namespace = ? AND key = ?")
                        .bind(namespace.as_str())
                        .bind(key)
                        .execute(&mut *tx)
                        .await?;
                }
                Write::PutQueue { key, config } => {
                    sqlx::query(
                        "INSERT INTO queues (namespace, name, config) VALUES (?, ?, ?) \
                         ON CONFLICT (namespace, name) DO UPDATE SET config = excluded.config",
                    )
                    .bind(key.namespace.as_str())
                    .bind(key.name.as_str())
                    .bind(serde_json::to_string(config).map_err(corrupt)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::PutPool { key, config } => {
                    sqlx::query(
                        "INSERT INTO pools (namespace, name, config) VALUES (?, ?, ?) \
                         ON CONFLICT (namespace, name) DO UPDATE SET config = excluded.config",
                    )
                    .bind(key.namespace.as_str())
                    .bind(key.name.as_str())
                    .bind(serde_json::to_string(config).map_err(corrupt)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::DeletePool { key } => {
                    sqlx::query("DELETE FROM pools WHERE namespace = ? AND name = ?")
                        .bind(key.namespace.as_str())
                        .bind(key.name.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                Write::PoolCooldown { key, cooldown } => {
                    sqlx::query(
                        "UPDATE pools SET cooldown_until = ?, cooldown_epoch = ? \
                         WHERE namespace = ? AND name = ?",
                    )
                    .bind(cooldown.until.0)
                    .bind(cooldown.epoch as i64)
                    .bind(key.namespace.as_str())
                    .bind(key.name.as_str())
                    .execute(&mut *tx)
                    .await?;
                }
                Write::InsertJob(_) | Write::UpdateJob { .. } | Write::Event(_) => {}
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('QUEUED', 'LEASED', 'RUNNING') \
             ORDER BY id"
        ))
        .fetch_all(&self.readers)
        .await?;
        let active_jobs = rows.iter().map(job_from_row).collect::<Result<_, _>>()?;
        let queues = sqlx::query("SELECT namespace, name, config FROM queues")
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| {
                let key = QueueKey {
                    namespace: name(r.try_get("namespace")?)?,
                    name: name(r.try_get("name")?)?,
                };
                let config: QueueConfig =
                    serde_json::from_str(r.try_get("config")?).map_err(corrupt)?;
                Ok((key, config))
            })
            .collect::<Result<_, StoreError>>()?;
        let rows = sqlx::query(
            "SELECT namespace, name, config, cooldown_until, cooldown_epoch FROM pools",
        )
        .fetch_all(&self.readers)
        .await?;
        let mut pools = Vec::with_capacity(rows.len());
        let mut cooldowns = Vec::new();
        for r in &rows {
            let key = PoolKey {
                namespace: name(r.try_get("namespace")?)?,
                name: name(r.try_get("name")?)?,
            };
            let config: PoolConfig = serde_json::from_str(r.try_get("config")?).map_err(corrupt)?;
            if let Some(until) = r.try_get::<Option<i64>, _>("cooldown_until")? {
                let epoch: i64 = r.try_get("cooldown_epoch")?;
                cooldowns.push((
                    key.clone(),
                    PoolCooldown {
                        until: Timestamp(until),
                        epoch: epoch as u64,
                    },
                ));
            }
            pools.push((key, config));
        }
        let idempotency = sqlx::query(
            "SELECT namespace, key, job_id, digest, expires_at FROM idempotency_keys \
             WHERE expires_at > ?",
        )
        .bind(Timestamp::now().0)
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|r| {
            Ok(IdempotencyRecord {
                namespace: name(r.try_get("namespace")?)?,
                key: r.try_get("key")?,
                job_id: job_id(r.try_get("job_id")?)?,
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
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))
            .bind(id.0.to_string())
            .fetch_optional(&self.readers)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ("));
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id.0.to_string());
            }
            qb.push(")");
            for row in qb.build().fetch_all(&self.readers).await? {
                out.push(job_from_row(&row)?);
            }
        }
        Ok(out)
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1"));
        if let Some(ns) = &filter.namespace {
            qb.push(" AND namespace = ")
                .push_bind(ns.as_str().to_owned());
        }
        if let Some(q) = &filter.queue {
            qb.push(" AND queue = ").push_bind(q.as_str().to_owned());
        }
        if !filter.states.is_empty() {
            qb.push(" AND state IN (");
            let mut sep = qb.separated(", ");
            for s in &filter.states {
                sep.push_bind(s.as_str());
            }
            qb.push(")");
        }
        for (k, v) in &filter.labels {
            qb.push(" AND EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE key = ")
                .push_bind(k.clone())
                .push(" AND value = ")
                .push_bind(v.clone())
                .push(")");
        }
        if let Some(t) = filter.created_after {
            qb.push(" AND created_at >= ").push_bind(t.0);
        }
        if let Some(t) = filter.created_before {
            qb.push(" AND created_at < ").push_bind(t.0);
        }
        if let Some(id) = filter.before_id {
            qb.push(" AND id < ").push_bind(id.0.to_string());
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(filter.limit.max(1) as i64);
        let rows = qb.build().fetch_all(&self.readers).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn events(
        &self,
        id: JobId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, time, detail, data FROM job_events WHERE job_id = ? AND seq > ? \
             ORDER BY seq LIMIT ?",
        )
        .bind(id.0.to_string())
        .bind(after_seq.min(i64::MAX as u64) as i64)
        .bind(limit as i64)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: EventKind =
                    serde_json::from_str(r.try_get("detail")?).map_err(corrupt)?;
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
        let cut = Uuid::from_bytes(bytes).to_string();
        let mut tx = self.writer.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE id < ? AND finished_at < ? ORDER BY id LIMIT ?",
        )
        .bind(&cut)
        .bind(before.0)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            for table in ["job_events WHERE job_id", "jobs WHERE id"] {
                let mut qb: QueryBuilder<Sqlite> =
                    QueryBuilder::new(format!("DELETE FROM {table} IN ("));
                let mut sep = qb.separated(", ");
                for id in chunk {
                    sep.push_bind(id.as_str());
                }
                qb.push(")");
                qb.build().execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.readers.close().await;
    }
}

/// Takes jobplane's `synchronous` parameter out of a SQLite URL.
fn split_synchronous(url: &str) -> Result<(String, SqliteSynchronous), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), SqliteSynchronous::Full));
    };
    let mut sync = SqliteSynchronous::Full;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("synchronous", v)) => {
                sync = match v.to_ascii_lowercase().as_str() {
                    "full" => SqliteSynchronous::Full,
                    "normal" => SqliteSynchronous::Normal,
                    other => {
                        return Err(StoreError::Config(format!(
                            "synchronous={other}: expected full or normal"
                        )))
                    }
                }
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, sync))
}

fn name(s: String) -> Result<Name, StoreError> {
    Name::parse(&s).map_err(|e| corrupt(format!("name {s:?}: {e}")))
}

fn job_id(s: String) -> Result<JobId, StoreError> {
    Uuid::parse_str(&s)
        .map(JobId)
        .map_err(|e| corrupt(format!("job id {s:?}: {e}")))
}

fn duration_us(v: Option<i64>) -> Option<Duration> {
    v.map(|us| Duration::from_micros(us.max(0) as u64))
}

fn job_from_row(r: &SqliteRow) -> Result<Job, StoreError> {
    let state: String = r.try_get("state")?;
    let labels: String = r.try_get("labels")?;
    let policy: String = r.try_get("retry_policy")?;
    let error_reason: Option<String> = r.try_get("error_reason")?;
    let error_message: Option<String> = r.try_get("error_message")?;
    let worker_id: Option<String> = r.try_get("worker_id")?;
    let payload: Vec<u8> = r.try_get("payload")?;
    let result: Option<Vec<u8>> = r.try_get("result")?;
    let demand: String = r.try_get("demand")?;
    let pool: Option<String> = r.try_get("pool")?;
    let traceparent: Option<String> = r.try_get("traceparent")?;
    let tracestate: Option<String> = r.try_get("tracestate")?;
    Ok(Job {
        id: job_id(r.try_get("id")?)?,
        namespace: name(r.try_get("namespace")?)?,
        queue: name(r.try_get("queue")?)?,
        payload: Bytes::from(payload),
        labels: Arc::new(serde_json::from_str(&labels).map_err(corrupt)?),
        priority: r.try_get("priority")?,
        idempotency_key: r.try_get("idempotency_key")?,
        state: JobState::from_str(&state).map_err(corrupt)?,
        attempt: r.try_get::<i64, _>("attempt")? as u32,
        retries_used: r.try_get::<i64, _>("retries_used")? as u32,
        retry_policy: serde_json::from_str(&policy).map_err(corrupt)?,
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
        demand: Arc::new(serde_json::from_str(&demand).map_err(corrupt)?),
        pool: pool.map(name).transpose()?,
        trace: traceparent.map(|traceparent| {
            Arc::new(TraceContext {
                traceparent,
                tracestate: tracestate.unwrap_or_default(),
            })
        }),
    })
}
