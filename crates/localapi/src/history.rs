//! The event history: what the agent did and why, kept across reboots and bounded in size.
//!
//! One JSON object per line in `history.jsonl` in the state directory. An append is one
//! `write` of one line with O_APPEND, then fsync; when the file passes [`MAX_BYTES`] its older
//! half is dropped by rewriting the newer half atomically. A torn last line (power cut during
//! an append) is skipped when reading.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::Path;

/// File name in the state directory.
pub const HISTORY_FILE: &str = "history.jsonl";
/// Size past which the older half is dropped.
pub const MAX_BYTES: u64 = 256 << 10;

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When.
    pub time: Timestamp,
    /// The phase afterwards (`idle`, `installing`, ...).
    pub phase: String,
    /// What happened.
    pub message: String,
}

/// Appends an entry (durably), trimming the file when it grows past [`MAX_BYTES`].
pub fn append(state_dir: &Path, entry: &Entry) -> std::io::Result<()> {
    let path = state_dir.join(HISTORY_FILE);
    let mut line = serde_json::to_vec(entry).expect("entry serialises");
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    f.write_all(&line)?;
    f.sync_data()?;
    if f.metadata()?.len() > MAX_BYTES {
        let text = std::fs::read(&path)?;
        let cut = text.len() / 2;
        let start = text[cut..].iter().position(|&b| b == b'\n').map_or(text.len(), |p| cut + p + 1);
        durable::replace_file(&path, &text[start..])?;
    }
    Ok(())
}

/// The newest `limit` entries, oldest first; unreadable lines are skipped.
pub fn read(state_dir: &Path, limit: usize) -> Vec<Entry> {
    let text = std::fs::read_to_string(state_dir.join(HISTORY_FILE)).unwrap_or_default();
    let all: Vec<Entry> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    all[all.len().saturating_sub(limit)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_torn_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5000 {
            let e = Entry {
                time: Timestamp::from_second(1_800_000_000 + i).unwrap(),
                phase: "idle".into(),
                message: format!("event {i}"),
            };
            append(dir.path(), &e).unwrap();
        }
        let size = std::fs::metadata(dir.path().join(HISTORY_FILE)).unwrap().len();
        assert!(size <= MAX_BYTES, "{size}");
        let last = read(dir.path(), 3);
        assert_eq!(
            last.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["event 4997", "event 4998", "event 4999"]
        );
        // A power cut in the middle of an append leaves a torn line: skipped.
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join(HISTORY_FILE)).unwrap();
        f.write_all(b"{\"time\":\"2027-").unwrap();
        assert_eq!(read(dir.path(), 1)[0].message, "event 4999");
    }
}
