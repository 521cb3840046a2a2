//! Choice of the execution method: which of the container sandbox, an
//! in-process interpreter or a FaaS backend runs a task, given what was
//! requested, the security level, the runtime and what this executor has
//! available. The container sandbox is always available and is the
//! fallback.

use crate::task::{Method, SecurityLevel};

/// Which optional execution methods this executor offers. The container
/// sandbox is always available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MethodAvailability {
    /// An in-process interpreter is available.
    pub in_process: bool,
    /// A FaaS backend is available.
    pub faas: bool,
}

impl MethodAvailability {
    /// Whether `method` can be used (`AUTO` is not a concrete method and is
    /// never "available").
    pub const fn offers(self, method: Method) -> bool {
        match method {
            Method::Auto => false,
            Method::Container => true,
            Method::InProcess => self.in_process,
            Method::Faas => self.faas,
        }
    }
}

/// Runtimes that may run in-process when `AUTO` is requested.
pub const IN_PROCESS_RUNTIMES: [&str; 2] = ["wasm", "javascript"];

/// Picks the concrete method for a task. `HIGH` security always gets
/// `CONTAINER`. An explicit request is honoured if available, else
/// `CONTAINER`. `AUTO` picks `IN_PROCESS` for the `wasm` and `javascript`
/// runtimes (case-insensitive) when available, else `CONTAINER`. The result
/// is never `AUTO`.
pub fn select_method(
    requested: Method,
    level: SecurityLevel,
    runtime: &str,
    avail: MethodAvailability,
) -> Method {
    if level == SecurityLevel::High {
        return Method::Container;
    }
    match requested {
        Method::Auto => {
            let in_process_runtime = IN_PROCESS_RUNTIMES
                .iter()
                .any(|r| r.eq_ignore_ascii_case(runtime));
            if in_process_runtime && avail.in_process {
                Method::InProcess
            } else {
                Method::Container
            }
        }
        explicit if avail.offers(explicit) => explicit,
        _ => Method::Container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_AVAIL: MethodAvailability = MethodAvailability {
        in_process: true,
        faas: true,
    };
    const NONE_AVAIL: MethodAvailability = MethodAvailability {
        in_process: false,
        faas: false,
    };

    #[test]
    fn high_security_always_gets_container() {
        for m in Method::ALL {
            for rt in ["wasm", "python"] {
                assert_eq!(
                    select_method(m, SecurityLevel::High, rt, ALL_AVAIL),
                    Method::Container,
                    "{m} {rt}"
                );
            }
        }
    }

    #[test]
    fn explicit_requests_honoured_when_available() {
        for level in [SecurityLevel::Low, SecurityLevel::Medium] {
            assert_eq!(
                select_method(Method::InProcess, level, "python", ALL_AVAIL),
                Method::InProcess
            );
            assert_eq!(
                select_method(Method::Faas, level, "python", ALL_AVAIL),
                Method::Faas
            );
            assert_eq!(
                select_method(Method::Container, level, "wasm", ALL_AVAIL),
                Method::Container
            );
            assert_eq!(
                select_method(Method::InProcess, level, "python", NONE_AVAIL),
                Method::Container
            );
            assert_eq!(
                select_method(Method::Faas, level, "python", NONE_AVAIL),
                Method::Container
            );
        }
    }

    #[test]
    fn auto_prefers_in_process_for_wasm_and_javascript() {
        let lvl = SecurityLevel::Medium;
        assert_eq!(
            select_method(Method::Auto, lvl, "wasm", ALL_AVAIL),
            Method::InProcess
        );
        assert_eq!(
            select_method(Method::Auto, lvl, "javascript", ALL_AVAIL),
            Method::InProcess
        );
        assert_eq!(
            select_method(Method::Auto, lvl, "JavaScript", ALL_AVAIL),
            Method::InProcess
        );
        assert_eq!(
            select_method(Method::Auto, lvl, "wasm", NONE_AVAIL),
            Method::Container
        );
        assert_eq!(
            select_method(Method::Auto, lvl, "python", ALL_AVAIL),
            Method::Container
        );
        assert_eq!(
            select_method(Method::Auto, lvl, "node", ALL_AVAIL),
            Method::Container
        );
        assert_eq!(
            select_method(
                Method::Auto,
                SecurityLevel::Low,
                "wasm",
                MethodAvailability {
                    in_process: true,
                    faas: false
                }
            ),
            Method::InProcess
        );
    }

    #[test]
    fn result_is_never_auto() {
        for m in Method::ALL {
            for level in [
                SecurityLevel::Low,
                SecurityLevel::Medium,
                SecurityLevel::High,
            ] {
                for avail in [ALL_AVAIL, NONE_AVAIL] {
                    assert_ne!(select_method(m, level, "wasm", avail), Method::Auto);
                }
            }
        }
    }
}
