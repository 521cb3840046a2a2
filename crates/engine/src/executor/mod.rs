//! Executors: what runs a task's attempts, one per execution method
//! (`executionConfig.method`). The pipeline ([`crate::pipeline`]) hands each
//! attempt to the executor of the prepared task. CONTAINER, the Linux
//! sandbox, is the only one on this executor (AUTO chooses it); another
//! method is a variant here with a module of its own.

mod container;

use taskexec_model::{Method, PhaseTimings, TaskInstance};
use taskexec_sandbox::RunOutcome;

use crate::{Cancellation, Engine, Prepared, Verdict};

/// The executor of a prepared task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// The Linux sandbox ([`taskexec_sandbox`]): namespaces, a cgroup,
    /// seccomp.
    Container,
}

impl Executor {
    /// The executor of `method` here, or `None` if this executor has none
    /// (the task is rejected).
    pub fn for_method(method: Method) -> Option<Self> {
        match method {
            Method::Auto | Method::Container => Some(Self::Container),
            Method::InProcess | Method::Faas => None,
        }
    }

    /// The method it implements.
    pub fn method(self) -> Method {
        match self {
            Self::Container => Method::Container,
        }
    }
}

impl Engine {
    /// One attempt of `p` on its executor: its verdict (before output
    /// validation), the sandbox's outcome when it ran, and the timings.
    pub(crate) async fn attempt(
        &self,
        task: &TaskInstance,
        p: &Prepared,
        attempt: u32,
        cancel: &Cancellation,
    ) -> (Verdict, Option<RunOutcome>, PhaseTimings) {
        match p.executor {
            Executor::Container => self.container_attempt(task, p, attempt, cancel).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_has_its_executor_or_none() {
        for method in Method::ALL {
            let executor = Executor::for_method(method);
            match method {
                Method::Auto | Method::Container => {
                    assert_eq!(executor, Some(Executor::Container), "{method:?}");
                }
                Method::InProcess | Method::Faas => assert_eq!(executor, None, "{method:?}"),
            }
        }
        assert_eq!(Executor::Container.method(), Method::Container);
    }
}
