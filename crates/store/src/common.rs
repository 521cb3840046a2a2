//! What the backends share: value conversions, the decoded form of a `tasks`
//! row, and the pure rules of the store — write fencing
//! ([`apply_write`]), the greedy fit of a claim ([`greedy_fit`]),
//! idempotency within a batch ([`batch_leaders`]) and the result of a task
//! cancelled while queued ([`cancelled_result`]) — so that every backend
//! has the same semantics and only the SQL around them differs.
//!
//! Both schemas store times as unix milliseconds and JSON as text, so the
//! conversions here serve both.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use taskexec_model::{
    AttemptRecord, ErrorType, TaskError, TaskInstance, TaskResult, TaskStatus, TransitionRecord,
};
use time::OffsetDateTime;

use crate::{Capacity, ClaimedTask, NewTask, StoreError, TaskRecord, Write};

/// SQL condition: the row's status is not final (keep in step with
/// `TaskStatus::is_final`; a unit test checks it).
macro_rules! not_final {
    () => {
        "status NOT IN ('COMPLETED', 'FAILED', 'REJECTED', 'CANCELLED')"
    };
}
pub(crate) use not_final;

/// The `tasks` columns read into a [`TaskRow`].
macro_rules! task_columns {
    () => {
        "id, runtime, status, queued, attempt, node, submitted_at, updated_at, \
         cancel_requested, task_json, attempts_json, result_json, queued_since, \
         cpu_millis, memory_bytes"
    };
}
pub(crate) use task_columns;

/// The `tasks` columns read into a [`TaskState`].
macro_rules! state_columns {
    () => {
        "id, status, attempt, queued, run_after, queued_since, node, lease_until, updated_at, \
         attempts_json, result_json, cancel_requested"
    };
}
pub(crate) use state_columns;

/// Default page size of `list`.
pub(crate) const DEFAULT_PAGE: u32 = 50;
/// Largest page size of `list`.
pub(crate) const MAX_PAGE: u32 = 500;

/// The page size of a listing asking for `limit` rows (0: the default).
pub(crate) fn page_size(limit: u32) -> u32 {
    match limit {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// Unix milliseconds of `t`.
pub(crate) fn to_ms(t: OffsetDateTime) -> i64 {
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

/// The time of unix milliseconds `ms` (the epoch if out of range, which
/// [`to_ms`] never produces).
pub(crate) fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Milliseconds of `d`, saturating.
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A stored non-negative integer as `u32` (saturating, 0 if negative).
pub(crate) fn int_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A stored non-negative integer as `u64` (0 if negative).
pub(crate) fn int_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `v` as a stored integer (saturating).
pub(crate) fn u64_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A JSON error about task `id`.
pub(crate) fn json_err(id: &str) -> impl FnOnce(serde_json::Error) -> StoreError + '_ {
    move |source| StoreError::Json {
        id: id.to_owned(),
        source,
    }
}

/// Parses a stored status wire name.
pub(crate) fn parse_status(id: &str, s: &str) -> Result<TaskStatus, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(json_err(id))
}

/// Parses a listing cursor (a positive sequence number).
pub(crate) fn parse_cursor(cursor: &str) -> Result<i64, StoreError> {
    cursor
        .parse::<i64>()
        .ok()
        .filter(|seq| *seq > 0)
        .ok_or_else(|| StoreError::BadCursor(cursor.to_owned()))
}

/// Parses the stored history of task `id` (`TransitionRecord` JSON, oldest
/// first).
pub(crate) fn parse_history<S: AsRef<str>>(
    id: &str,
    records: impl IntoIterator<Item = S>,
) -> Result<Vec<TransitionRecord>, StoreError> {
    records
        .into_iter()
        .map(|json| serde_json::from_str(json.as_ref()).map_err(json_err(id)))
        .collect()
}

/// One `tasks` row, as read by [`task_columns`].
#[derive(Debug)]
pub(crate) struct TaskRow {
    pub(crate) id: String,
    pub(crate) runtime: String,
    pub(crate) status: TaskStatus,
    pub(crate) queued: bool,
    pub(crate) attempt: u32,
    pub(crate) node: Option<String>,
    pub(crate) submitted_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) cancel_requested: bool,
    pub(crate) task_json: String,
    pub(crate) attempts_json: String,
    pub(crate) result_json: Option<String>,
    pub(crate) queued_since: i64,
    pub(crate) cpu_millis: u32,
    pub(crate) memory_bytes: u64,
}

impl TaskRow {
    /// The whole record, with its `history`.
    pub(crate) fn into_record(
        self,
        history: Vec<TransitionRecord>,
    ) -> Result<TaskRecord, StoreError> {
        let task: TaskInstance =
            serde_json::from_str(&self.task_json).map_err(json_err(&self.id))?;
        let attempts: Vec<AttemptRecord> =
            serde_json::from_str(&self.attempts_json).map_err(json_err(&self.id))?;
        let result: Option<TaskResult> = self
            .result_json
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(json_err(&self.id))?;
        Ok(TaskRecord {
            task,
            status: self.status,
            attempt: self.attempt,
            runtime: self.runtime,
            queued: self.queued,
            node: self.node,
            submitted_at: from_ms(self.submitted_at),
            updated_at: from_ms(self.updated_at),
            cancel_requested: self.cancel_requested,
            history,
            attempts,
            result,
        })
    }

    /// The row as a task claimed for `attempt`, with its `history` (and,
    /// from a take-over, the node that ran the attempt and the task's
    /// count of lost attempts).
    pub(crate) fn into_claimed(
        self,
        attempt: u32,
        history: Vec<TransitionRecord>,
        previous_node: Option<String>,
        lost_attempts: u32,
    ) -> Result<ClaimedTask, StoreError> {
        let (queued_since, cpu_millis, memory_bytes) = (
            from_ms(self.queued_since),
            self.cpu_millis,
            self.memory_bytes,
        );
        Ok(ClaimedTask {
            record: self.into_record(history)?,
            attempt,
            queued_since,
            cpu_millis,
            memory_bytes,
            previous_node,
            lost_attempts,
        })
    }
}

/// The columns of a `tasks` row that writes read and change, as read by
/// [`state_columns`] (the id aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskState {
    pub(crate) status: TaskStatus,
    pub(crate) attempt: u32,
    pub(crate) queued: bool,
    pub(crate) run_after: i64,
    pub(crate) queued_since: i64,
    pub(crate) node: Option<String>,
    pub(crate) lease_until: Option<i64>,
    pub(crate) updated_at: i64,
    pub(crate) attempts_json: String,
    pub(crate) result_json: Option<String>,
    /// A cancel was requested while the task was not final: it ends
    /// CANCELLED, whatever its attempt reports.
    pub(crate) cancel_requested: bool,
}

impl TaskState {
    /// Closed: the result is stored, nothing changes the task any more.
    pub(crate) fn closed(&self) -> bool {
        self.result_json.is_some()
    }
}

/// What [`apply_write`] did to a task it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Applied<'w> {
    /// A transition to append to the task's history.
    pub(crate) event: Option<Cow<'w, TransitionRecord>>,
    /// The task went back to the queue.
    pub(crate) requeued: bool,
    /// A final write was stored as CANCELLED: a cancel requested before
    /// it won.
    pub(crate) cancel_won: bool,
}

/// The task id and attempt a write belongs to.
pub(crate) fn write_target(write: &Write) -> (&str, u32) {
    match write {
        Write::Transition { id, attempt, .. }
        | Write::Requeue { id, attempt, .. }
        | Write::Finish { id, attempt, .. } => (id, *attempt),
        Write::AttemptDone { id, record } => (id, record.attempt),
    }
}

/// Applies `write` to `state` (the state of the write's task) if its fence
/// allows it; `None` if it was skipped. The rules (every backend's):
/// - with a `holder`, a write is ignored unless that node holds the task's
///   claim (a node whose lease was taken over writes nothing any more);
/// - a transition whose `from` is not the current status (a retried batch
///   whose first commit went through) is ignored;
/// - a write for an attempt other than the task's current one is ignored,
///   and so is every write once the task is closed (its result stored);
/// - a transition or requeue of a task whose status is final is ignored
///   (its attempt record and a result with that same status still apply);
/// - an attempt record already recorded is ignored;
/// - a finish whose status is not final is ignored (and logged): it would
///   release the task without requeuing it;
/// - once a cancel was requested (which [`request_cancel`] records only
///   while the task is not final: the one compare-and-set between a cancel
///   and the task's end), the task ends CANCELLED: a transition into
///   another final status, and a finish with one, are stored as CANCELLED
///   ([`cancel_won`], the attempt's output discarded), and a requeue is
///   ignored (the node then finishes the task as cancelled).
///
/// [`request_cancel`]: crate::TaskStore::request_cancel
pub(crate) fn apply_write<'w>(
    state: &mut TaskState,
    write: &'w Write,
    holder: Option<&str>,
) -> Result<Option<Applied<'w>>, StoreError> {
    let (id, attempt) = write_target(write);
    if let Some(node) = holder
        && state.node.as_deref() != Some(node)
    {
        tracing::debug!(
            task = id,
            node,
            holder = state.node.as_deref().unwrap_or(""),
            "write of a node that no longer holds the task skipped"
        );
        return Ok(None);
    }
    if state.attempt != attempt {
        tracing::debug!(
            task = id,
            attempt,
            current = state.attempt,
            "write of a stale attempt skipped"
        );
        return Ok(None);
    }
    if state.closed() {
        tracing::debug!(task = id, "write for a finished task skipped");
        return Ok(None);
    }
    let is_final = state.status.is_final();
    // The cancel won: an attempt's end is the task's cancellation.
    let won = state.cancel_requested && !is_final;
    let write: Cow<'w, Write> = match write {
        Write::Transition {
            id,
            attempt,
            record,
        } if won && record.to.is_final() && record.to != TaskStatus::Cancelled => {
            Cow::Owned(Write::Transition {
                id: id.clone(),
                attempt: *attempt,
                record: cancel_won_transition(record),
            })
        }
        Write::Finish {
            id,
            attempt,
            result,
        } if state.cancel_requested && result.status != TaskStatus::Cancelled => {
            Cow::Owned(Write::Finish {
                id: id.clone(),
                attempt: *attempt,
                result: cancel_won(result),
            })
        }
        Write::Requeue { .. } if won => {
            tracing::debug!(
                task = id,
                "requeue of a task whose cancel was requested skipped"
            );
            return Ok(None);
        }
        other => Cow::Borrowed(other),
    };
    match write {
        Cow::Borrowed(write) => apply_checked(state, write, is_final),
        Cow::Owned(write) => Ok(
            apply_checked(state, &write, is_final)?.map(|applied| Applied {
                event: applied.event.map(|e| Cow::Owned(e.into_owned())),
                requeued: applied.requeued,
                cancel_won: matches!(write, Write::Finish { .. }),
            }),
        ),
    }
}

/// The reason of a final transition stored as CANCELLED because a cancel
/// was requested before the attempt's end.
pub(crate) const CANCEL_WON_REASON: &str =
    "cancelled (requested before the attempt ended; its result was discarded)";

/// `record`, a transition into a final status, as the transition into
/// CANCELLED that it becomes once a cancel was requested.
pub fn cancel_won_transition(record: &TransitionRecord) -> TransitionRecord {
    TransitionRecord {
        to: TaskStatus::Cancelled,
        reason: CANCEL_WON_REASON.to_owned(),
        ..record.clone()
    }
}

/// `result`, the final result of an attempt that ended after a cancel was
/// requested, as the CANCELLED result stored instead: the status, the
/// error and the last transition (as [`cancel_won_transition`] stores it)
/// say cancelled, the output is discarded; the attempts, logs and
/// measurements stay.
pub(crate) fn cancel_won(result: &TaskResult) -> TaskResult {
    let mut out = result.clone();
    out.status = TaskStatus::Cancelled;
    out.output = taskexec_model::TaskOutput::null();
    out.error = Some(TaskError::new(
        ErrorType::Cancelled,
        "the task was cancelled",
    ));
    if let Some(last) = out.history.last_mut()
        && last.to == result.status
    {
        *last = cancel_won_transition(last);
    }
    out
}

/// [`apply_write`] past the fences and the cancel rule.
fn apply_checked<'w>(
    state: &mut TaskState,
    write: &'w Write,
    is_final: bool,
) -> Result<Option<Applied<'w>>, StoreError> {
    let (id, attempt) = write_target(write);
    let mut applied = Applied {
        event: None,
        requeued: false,
        cancel_won: false,
    };
    match write {
        Write::Transition { record, .. } => {
            if is_final {
                tracing::debug!(task = id, status = %state.status, "transition of a final task skipped");
                return Ok(None);
            }
            // A transition starts from the current status: one that does not
            // (or repeats the last one exactly) is a batch retried after a
            // commit whose answer was lost, and is applied once only.
            let repeated = record.from == Some(record.to) && state.updated_at == to_ms(record.at);
            if record.from.is_some_and(|from| from != state.status) || repeated {
                tracing::debug!(task = id, status = %state.status, to = %record.to, "transition not from the current status skipped");
                return Ok(None);
            }
            state.status = record.to;
            state.updated_at = to_ms(record.at);
            applied.event = Some(Cow::Borrowed(record));
        }
        Write::AttemptDone { record, .. } => {
            let mut attempts: Vec<AttemptRecord> =
                serde_json::from_str(&state.attempts_json).map_err(json_err(id))?;
            if attempts.iter().any(|a| a.attempt == record.attempt) {
                tracing::debug!(task = id, attempt, "attempt already recorded");
                return Ok(None);
            }
            attempts.push(record.clone());
            state.attempts_json = serde_json::to_string(&attempts).map_err(json_err(id))?;
        }
        Write::Requeue { run_after, .. } => {
            if is_final {
                tracing::debug!(task = id, status = %state.status, "requeue of a final task skipped");
                return Ok(None);
            }
            let at = to_ms(*run_after);
            state.queued = true;
            state.run_after = at;
            state.queued_since = at;
            state.node = None;
            state.lease_until = None;
            applied.requeued = true;
        }
        Write::Finish { result, .. } => {
            if !result.status.is_final() {
                tracing::warn!(task = id, status = %result.status, "finish with a non-final status skipped");
                return Ok(None);
            }
            if is_final && state.status != result.status {
                tracing::debug!(
                    task = id,
                    status = %state.status,
                    result = %result.status,
                    "finish with another final status skipped"
                );
                return Ok(None);
            }
            state.status = result.status;
            state.result_json = Some(serde_json::to_string(result).map_err(json_err(id))?);
            state.queued = false;
            state.node = None;
            state.lease_until = None;
            if let Some(at) = result
                .execution_metadata
                .end_time
                .or_else(|| result.history.last().map(|r| r.at))
            {
                state.updated_at = to_ms(at);
            }
        }
    }
    Ok(Some(applied))
}

/// The claim's greedy fit: indices of the candidates (resource requests
/// `(cpu_millis, memory_bytes)`, in claim order) taken, each fitting in
/// what is left of `free` after those before it, at most `limit`.
pub(crate) fn greedy_fit(
    requests: impl IntoIterator<Item = (u32, u64)>,
    free: Capacity,
    limit: usize,
) -> Vec<usize> {
    let (mut cpu_left, mut mem_left) = (free.cpu_millis, free.memory_bytes);
    let mut taken = Vec::new();
    if limit == 0 {
        return taken;
    }
    for (i, (cpu, mem)) in requests.into_iter().enumerate() {
        let cpu = u64::from(cpu);
        if cpu > cpu_left || mem > mem_left {
            continue;
        }
        cpu_left -= cpu;
        mem_left -= mem;
        taken.push(i);
        if taken.len() == limit {
            break;
        }
    }
    taken
}

/// For each task of a submitted batch, the index of the task whose outcome
/// it shares: itself, or the first earlier task of the batch with the same
/// stored idempotency key (which is then `Existing` with that task's id).
/// Fails with [`StoreError::IdempotencyConflict`] when such a task was sent
/// with another request digest.
pub(crate) fn batch_leaders(tasks: &[NewTask]) -> Result<Vec<usize>, StoreError> {
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut leaders = Vec::with_capacity(tasks.len());
    for (i, new) in tasks.iter().enumerate() {
        let leader = match new.stored_key() {
            Some(key) => *first.entry(key).or_insert(i),
            None => i,
        };
        if let Some(lead) = tasks.get(leader)
            && !new.same_request(lead.request_hash.as_deref())
        {
            return Err(conflict(i, new, &lead.task.id));
        }
        leaders.push(leader);
    }
    Ok(leaders)
}

/// The error of task `index` of a submission, whose key belongs to task
/// `existing` submitted with another request.
pub(crate) fn conflict(index: usize, new: &NewTask, existing: &str) -> StoreError {
    StoreError::IdempotencyConflict {
        index,
        key: new.task.idempotency_key.clone().unwrap_or_default(),
        existing: existing.to_owned(),
    }
}

/// The digest stored with an idempotency key: SHA-256, in lowercase hex, of
/// the canonical JSON of `task` as submitted (before an id is assigned):
/// the parsed task serialized again with object keys sorted and no
/// whitespace. So two requests that differ only in whitespace, key order,
/// or in leaving out a field rather than sending its default, have the
/// same digest.
pub fn request_hash(task: &TaskInstance) -> String {
    use sha2::{Digest, Sha256};
    // `serde_json::Value` keeps objects in sorted order (a BTreeMap).
    let canonical = serde_json::to_value(task)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let digest = Sha256::digest(canonical.as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut out, b| {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The result of task `id`, cancelled while queued: its history (the
/// cancelling transition included) and finished attempts.
pub(crate) fn cancelled_result(
    id: &str,
    history: Vec<TransitionRecord>,
    attempts: Vec<AttemptRecord>,
) -> TaskResult {
    let mut result = TaskResult::new(id, TaskStatus::Cancelled);
    result.error = Some(TaskError::new(
        ErrorType::Cancelled,
        "the task was cancelled",
    ));
    result.history = history;
    result.execution_metadata.attempts = attempts;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_final_lists_exactly_the_final_statuses() {
        for status in TaskStatus::ALL {
            let quoted = format!("'{}'", status.as_str());
            assert_eq!(
                not_final!().contains(&quoted),
                status.is_final(),
                "{status}"
            );
        }
    }

    #[test]
    fn milliseconds_round_trip() {
        let t = time::macros::datetime!(2025-06-01 12:00:00.123 UTC);
        assert_eq!(from_ms(to_ms(t)), t);
        assert_eq!(to_ms(OffsetDateTime::UNIX_EPOCH), 0);
        let before = time::macros::datetime!(1969-12-31 23:59:59.5 UTC);
        assert_eq!(from_ms(to_ms(before)), before);
    }

    #[test]
    fn cursors() {
        assert_eq!(parse_cursor("42").expect("valid"), 42);
        for bad in ["", "x", "-1", "0", "1.5"] {
            assert!(
                matches!(parse_cursor(bad), Err(StoreError::BadCursor(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0), DEFAULT_PAGE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(100_000), MAX_PAGE);
    }

    #[test]
    fn greedy_fit_skips_what_does_not_fit_and_stops_at_the_limit() {
        let free = Capacity {
            cpu_millis: 1000,
            memory_bytes: 100,
        };
        let requests = [
            (400, 10),
            (700, 10),
            (400, 10),
            (100, 90),
            (100, 50),
            (0, 0),
        ];
        assert_eq!(greedy_fit(requests, free, 10), vec![0, 2, 4, 5]);
        assert_eq!(greedy_fit(requests, free, 2), vec![0, 2]);
        assert_eq!(greedy_fit(requests, free, 0), Vec::<usize>::new());
    }

    #[test]
    fn batch_leaders_point_at_the_first_task_of_each_key() {
        let task = |id: &str, key: Option<&str>| {
            let task: TaskInstance = serde_json::from_value(serde_json::json!({
                "id": id,
                "definition": {"runtime": "python", "code": "1"},
            }))
            .expect("task");
            let mut task = task;
            task.idempotency_key = key.map(str::to_owned);
            NewTask {
                task,
                runtime: "python".to_owned(),
                cpu_millis: 1,
                memory_bytes: 1,
                received: TransitionRecord {
                    from: None,
                    to: TaskStatus::Received,
                    at: OffsetDateTime::UNIX_EPOCH,
                    attempt: 0,
                    reason: String::new(),
                },
                idempotency_scope: String::new(),
                request_hash: None,
            }
        };
        let batch = [
            task("a", Some("k")),
            task("b", None),
            task("c", Some("k")),
            task("d", Some("j")),
            task("e", Some("j")),
            task("f", None),
        ];
        assert_eq!(
            batch_leaders(&batch).expect("no conflict"),
            vec![0, 1, 0, 3, 3, 5]
        );
    }
}
