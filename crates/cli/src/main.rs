//! The `taskexec` binary: the CLI (`run`, `runtimes`, `bench`) and, when
//! started with the launcher argument, the sandbox launcher itself.

#![forbid(unsafe_code)]

/// `println!` for a command's output: a reader that went away (`taskexec
/// list | head`) ends the output quietly instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::run::print_out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` likewise.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::run::print_out(&format!($($arg)*))
    };
}

mod bench;
mod client;
mod config;
mod run;
mod serve;
mod setup;
mod table;

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
    /// The benchmark report: task latency and throughput, cold and warm,
    /// engine and service, each beside the bare interpreter.
    Bench(bench::BenchArgs),
    /// Serve the HTTP API with an embedded store and local workers.
    Serve(Box<config::ServeFlags>),
    /// Execute tasks from a shared database, without an HTTP API.
    // `serve`'s settings less the HTTP ones, which a worker hides and
    // refuses (`config::Scope::Http`).
    Worker(Box<config::WorkerFlags>),
    /// Submit a task to a server.
    Submit(Box<client::SubmitArgs>),
    /// Show a task's status and result.
    Status(client::IdArgs),
    /// Print a task's stdout and stderr.
    Logs(client::LogsArgs),
    /// Cancel a task.
    Cancel(client::IdArgs),
    /// List tasks.
    List(client::ListArgs),
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
        Command::Serve(args) => serve::main(&cli.global, args.0, true),
        Command::Worker(args) => serve::main(&cli.global, args.0, false),
        Command::Submit(args) => client::submit(&cli.global, *args),
        Command::Status(args) => client::status(args),
        Command::Logs(args) => client::logs(args),
        Command::Cancel(args) => client::cancel(args),
        Command::List(args) => client::list(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("taskexec: {e:#}");
            ExitCode::from(2)
        }
    }
}
