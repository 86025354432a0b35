//! `acl-boot`: the first-stage initramfs's slot selector (see the library docs). Prints shell
//! assignments describing the chosen slot, for the dracut hook to open it and kexec its kernel.

use anyhow::{Context as _, Result};
use clap::Parser;
use std::path::PathBuf;

/// Choose the slot to boot, spend a try, verify its signed manifest, print how to open it.
#[derive(Debug, Parser)]
#[command(name = "acl-boot", version)]
enum Cli {
    /// Select a slot on `--disk` and print `ACL_*` shell assignments.
    Select {
        /// The disk with the slots.
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
        /// Trusted public key files or directories (built into the initramfs).
        #[arg(long = "keys", default_value = "/etc/acl-update/keys")]
        keys: Vec<PathBuf>,
        /// How many distinct trusted keys must have signed the manifest.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
    },
}

fn main() -> std::process::ExitCode {
    cliutil::default_sigpipe();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("acl-boot: error: {}", cliutil::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

// The selection is the program's output.
#[allow(clippy::print_stdout)]
fn run(cli: Cli) -> Result<()> {
    let Cli::Select { disk, keys, threshold } = cli;
    let trusted = signing::TrustedKeys::load(&keys).context("load the trusted keys")?;
    let policy = repo::TrustPolicy::new(trusted, threshold).map_err(anyhow::Error::msg)?;
    let s = boot::select(&disk, &policy).with_context(|| format!("select a slot on {}", disk.display()))?;
    for (slot, why) in &s.skipped {
        eprintln!("acl-boot: slot {slot} given up: {why}");
    }
    eprintln!(
        "acl-boot: booting slot {} ({}), {}",
        s.slot,
        s.version,
        s.tries_left.map_or("confirmed".to_owned(), |t| format!("on trial, {t} tries left after this one"))
    );
    print!("{}", s.to_env(&disk.to_string_lossy()));
    Ok(())
}
