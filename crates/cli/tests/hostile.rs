//! The security suite against cold sandboxes: every hostile program runs as
//! a script in a sandbox built for it. The suite is `suites/hostile.rs`;
//! `hostile_warm.rs` runs the same suite against the fork server.

mod util;

/// Cold: a sandbox per run, script mode.
const WARM: bool = false;

include!("suites/hostile.rs");
