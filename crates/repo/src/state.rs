//! What a verifier accepted before: the newest channel index per channel.
//!
//! Kept as a small JSON file replaced atomically, so that a crash leaves the old or the new
//! record. A missing file means nothing was accepted yet.
//!
//! Several processes may check at once (the agent, `aclctl update`, `publish verify`). Each
//! reads the record, fetches and checks an index for seconds, then writes: without care the
//! slower one writes back an older record over a newer one (issue 12), which reopens the
//! replay of an index between the two. [`AcceptedState::commit`] records under an exclusive
//! lock on a sibling `.lock` file, against the record as it is then, and refuses an index
//! older than one accepted meanwhile.

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

    /// Records `accepted` in the state file at `path`: under the file's lock, against what is
    /// recorded now (another process may have accepted a newer index since this one read the
    /// file). Refused when the file now holds a newer index for the channel, or another index
    /// with the same version. Returns the state as saved.
    pub fn commit(path: &Path, accepted: Accepted) -> Result<Self, StateError> {
        let err = |reason: String| StateError { path: path.to_owned(), reason };
        let lock_path = path.with_extension("json.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| err(format!("open {}: {e}", lock_path.display())))?;
        lock.lock().map_err(|e| err(format!("lock {}: {e}", lock_path.display())))?;
        let mut state = Self::load(path)?;
        if let Some(now) = state.get(&accepted.channel) {
            if now.index_version > accepted.index_version {
                return Err(err(format!(
                    "channel {:?}: index version {} was accepted meanwhile by another process; version {} \
                     is older and is not recorded",
                    accepted.channel, now.index_version, accepted.index_version
                )));
            }
            if now.index_version == accepted.index_version && now.sha256 != accepted.sha256 {
                return Err(err(format!(
                    "channel {:?}: another index with version {} was accepted meanwhile",
                    accepted.channel, accepted.index_version
                )));
            }
            if now == &accepted {
                return Ok(state);
            }
        }
        state.record(accepted);
        state.save(path)?;
        Ok(state)
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

    fn acc(version: u64) -> Accepted {
        Accepted {
            channel: "stable".into(),
            index_version: version,
            sha256: Sha256Digest([version as u8; 32]),
        }
    }

    /// Issue 12: two checks read the record, then each wrote back its own: the slower one's
    /// older index replaced the newer one. Now the record only moves forward, whatever the
    /// order of the commits, and an older index committed late is refused.
    #[test]
    fn issue_12_concurrent_commits_never_move_the_record_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accepted-index.json");
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let path = &path;
                s.spawn(move || {
                    for v in 0..100u64 {
                        let version = v * 4 + t;
                        let before =
                            AcceptedState::load(path).unwrap().get("stable").map(|a| a.index_version);
                        match AcceptedState::commit(path, acc(version)) {
                            Ok(st) => assert!(st.get("stable").unwrap().index_version >= version),
                            Err(e) => assert!(e.to_string().contains("accepted meanwhile"), "{e}"),
                        }
                        let after = AcceptedState::load(path).unwrap().get("stable").unwrap().index_version;
                        assert!(
                            before.is_none_or(|b| after >= b),
                            "the record moved back: {before:?} -> {after}"
                        );
                    }
                });
            }
        });
        assert_eq!(AcceptedState::load(&path).unwrap().get("stable").unwrap().index_version, 399);
        let e = AcceptedState::commit(&path, acc(398)).unwrap_err().to_string();
        assert!(e.contains("index version 399 was accepted meanwhile"), "{e}");
        let other = Accepted { sha256: Sha256Digest([0; 32]), ..acc(399) };
        assert!(AcceptedState::commit(&path, other).is_err());
        AcceptedState::commit(&path, acc(399)).unwrap();
    }

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
