//! The `taskexec` binary: the CLI (`run`, `runtimes`, `bench`) and, when
//! started with the launcher argument, the sandbox launcher itself.

#![forbid(unsafe_code)]

mod bench;
mod run;
mod setup;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs untrusted code-based tasks in a Linux sandbox with enforced limits.
#[derive(Debug, Parser)]
#[command(name = "taskexec", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: setup::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one task now, in a sandbox, and print its result.
    Run(Box<run::RunArgs>),
    /// List the runtimes found on this host, with their versions.
    Runtimes(setup::RuntimesArgs),
    /// Measure sandboxed task latency against the bare interpreter start.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    // The launcher must take over before any thread exists.
    taskexec_sandbox::run_if_launcher();
    let cli = Cli::parse();
    setup::init_logging(&cli.global);
    let result = match cli.command {
        Command::Run(args) => run::main(&cli.global, *args),
        Command::Runtimes(args) => setup::runtimes(&cli.global, args),
        Command::Bench(args) => bench::main(&cli.global, args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("taskexec: {e:#}");
            ExitCode::from(2)
        }
    }
}
