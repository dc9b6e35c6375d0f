-- jobplane schema, SQLite backend.

CREATE TABLE jobs (
    id               TEXT    PRIMARY KEY,              -- UUIDv7: sorts by creation time
    namespace        TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    payload          BLOB    NOT NULL,
    labels           TEXT    NOT NULL,                 -- JSON object
    priority         INTEGER NOT NULL,
    idempotency_key  TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('QUEUED', 'LEASED', 'RUNNING', 'SUCCEEDED',
                                                       'FAILED', 'CANCELLED', 'TIMED_OUT', 'EXPIRED')),
    attempt          INTEGER NOT NULL CHECK (attempt >= 0),
    retries_used     INTEGER NOT NULL CHECK (retries_used >= 0),
    retry_policy     TEXT    NOT NULL,                 -- JSON
    run_timeout_us   INTEGER,
    max_wait_us      INTEGER,
    result           BLOB,
    error_reason     TEXT,
    error_message    TEXT,
    waiting_for      TEXT    NOT NULL,
    progress         REAL    NOT NULL,
    worker_id        TEXT,
    cancel_requested INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,                 -- microseconds since the epoch
    scheduled_at     INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    updated_at       INTEGER NOT NULL,
    last_seq         INTEGER NOT NULL,
    version          INTEGER NOT NULL,
    output_bytes     INTEGER NOT NULL,
    -- finished_at is set exactly when the state is terminal
    CHECK ((finished_at IS NOT NULL) =
           (state IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT', 'EXPIRED'))),
    -- a running or leased job names its worker
    CHECK (state NOT IN ('LEASED', 'RUNNING') OR worker_id IS NOT NULL)
);

CREATE INDEX jobs_active ON jobs (state) WHERE state IN ('QUEUED', 'LEASED', 'RUNNING');
CREATE INDEX jobs_namespace_id ON jobs (namespace, id);
CREATE INDEX jobs_namespace_queue_id ON jobs (namespace, queue, id);

CREATE TABLE job_events (
    job_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL CHECK (seq >= 1),
    time   INTEGER NOT NULL,
    detail TEXT    NOT NULL,                           -- JSON of the event kind
    data   BLOB    NOT NULL,                           -- output bytes or result
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

CREATE TABLE idempotency_keys (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;

CREATE TABLE queues (
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    config    TEXT NOT NULL,                            -- JSON
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
