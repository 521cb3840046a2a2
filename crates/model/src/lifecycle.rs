//! The task lifecycle as an explicit state machine over [`TaskStatus`]:
//!
//! ```text
//! RECEIVED  -> PREPARING
//! PREPARING -> PREPARING (retry after a setup failure) | RUNNING | REJECTED | FAILED
//! RUNNING   -> COMPLETED | FAILED | PREPARING (retry: next attempt)
//! any non-final state -> CANCELLED
//! COMPLETED, FAILED, REJECTED, CANCELLED: final, no outgoing transition
//! ```
//!
//! [`Lifecycle`] tracks the state, the attempt number (incremented on every
//! entry into PREPARING) and a history of [`TransitionRecord`]s. Timestamps
//! are passed in by the caller.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::result::TaskStatus;

/// Whether the lifecycle may move from `from` to `to`.
pub const fn can_transition(from: TaskStatus, to: TaskStatus) -> bool {
    use TaskStatus as S;
    matches!(
        (from, to),
        (S::Received, S::Preparing | S::Cancelled)
            | (
                S::Preparing,
                S::Preparing | S::Running | S::Rejected | S::Failed | S::Cancelled
            )
            | (
                S::Running,
                S::Completed | S::Failed | S::Preparing | S::Cancelled
            )
    )
}

/// One transition in a task's history. The first record of a history has
/// no `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransitionRecord {
    /// The previous state; `None` for the initial `RECEIVED` record.
    #[serde(default)]
    pub from: Option<TaskStatus>,
    /// The new state.
    pub to: TaskStatus,
    /// When the transition happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The attempt number after the transition (0 before the first
    /// attempt).
    pub attempt: u32,
    /// Why the transition happened.
    #[serde(default)]
    pub reason: String,
}

/// A transition that the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal lifecycle transition from {from} to {to}")]
pub struct IllegalTransition {
    /// The current state.
    pub from: TaskStatus,
    /// The requested state.
    pub to: TaskStatus,
}

/// The lifecycle of one task: current state, attempt number and history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    state: TaskStatus,
    attempt: u32,
    history: Vec<TransitionRecord>,
}

impl Lifecycle {
    /// A lifecycle in `RECEIVED` at attempt 0, with one history record
    /// (`from: None`, reason `"received"`).
    pub fn new(at: OffsetDateTime) -> Self {
        Lifecycle {
            state: TaskStatus::Received,
            attempt: 0,
            history: vec![TransitionRecord {
                from: None,
                to: TaskStatus::Received,
                at,
                attempt: 0,
                reason: "received".to_owned(),
            }],
        }
    }

    /// Resumes a lifecycle from a stored history (oldest first): the state
    /// and attempt are those of the last record. `None` for an empty history.
    pub fn resume(history: Vec<TransitionRecord>) -> Option<Self> {
        let last = history.last()?;
        Some(Lifecycle {
            state: last.to,
            attempt: last.attempt,
            history,
        })
    }

    /// Moves to `to` if [`can_transition`] allows it, recording the
    /// transition; entering `PREPARING` starts the next attempt. An illegal
    /// transition returns [`IllegalTransition`] and changes nothing.
    pub fn transition(
        &mut self,
        to: TaskStatus,
        at: OffsetDateTime,
        reason: impl Into<String>,
    ) -> Result<(), IllegalTransition> {
        let from = self.state;
        if !can_transition(from, to) {
            return Err(IllegalTransition { from, to });
        }
        if to == TaskStatus::Preparing {
            self.attempt = self.attempt.saturating_add(1);
        }
        self.state = to;
        self.history.push(TransitionRecord {
            from: Some(from),
            to,
            at,
            attempt: self.attempt,
            reason: reason.into(),
        });
        Ok(())
    }

    /// The current state.
    pub fn state(&self) -> TaskStatus {
        self.state
    }

    /// The current attempt number (0 before the first `PREPARING`).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the current state is final.
    pub fn is_final(&self) -> bool {
        self.state.is_final()
    }

    /// The transitions so far, oldest first.
    pub fn history(&self) -> &[TransitionRecord] {
        &self.history
    }

    /// Consumes the lifecycle, returning its history.
    pub fn into_history(self) -> Vec<TransitionRecord> {
        self.history
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::Duration;

    #[test]
    fn resume_continues_where_the_history_stopped() {
        let t = OffsetDateTime::UNIX_EPOCH;
        let mut lc = Lifecycle::new(t);
        lc.transition(TaskStatus::Preparing, t, "p").expect("legal");
        lc.transition(TaskStatus::Running, t, "r").expect("legal");
        let mut resumed = Lifecycle::resume(lc.history().to_vec()).expect("non-empty");
        assert_eq!(
            (resumed.state(), resumed.attempt()),
            (TaskStatus::Running, 1)
        );
        resumed
            .transition(TaskStatus::Preparing, t, "retry")
            .expect("legal");
        assert_eq!(resumed.attempt(), 2);
        assert_eq!(resumed.history().len(), 4);
        assert!(Lifecycle::resume(Vec::new()).is_none());
    }
    use time::macros::datetime;

    use TaskStatus::{Cancelled, Completed, Failed, Preparing, Received, Rejected, Running};

    const T0: OffsetDateTime = datetime!(2025-06-01 12:00 UTC);

    /// A lifecycle driven legally into `state` (attempt >= 1 unless RECEIVED).
    fn at_state(state: TaskStatus) -> Lifecycle {
        let mut l = Lifecycle::new(T0);
        let path: &[TaskStatus] = match state {
            Received => &[],
            Preparing => &[Preparing],
            Running => &[Preparing, Running],
            Completed => &[Preparing, Running, Completed],
            Failed => &[Preparing, Running, Failed],
            Rejected => &[Preparing, Rejected],
            Cancelled => &[Cancelled],
        };
        for s in path {
            l.transition(*s, T0, "setup").expect("legal path");
        }
        assert_eq!(l.state(), state);
        l
    }

    /// The full 7x7 table, written out independently of `can_transition`.
    const LEGAL: [(TaskStatus, TaskStatus); 11] = [
        (Received, Preparing),
        (Received, Cancelled),
        (Preparing, Preparing),
        (Preparing, Running),
        (Preparing, Rejected),
        (Preparing, Failed),
        (Preparing, Cancelled),
        (Running, Completed),
        (Running, Failed),
        (Running, Preparing),
        (Running, Cancelled),
    ];

    fn expected_legal(from: TaskStatus, to: TaskStatus) -> bool {
        LEGAL.contains(&(from, to))
    }

    #[test]
    fn every_ordered_pair() {
        let mut legal_count = 0;
        for from in TaskStatus::ALL {
            for to in TaskStatus::ALL {
                let expected = expected_legal(from, to);
                assert_eq!(can_transition(from, to), expected, "{from} -> {to}");

                let mut l = at_state(from);
                let before = l.clone();
                let later = T0 + Duration::seconds(5);
                let outcome = l.transition(to, later, "test");
                if expected {
                    legal_count += 1;
                    assert_eq!(outcome, Ok(()), "{from} -> {to}");
                    assert_eq!(l.state(), to);
                    assert_eq!(l.history().len(), before.history().len() + 1);
                    let rec = l.history().last().expect("a record");
                    assert_eq!(rec.from, Some(from));
                    assert_eq!(rec.to, to);
                    assert_eq!(rec.at, later);
                    assert_eq!(rec.reason, "test");
                    let bump = u32::from(to == Preparing);
                    assert_eq!(l.attempt(), before.attempt() + bump, "{from} -> {to}");
                    assert_eq!(rec.attempt, l.attempt());
                } else {
                    assert_eq!(
                        outcome,
                        Err(IllegalTransition { from, to }),
                        "{from} -> {to}"
                    );
                    assert_eq!(l, before, "illegal transition changed state");
                }
            }
        }
        assert_eq!(legal_count, 11);
        for s in TaskStatus::ALL {
            if s.is_final() {
                assert!(
                    TaskStatus::ALL.iter().all(|t| !can_transition(s, *t)),
                    "{s}"
                );
            } else {
                assert!(can_transition(s, Cancelled), "{s}");
            }
        }
    }

    #[test]
    fn new_lifecycle() {
        let l = Lifecycle::new(T0);
        assert_eq!(l.state(), Received);
        assert_eq!(l.attempt(), 0);
        assert!(!l.is_final());
        assert_eq!(
            l.history(),
            &[TransitionRecord {
                from: None,
                to: Received,
                at: T0,
                attempt: 0,
                reason: "received".into()
            }]
        );
    }

    #[test]
    fn retry_cycle_counts_attempts() {
        let mut l = Lifecycle::new(T0);
        l.transition(Preparing, T0, "start").expect("legal");
        l.transition(Preparing, T0, "setup failed, retrying")
            .expect("legal");
        l.transition(Running, T0, "started").expect("legal");
        l.transition(Preparing, T0, "runtime error, retrying")
            .expect("legal");
        l.transition(Running, T0, "started").expect("legal");
        l.transition(Completed, T0, "exit 0").expect("legal");
        assert_eq!(l.attempt(), 3);
        assert!(l.is_final());
        let err = l.transition(Running, T0, "late").expect_err("final");
        assert_eq!(
            err.to_string(),
            "illegal lifecycle transition from COMPLETED to RUNNING"
        );
        let attempts: Vec<u32> = l.history().iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, vec![0, 1, 2, 2, 3, 3, 3]);
        let history = l.into_history();
        assert_eq!(history.len(), 7);
        let json = serde_json::to_value(&history[1]).expect("ser");
        assert_eq!(
            json,
            serde_json::json!({"from": "RECEIVED", "to": "PREPARING", "at": "2025-06-01T12:00:00Z", "attempt": 1, "reason": "start"})
        );
    }

    proptest! {
        #[test]
        fn random_sequences_respect_the_machine(
            steps in proptest::collection::vec(proptest::sample::select(TaskStatus::ALL.to_vec()), 0..60)
        ) {
            let mut l = Lifecycle::new(T0);
            let mut legal = 0usize;
            for (i, to) in steps.into_iter().enumerate() {
                let before_state = l.state();
                let before_attempt = l.attempt();
                let at = T0 + Duration::seconds(i64::try_from(i).expect("small"));
                let ok = l.transition(to, at, "step").is_ok();
                prop_assert_eq!(ok, can_transition(before_state, to));
                if before_state.is_final() {
                    prop_assert!(!ok);
                    prop_assert_eq!(l.state(), before_state);
                }
                if ok {
                    legal += 1;
                    prop_assert_eq!(l.state(), to);
                } else {
                    prop_assert_eq!(l.state(), before_state);
                }
                prop_assert!(l.attempt() >= before_attempt);
                prop_assert!(l.attempt() <= before_attempt + 1);
            }
            let h = l.history();
            prop_assert_eq!(h.len(), legal + 1);
            prop_assert_eq!(h[0].from, None);
            for pair in h.windows(2) {
                prop_assert_eq!(pair[1].from, Some(pair[0].to));
                prop_assert!(pair[1].attempt >= pair[0].attempt);
                prop_assert!(!pair[0].to.is_final());
            }
        }
    }
}
