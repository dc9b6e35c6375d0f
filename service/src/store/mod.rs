//! Durable storage: the [`Store`] trait and its backends.
//!
//! The engine keeps the live state of active jobs in memory and writes every change through
//! [`Store::apply`], which commits a batch of writes in one transaction (the engine's committer
//! groups concurrent requests into one batch). Reads that must only see committed data (get,
//! list, event log replay) come from the store. Only this module knows sqlx.

use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::model::{
    Event, IdempotencyRecord, Job, JobFilter, JobId, Name, PoolConfig, PoolKey, QueueConfig,
    QueueKey, Timestamp,
};

mod leader;
pub mod postgres;
pub mod sqlite;

pub use leader::{Coordinator, LeaderInfo, LeaderWatch, Leadership};

/// The number of columns in [`JOB_COLUMNS`].
pub(crate) const fn job_column_count() -> usize {
    let bytes = JOB_COLUMNS.as_bytes();
    let mut n = 1;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b',' {
            n += 1;
        }
        i += 1;
    }
    n
}

/// The columns of a job row, in the order every backend binds and reads them.
pub(crate) const JOB_COLUMNS: &str = "id, namespace, queue, payload, labels, priority, idempotency_key, \
    state, attempt, retries_used, retry_policy, run_timeout_us, max_wait_us, result, \
    error_reason, error_message, waiting_for, progress, worker_id, cancel_requested, created_at, \
    scheduled_at, started_at, finished_at, updated_at, last_seq, version, output_bytes, demand, pool, traceparent, tracestate";

/// A store failure, classified so the engine never inspects a driver error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A guarded write found the row changed by someone else.
    #[error("conflict on {what}")]
    Conflict {
        /// What conflicted.
        what: String,
    },
    /// The database cannot be reached or is failing; retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// This instance no longer leads: another one took over, so this one may not commit.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Data in the database could not be decoded.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The URL or options are wrong.
    #[error("bad database configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// One write of a batch. A batch is applied in order, atomically.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new job.
    InsertJob(Arc<Job>),
    /// A changed job; applies only if the stored version is `expected_version`
    /// (the new row carries `job.version`).
    UpdateJob {
        /// The new state.
        job: Arc<Job>,
        /// Version the stored row must have.
        expected_version: u64,
    },
    /// An event of a job's log.
    Event(Event),
    /// A new idempotency key.
    PutIdempotency(IdempotencyRecord),
    /// Forget an idempotency key (expired).
    DeleteIdempotency {
        /// Namespace.
        namespace: Name,
        /// Key.
        key: String,
    },
    /// Create or replace a queue's settings.
    PutQueue {
        /// The queue.
        key: QueueKey,
        /// Its settings.
        config: QueueConfig,
    },
    /// Create or replace a capacity pool's settings.
    PutPool {
        /// The pool.
        key: PoolKey,
        /// Its settings.
        config: PoolConfig,
    },
    /// Remove a capacity pool.
    DeletePool {
        /// The pool.
        key: PoolKey,
    },
    /// A pool's cooldown began or was extended (after an upstream rate limit).
    PoolCooldown {
        /// The pool.
        key: PoolKey,
        /// Its cooldown state.
        cooldown: PoolCooldown,
    },
}

/// A pool's cooldown, kept so that it outlives a restart or a change of leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCooldown {
    /// When the current cooldown ends.
    pub until: Timestamp,
    /// How many cooldowns the pool has had.
    pub epoch: u64,
}

/// What the engine loads on start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every job not in a terminal state.
    pub active_jobs: Vec<Job>,
    /// Every configured queue.
    pub queues: Vec<(QueueKey, QueueConfig)>,
    /// Every capacity pool.
    pub pools: Vec<(PoolKey, PoolConfig)>,
    /// The last cooldown of each pool that had one.
    pub cooldowns: Vec<(PoolKey, PoolCooldown)>,
    /// Every idempotency key not yet expired.
    pub idempotency: Vec<IdempotencyRecord>,
}

/// The storage seam: one implementation per database backend, all passing the same test suite.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits the writes in one transaction, in order; all or nothing.
    async fn apply(&self, writes: &[Write]) -> Result<(), StoreError>;

    /// Loads what the engine needs to resume: active jobs, queues, live idempotency keys.
    async fn recover(&self) -> Result<Recovered, StoreError>;

    /// A job's committed state.
    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError>;

    /// The committed state of each of these jobs that exists (in no particular order).
    async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError>;

    /// Jobs matching the filter, newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError>;

    /// A job's events with `seq > after_seq`, in order, at most `limit`.
    async fn events(&self, id: JobId, after_seq: u64, limit: u32)
        -> Result<Vec<Event>, StoreError>;

    /// Deletes up to `limit` terminal jobs that finished before `before`, with their events;
    /// returns how many it deleted. Only jobs created before `before` are considered, so the
    /// search stays within the oldest rows.
    async fn prune_finished(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError>;

    /// Checks that the database answers (for health checks).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes connections, after the last write.
    async fn close(&self);

    /// How instances sharing this database agree on one leader; `None` for a database only one
    /// instance can use (SQLite), which then always leads.
    fn coordinator(&self) -> Option<Arc<dyn Coordinator>> {
        None
    }
}

/// Opens the store named by a URL: `sqlite://PATH` (created if missing), `sqlite::memory:`, or
/// `postgres://…` / `postgresql://…` (see [`postgres::PostgresStore::open`] for its parameters).
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::open(url).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported database URL {url:?}: expected sqlite://PATH or postgres://HOST/DATABASE"
        )))
    }
}

#[cfg(test)]
pub(crate) mod suite;
