//! The SQLite store's statements on its own connections
//! ([`super::threads`]): every transaction that writes, and the read of one
//! task. They mirror what the PostgreSQL backend does in SQL of its own;
//! the rules between them are the shared ones of `common`.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use taskexec_model::{TaskStatus, TransitionRecord};
use time::OffsetDateTime;

use crate::common::{
    TaskRow, TaskState, apply_write, cancelled_result, conflict, duration_ms, from_ms, greedy_fit,
    int_u32, int_u64, json_err, not_final, parse_history, parse_status, state_columns,
    task_columns, to_ms, u64_int, write_target,
};
use crate::{
    CancelOutcome, Capacity, ClaimedTask, NewTask, StoreError, Submitted, TaskProgress, TaskRecord,
    Write,
};

/// A claim with owned parts, to move into a job.
#[derive(Debug, Clone)]
pub(super) struct Claim {
    pub node: String,
    pub free: Capacity,
    pub limit: usize,
    pub now: OffsetDateTime,
    pub lease: Duration,
}

/// Reads a row selected with [`task_columns`].
fn read_row(row: &rusqlite::Row<'_>) -> Result<TaskRow, StoreError> {
    let id: String = row.get("id")?;
    let status: String = row.get("status")?;
    let status = parse_status(&id, &status)?;
    Ok(TaskRow {
        runtime: row.get("runtime")?,
        status,
        queued: row.get::<_, i64>("queued")? != 0,
        attempt: int_u32(row.get("attempt")?),
        node: row.get("node")?,
        submitted_at: row.get("submitted_at")?,
        updated_at: row.get("updated_at")?,
        cancel_requested: row.get::<_, i64>("cancel_requested")? != 0,
        task_json: row.get("task_json")?,
        attempts_json: row.get("attempts_json")?,
        result_json: row.get("result_json")?,
        queued_since: row.get("queued_since")?,
        cpu_millis: int_u32(row.get("cpu_millis")?),
        memory_bytes: int_u64(row.get("memory_bytes")?),
        id,
    })
}

/// Reads a row selected with [`task_columns`] and `history_column`.
fn read_row_with_history(
    row: &rusqlite::Row<'_>,
) -> Result<(TaskRow, Vec<TransitionRecord>), StoreError> {
    let task = read_row(row)?;
    let json: String = row.get("history_json")?;
    let history = serde_json::from_str(&json).map_err(json_err(&task.id))?;
    Ok((task, history))
}

/// Task `id` and its history, from one statement (one snapshot).
pub(super) fn get(conn: &Connection, id: &str) -> Result<Option<TaskRecord>, StoreError> {
    rows_with_history(
        conn,
        concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE id = ?"
        ),
        [id],
    )?
    .pop()
    .map(|(task, history)| task.into_record(history))
    .transpose()
}

/// Task `id`'s progress, from one statement.
pub(super) fn progress(conn: &Connection, id: &str) -> Result<Option<TaskProgress>, StoreError> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT status, attempt, queued, node, submitted_at, updated_at, cancel_requested, ",
        history_column!(),
        " FROM tasks WHERE id = ?"
    ))?;
    let row = stmt
        .query_row([id], |row| {
            Ok((
                row.get::<_, String>("status")?,
                row.get::<_, String>("history_json")?,
                TaskProgress {
                    status: TaskStatus::Received,
                    attempt: int_u32(row.get("attempt")?),
                    queued: row.get::<_, i64>("queued")? != 0,
                    node: row.get("node")?,
                    submitted_at: from_ms(row.get("submitted_at")?),
                    updated_at: from_ms(row.get("updated_at")?),
                    cancel_requested: row.get::<_, i64>("cancel_requested")? != 0,
                    history: Vec::new(),
                },
            ))
        })
        .optional()?;
    row.map(|(status, history, progress)| {
        Ok(TaskProgress {
            status: parse_status(id, &status)?,
            history: serde_json::from_str(&history).map_err(json_err(id))?,
            ..progress
        })
    })
    .transpose()
}

/// Whether some task is claimable at `now_ms` within `free`: the read
/// that answers most claims of an idle or keeping-up node.
pub(super) fn any_claimable(
    conn: &Connection,
    now_ms: i64,
    free: Capacity,
) -> Result<bool, StoreError> {
    let found = conn
        .prepare_cached(concat!(
            "SELECT 1 FROM tasks WHERE queued = 1 AND run_after <= ? AND cpu_millis <= ? \
             AND memory_bytes <= ? AND ",
            not_final!(),
            " LIMIT 1"
        ))?
        .query_row(
            params![now_ms, u64_int(free.cpu_millis), u64_int(free.memory_bytes)],
            |_| Ok(()),
        )
        .optional()?;
    Ok(found.is_some())
}

/// The lifecycle history of task `id`, oldest first.
fn load_history(tx: &Transaction<'_>, id: &str) -> Result<Vec<TransitionRecord>, StoreError> {
    let mut stmt =
        tx.prepare_cached("SELECT record_json FROM events WHERE task_id = ? ORDER BY n")?;
    let rows = stmt
        .query_map([id], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<String>, _>>()?;
    parse_history(id, rows)
}

/// Appends `record` to the history of task `id`.
fn append_event(
    tx: &Transaction<'_>,
    id: &str,
    record: &TransitionRecord,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(record).map_err(json_err(id))?;
    tx.prepare_cached(
        "INSERT INTO events (task_id, n, record_json) \
         SELECT ?1, COALESCE(MAX(n) + 1, 0), ?2 FROM events WHERE task_id = ?1",
    )?
    .execute(params![id, json])?;
    Ok(())
}

/// Inserts one new task and its RECEIVED event.
fn insert_task(tx: &Transaction<'_>, new: &NewTask) -> Result<(), StoreError> {
    let id = new.task.id.as_str();
    let task_json = serde_json::to_string(&new.task).map_err(json_err(id))?;
    let at = to_ms(new.received.at);
    tx.prepare_cached(
        "INSERT INTO tasks (id, idempotency_key, workflow_instance_id, runtime, priority, \
         cpu_millis, memory_bytes, status, queued, run_after, attempt, cancel_requested, \
         submitted_at, updated_at, queued_since, task_json, attempts_json, request_hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9, 0, 0, ?9, ?9, ?9, ?10, '[]', ?11)",
    )?
    .execute(params![
        id,
        new.stored_key(),
        new.task.workflow_instance_id.as_deref(),
        new.runtime.as_str(),
        i64::from(new.task.priority),
        i64::from(new.cpu_millis),
        u64_int(new.memory_bytes),
        new.received.to.as_str(),
        at,
        task_json,
        new.request_hash.as_deref(),
    ])?;
    append_event(tx, id, &new.received)
}

/// Reads the [`TaskState`] of task `id`, if it exists.
fn read_state(tx: &Transaction<'_>, id: &str) -> Result<Option<TaskState>, StoreError> {
    let mut stmt = tx.prepare_cached(concat!(
        "SELECT ",
        state_columns!(),
        " FROM tasks WHERE id = ?"
    ))?;
    let row = stmt
        .query_row([id], |row| {
            Ok((
                row.get::<_, String>("status")?,
                TaskState {
                    status: TaskStatus::Received,
                    attempt: int_u32(row.get("attempt")?),
                    queued: row.get::<_, i64>("queued")? != 0,
                    run_after: row.get("run_after")?,
                    queued_since: row.get("queued_since")?,
                    node: row.get("node")?,
                    lease_until: row.get("lease_until")?,
                    updated_at: row.get("updated_at")?,
                    attempts_json: row.get("attempts_json")?,
                    result_json: row.get("result_json")?,
                    cancel_requested: row.get::<_, i64>("cancel_requested")? != 0,
                },
            ))
        })
        .optional()?;
    row.map(|(status, state)| {
        Ok(TaskState {
            status: parse_status(id, &status)?,
            ..state
        })
    })
    .transpose()
}

/// Stores `state` as the state of task `id`.
fn write_state(tx: &Transaction<'_>, id: &str, state: &TaskState) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE tasks SET status = ?, queued = ?, run_after = ?, queued_since = ?, node = ?, \
         lease_until = ?, updated_at = ?, attempts_json = ?, result_json = ? WHERE id = ?",
    )?
    .execute(params![
        state.status.as_str(),
        i64::from(state.queued),
        state.run_after,
        state.queued_since,
        state.node.as_deref(),
        state.lease_until,
        state.updated_at,
        state.attempts_json.as_str(),
        state.result_json.as_deref(),
        id,
    ])?;
    Ok(())
}

/// Enqueues `tasks` (see [`crate::TaskStore::submit`]); an error leaves
/// the transaction to be rolled back.
pub(super) fn submit(
    tx: &Transaction<'_>,
    tasks: &[NewTask],
    max_queued: u64,
) -> Result<Vec<Submitted>, StoreError> {
    let mut out = Vec::with_capacity(tasks.len());
    let mut fresh: Vec<&NewTask> = Vec::with_capacity(tasks.len());
    // Stored key -> the task of this batch that holds it.
    let mut batch_keys: HashMap<String, &NewTask> = HashMap::new();
    for (index, new) in tasks.iter().enumerate() {
        if let Some(key) = new.stored_key() {
            if let Some(lead) = batch_keys.get(&key) {
                if !new.same_request(lead.request_hash.as_deref()) {
                    return Err(conflict(index, new, &lead.task.id));
                }
                out.push(Submitted::Existing {
                    id: lead.task.id.clone(),
                });
                continue;
            }
            let earlier: Option<(String, Option<String>)> = tx
                .prepare_cached("SELECT id, request_hash FROM tasks WHERE idempotency_key = ?")?
                .query_row([key.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((id, hash)) = earlier {
                if !new.same_request(hash.as_deref()) {
                    return Err(conflict(index, new, &id));
                }
                out.push(Submitted::Existing { id });
                continue;
            }
            batch_keys.insert(key, new);
        }
        out.push(Submitted::Created {
            id: new.task.id.clone(),
        });
        fresh.push(new);
    }
    if !fresh.is_empty() {
        let depth: i64 = tx
            .prepare_cached(concat!(
                "SELECT COUNT(*) FROM tasks WHERE queued = 1 AND ",
                not_final!()
            ))?
            .query_row([], |r| r.get(0))?;
        let depth = int_u64(depth);
        let adding = u64::try_from(fresh.len()).unwrap_or(u64::MAX);
        if depth.saturating_add(adding) > max_queued {
            return Err(StoreError::QueueFull {
                depth,
                max: max_queued,
            });
        }
        for new in fresh {
            insert_task(tx, new)?;
        }
    }
    Ok(out)
}

/// Claims what fits (see [`crate::TaskStore::claim`]).
pub(super) fn claim(tx: &Transaction<'_>, claim: &Claim) -> Result<Vec<ClaimedTask>, StoreError> {
    if claim.limit == 0 {
        return Ok(Vec::new());
    }
    let now_ms = to_ms(claim.now);
    let lease_until = now_ms.saturating_add(duration_ms(claim.lease));
    // Candidates that fit in `free` on their own, in claim order; the
    // window is bounded, the greedy fit below picks from it.
    let window = i64::try_from(claim.limit.saturating_mul(8).clamp(64, 1024)).unwrap_or(1024);
    let mut candidates: Vec<Option<(TaskRow, Vec<TransitionRecord>)>> = rows_with_history(
        tx,
        concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE queued = 1 AND run_after <= ? AND cpu_millis <= ? \
             AND memory_bytes <= ? AND ",
            not_final!(),
            " ORDER BY priority DESC, seq ASC LIMIT ?"
        ),
        params![
            now_ms,
            u64_int(claim.free.cpu_millis),
            u64_int(claim.free.memory_bytes),
            window
        ],
    )?
    .into_iter()
    .map(Some)
    .collect();
    let fit = greedy_fit(
        candidates
            .iter()
            .flatten()
            .map(|(r, _)| (r.cpu_millis, r.memory_bytes)),
        claim.free,
        claim.limit,
    );
    let mut out = Vec::with_capacity(fit.len());
    for i in fit {
        let Some((mut row, history)) = candidates.get_mut(i).and_then(Option::take) else {
            continue;
        };
        tx.prepare_cached(
            "UPDATE tasks SET queued = 0, attempt = attempt + 1, node = ?1, attempt_node = ?1, \
             lease_until = ?2, updated_at = ?3 WHERE id = ?4",
        )?
        .execute(params![claim.node, lease_until, now_ms, row.id])?;
        row.node = Some(claim.node.clone());
        row.queued = false;
        row.updated_at = now_ms;
        let attempt = row.attempt.saturating_add(1);
        out.push(row.into_claimed(attempt, history, None, 0)?);
    }
    Ok(out)
}

/// Applies `writes`; with a `holder`, only where that node holds the
/// task's claim (see [`crate::TaskStore::apply_as`]). The tasks whose
/// cancel won.
pub(super) fn apply_writes(
    tx: &Transaction<'_>,
    writes: &[Write],
    holder: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    // The state of each task written (and whether it changed), read once
    // and changed in memory; events are appended as they come, the changed
    // rows stored at the end.
    let mut states: HashMap<&str, Option<(TaskState, bool)>> = HashMap::new();
    let mut cancelled = Vec::new();
    for write in writes {
        let (id, _) = write_target(write);
        if !states.contains_key(id) {
            let state = read_state(tx, id)?;
            states.insert(id, state.map(|s| (s, false)));
        }
        let Some(Some((state, changed))) = states.get_mut(id) else {
            tracing::debug!(task = id, "write for an unknown task skipped");
            continue;
        };
        let Some(applied) = apply_write(state, write, holder)? else {
            continue;
        };
        *changed = true;
        if applied.cancel_won {
            cancelled.push(id.to_owned());
        }
        if let Some(record) = applied.event {
            append_event(tx, id, &record)?;
        }
    }
    for (id, state) in &states {
        if let Some((state, true)) = state {
            write_state(tx, id, state)?;
        }
    }
    Ok(cancelled)
}

/// Extends the leases `node` holds on `ids` to `until`; the ids extended.
pub(super) fn renew(
    tx: &Transaction<'_>,
    node: &str,
    ids: &[String],
    until: OffsetDateTime,
    chunk: usize,
) -> Result<Vec<String>, StoreError> {
    let mut held = Vec::with_capacity(ids.len());
    for ids in ids.chunks(chunk) {
        let marks = vec!["?"; ids.len()].join(", ");
        let sql = format!(
            concat!(
                "UPDATE tasks SET lease_until = ? WHERE node = ? AND queued = 0 AND ",
                not_final!(),
                " AND id IN ({}) RETURNING id"
            ),
            marks
        );
        let mut values: Vec<rusqlite::types::Value> = Vec::with_capacity(ids.len() + 2);
        values.push(to_ms(until).into());
        values.push(node.to_owned().into());
        values.extend(ids.iter().map(|id| id.clone().into()));
        let mut stmt = tx.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(values), |r| r.get(0))?;
        for id in rows {
            held.push(id?);
        }
    }
    Ok(held)
}

/// Cancels task `id` if queued, else marks it for its node to cancel.
pub(super) fn request_cancel(
    tx: &Transaction<'_>,
    id: &str,
    record: TransitionRecord,
) -> Result<CancelOutcome, StoreError> {
    let mut stmt = tx.prepare_cached(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE id = ?"
    ))?;
    let row = stmt.query([id])?.next()?.map(read_row).transpose()?;
    drop(stmt);
    let Some(row) = row else {
        return Ok(CancelOutcome::NotFound);
    };
    if row.status.is_final() {
        return Ok(CancelOutcome::AlreadyFinal(row.status));
    }
    if !row.queued {
        tx.prepare_cached("UPDATE tasks SET cancel_requested = 1 WHERE id = ?")?
            .execute([id])?;
        return Ok(CancelOutcome::Requested { node: row.node });
    }
    // The cancelling transition starts from where the task stands.
    let record = TransitionRecord {
        from: Some(row.status),
        attempt: row.attempt,
        ..record
    };
    append_event(tx, id, &record)?;
    let history = load_history(tx, id)?;
    let stored = row.into_record(history)?;
    let result = cancelled_result(id, stored.history, stored.attempts);
    let json = serde_json::to_string(&result).map_err(json_err(id))?;
    tx.prepare_cached(
        "UPDATE tasks SET status = ?, queued = 0, cancel_requested = 1, result_json = ?, \
         node = NULL, lease_until = NULL, updated_at = ? WHERE id = ?",
    )?
    .execute(params![
        TaskStatus::Cancelled.as_str(),
        json,
        to_ms(record.at),
        id
    ])?;
    Ok(CancelOutcome::CancelledQueued)
}

/// Gives `node` the tasks whose lease ran out before `now`.
pub(super) fn take_over_expired(
    tx: &Transaction<'_>,
    node: &str,
    now: OffsetDateTime,
    lease: Duration,
) -> Result<Vec<ClaimedTask>, StoreError> {
    let now_ms = to_ms(now);
    let lease_until = now_ms.saturating_add(duration_ms(lease));
    let rows = rows_with_history(
        tx,
        concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE node IS NOT NULL AND queued = 0 AND lease_until < ? AND ",
            not_final!(),
            " ORDER BY seq"
        ),
        params![now_ms],
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (mut row, history) in rows {
        // The attempt is counted as lost once, by its first take-over; its
        // holder is the node that claimed it, whoever held the lease since.
        let (holder, lost): (Option<String>, i64) = tx
            .prepare_cached(
                "UPDATE tasks SET node = ?, lease_until = ?, \
                 lost_attempts = lost_attempts + (lost_through < attempt), \
                 lost_through = attempt WHERE id = ? RETURNING attempt_node, lost_attempts",
            )?
            .query_row(params![node, lease_until, row.id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let previous = row.node.replace(node.to_owned());
        let attempt = row.attempt;
        out.push(row.into_claimed(attempt, history, holder.or(previous), int_u32(lost))?);
    }
    Ok(out)
}

/// The tasks `node` holds a claim on, at their current attempt.
pub(super) fn claimed_by(conn: &Connection, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
    rows_with_history(
        conn,
        concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE node = ? AND queued = 0 AND ",
            not_final!(),
            " ORDER BY seq"
        ),
        params![node],
    )?
    .into_iter()
    .map(|(row, history)| {
        let attempt = row.attempt;
        row.into_claimed(attempt, history, None, 0)
    })
    .collect()
}

/// [`claimed_by`], each task's current attempt counted as lost (once per
/// attempt, as [`take_over_expired`] counts it), with the task's count.
pub(super) fn recover_claimed(
    tx: &Transaction<'_>,
    node: &str,
) -> Result<Vec<ClaimedTask>, StoreError> {
    let mut out = claimed_by(tx, node)?;
    for c in &mut out {
        let lost: i64 = tx
            .prepare_cached(
                "UPDATE tasks SET lost_attempts = lost_attempts + (lost_through < attempt), \
                 lost_through = attempt WHERE id = ? RETURNING lost_attempts",
            )?
            .query_row(params![c.record.task.id], |r| r.get(0))?;
        c.lost_attempts = int_u32(lost);
    }
    Ok(out)
}

/// The rows of `sql` (selecting [`task_columns`] and `history_column`), each
/// with its history: one statement, so one snapshot.
fn rows_with_history(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(TaskRow, Vec<TransitionRecord>)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_row_with_history(r)?);
    }
    Ok(out)
}
