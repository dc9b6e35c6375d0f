-- jobplane schema, PostgreSQL backend (the same tables as the SQLite series, in native types).
-- Times and durations are BIGINT microseconds since the epoch, as the engine's `Timestamp`:
-- they round-trip exactly and compare as they do on SQLite.

CREATE TABLE jobs (
    id               UUID             PRIMARY KEY,     -- UUIDv7: sorts by creation time
    namespace        TEXT             NOT NULL,
    queue            TEXT             NOT NULL,
    payload          BYTEA            NOT NULL,
    labels           JSONB            NOT NULL,        -- object of strings
    priority         INTEGER          NOT NULL,
    idempotency_key  TEXT,
    state            TEXT             NOT NULL CHECK (state IN ('QUEUED', 'LEASED', 'RUNNING',
                                          'SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT', 'EXPIRED')),
    attempt          BIGINT           NOT NULL CHECK (attempt >= 0),
    retries_used     BIGINT           NOT NULL CHECK (retries_used >= 0),
    retry_policy     JSONB            NOT NULL,
    run_timeout_us   BIGINT,
    max_wait_us      BIGINT,
    result           BYTEA,
    error_reason     TEXT,
    error_message    TEXT,
    waiting_for      TEXT             NOT NULL,
    progress         DOUBLE PRECISION NOT NULL,
    worker_id        TEXT,
    cancel_requested BOOLEAN          NOT NULL,
    created_at       BIGINT           NOT NULL,
    scheduled_at     BIGINT           NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    updated_at       BIGINT           NOT NULL,
    last_seq         BIGINT           NOT NULL,
    version          BIGINT           NOT NULL,
    output_bytes     BIGINT           NOT NULL,
    -- finished_at is set exactly when the state is terminal
    CONSTRAINT jobs_finished_iff_terminal CHECK ((finished_at IS NOT NULL) =
        (state IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT', 'EXPIRED'))),
    -- a running or leased job names its worker
    CONSTRAINT jobs_active_has_worker CHECK (state NOT IN ('LEASED', 'RUNNING') OR worker_id IS NOT NULL)
);

-- Recovery reads the active jobs; listings go newest first within a namespace (and queue). A
-- label filter is checked on the rows of that order, as on SQLite: a GIN index on labels would
-- be paid by every job update (none of them is a HOT update: `state` is indexed).
CREATE INDEX jobs_active ON jobs (state) WHERE state IN ('QUEUED', 'LEASED', 'RUNNING');
CREATE INDEX jobs_namespace_id ON jobs (namespace, id);
CREATE INDEX jobs_namespace_queue_id ON jobs (namespace, queue, id);

CREATE TABLE job_events (
    job_id UUID   NOT NULL,
    seq    BIGINT NOT NULL CHECK (seq >= 1),
    time   BIGINT NOT NULL,
    detail JSONB  NOT NULL,                            -- the event kind
    data   BYTEA  NOT NULL,                            -- output bytes or result
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE idempotency_keys (
    namespace  TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    job_id     UUID   NOT NULL,
    digest     TEXT   NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, key)
);

CREATE TABLE queues (
    namespace TEXT  NOT NULL,
    name      TEXT  NOT NULL,
    config    JSONB NOT NULL,
    PRIMARY KEY (namespace, name)
);
