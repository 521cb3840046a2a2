//! Task uids: one allocator per [`crate::Sandbox`] (so per node), lending
//! host uids to cold runs, pre-built sandboxes and fork servers alike, so
//! no two tasks running at once share a uid, nor anything the kernel
//! counts per uid (processes under `RLIMIT_NPROC`, inotify instances,
//! message-queue bytes, pending signals, locked memory...).
//!
//! The ids come from a range no host account uses (by default the 65536
//! ids from 2130706432, [`TaskUids::DEFAULT`], far above the ranges
//! distributions hand out and the subordinate ids of `/etc/subuid`). A
//! cold run leases one uid (gid = uid); a fork server leases a block for
//! its life (its user namespace maps it, see [`crate::fork_server`]). A lease
//! goes back to the pool when dropped: its holders drop it only once the
//! task's cgroup is empty, and forget it (the ids are then never lent
//! again) when that cannot be made sure.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

/// A range of host uids for tasks, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskUids {
    /// The first id.
    pub first: u32,
    /// The last id (inclusive).
    pub last: u32,
}

/// Why a uid range is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UidRangeError {
    /// Not `START-END` with two decimal numbers.
    #[error("{text:?} is not a uid range; expected START-END, e.g. 2130706432-2130771967")]
    Syntax {
        /// What was given.
        text: String,
    },
    /// Empty, reversed, too small, or reaching root or the overflow ids.
    #[error(
        "{first}-{last}: expected START <= END, at least {min} ids, no id 0, and below 4294967295"
    )]
    Bounds {
        /// The first id given.
        first: u32,
        /// The last id given.
        last: u32,
        /// The smallest accepted size.
        min: u32,
    },
    /// Overlaps ids configured for another use (e.g. `runAs`).
    #[error("{first}-{last} overlaps the {what} ids {other_first}-{other_last}")]
    Overlap {
        /// The first id given.
        first: u32,
        /// The last id given.
        last: u32,
        /// The other use.
        what: &'static str,
        /// Its first id.
        other_first: u32,
        /// Its last id.
        other_last: u32,
    },
}

impl TaskUids {
    /// 2130706432 to 2130771967: 65536 ids no distribution hands out.
    pub const DEFAULT: TaskUids = TaskUids {
        first: 2_130_706_432,
        last: 2_130_771_967,
    };

    /// The smallest range accepted: one fork server's block and a few cold
    /// runs beside it.
    pub const MIN_LEN: u32 = 2 * crate::fork_server::SERVER_UIDS;

    /// A range `first..=last`, checked.
    pub fn new(first: u32, last: u32) -> Result<Self, UidRangeError> {
        let bad = UidRangeError::Bounds {
            first,
            last,
            min: Self::MIN_LEN,
        };
        if first == 0 || last == u32::MAX || last < first || last - first + 1 < Self::MIN_LEN {
            return Err(bad);
        }
        Ok(Self { first, last })
    }

    /// Parses `START-END`.
    pub fn parse(text: &str) -> Result<Self, UidRangeError> {
        let syntax = || UidRangeError::Syntax { text: text.into() };
        let (a, b) = text.trim().split_once('-').ok_or_else(syntax)?;
        let first = a.trim().parse().map_err(|_| syntax())?;
        let last = b.trim().parse().map_err(|_| syntax())?;
        Self::new(first, last)
    }

    /// Refuses a range that shares an id with `other` (ids configured for
    /// `what`).
    pub fn disjoint_from(
        self,
        what: &'static str,
        other: &RangeInclusive<u32>,
    ) -> Result<Self, UidRangeError> {
        if other.is_empty() || *other.end() < self.first || *other.start() > self.last {
            return Ok(self);
        }
        Err(UidRangeError::Overlap {
            first: self.first,
            last: self.last,
            what,
            other_first: *other.start(),
            other_last: *other.end(),
        })
    }

    /// Whether `uid` is one of these.
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }

    fn len(&self) -> usize {
        (self.last - self.first) as usize + 1
    }
}

impl Default for TaskUids {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for TaskUids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

#[derive(Debug)]
struct State {
    /// Whether each id of the range is lent (or lost).
    used: Vec<bool>,
    /// Where the next search starts: ids are lent round-robin, so a uid
    /// just given back is the last to be lent again.
    next: usize,
}

/// The allocator: lends blocks of consecutive ids of a [`TaskUids`].
#[derive(Debug)]
pub(crate) struct UidPool {
    range: TaskUids,
    state: Arc<Mutex<State>>,
}

impl UidPool {
    pub(crate) fn new(range: TaskUids) -> Self {
        Self {
            range,
            state: Arc::new(Mutex::new(State {
                used: vec![false; range.len()],
                next: 0,
            })),
        }
    }

    /// `count` consecutive free ids, or `None` when there is no such run.
    pub(crate) fn lease(&self, count: u32) -> Option<UidLease> {
        let count = count as usize;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let len = st.used.len();
        if count == 0 || count > len {
            return None;
        }
        let start_at = st.next % len;
        // Candidate starts from `next` round to `next` again; a block never
        // wraps past the end of the range.
        let mut start = start_at;
        for _ in 0..len {
            if start + count <= len && !st.used[start..start + count].iter().any(|u| *u) {
                st.used[start..start + count]
                    .iter_mut()
                    .for_each(|u| *u = true);
                st.next = (start + count) % len;
                return Some(UidLease {
                    state: Arc::clone(&self.state),
                    offset: start,
                    count,
                    #[allow(
                        clippy::cast_possible_truncation,
                        reason = "start is below the range's count, a u32"
                    )]
                    first: self.range.first + start as u32,
                });
            }
            start = (start + 1) % len;
        }
        None
    }

    /// Ids lent now (or lost).
    #[cfg(test)]
    fn in_use(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.used.iter().filter(|u| **u).count()
    }
}

/// Consecutive ids lent to one task or one fork server; back to the pool
/// when dropped.
#[derive(Debug)]
pub(crate) struct UidLease {
    state: Arc<Mutex<State>>,
    offset: usize,
    count: usize,
    first: u32,
}

impl UidLease {
    /// The first id of the block.
    pub(crate) fn first(&self) -> u32 {
        self.first
    }

    /// Never gives the ids back: for a task of which something may have
    /// survived (its cgroup could not be emptied).
    pub(crate) fn lose(self) {
        std::mem::forget(self);
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ids) = st.used.get_mut(self.offset..self.offset + self.count) {
            ids.iter_mut().for_each(|u| *u = false);
        }
    }
}

/// Gives `lease` back when `emptied` (the task's cgroup is known empty),
/// else loses it.
pub(crate) fn release<E>(lease: Option<UidLease>, emptied: &Result<(), E>) {
    if let Some(lease) = lease
        && emptied.is_err()
    {
        lease.lose();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(len: u32) -> UidPool {
        UidPool::new(TaskUids {
            first: 1000,
            last: 1000 + len - 1,
        })
    }

    #[test]
    fn leases_are_disjoint_and_come_back_when_dropped() {
        let p = pool(10);
        let a = p.lease(1).expect("one");
        let b = p.lease(4).expect("four");
        let c = p.lease(5).expect("five");
        assert_eq!((a.first(), b.first(), c.first()), (1000, 1001, 1005));
        assert!(p.lease(1).is_none(), "all lent");
        drop(b);
        assert_eq!(p.in_use(), 6);
        assert!(p.lease(5).is_none(), "no five in a row");
        let d = p.lease(4).expect("b's block");
        assert_eq!(d.first(), 1001);
        drop((a, c, d));
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn ids_are_lent_round_robin() {
        let p = pool(4);
        let first = p.lease(1).expect("a").first();
        let second = p.lease(1).expect("b").first();
        assert_ne!(first, second, "a uid given back is not the next one lent");
    }

    #[test]
    fn a_lost_lease_never_comes_back() {
        let p = pool(2);
        p.lease(1).expect("a").lose();
        release(p.lease(1), &Err::<(), ()>(()));
        assert!(p.lease(1).is_none());
        assert_eq!(p.in_use(), 2);
    }

    #[test]
    fn ranges_are_parsed_and_checked() {
        assert_eq!(
            TaskUids::parse("2130706432-2130771967"),
            Ok(TaskUids::DEFAULT)
        );
        for bad in ["", "5", "a-b", "10-", "-10"] {
            assert!(
                matches!(TaskUids::parse(bad), Err(UidRangeError::Syntax { .. })),
                "{bad}"
            );
        }
        for bad in ["0-1000", "2000-1000", "1000-1001", "4294967000-4294967295"] {
            assert!(
                matches!(TaskUids::parse(bad), Err(UidRangeError::Bounds { .. })),
                "{bad}"
            );
        }
        let r = TaskUids::parse("60000-70000").expect("range");
        assert!(matches!(
            r.disjoint_from("runAs", &(60000..=65534)),
            Err(UidRangeError::Overlap { .. })
        ));
        assert!(
            TaskUids::DEFAULT
                .disjoint_from("runAs", &(60000..=65534))
                .is_ok()
        );
    }
}
