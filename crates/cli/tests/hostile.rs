//! The security suite against cold sandboxes: every hostile program runs as
//! a script in a sandbox built for it. The suite is `suites/hostile.rs`;
//! `hostile_warm.rs` runs the same suite against the fork server.

mod util;

/// Cold: a sandbox per run, script mode.
const WARM: bool = false;

include!("suites/hostile.rs");

/// Node's `os.networkInterfaces()` reads the interfaces over a
/// NETLINK_ROUTE socket (libuv's `uv_interface_addresses`), which the
/// sandbox allows: in the task's network namespace only `lo` is there.
/// Cold only: fork servers run Python.
#[test]
fn node_network_interfaces_lists_only_loopback() {
    let code = "const fs = require('fs');\n\
                fs.writeFileSync(process.env.TASK_OUTPUT, \
                JSON.stringify(Object.keys(require('os').networkInterfaces())));\n";
    let r = util::run_code(
        code,
        "node",
        &["--max-retries", "0", "--timeout", "20s"],
        &[],
    );
    r.expect(0, "COMPLETED", None);
    assert_eq!(r.output(), &serde_json::json!(["lo"]), "{}", r.stdout);
}
