//! `aclpub`: build, sign, publish, verify and show OS images and static repositories.
//!
//! A thin binary: `cli` declares the arguments, `commands` runs each one through the library
//! crates, and `main` maps the outcome to an exit code (`EXIT_REJECTED`, `EXIT_FAILED`).

// A command-line tool's results go to standard output.
#![allow(clippy::print_stdout)]

mod cli;
mod commands;

use clap::Parser as _;

/// Exit code when something was checked and rejected (bad signature, corrupt chunk, expired...).
const EXIT_REJECTED: u8 = 3;
/// Exit code for any other failure (I/O, bad arguments found after parsing).
const EXIT_FAILED: u8 = 1;

fn main() -> std::process::ExitCode {
    cliutil::default_sigpipe();
    let args = cli::Cli::parse();
    match commands::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aclpub: error: {}", cliutil::error_chain(&e));
            let rejected = e.downcast_ref::<repo::RepoError>().is_some_and(|r| r.is_rejection());
            std::process::ExitCode::from(if rejected { EXIT_REJECTED } else { EXIT_FAILED })
        }
    }
}
