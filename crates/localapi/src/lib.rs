//! The agent's local API as seen from outside: the request and answer lines, the state they
//! carry, the client call, and the event history file. `aclctl` needs these and nothing else
//! of the agent, so they live here, without the agent's Kubernetes client, installer and
//! daemon (`aclctl` does not link kube or k8s-openapi; `cargo xtask test` checks that).
//!
//! The protocol: a Unix socket that only root can open (mode 0600 in a 0700 directory), one
//! JSON request per line, one JSON answer per line.
//!
//! ```text
//! -> {"request":"pause"}
//! <- {"ok":true,"state":{"phase":{"phase":"idle"},"paused":true,...}}
//! ```
//!
//! [`State`] is also what the agent persists (`state.json`): its serialized form is kept
//! compatible across versions.

pub mod history;

use jiff::Timestamp;
use policy::Failure;
use semver::Version;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

/// Where the agent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing in progress.
    Idle,
    /// Writing `version` into the other slot.
    Installing {
        /// The release.
        version: Version,
        /// The SHA-256 of its manifest, as named by the index the check accepted: the install
        /// takes exactly that manifest, whatever the repository says by then (absent in state
        /// files written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<manifest::Sha256Digest>,
    },
    /// Installed and set to boot next; waiting for the reboot to be allowed.
    Staged {
        /// The release.
        version: Version,
    },
    /// Reboot asked for; the next start sees which slot booted.
    Rebooting {
        /// The version expected to boot.
        version: Version,
    },
    /// Running an unconfirmed slot; health checks decide before `deadline`.
    Verifying {
        /// The version running.
        version: Version,
        /// The time by which it must pass.
        deadline: Timestamp,
    },
}

impl Phase {
    /// The phase's name as in the state file (`idle`, `installing`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Installing { .. } => "installing",
            Phase::Staged { .. } => "staged",
            Phase::Rebooting { .. } => "rebooting",
            Phase::Verifying { .. } => "verifying",
        }
    }

    /// The version this phase is about, if any.
    pub fn version(&self) -> Option<&Version> {
        match self {
            Phase::Idle => None,
            Phase::Installing { version, .. }
            | Phase::Staged { version }
            | Phase::Rebooting { version }
            | Phase::Verifying { version, .. } => Some(version),
        }
    }
}

/// Everything the agent keeps across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The phase.
    pub phase: Phase,
    /// When the repository was last checked.
    pub last_check: Option<Timestamp>,
    /// The last decision or error, for the operator.
    pub note: String,
    /// Versions that failed here (backoff, then skipped).
    pub failures: Vec<Failure>,
    /// Operator pause: no checks, installs or reboots.
    pub paused: bool,
    /// A repository check is running. Not persisted: a check cut short by a crash is simply
    /// started again after the restart, instead of waiting a whole interval.
    #[serde(skip)]
    pub checking: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            phase: Phase::Idle,
            last_check: None,
            note: String::new(),
            failures: Vec::new(),
            paused: false,
            checking: false,
        }
    }
}

/// An operator's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    /// Nothing: just report the state.
    Status,
    /// Check the repository now.
    CheckNow,
    /// Stop all update activity.
    Pause,
    /// Resume.
    Resume,
    /// Go back to the other slot: it boots next; with `now`, reboot into it at once.
    Rollback {
        /// Reboot now (else at the next reboot).
        now: bool,
    },
    /// Install the latest release (`version: null`) or exactly `version`, now, whatever the
    /// mode (except off), waves and backoff say; the reboot still waits for its window.
    Update {
        /// The version, or the latest.
        version: Option<Version>,
    },
    /// The staged update of this version may reboot now: in Kubernetes mode, the cluster lock
    /// is held and the node drained. The same as the state machine's `Event::RebootAllowed`,
    /// for this version only: a permit for one version never reboots into another.
    AllowReboot {
        /// The version the permit names.
        version: Version,
    },
}

/// How far the running install is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// The image size (0 until the manifest has been read).
    pub total: u64,
    /// Image bytes in place in the target slot.
    pub done: u64,
    /// Of those, bytes copied from the running slot.
    pub reused: u64,
    /// Of those, bytes found already written by an interrupted install.
    pub resumed: u64,
    /// Image bytes read back and verified after writing.
    pub verified: u64,
}

/// A request line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestLine {
    /// What is asked.
    pub request: Request,
}

/// An answer line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the request was taken.
    pub ok: bool,
    /// The agent's state after it.
    pub state: Option<State>,
    /// A repository check is running.
    #[serde(default)]
    pub checking: bool,
    /// The running install's progress.
    #[serde(default)]
    pub progress: Option<Progress>,
    /// Why not, when not ok.
    pub error: Option<String>,
}

impl Answer {
    /// A refusal saying why.
    pub fn refused(why: String) -> Self {
        Self { ok: false, state: None, checking: false, progress: None, error: Some(why) }
    }
}

/// Sends one request to the agent at `path` and returns its answer (for `aclctl`).
pub async fn call(path: &Path, request: Request) -> std::io::Result<Answer> {
    let sock = tokio::net::UnixStream::connect(path).await?;
    let (r, mut w) = sock.into_split();
    let mut line = serde_json::to_vec(&RequestLine { request }).expect("request serialises");
    line.push(b'\n');
    w.write_all(&line).await?;
    let answer = BufReader::new(r)
        .lines()
        .next_line()
        .await?
        .ok_or_else(|| std::io::Error::other("the agent closed the connection"))?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}
