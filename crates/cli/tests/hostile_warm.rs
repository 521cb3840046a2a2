//! The security suite against warm mode: every hostile program runs as a
//! handler module (`--warm --mode handler`) in a child forked from a
//! pre-started Python interpreter, which enters the task's own isolation
//! before it imports the task. The suite is `suites/hostile.rs`, shared
//! with the cold `hostile.rs`: the isolation must be the same.

mod util;

/// Warm: a fork-server child, handler mode.
const WARM: bool = true;

include!("suites/hostile.rs");
