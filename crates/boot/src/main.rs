//! `acl-boot`: the boot path's initramfs tool (see the library docs). `select` (stage 1) and
//! `verify` (stage 2) print shell assignments describing a slot, for the dracut hook to open it;
//! `disk` resolves the disk the command line names; `trust-files` tells the dracut module what
//! to copy into the initramfs.
//!
//! Keys and threshold come from the agent's own configuration files (`[trust]`), which the
//! dracut module installs into the initramfs together with the keys they name: the boot path
//! asks for as many signatures as the agent does.

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use std::path::{Path, PathBuf};

/// The boot path's slot choice and checks.
#[derive(Debug, Parser)]
#[command(name = "acl-boot", version)]
enum Cli {
    /// Stage 1: choose a slot on `--disk`, spend a try, verify it, print `ACL_*` assignments.
    Select {
        /// The disk with the slots.
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
        #[command(flatten)]
        trust: Trust,
    },
    /// Stage 2: check that `--slot` is the slot the rule chose and verify its signed manifest;
    /// print `ACL_*` assignments from the manifest (nothing from the command line). Read-only.
    Verify {
        /// The disk with the slots.
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
        /// The slot stage 1 handed over (A or B).
        #[arg(long)]
        slot: slot::choice::Slot,
        #[command(flatten)]
        trust: Trust,
    },
    /// Print the device path of the disk a boot parameter (`acl.disk=`) names: a path as it
    /// is, or `PARTUUID=<uuid>` of any of its partitions (what `esp/grub.cfg` passes: the EFI
    /// system partition's), found by reading the GPTs of the kernel's whole disks. Fails while
    /// no disk holds it; the dracut hook then waits for its next pass.
    Disk {
        /// `/dev/...` or `PARTUUID=<uuid>`.
        spec: String,
    },
    /// Build time: list, as paths inside the image, the configuration files and key files
    /// of the image tree `--root` that the initramfs needs; fails when they cannot verify
    /// anything (no keys, fewer keys than the threshold, a file that does not parse).
    TrustFiles {
        /// The image tree.
        #[arg(long)]
        root: PathBuf,
    },
}

/// Where the trust rules come from.
#[derive(Debug, clap::Args)]
struct Trust {
    /// The root under which the agent's configuration files are read (`[trust]` keys and
    /// threshold); key paths are resolved under it too.
    #[arg(long, default_value = "/")]
    config_root: PathBuf,
    /// Use these key files or directories instead of the configuration's.
    #[arg(long = "keys")]
    keys: Vec<PathBuf>,
    /// Use this threshold instead of the configuration's.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threshold: Option<u16>,
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

/// `path` of the configuration, under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn policy(t: &Trust) -> Result<repo::TrustPolicy> {
    let loaded =
        config::load(&config::Sources::under(&t.config_root)).context("read the trust configuration")?;
    let settings = config::TrustSettings::from_loaded(&loaded)?;
    let keys: Vec<PathBuf> = if t.keys.is_empty() {
        settings.keys.iter().map(|k| under(&t.config_root, k)).collect()
    } else {
        t.keys.clone()
    };
    let threshold = t.threshold.map_or(settings.threshold.get(), usize::from);
    let trusted = signing::TrustedKeys::load(&keys).context("load the trusted keys")?;
    repo::TrustPolicy::new(trusted, threshold).map_err(anyhow::Error::msg)
}

// The selection and the file list are the program's output.
#[allow(clippy::print_stdout)]
fn run(cli: Cli) -> Result<()> {
    match cli {
        Cli::Select { disk, trust } => {
            let policy = policy(&trust)?;
            let s = boot::select(&disk, &policy)
                .with_context(|| format!("select a slot on {}", disk.display()))?;
            for (slot, why) in &s.skipped {
                eprintln!("acl-boot: slot {slot} given up: {why}");
            }
            eprintln!(
                "acl-boot: booting slot {} ({}), {}",
                s.slot,
                s.version,
                s.tries_left
                    .map_or("confirmed".to_owned(), |t| format!("on trial, {t} tries left after this one"))
            );
            print!("{}", s.to_env(&disk.to_string_lossy()));
        }
        Cli::Verify { disk, slot, trust } => {
            let policy = policy(&trust)?;
            let s = boot::verify_chosen(&disk, slot, &policy)
                .with_context(|| format!("verify slot {slot} on {}", disk.display()))?;
            eprintln!("acl-boot: slot {} ({}) verified for stage 2", s.slot, s.version);
            print!("{}", s.to_env(&disk.to_string_lossy()));
        }
        Cli::Disk { spec } => {
            let disk = slot::system::resolve_disk(&spec, Path::new("/sys"), Path::new("/dev"))
                .map_err(anyhow::Error::msg)?;
            println!("{}", disk.display());
        }
        Cli::TrustFiles { root } => {
            for f in trust_files(&root)? {
                println!("{}", f.display());
            }
        }
    }
    Ok(())
}

/// The configuration files and key files, as absolute paths inside the image rooted at `root`.
fn trust_files(root: &Path) -> Result<Vec<PathBuf>> {
    let loaded = config::load(&config::Sources::under(root)).context("read the image's configuration")?;
    let settings = config::TrustSettings::from_loaded(&loaded)?;
    let inside = |p: &Path| -> Result<PathBuf> {
        let rel =
            p.strip_prefix(root).with_context(|| format!("{} is outside {}", p.display(), root.display()))?;
        Ok(Path::new("/").join(rel))
    };
    let mut out = Vec::new();
    for f in &loaded.files {
        out.push(inside(f)?);
    }
    let mut key_files = Vec::new();
    for k in &settings.keys {
        let p = under(root, k);
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&p)
                .with_context(|| format!("trust.keys: {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "pub"))
                .collect();
            v.sort();
            key_files.extend(v);
        } else if p.is_file() {
            key_files.push(p);
        } else {
            bail!("trust.keys: {} ({}) does not exist in the image", k.display(), p.display());
        }
    }
    if key_files.is_empty() {
        bail!("trust.keys names no *.pub key file in the image ({:?})", settings.keys);
    }
    let keys = signing::TrustedKeys::load(&key_files).context("load the image's trusted keys")?;
    if keys.len() < settings.threshold.get() {
        bail!(
            "the image trusts {} key(s) but trust.threshold is {}: its boot path could verify nothing",
            keys.len(),
            settings.threshold
        );
    }
    for k in &key_files {
        out.push(inside(k)?);
    }
    Ok(out)
}
