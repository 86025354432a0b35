//! The agent's state on disk: one JSON file replaced atomically, so a crash leaves the old or
//! the new state, never a mixture. An unreadable file is reported, not guessed at.

use crate::machine::State;
use std::path::{Path, PathBuf};

/// File name of the state in the state directory.
pub const STATE_FILE: &str = "agent-state.json";

/// The state file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("agent state {path}: {reason}")]
pub struct PersistError {
    path: PathBuf,
    reason: String,
}

/// Reads the state; a missing file is the initial state.
pub fn load(state_dir: &Path) -> Result<State, PersistError> {
    let path = state_dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| PersistError { path, reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(PersistError { path, reason: e.to_string() }),
    }
}

/// Replaces the state file: temporary file, fsync, rename, fsync of the directory.
pub fn save(state_dir: &Path, state: &State) -> Result<(), PersistError> {
    let path = state_dir.join(STATE_FILE);
    let err = |e: std::io::Error| PersistError { path: path.clone(), reason: e.to_string() };
    let mut bytes = serde_json::to_vec_pretty(state).expect("state serialises");
    bytes.push(b'\n');
    durable::replace_file(&path, &bytes).map_err(err)
}
