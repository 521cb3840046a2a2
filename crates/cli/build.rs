//! `cfg(taskexec_skip_postgres)` when the tests are built with
//! `TASKEXEC_SKIP_POSTGRES=1`, so that the PostgreSQL suites' sentinel test
//! shows as ignored, with the reason, in the test summary.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=TASKEXEC_SKIP_POSTGRES");
    println!("cargo::rustc-check-cfg=cfg(taskexec_skip_postgres)");
    if std::env::var("TASKEXEC_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=taskexec_skip_postgres");
    }
}
