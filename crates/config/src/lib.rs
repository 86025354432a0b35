//! The agent's configuration, in stages (as zincati and ripgrep do it):
//!
//! 1. each file is parsed on its own against the full schema ([`Config`], every key optional
//!    with its default, unknown keys refused), so a typo is reported with its file and line;
//! 2. the files' tables are merged key by key, later files winning ([`load`]);
//! 3. the merged [`Config`] is validated once into [`Settings`], whose fields are parsed types
//!    (durations, time zones, versions, non-zero counts); an invalid value is reported with the
//!    key and the file and line that set it.
//!
//! The agent never runs with half a configuration: any error stops it before it starts.
//! `default.toml` documents every key with its default; a test checks that it parses to
//! exactly `Config::default()`, so the documentation cannot drift from the code.

mod settings;

pub use settings::{KubeSettings, Kubelet, Mode, Settings, TrustSettings, Window};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The documented defaults, also shipped as `/usr/lib/acl-update/config.d/00-defaults.toml`.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// What the files say, merged; every key has its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// `[updates]`.
    pub updates: Updates,
    /// `[trust]`.
    pub trust: Trust,
    /// `[reboot]`.
    pub reboot: Reboot,
    /// `[health]`.
    pub health: Health,
    /// `[agent]`.
    pub agent: Agent,
    /// `[kubernetes]`.
    pub kubernetes: Kubernetes,
}

/// `[updates]` (see default.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
#[allow(missing_docs)]
pub struct Updates {
    pub mode: String,
    pub repository: String,
    pub channel: String,
    pub check_interval: String,
    pub retry_backoff: String,
    pub pinned_version: String,
    pub tries: u8,
    pub paused: bool,
    pub parallel: usize,
}

impl Default for Updates {
    fn default() -> Self {
        Self {
            mode: "automatic".into(),
            repository: String::new(),
            channel: "stable".into(),
            check_interval: "1h".into(),
            retry_backoff: "10m".into(),
            pinned_version: String::new(),
            tries: 3,
            paused: false,
            parallel: 4,
        }
    }
}

/// `[trust]` (see default.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
#[allow(missing_docs)]
pub struct Trust {
    pub keys: Vec<PathBuf>,
    pub threshold: usize,
    pub ca_file: String,
}

impl Default for Trust {
    fn default() -> Self {
        Self { keys: vec![PathBuf::from("/usr/share/acl-update/keys")], threshold: 1, ca_file: String::new() }
    }
}

/// `[reboot]` (see default.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
#[allow(missing_docs)]
pub struct Reboot {
    pub windows: Vec<WindowSpec>,
}

/// One maintenance window as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(missing_docs)]
pub struct WindowSpec {
    pub days: Vec<String>,
    pub start: String,
    pub length: String,
    #[serde(default = "utc")]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".into()
}

/// `[health]` (see default.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
#[allow(missing_docs)]
pub struct Health {
    pub deadline: String,
    pub fallback_grace: String,
    pub check_timeout: String,
    pub required_dir: PathBuf,
    pub wanted_dir: PathBuf,
    pub systemd: bool,
    pub kubelet: String,
    pub kubelet_healthz: String,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            deadline: "10m".into(),
            fallback_grace: "2m".into(),
            check_timeout: "60s".into(),
            required_dir: "/etc/acl-update/health/required.d".into(),
            wanted_dir: "/etc/acl-update/health/wanted.d".into(),
            systemd: true,
            kubelet: "auto".into(),
            kubelet_healthz: "http://127.0.0.1:10248/healthz".into(),
        }
    }
}

/// `[agent]` (see default.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
#[allow(missing_docs)]
pub struct Agent {
    pub state_dir: PathBuf,
    pub disk: String,
    pub socket: PathBuf,
    pub reboot_command: String,
    pub metrics_listen: String,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/acl-update".into(),
            disk: String::new(),
            socket: "/run/acl-update/agent.sock".into(),
            reboot_command: "systemctl reboot".into(),
            metrics_listen: String::new(),
        }
    }
}

/// `[kubernetes]` (see default.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
#[allow(missing_docs)]
pub struct Kubernetes {
    pub enabled: bool,
    pub kubeconfig: String,
    pub node_name: String,
    pub events_namespace: String,
    /// Retired: the coordinator holds the lock and drains now (its own flags). Still read, so
    /// that a node's older files keep loading; the agent warns that they are ignored.
    pub lock_namespace: Option<String>,
    /// Retired (see `lock_namespace`).
    pub lease_duration: Option<String>,
    /// Retired (see `lock_namespace`).
    pub drain_timeout: Option<String>,
}

impl Default for Kubernetes {
    fn default() -> Self {
        Self {
            enabled: false,
            kubeconfig: "/var/lib/kubelet/kubeconfig".into(),
            node_name: String::new(),
            events_namespace: "default".into(),
            lock_namespace: None,
            lease_duration: None,
            drain_timeout: None,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file is not valid TOML or does not fit the schema.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// The parser's message.
        reason: String,
    },
    /// A value is out of range or malformed.
    #[error("{origin}: {key}: {reason}")]
    Invalid {
        /// "file:line" of the setting, or "default".
        origin: String,
        /// The key, as `section.key`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where configuration files are looked for: the usual system paths under `root` ("/").
#[derive(Debug, Clone)]
pub struct Sources {
    root: PathBuf,
}

impl Sources {
    /// The system's paths under `root` (tests pass a temporary directory).
    pub fn under(root: &Path) -> Self {
        Self { root: root.to_owned() }
    }

    /// The files that exist, in the order they are applied.
    pub fn files(&self) -> Vec<PathBuf> {
        let r = |p: &str| self.root.join(p.trim_start_matches('/'));
        let mut out = Vec::new();
        let dir = |d: PathBuf, out: &mut Vec<PathBuf>| {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            out.extend(v);
        };
        dir(r("/usr/lib/acl-update/config.d"), &mut out);
        let main = r("/etc/acl-update/config.toml");
        if main.exists() {
            out.push(main);
        }
        dir(r("/run/acl-update/config.d"), &mut out);
        dir(r("/etc/acl-update/config.d"), &mut out);
        out
    }
}

/// The merged configuration, and for each `section.key` the "file:line" that set it last.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The merged configuration.
    pub config: Config,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    origins: std::collections::BTreeMap<String, String>,
}

impl Loaded {
    /// Where `key` (`section.key`) was set, or "default".
    pub fn origin(&self, key: &str) -> String {
        self.origins.get(key).cloned().unwrap_or_else(|| "default".into())
    }
}

/// Reads and merges every file of `sources`.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let files = sources.files();
    let mut merged = toml::Table::new();
    let mut origins = std::collections::BTreeMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.clone(), reason: e.to_string() })?;
        // The file alone must fit the schema: this is where a typo gets its line number.
        let _: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            line: e.span().map_or(0, |s| line_of(&text, s.start)),
            reason: e.message().to_owned(),
        })?;
        let table: toml::Table = toml::from_str(&text).expect("a file that fits the schema is a table");
        for (section, value) in table {
            let toml::Value::Table(keys) = value else { continue };
            let into =
                merged.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(into) = into else { continue };
            for (key, v) in keys {
                let line = key_line(&text, &section, &key);
                origins.insert(format!("{section}.{key}"), format!("{}:{line}", path.display()));
                into.insert(key, v);
            }
        }
    }
    let config: Config = merged.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
        path: PathBuf::from("<merged>"),
        line: 0,
        reason: e.message().to_owned(),
    })?;
    Ok(Loaded { config, files, origins })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of `key = ...` inside `[section]` (the first one; TOML forbids repeats).
fn key_line(text: &str, section: &str, key: &str) -> usize {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(s) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            current = s.trim().to_owned();
        } else if current == section && t.split('=').next().is_some_and(|k| k.trim() == key) {
            return i + 1;
        }
    }
    0
}

#[cfg(test)]
mod tests;
