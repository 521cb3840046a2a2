//! A standalone launcher binary, for the sandbox crate's own tests and for
//! hosts that prefer a small launcher over re-executing `taskexec`.

fn main() {
    taskexec_sandbox::run_if_launcher();
    eprintln!("taskexec-launcher is started by the taskexec executor, not by hand");
    std::process::exit(2);
}
