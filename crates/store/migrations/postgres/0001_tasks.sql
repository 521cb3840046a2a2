-- taskexec store, PostgreSQL schema v1: the SQLite schema (migrations/sqlite)
-- in PostgreSQL types, shared by every node of a cluster.
--
-- One row per task in `tasks`; the queue is the rows with queued = true.
-- Times are unix milliseconds (BIGINT), as in SQLite, so both backends
-- return the same (millisecond) times. JSON columns are TEXT holding the
-- camelCase model types of taskexec-model: stored byte for byte (JSONB
-- would reorder the keys of user input and output); cast to jsonb to query
-- them (`task_json::jsonb ->> 'priority'`). Invariants kept by the store:
--   * queued       => the task is not final and node IS NULL;
--   * node set     => claimed by that node (lease until lease_until);
--   * result_json set => the task is final and never changes again.

CREATE TABLE tasks (
    -- Insertion order: FIFO tie-break of the claim order and listing cursor.
    seq                  BIGSERIAL PRIMARY KEY,
    id                   TEXT    NOT NULL UNIQUE,
    -- Deduplication key of repeated submissions (NULLs never collide); the
    -- arbiter of INSERT ... ON CONFLICT (idempotency_key) DO NOTHING.
    idempotency_key      TEXT    UNIQUE,
    workflow_instance_id TEXT,
    runtime              TEXT    NOT NULL,
    -- Higher is claimed first.
    priority             INTEGER NOT NULL,
    -- Resource requests, for admission at claim time.
    cpu_millis           BIGINT  NOT NULL,
    memory_bytes         BIGINT  NOT NULL,
    -- TaskStatus wire name (RECEIVED, PREPARING, ...).
    status               TEXT    NOT NULL,
    -- True while waiting to be claimed.
    queued               BOOLEAN NOT NULL,
    -- Not claimable before (retry backoff).
    run_after            BIGINT  NOT NULL,
    -- Attempts started so far; fences writes of stale attempts.
    attempt              BIGINT  NOT NULL,
    -- Node holding the claim, and until when.
    node                 TEXT,
    lease_until          BIGINT,
    cancel_requested     BOOLEAN NOT NULL DEFAULT false,
    submitted_at         BIGINT  NOT NULL,
    updated_at           BIGINT  NOT NULL,
    -- When the task last became claimable (submission or retry time).
    queued_since         BIGINT  NOT NULL,
    -- The TaskInstance as submitted.
    task_json            TEXT    NOT NULL,
    -- JSON array of AttemptRecord, one per finished attempt.
    attempts_json        TEXT    NOT NULL DEFAULT '[]',
    -- The final TaskResult, once final.
    result_json          TEXT
);

-- The claim query (SELECT ... FOR UPDATE SKIP LOCKED): queued rows by
-- priority, then FIFO.
CREATE INDEX tasks_claim ON tasks (priority DESC, seq) WHERE queued;
-- claimed_by, renew, take_over_expired and the running count.
CREATE INDEX tasks_node ON tasks (node) WHERE node IS NOT NULL;
-- Listing filters (newest first within each).
CREATE INDEX tasks_status ON tasks (status, seq);
CREATE INDEX tasks_runtime ON tasks (runtime, seq);
CREATE INDEX tasks_workflow ON tasks (workflow_instance_id, seq)
    WHERE workflow_instance_id IS NOT NULL;

-- The lifecycle history of each task: TransitionRecord number n (0 is the
-- RECEIVED record written at submission). Appends hold the task's row lock.
CREATE TABLE events (
    task_id     TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    n           INTEGER NOT NULL,
    record_json TEXT    NOT NULL,
    PRIMARY KEY (task_id, n)
);
