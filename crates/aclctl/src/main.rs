//! `aclctl`: the node's local command line.
//!
//! It talks to the running agent over its root-only Unix socket (`update`, `rollback`,
//! `pause`, `resume`, `check`, and the agent part of `status`), and works on a disk directly
//! where no agent runs (`--disk`, a block device or an image file, or the running system's
//! disk found from the kernel command line): `status`, `update --repo`, `rollback`,
//! `mark-good`, `boot`.

// A command-line tool's results go to standard output.
#![allow(clippy::print_stdout)]

mod deadline;
mod first_stage;
mod follow;
mod status;
mod update;

use anyhow::{Context as _, Result};
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use slot::choice::{self, Slot};
use slot::{Disk, DiskError, system};
use std::path::PathBuf;

/// Exit code when the disk's state does not allow the request (e.g. nothing to roll back to).
const EXIT_REFUSED: u8 = 3;

/// Inspect and steer the A/B slots of this node.
#[derive(Debug, Parser)]
#[command(
    name = "aclctl",
    version,
    after_help = "\
One writer per disk: the commands that change a disk (rollback, mark-good, boot, update --repo,
provision) hold its lock while they work. Another acl-update process holding it (the agent
installing, another aclctl) makes them fail at once, naming its pid and command, without changing
anything. A lock held by another program is waited for, with a word after 2 s: up to 180 s while
only shared locks are held (udev probing the disk and its partitions after every write; 180 s is
udev's own event timeout), up to 10 s for an exclusive one (a partitioning tool, udevadm lock).
status and history never wait.

Exit codes: 0 success; 1 failure (the message says what the disk holds afterwards); 2 usage
error; 3 refused, nothing changed (the slots' state, the partition table's layout, another writer
holding the disk, or the repository's signatures do not allow it)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show both slots: partition, bits, which is booted and which boots next, and the running
    /// agent's state when one answers.
    Status {
        #[command(flatten)]
        target: Target,
        /// The agent's socket.
        #[arg(long, default_value = "/run/acl-update/agent.sock")]
        socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Install the newest (or a given) release into the slot not booted: by the running agent
    /// (from its configured repository), or with --repo directly on a disk where no agent runs.
    Update {
        #[command(flatten)]
        target: Target,
        /// Repository URL: http://host/path, file:///path, or a directory. Without it, the
        /// running agent does the update.
        #[arg(long)]
        repo: Option<String>,
        /// The agent's socket.
        #[arg(long, default_value = "/run/acl-update/agent.sock")]
        socket: PathBuf,
        /// Stay and show the agent's progress until the release is staged.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        source: Source,
        /// Install exactly this version (the only way to go to an older one).
        #[arg(long)]
        version: Option<semver::Version>,
        /// Boot attempts the new slot gets before the boot path falls back (1-15).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=15))]
        tries: u8,
        /// Range requests in flight at once (1-64).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
        parallel: usize,
        /// A PEM file of CA certificates to trust for an https:// repository, besides the
        /// system's.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a release into a slot of a fresh disk (factory or installer): the slot boots next,
    /// on trial like any new slot, and is confirmed by the agent's health checks after its first
    /// boot. Refused on a disk that already has a confirmed slot.
    Provision {
        /// The disk: a block device or a disk-image file.
        #[arg(long)]
        disk: PathBuf,
        /// The slot to write.
        #[arg(long, default_value = "A")]
        slot: Slot,
        /// Repository URL: http://host/path, file:///path, or a directory.
        #[arg(long)]
        repo: String,
        #[command(flatten)]
        source: Source,
        /// This version (default: the newest).
        #[arg(long)]
        version: Option<semver::Version>,
        /// Boot attempts before the boot path gives the slot up (1-15).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=15))]
        tries: u8,
        /// Where to keep the install journal while writing.
        #[arg(long, default_value = "/var/lib/acl-update")]
        state_dir: PathBuf,
    },
    /// Print the agent's merged configuration (or, with --defaults, every key and its default).
    Config {
        /// Print the documented defaults instead (what /usr/lib/acl-update/config.d ships).
        #[arg(long)]
        defaults: bool,
        /// Look for the configuration files under this directory instead of /.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Do what the boot path does at power-on: choose the slot by the gptprio rule and spend
    /// one try if it is not yet confirmed (for disk images and tests; the first-stage
    /// initramfs runs the same function on real machines).
    Boot {
        /// The disk: a block device or a disk-image file.
        #[arg(long)]
        disk: PathBuf,
    },
    /// What the agent did and why, newest last (read from the state directory; works without a
    /// running agent).
    History {
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/acl-update")]
        state_dir: PathBuf,
        /// How many entries.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent to stop all update activity until `aclctl resume`.
    Pause(AgentArgs),
    /// Ask the running agent to resume update activity.
    Resume(AgentArgs),
    /// Ask the running agent to check the repository now.
    Check(AgentArgs),
    /// Make the other slot boot next, if it holds an image that was confirmed good (through
    /// the agent when one runs).
    Rollback {
        #[command(flatten)]
        target: Target,
        /// Reboot into it now (the running system only).
        #[arg(long)]
        now: bool,
        /// The agent's socket.
        #[arg(long, default_value = "/run/acl-update/agent.sock")]
        socket: PathBuf,
        /// Print the resulting status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give up the booted slot if nothing confirms it in time: waits until it is confirmed
    /// (exits 0) or until health.deadline + health.fallback-grace after the kernel started, then
    /// marks it bad and reboots into the other slot, when that one can boot. Run by
    /// acl-boot-deadline.service on every boot, independently of the agent.
    BootDeadline {
        /// The disk (default: the agent configuration's disk setting, else the running system's disk).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// The booted slot (default: from the kernel command line).
        #[arg(long)]
        booted: Option<Slot>,
        /// Look for the agent's configuration under this directory instead of /.
        #[arg(long, default_value = "/")]
        config_root: PathBuf,
    },
    /// The first stage on the EFI system partition (Secure Boot machines: shim, GRUB, then a
    /// signed kernel and the initramfs that chooses the slot): show its two sets, or replace it
    /// crash-safely (written beside the set GRUB starts, then switched to).
    #[command(subcommand)]
    FirstStage(FirstStage),
    /// Confirm the booted slot as good (what the agent does after its health checks pass).
    MarkGood {
        #[command(flatten)]
        target: Target,
        /// Print the resulting status as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `aclctl first-stage ...`.
#[derive(Debug, Subcommand)]
enum FirstStage {
    /// Both sets, GRUB's environment block, and the set GRUB starts.
    Status {
        /// The disk: a block device or a disk-image file (default: the running system's disk).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Whether the machine enforces Secure Boot (it decides whether GRUB can start a set
        /// whose kernel is unsigned); default: what this machine's firmware says.
        #[arg(long, value_parser = on_off)]
        secure_boot: Option<bool>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a kernel and initramfs as a new set beside the one GRUB starts, read it back, then
    /// switch GRUB to it (the old set stays as the fallback). A power cut at any point leaves
    /// a partition GRUB starts.
    Install {
        /// The disk: a block device or a disk-image file (default: the running system's disk).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// The kernel (signed, for Secure Boot), e.g. /boot/vmlinuz of the booted slot.
        #[arg(long)]
        kernel: PathBuf,
        /// The initramfs with the boot path's module (dracut/90acl), e.g. /boot/initrd.img.
        #[arg(long)]
        initrd: PathBuf,
        /// Whether the machine enforces Secure Boot (it decides which set GRUB starts now, and
        /// so which one may be written); default: what this machine's firmware says. Give it
        /// for the disk image of another machine.
        #[arg(long, value_parser = on_off)]
        secure_boot: Option<bool>,
        /// Write a kernel that carries no signature (machines without Secure Boot, or tests).
        #[arg(long)]
        allow_unsigned: bool,
    },
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// Where releases come from and who must have signed them (`update --repo`, `provision`).
#[derive(Debug, Args)]
struct Source {
    /// Channel to take the release from.
    #[arg(long, default_value = "stable")]
    channel: String,
    /// Trusted public key file or directory of *.pub files; repeatable (required with a
    /// repository).
    #[arg(long = "trust")]
    trust: Vec<PathBuf>,
    /// How many distinct trusted keys must have signed each document (at least 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    threshold: usize,
}

impl Source {
    fn args(self, repo: String, version: Option<semver::Version>, tries: u8) -> Result<update::UpdateArgs> {
        if self.trust.is_empty() {
            anyhow::bail!("a repository needs at least one --trust key file or directory");
        }
        Ok(update::UpdateArgs {
            repo,
            channel: self.channel,
            trust: self.trust,
            threshold: self.threshold,
            version,
            tries,
            parallel: 4,
            ca_file: None,
            provision: false,
        })
    }
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// The agent's socket.
    #[arg(long, default_value = "/run/acl-update/agent.sock")]
    socket: PathBuf,
    /// Print the agent's state as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct Target {
    /// The disk: a block device or a disk-image file (default: the running system's disk).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Treat this slot as the booted one (A or B); default: from the kernel command line.
    #[arg(long)]
    booted: Option<Slot>,
    /// The agent's state directory (install journal, what each slot holds).
    #[arg(long, default_value = "/var/lib/acl-update")]
    state_dir: PathBuf,
}

fn main() -> std::process::ExitCode {
    cliutil::default_sigpipe();
    cliutil::fix_malloc_threshold();
    slot::lock::set_wait_notice(|m| eprintln!("aclctl: {m}"));
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aclctl: error: {}", cliutil::error_chain(&e));
            std::process::ExitCode::from(if refused(&e) { EXIT_REFUSED } else { 1 })
        }
    }
}

/// Whether `e` is a refusal (exit code 3): the slots' state, the table's layout, another writer
/// holding the disk or the repository's signatures do not allow the request; nothing was
/// changed.
fn refused(e: &anyhow::Error) -> bool {
    let disk_refused = |d: &DiskError| {
        matches!(d, DiskError::Transition { .. } | DiskError::Layout { .. } | DiskError::Busy { .. })
    };
    e.chain().any(|c| {
        c.downcast_ref::<DiskError>().is_some_and(disk_refused)
            || matches!(c.downcast_ref::<install::InstallError>(), Some(install::InstallError::Disk(d)) if disk_refused(d))
            // A payload that does not match its signed manifest is refused like a bad signature.
            || matches!(c.downcast_ref::<install::InstallError>(), Some(install::InstallError::BadChunk { .. }))
            || c.downcast_ref::<repo::TrustError>().is_some()
            || c.downcast_ref::<first_stage::Refused>().is_some()
            || matches!(c.downcast_ref::<esp::Error>(), Some(esp::Error::NoSpace { .. }))
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Status { target, json, socket } => {
            let (disk, booted) = open(&target, false)?;
            status::print(&status::Status::of(&disk, booted, &target.state_dir).with_agent(&socket), json)
        }
        Command::Update { target, repo: None, socket, follow, version, json, .. } => {
            let _ = target;
            follow::update(&socket, version, follow, json)
        }
        Command::Update {
            target,
            repo: Some(repo),
            socket,
            follow: _,
            source,
            version,
            tries,
            parallel,
            ca_file,
            json,
        } => {
            let args = update::UpdateArgs { parallel, ca_file, ..source.args(repo, version, tries)? };
            if follow::try_call(&socket, localapi::Request::Status)?.is_some() {
                anyhow::bail!(
                    "an agent runs on this node ({}): run `aclctl update` without --repo to have it \
                     update, or stop it first; two writers must not share a slot",
                    socket.display()
                );
            }
            let (disk, booted) = open(&target, true)?;
            let current = booted
                .slot()
                .or_else(|| choice::choose(&disk.slots()))
                .context("no slot is bootable on this disk")?;
            let path = disk.path().to_owned();
            drop(disk);
            update::run(&path, current, &target.state_dir, &args, json)?;
            let (disk, booted) = open(&target, false)?;
            if json {
                return Ok(());
            }
            status::print(&status::Status::of(&disk, booted, &target.state_dir), false)
        }
        Command::Provision { disk, slot, repo, source, version, tries, state_dir } => {
            let args = update::UpdateArgs { provision: true, ..source.args(repo, version, tries)? };
            let d = Disk::open(&disk, false)?;
            let s = d.slots();
            if s.a.successful() || s.b.successful() {
                anyhow::bail!(
                    "{} already has a confirmed slot (A[{}] B[{}]): provisioning is for fresh disks; use `aclctl update`",
                    disk.display(),
                    s.a,
                    s.b
                );
            }
            drop(d);
            update::run(&disk, slot.other(), &state_dir, &args, false)?;
            let (d, _) =
                open(&Target { disk: Some(disk), booted: None, state_dir: state_dir.clone() }, false)?;
            status::print(&status::Status::of(&d, status::Booted::Unknown, &state_dir), false)
        }
        Command::Config { defaults, root } => print_config(defaults, &root),
        Command::Boot { disk } => {
            let mut d = Disk::open(&disk, true)?;
            let chosen = choice::boot_attempt(&d.slots())
                .map(|(s, _)| s)
                .context("no slot is bootable: this disk would not boot")?;
            let after = d.update(|s| Ok(choice::boot_attempt(s).expect("checked above").1))?;
            println!("boot: slot {chosen} ({})", after.get(chosen));
            Ok(())
        }
        Command::History { state_dir, lines, json } => {
            let entries = localapi::history::read(&state_dir, lines);
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("no history in {}", state_dir.display());
            } else {
                for e in entries {
                    println!("{}  {:<11} {}", e.time, e.phase, e.message);
                }
            }
            Ok(())
        }
        Command::Pause(a) => ask_agent(&a, localapi::Request::Pause),
        Command::Resume(a) => ask_agent(&a, localapi::Request::Resume),
        Command::Check(a) => ask_agent(&a, localapi::Request::CheckNow),
        Command::Rollback { target, now, socket, json } => rollback(&target, now, &socket, json),
        Command::BootDeadline { disk, booted, config_root } => {
            deadline::run(&config_root, disk.as_deref(), booted)
        }
        Command::MarkGood { target, json } => change(&target, json, "mark-good", choice::mark_good),
        Command::FirstStage(FirstStage::Status { disk, secure_boot, json }) => {
            first_stage::status(disk.as_deref(), secure_boot, json)
        }
        Command::FirstStage(FirstStage::Install { disk, kernel, initrd, secure_boot, allow_unsigned }) => {
            first_stage::install(disk.as_deref(), &kernel, &initrd, secure_boot, allow_unsigned)
        }
    }
}

/// `aclctl rollback`: through the agent when one answers (after checking on the disk that
/// there is a good slot to go back to), else on the disk directly.
fn rollback(target: &Target, now: bool, socket: &std::path::Path, json: bool) -> Result<()> {
    if follow::try_call(socket, localapi::Request::Status)?.is_some() {
        let (disk, booted) = open(target, false)?;
        let current = booted.slot().context("cannot tell which slot runs (give --booted)")?;
        choice::rollback(&disk.slots(), current)
            .map_err(|source| DiskError::Transition { path: disk.path().to_owned(), source })?;
        drop(disk);
        let a = AgentArgs { socket: socket.to_owned(), json };
        return ask_agent(&a, localapi::Request::Rollback { now });
    }
    if now && target.disk.is_some() {
        anyhow::bail!("--now reboots this machine: it needs the running system's disk, not --disk");
    }
    change(target, json, "rollback", choice::rollback)?;
    if now {
        let status =
            std::process::Command::new("systemctl").arg("reboot").status().context("systemctl reboot")?;
        anyhow::ensure!(status.success(), "systemctl reboot: {status}");
    }
    Ok(())
}

/// Sends one request to the running agent and prints its state afterwards.
fn ask_agent(a: &AgentArgs, request: localapi::Request) -> Result<()> {
    let answer = follow::call(&a.socket, request)?;
    let state = answer.state.context("the agent sent no state")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        let phase = serde_json::to_value(&state.phase)?;
        println!(
            "agent: {}{}",
            phase["phase"].as_str().unwrap_or("?"),
            if state.paused { " (paused)" } else { "" }
        );
        if !state.note.is_empty() {
            println!("  {}", state.note);
        }
        for f in &state.failures {
            println!("  {} failed {} time(s): {}", f.version, f.count, f.reason);
        }
    }
    Ok(())
}

/// `aclctl config`: the merged files, validated, as TOML with where each key came from.
fn print_config(defaults: bool, root: &std::path::Path) -> Result<()> {
    if defaults {
        print!("{}", config::DEFAULT_TOML);
        return Ok(());
    }
    let loaded = config::load(&config::Sources::under(root))?;
    config::Settings::from_loaded(&loaded)?;
    println!("# merged from, in order (later files win):");
    for f in &loaded.files {
        println!("#   {}", f.display());
    }
    if loaded.files.is_empty() {
        println!("#   (no files: every key has its default)");
    }
    let text = toml::to_string_pretty(&loaded.config).context("print configuration")?;
    // Annotate each `key = value` with where it was set; an array of tables (`[[reboot.windows]]`)
    // is set as a whole, so its header carries the annotation.
    let mut section = String::new();
    let mut in_array = false;
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
            in_array = true;
            println!("{line:<60} # {}", loaded.origin(s));
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_owned();
            in_array = false;
        }
        match line.split_once(" = ") {
            Some((key, _)) if !section.is_empty() && !in_array => {
                println!("{line:<60} # {}", loaded.origin(&format!("{section}.{}", key.trim())));
            }
            _ => println!("{line}"),
        }
    }
    Ok(())
}

/// Opens the disk and works out the booted slot (`None` when the disk is not the running
/// system's and `--booted` was not given).
fn open(target: &Target, writable: bool) -> Result<(Disk<std::fs::File>, status::Booted)> {
    let cmdline = system::kernel_cmdline();
    let path = match &target.disk {
        Some(p) => p.clone(),
        None => {
            system::system_disk(cmdline.as_deref()).map_err(anyhow::Error::msg).context("no --disk given")?
        }
    };
    let disk = Disk::open(&path, writable)?;
    let booted = match target.booted {
        Some(s) => status::Booted::Given(s),
        None => system::booted_slot(&disk, cmdline.as_deref())
            .map_or(status::Booted::Unknown, status::Booted::Cmdline),
    };
    Ok((disk, booted))
}

fn change(
    target: &Target,
    json: bool,
    what: &str,
    f: impl FnOnce(&slot::Slots, Slot) -> Result<slot::Slots, choice::TransitionError>,
) -> Result<()> {
    let (mut disk, booted) = open(target, true)?;
    // On a disk that is not running, the slot that would boot now stands for the booted one.
    let current = booted
        .slot()
        .or_else(|| choice::choose(&disk.slots()))
        .context("no slot is bootable on this disk")?;
    let repaired = !disk.health().is_clean();
    let before = choice::choose(&disk.slots());
    disk.update(|s| f(s, current))?;
    let after = choice::choose(&disk.slots());
    if !json {
        if repaired {
            println!("repaired a damaged copy of the partition table");
        }
        let show = |s: Option<Slot>| s.map_or("none".to_owned(), |s| s.to_string());
        println!("{what}: slot {} boots next (was {})", show(after), show(before));
    }
    status::print(&status::Status::of(&disk, booted, &target.state_dir), json)
}
