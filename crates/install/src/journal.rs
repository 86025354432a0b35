//! The install journal: which chunks of which image are durably in the target slot.
//!
//! A chunk is marked done only after the target was synced with it in place, and the journal
//! is replaced atomically, so after a crash it never claims more than the disk holds. It may
//! claim less (work since the last sync is redone). The read-back at the end checks every chunk
//! again, so a journal that lies (a disk that lost a write) costs a re-fetch, not a bad slot.
//! It is saved through `durable::replace_file`, whose temporary file is unique per writer, so
//! two installers saving at once never rename each other's half-written file.

use manifest::Sha256Digest;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the journal in the state directory.
pub const JOURNAL_FILE: &str = "install-journal.json";

/// Progress of one install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// SHA-256 of the manifest being installed.
    pub manifest_sha256: Sha256Digest,
    /// The target slot's unique partition GUID.
    pub target_partuuid: String,
    /// Number of chunks in the image.
    pub chunk_count: usize,
    /// Done chunks, one bit each, as hex (bit i of byte i/8).
    done: String,
}

impl Journal {
    /// A journal with nothing done.
    pub fn new(manifest_sha256: Sha256Digest, target_partuuid: String, chunk_count: usize) -> Self {
        Self { manifest_sha256, target_partuuid, chunk_count, done: "00".repeat(chunk_count.div_ceil(8)) }
    }

    /// The done bits.
    pub fn done(&self) -> Vec<bool> {
        let bytes: Vec<u8> = (0..self.done.len() / 2)
            .map(|i| u8::from_str_radix(&self.done[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        (0..self.chunk_count).map(|i| bytes.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)).collect()
    }

    /// Replaces the done bits.
    pub fn set_done(&mut self, done: &[bool]) {
        let mut bytes = vec![0u8; self.chunk_count.div_ceil(8)];
        for (i, _) in done.iter().enumerate().filter(|(_, d)| **d) {
            bytes[i / 8] |= 1 << (i % 8);
        }
        self.done = bytes.iter().map(|b| format!("{b:02x}")).collect();
    }

    /// Reads the journal of `state_dir`; `None` if there is none or it is unreadable (a
    /// damaged journal only means starting over).
    pub fn load(state_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(state_dir.join(JOURNAL_FILE)).ok()?;
        let j: Journal = serde_json::from_slice(&bytes).ok()?;
        (j.done.len() == 2 * j.chunk_count.div_ceil(8)).then_some(j)
    }

    /// Writes the journal atomically and durably.
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("journal serialises");
        durable::replace_file(&state_dir.join(JOURNAL_FILE), &bytes)
    }

    /// Removes the journal (the install finished).
    pub fn remove(state_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(state_dir.join(JOURNAL_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => sync_dir(state_dir),
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: two installs shared `.install-journal.json.tmp`; one renamed the other's
    /// half-written journal or failed. Now concurrent saves all succeed, the journal always
    /// parses, and no temporary file is left.
    #[test]
    fn issue_12_concurrent_saves_do_not_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let dir = dir.path();
                s.spawn(move || {
                    for i in 0..150usize {
                        let mut j = Journal::new(Sha256Digest([t; 32]), format!("target-{t}"), 4000);
                        j.set_done(&vec![i % 2 == 0; 4000]);
                        j.save(dir).unwrap();
                        assert!(Journal::load(dir).is_some(), "a torn journal");
                    }
                });
            }
        });
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(JOURNAL_FILE)]);
    }

    #[test]
    fn bits_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(Sha256Digest([1; 32]), "x".into(), 13);
        let mut done = vec![false; 13];
        done[0] = true;
        done[9] = true;
        done[12] = true;
        j.set_done(&done);
        j.save(dir.path()).unwrap();
        let back = Journal::load(dir.path()).unwrap();
        assert_eq!(back.done(), done);
        Journal::remove(dir.path()).unwrap();
        assert!(Journal::load(dir.path()).is_none());
        std::fs::write(dir.path().join(JOURNAL_FILE), b"{garbage").unwrap();
        assert!(Journal::load(dir.path()).is_none());
    }
}
