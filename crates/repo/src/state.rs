//! What a verifier accepted before: the newest channel index per channel.
//!
//! Kept as a small JSON file replaced atomically, so that a crash leaves the old or the new
//! record. A missing file means nothing was accepted yet.

use durable::replace_file;
use manifest::Accepted;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The accepted-index record of every channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedState {
    /// By channel name.
    pub channels: BTreeMap<String, Accepted>,
}

/// The state file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("accepted-index state {path}: {reason}")]
pub struct StateError {
    path: PathBuf,
    reason: String,
}

impl AcceptedState {
    /// Reads the state; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let err = |reason: String| StateError { path: path.to_owned(), reason };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Replaces the state file atomically.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("state serialises");
        bytes.push(b'\n');
        replace_file(path, &bytes).map_err(|e| StateError { path: path.to_owned(), reason: e.to_string() })
    }

    /// What was accepted on `channel`.
    pub fn get(&self, channel: &str) -> Option<&Accepted> {
        self.channels.get(channel)
    }

    /// Records a newly accepted index.
    pub fn record(&mut self, accepted: Accepted) {
        self.channels.insert(accepted.channel.clone(), accepted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest::Sha256Digest;

    /// Issue 12: concurrent checks in one process shared `.accepted-index.json.tmp<pid>`, so one
    /// renamed the other's half-written file or failed with "not found". Now every save
    /// succeeds, the file is always one whole record, and no temporary file is left.
    #[test]
    fn issue_12_concurrent_saves_do_not_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accepted-index.json");
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let path = &path;
                s.spawn(move || {
                    for v in 0..150u64 {
                        let mut st = AcceptedState::default();
                        st.record(Accepted {
                            channel: format!("channel-{t}"),
                            index_version: v,
                            sha256: Sha256Digest([t as u8; 32]),
                        });
                        st.save(path).unwrap();
                        AcceptedState::load(path).expect("always a whole record");
                    }
                });
            }
        });
        let last = AcceptedState::load(&path).unwrap();
        assert_eq!(last.channels.values().next().unwrap().index_version, 149);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("accepted-index.json")]);
    }
}
