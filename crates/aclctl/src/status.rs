//! `aclctl status`: what the slots are, as a table for people and JSON for programs.

use anyhow::Result;
use serde::Serialize;
use slot::Disk;
use slot::choice::{self, Slot};

/// Where the booted slot came from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Booted {
    /// The kernel command line names a slot partition of this disk.
    Cmdline(Slot),
    /// `--booted`.
    Given(Slot),
    /// Not the running system's disk.
    Unknown,
}

impl Booted {
    pub(crate) fn slot(self) -> Option<Slot> {
        match self {
            Booted::Cmdline(s) | Booted::Given(s) => Some(s),
            Booted::Unknown => None,
        }
    }
}

/// The status of a disk (also the `--json` shape; documented in the README).
#[derive(Debug, Serialize)]
pub(crate) struct Status {
    disk: String,
    sector_size: u64,
    table: TableStatus,
    booted: Option<Slot>,
    booted_source: &'static str,
    next_boot: Option<Slot>,
    slots: Vec<SlotStatus>,
    /// The running agent's state, when one answers on its socket.
    agent: Option<localapi::State>,
}

#[derive(Debug, Serialize)]
struct TableStatus {
    primary_ok: bool,
    backup_ok: bool,
    /// Whether partitions and table copies lie apart and on the disk; when not, every change
    /// is refused and `problem` says why.
    layout_ok: bool,
    problem: Option<String>,
}

#[derive(Debug, Serialize)]
struct SlotStatus {
    slot: Slot,
    partition: u32,
    label: String,
    partuuid: String,
    /// The version the installer recorded for this slot, if any.
    version: Option<String>,
    priority: u8,
    tries: u8,
    successful: bool,
    bootable: bool,
    role: String,
}

impl Status {
    pub(crate) fn of<D: slot::table::BlockDevice>(
        disk: &Disk<D>,
        booted: Booted,
        state_dir: &std::path::Path,
    ) -> Self {
        let slots = disk.slots();
        let next = choice::choose(&slots);
        let health = disk.health();
        let layout = disk.check_layout().err();
        let slot_status = |s: Slot| {
            let p = disk.partition(s);
            let bits = slots.get(s);
            let mut role = Vec::new();
            if booted.slot() == Some(s) {
                role.push("booted".to_owned());
            }
            if next == Some(s) {
                role.push(if bits.successful() {
                    "boots next".to_owned()
                } else {
                    format!("boots next, on trial ({} tries left)", bits.tries())
                });
            } else if bits.bootable() {
                role.push("fallback".to_owned());
            } else {
                role.push("unbootable".to_owned());
            }
            SlotStatus {
                slot: s,
                partition: p.number,
                label: p.name.clone(),
                partuuid: p.unique_guid.to_string(),
                version: install::recorded_manifest(state_dir, s).map(|(m, _)| m.version.to_string()),
                priority: bits.priority(),
                tries: bits.tries(),
                successful: bits.successful(),
                bootable: bits.bootable(),
                role: role.join(", "),
            }
        };
        Status {
            disk: disk.path().display().to_string(),
            sector_size: disk.sector_size(),
            table: TableStatus {
                primary_ok: health.primary_error.is_none(),
                backup_ok: health.backup_error.is_none(),
                layout_ok: layout.is_none(),
                problem: layout
                    .map(|e| format!("unsafe layout: {e}"))
                    .or_else(|| health.primary_error.clone())
                    .or_else(|| health.backup_error.clone()),
            },
            booted: booted.slot(),
            booted_source: match booted {
                Booted::Cmdline(_) => "kernel command line",
                Booted::Given(_) => "--booted",
                Booted::Unknown => "unknown (not the running system's disk)",
            },
            next_boot: next,
            slots: Slot::BOTH.into_iter().map(slot_status).collect(),
            agent: None,
        }
    }
}

impl Status {
    /// Adds the running agent's state, if an agent answers on `socket` (silently nothing
    /// otherwise: status works without an agent).
    pub(crate) fn with_agent(mut self, socket: &std::path::Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        self.agent = rt
            .ok()
            .and_then(|rt| {
                let call = localapi::call(socket, localapi::Request::Status);
                rt.block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(2), call).await.ok()?.ok()
                })
            })
            .and_then(|a| a.state);
        self
    }
}

pub(crate) fn print(s: &Status, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let table = match &s.table.problem {
        None => "both copies valid".to_owned(),
        Some(p) if !s.table.layout_ok => {
            format!("UNSAFE ({p}); every change is refused until the table is fixed, e.g. with sgdisk")
        }
        Some(p) => format!("NEEDS REPAIR ({p}); any change repairs it"),
    };
    println!("disk       {} (GPT, {}-byte sectors, {table})", s.disk, s.sector_size);
    let show = |x: Option<Slot>| x.map_or("-".to_owned(), |x| x.to_string());
    println!("booted     {} ({})", show(s.booted), s.booted_source);
    println!("next boot  {}", s.next_boot.map_or("NONE: no slot is bootable".to_owned(), |x| x.to_string()));
    if let Some(a) = &s.agent {
        let phase = serde_json::to_value(&a.phase)?;
        let paused = if a.paused { ", paused" } else { "" };
        println!("agent      {}{paused}: {}", phase["phase"].as_str().unwrap_or("?"), a.note);
    }
    println!();
    println!(
        "{:<5} {:<5} {:<6} {:<37} {:<8} {:>8} {:>5} {:>10}  state",
        "slot", "part", "label", "partuuid", "version", "priority", "tries", "successful"
    );
    for x in &s.slots {
        println!(
            "{:<5} {:<5} {:<6} {:<37} {:<8} {:>8} {:>5} {:>10}  {}",
            x.slot.to_string(),
            x.partition,
            x.label,
            x.partuuid,
            x.version.as_deref().unwrap_or("-"),
            x.priority,
            x.tries,
            if x.successful { "yes" } else { "no" },
            x.role
        );
    }
    Ok(())
}
