//! `aclctl boot-deadline`: the last resort when nothing confirms a new slot.
//!
//! The agent confirms or rejects a new slot after its health checks. A release whose agent
//! cannot run (its binary fails at once, or hangs before it is ready) would leave the node on
//! an unconfirmed slot for as long as nobody reboots it: the boot path's tries only count
//! boots. `acl-boot-deadline.service` runs this command on every boot, beside the agent and
//! without it: when the booted slot is still not confirmed `health.deadline` +
//! `health.fallback-grace` after the kernel started, it gives the slot up (the same
//! `mark_bad` transition the agent uses) and reboots into the other slot. It never gives up a
//! slot when the other one cannot boot: there is nowhere to go, and rebooting would only spend
//! tries. On a confirmed boot it exits at once.

use anyhow::{Context as _, Result};
use slot::Slots;
use slot::choice::{self, Slot, TransitionError};
use std::path::Path;
use std::time::Duration;

/// What to do now, from the slot bits and the time since the kernel started.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The booted slot is confirmed: nothing to watch.
    Confirmed,
    /// Not yet confirmed, the deadline not yet passed: look again after this long.
    Wait(Duration),
    /// The deadline passed: write these bits (the booted slot given up) and reboot.
    GiveUp(Slots),
    /// The deadline passed but the other slot cannot boot: stay.
    Stay(TransitionError),
}

/// How often the bits are read again while waiting (an agent that confirms the slot in the
/// meantime ends the wait).
const POLL: Duration = Duration::from_secs(10);

/// The decision, without I/O.
pub(crate) fn verdict(s: &Slots, booted: Slot, uptime: Duration, limit: Duration) -> Verdict {
    if s.get(booted).successful() {
        return Verdict::Confirmed;
    }
    if uptime < limit {
        return Verdict::Wait((limit - uptime).min(POLL));
    }
    match choice::mark_bad(s, booted) {
        Ok(after) => Verdict::GiveUp(after),
        Err(e) => Verdict::Stay(e),
    }
}

/// Watches the booted slot until it is confirmed or the deadline passes (see the module docs).
pub(crate) fn run(config_root: &Path, disk: Option<&Path>, booted: Option<Slot>) -> Result<()> {
    let settings = settings(config_root)?;
    let limit = settings.health_deadline + settings.fallback_grace;
    let cmdline = slot::system::kernel_cmdline();
    let path = match disk.map(Path::to_owned).or_else(|| settings.disk.clone()) {
        Some(p) => p,
        None => slot::system::system_disk(cmdline.as_deref()).map_err(anyhow::Error::msg)?,
    };
    let booted = match booted {
        Some(b) => b,
        None => {
            let d = slot::Disk::open(&path, false)?;
            slot::system::booted_slot(&d, cmdline.as_deref())
                .with_context(|| format!("cannot tell which slot of {} is running", path.display()))?
        }
    };
    let mut said = false;
    loop {
        let d = slot::Disk::open(&path, false)?;
        let v = verdict(&d.slots(), booted, uptime()?, limit);
        drop(d);
        match v {
            Verdict::Confirmed => {
                println!("boot-deadline: slot {booted} is confirmed; nothing to watch");
                return Ok(());
            }
            Verdict::Wait(d) => {
                if !said {
                    println!(
                        "boot-deadline: slot {booted} is not confirmed yet; it will be given up if it still is not {} s after boot",
                        limit.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(d);
            }
            Verdict::Stay(e) => {
                let msg = format!(
                    "slot {booted} was not confirmed within {} s of boot, but it stays: {e}",
                    limit.as_secs()
                );
                record(&settings.state_dir, &msg);
                anyhow::bail!(msg);
            }
            Verdict::GiveUp(_) => {
                // Decide again under the disk's lock, on the table as it is now: the agent may
                // have confirmed the slot since the read above.
                let mut d = match slot::Disk::open(&path, true) {
                    Ok(d) => d,
                    Err(e @ slot::DiskError::Busy { .. }) => {
                        println!("boot-deadline: {e}; trying again");
                        std::thread::sleep(POLL);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let after = d.update(|s| match verdict(s, booted, Duration::MAX, limit) {
                    Verdict::GiveUp(after) => Ok(after),
                    Verdict::Stay(e) => Err(e),
                    Verdict::Confirmed | Verdict::Wait(_) => Ok(*s),
                })?;
                drop(d);
                if after.get(booted).successful() {
                    println!("boot-deadline: slot {booted} was confirmed at the last moment");
                    return Ok(());
                }
                let msg = format!(
                    "slot {booted} was not confirmed within {} s of boot (no health verdict): given up; slot {} boots next; rebooting",
                    limit.as_secs(),
                    booted.other()
                );
                println!("boot-deadline: {msg}");
                record(&settings.state_dir, &msg);
                return reboot(&settings.reboot_command);
            }
        }
    }
}

/// The agent's configuration, validated as the agent validates it but without needing a
/// repository (only the agent updates; this command reads the deadline, the disk, the state
/// directory and the reboot command). When the configuration cannot be used at all, the
/// defaults: a release whose configuration is broken must be given up too, not kept.
fn settings(root: &Path) -> Result<config::Settings> {
    let offline = |mut l: config::Loaded| {
        l.config.updates.mode = "off".into();
        config::Settings::from_loaded(&l)
    };
    match config::load(&config::Sources::under(root)).and_then(offline) {
        Ok(s) => Ok(s),
        Err(e) => {
            eprintln!("boot-deadline: the configuration cannot be used ({e}); using the defaults");
            // No files under a directory that does not exist: every key has its default.
            let none = root.join("nonexistent-acl-boot-deadline-defaults");
            Ok(offline(config::load(&config::Sources::under(&none))?)?)
        }
    }
}

/// Adds the event to the agent's history, so `aclctl history` tells it after the reboot.
fn record(state_dir: &Path, message: &str) {
    let entry = localapi::history::Entry {
        time: jiff::Timestamp::now(),
        phase: "boot-deadline".into(),
        message: message.into(),
    };
    use std::os::unix::fs::DirBuilderExt as _;
    // The agent that would have made the state directory may never have run.
    let made = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir);
    if let Err(e) = made.and_then(|()| localapi::history::append(state_dir, &entry)) {
        eprintln!("boot-deadline: could not record it in {}: {e}", state_dir.display());
    }
}

fn reboot(command: &[String]) -> Result<()> {
    let (cmd, args) = command.split_first().context("no reboot command ([agent] reboot-command)")?;
    let status = std::process::Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("reboot: {}", command.join(" ")))?;
    anyhow::ensure!(status.success(), "reboot: {}: {status}", command.join(" "));
    Ok(())
}

/// Time since the kernel started (CLOCK_BOOTTIME, as /proc/uptime gives it).
fn uptime() -> Result<Duration> {
    let text = std::fs::read_to_string("/proc/uptime").context("read /proc/uptime")?;
    let secs: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .context("/proc/uptime does not start with a number")?;
    Ok(Duration::from_secs_f64(secs.max(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use slot::GptPrio;

    fn slots(a: GptPrio, b: GptPrio) -> Slots {
        Slots { a, b }
    }
    fn bits(priority: u8, tries: u8, successful: bool) -> GptPrio {
        GptPrio::from_parts(priority, tries, successful).expect("valid nibbles")
    }
    const LIMIT: Duration = Duration::from_secs(300);

    #[test]
    fn a_confirmed_boot_ends_the_watch_whatever_the_time() {
        let s = slots(bits(2, 0, true), bits(1, 0, true));
        for t in [0, 299, 300, 10_000] {
            assert_eq!(verdict(&s, Slot::A, Duration::from_secs(t), LIMIT), Verdict::Confirmed);
        }
    }

    #[test]
    fn an_unconfirmed_boot_waits_then_is_given_up_for_a_good_fallback() {
        let s = slots(bits(2, 1, false), bits(1, 0, true));
        assert_eq!(verdict(&s, Slot::A, Duration::from_secs(0), LIMIT), Verdict::Wait(POLL));
        assert_eq!(
            verdict(&s, Slot::A, Duration::from_secs(295), LIMIT),
            Verdict::Wait(Duration::from_secs(5))
        );
        let Verdict::GiveUp(after) = verdict(&s, Slot::A, LIMIT, LIMIT) else { panic!("not given up") };
        assert!(!after.a.bootable());
        assert_eq!(choice::choose(&after), Some(Slot::B));
    }

    #[test]
    fn without_a_bootable_fallback_the_slot_stays() {
        let s = slots(bits(2, 1, false), GptPrio::default());
        assert!(matches!(verdict(&s, Slot::A, LIMIT, LIMIT), Verdict::Stay(_)));
    }
}
