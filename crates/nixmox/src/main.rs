//! The `nixmox` command: parses arguments, runs one command, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use nixmox::{cli, commands, error, output};

/// Rust's allocations go to mimalloc: a large project allocates hundreds of thousands of small
/// strings and nodes, where glibc's malloc and free cost a quarter of `validate`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A shell asking for completions (`COMPLETE=bash nixmox -- nixmox up …`, set by the script
    // `nixmox completion SHELL` prints) is answered here, and the process exits.
    clap_complete::CompleteEnv::with_factory(<cli::Cli as clap::CommandFactory>::command)
        .var(nixmox::complete::COMPLETE_VAR)
        .complete();
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // clap prints help/version to stdout with exit 0 and usage errors to stderr with 2.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match commands::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(
                e,
                error::Error::Reported { .. } | error::Error::BrokenPipe | error::Error::Changes
            ) {
                output::error_line(&e.to_string());
            }
            ExitCode::from(e.exit_code())
        }
    }
}
