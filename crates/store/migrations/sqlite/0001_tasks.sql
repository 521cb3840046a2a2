-- taskexec store, SQLite schema v1.
--
-- One row per task in `tasks`; the queue is the rows with queued = 1.
-- Times are unix milliseconds (INTEGER). JSON columns hold the camelCase
-- model types of taskexec-model. Invariants kept by the store:
--   * queued = 1  => the task is not final and node IS NULL;
--   * node set    => claimed by that node (lease until lease_until);
--   * result_json set => the task is final and never changes again.

CREATE TABLE tasks (
    -- Insertion order: FIFO tie-break of the claim order and listing cursor.
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT    NOT NULL UNIQUE,
    -- Deduplication key of repeated submissions (NULLs never collide).
    idempotency_key      TEXT    UNIQUE,
    workflow_instance_id TEXT,
    runtime              TEXT    NOT NULL,
    -- Higher is claimed first.
    priority             INTEGER NOT NULL,
    -- Resource requests, for admission at claim time.
    cpu_millis           INTEGER NOT NULL,
    memory_bytes         INTEGER NOT NULL,
    -- TaskStatus wire name (RECEIVED, PREPARING, ...).
    status               TEXT    NOT NULL,
    -- 1 while waiting to be claimed.
    queued               INTEGER NOT NULL CHECK (queued IN (0, 1)),
    -- Not claimable before (retry backoff).
    run_after            INTEGER NOT NULL,
    -- Attempts started so far; fences writes of stale attempts.
    attempt              INTEGER NOT NULL,
    -- Node holding the claim, and until when.
    node                 TEXT,
    lease_until          INTEGER,
    cancel_requested     INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    submitted_at         INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    -- When the task last became claimable (submission or retry time).
    queued_since         INTEGER NOT NULL,
    -- The TaskInstance as submitted.
    task_json            TEXT    NOT NULL,
    -- JSON array of AttemptRecord, one per finished attempt.
    attempts_json        TEXT    NOT NULL DEFAULT '[]',
    -- The final TaskResult, once final.
    result_json          TEXT
);

-- The claim query: queued rows by priority, then FIFO.
CREATE INDEX tasks_claim ON tasks (priority DESC, seq) WHERE queued = 1;
-- claimed_by, renew and the running count.
CREATE INDEX tasks_node ON tasks (node) WHERE node IS NOT NULL;
-- Listing filters (newest first within each).
CREATE INDEX tasks_status ON tasks (status, seq);
CREATE INDEX tasks_runtime ON tasks (runtime, seq);
CREATE INDEX tasks_workflow ON tasks (workflow_instance_id, seq)
    WHERE workflow_instance_id IS NOT NULL;

-- The lifecycle history of each task: TransitionRecord number n (0 is the
-- RECEIVED record written at submission).
CREATE TABLE events (
    task_id     TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    n           INTEGER NOT NULL,
    record_json TEXT    NOT NULL,
    PRIMARY KEY (task_id, n)
);
