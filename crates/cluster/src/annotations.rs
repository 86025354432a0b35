//! The annotation contract between operators, the host agent and the coordinator, defined
//! once.
//!
//! Every key shares one versioned prefix, [`PREFIX`]; a later incompatible contract gets
//! `v2.` and both can be read during a migration. Operators write the *request* keys; the
//! agent writes its *status* keys ([`AGENT_KEYS`]) and the coordinator its own
//! ([`COORDINATOR_KEYS`]); nobody touches another's keys. One-shot requests (`update`,
//! `rollback`) are removed by the agent when it takes them, in a patch conditioned on the
//! Node's `resourceVersion`, so a request written meanwhile is never lost. Standing settings
//! (`paused`, `reboot`) stay and are applied whenever they change.
//!
//! The agent runs with its node's own credentials and may write only its own Node, so every
//! key on a Node may have been written by that node: the coordinator takes from a Node only
//! what the node may decide for itself (that it wants to reboot; `reboot=allowed`, skipping
//! the lock for itself alone). Limits that protect the cluster, such as how many nodes reboot
//! at once, are the coordinator's own settings.
//!
//! | key (after the prefix) | written by | values | meaning |
//! |---|---|---|---|
//! | `update` | operator | `latest` or a version | install now, past waves and backoff (one-shot) |
//! | `allow-downgrade` | operator | `true` | lets `update=<version>` name a version older than the booted one |
//! | `rollback` | operator | `next-boot` or `now` | boot the other slot next, or reboot into it now (one-shot) |
//! | `paused` | operator | `true` / `false` | stop / resume all update activity |
//! | `reboot` | operator | `lock` (default) / `allowed` | take the cluster lock before rebooting, or reboot without it (still drained) |
//! | `state` | agent | `idle`, `installing`, `staged`, `rebooting`, `verifying` | the agent's phase (`paused` when paused) |
//! | `progress` | agent | `37%` | the install's progress |
//! | `booted-version` | agent | a version | what this node runs |
//! | `target-version` | agent | a version | what is being installed, staged or verified |
//! | `last-check` | agent | RFC 3339 time | the last repository check |
//! | `note` | agent | text | the last decision |
//! | `last-error` | agent | text | the last failure (install, health) |
//! | `request-result` | agent | text | what became of the last one-shot request |
//! | `reboot-request` | agent | `wanted` / `holding` | an update is staged and may reboot now / the node is rebooting or checking its health: keep its lock |
//! | `reboot-allowed` | coordinator | a version | the node is drained and holds a lock slot: it may reboot into this version |
//! | `lock` | coordinator | a Lease name | the reboot lock slot held for this node |
//! | `drain` | coordinator | text | cordon and eviction progress, or what blocks it |
//! | `cordoned` | coordinator | `true` | the coordinator cordoned this node (and will uncordon it) |
//!
//! One label, `version` (the booted version), because selecting nodes by version is what
//! operators do with it (`kubectl get nodes -l v1.acl-update.dev/version=2.0.0`).

use semver::Version;
use std::collections::BTreeMap;

macro_rules! key {
    ($name:literal) => {
        concat!("v1.acl-update.dev/", $name)
    };
}

/// The prefix of every key.
pub const PREFIX: &str = key!("");

/// Operator: install `latest` or a version.
pub const UPDATE: &str = key!("update");
/// Operator: `next-boot` or `now`.
pub const ROLLBACK: &str = key!("rollback");
/// Operator: `true` / `false`.
pub const PAUSED: &str = key!("paused");
/// Operator: `lock` / `allowed`.
pub const REBOOT: &str = key!("reboot");
/// Operator: lets `update` name an older version.
pub const ALLOW_DOWNGRADE: &str = key!("allow-downgrade");
/// Agent: the phase.
pub const STATE: &str = key!("state");
/// Agent: install progress.
pub const PROGRESS: &str = key!("progress");
/// Agent: the booted version.
pub const BOOTED: &str = key!("booted-version");
/// Agent: the version being installed, staged or verified.
pub const TARGET: &str = key!("target-version");
/// Agent: the last repository check.
pub const LAST_CHECK: &str = key!("last-check");
/// Agent: the last decision.
pub const NOTE: &str = key!("note");
/// Agent: the last failure.
pub const LAST_ERROR: &str = key!("last-error");
/// Agent: the fate of the last one-shot request.
pub const REQUEST_RESULT: &str = key!("request-result");
/// Agent: `wanted` (may reboot now) or `holding` (rebooting or verifying).
pub const REBOOT_REQUEST: &str = key!("reboot-request");
/// Coordinator: the version the node may reboot into (drained, lock held).
pub const REBOOT_ALLOWED: &str = key!("reboot-allowed");
/// Coordinator: the lock slot held for the node.
pub const LOCK: &str = key!("lock");
/// Coordinator: drain status.
pub const DRAIN: &str = key!("drain");
/// Coordinator: it cordoned the node.
pub const CORDONED: &str = key!("cordoned");
/// Label: the booted version.
pub const VERSION_LABEL: &str = key!("version");

/// The most lock slots the coordinator may be given.
pub const MAX_SLOTS: u32 = 64;

/// What the operator asks for in one Node's annotations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requests {
    /// A one-shot update request: the latest (`None`) or a version; `Err` if unreadable.
    pub update: Option<Result<Option<Version>, String>>,
    /// A one-shot rollback request: `now` or not; `Err` if unreadable.
    pub rollback: Option<Result<bool, String>>,
    /// The standing pause setting, if any.
    pub paused: Option<Result<bool, String>>,
    /// Reboot without the lock.
    pub reboot_without_lock: bool,
    /// `update` may name a version older than the booted one.
    pub allow_downgrade: bool,
    /// Problems with the standing settings, for `last-error`.
    pub problems: Vec<String>,
}

/// Reads the operator's keys.
pub fn requests(a: &BTreeMap<String, String>) -> Requests {
    let mut r = Requests {
        update: a.get(UPDATE).map(|v| match v.trim() {
            "latest" => Ok(None),
            v => {
                v.parse().map(Some).map_err(|e| format!("{UPDATE}={v:?}: not \"latest\" or a version ({e})"))
            }
        }),
        ..Requests::default()
    };
    r.rollback = a.get(ROLLBACK).map(|v| match v.trim() {
        "now" => Ok(true),
        "next-boot" => Ok(false),
        v => Err(format!("{ROLLBACK}={v:?}: not \"next-boot\" or \"now\"")),
    });
    r.paused = a.get(PAUSED).map(|v| match v.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        v => Err(format!("{PAUSED}={v:?}: not \"true\" or \"false\"")),
    });
    if let Some(Err(e)) = &r.paused {
        r.problems.push(e.clone());
    }
    match a.get(REBOOT).map(|v| v.trim()) {
        None | Some("lock") => {}
        Some("allowed") => r.reboot_without_lock = true,
        Some(v) => r.problems.push(format!("{REBOOT}={v:?}: not \"lock\" or \"allowed\"; the lock decides")),
    }
    match a.get(ALLOW_DOWNGRADE).map(|v| v.trim()) {
        None | Some("false") => {}
        Some("true") => r.allow_downgrade = true,
        Some(v) => r.problems.push(format!("{ALLOW_DOWNGRADE}={v:?}: not \"true\" or \"false\"")),
    }
    r
}

/// The merge patch turning `current` annotations into `wanted` for the agent's keys only:
/// changed or new keys with their value, keys to drop as `null`. Empty when nothing changes.
pub fn status_patch(
    current: &BTreeMap<String, String>,
    wanted: &BTreeMap<&'static str, String>,
    owned: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    let mut patch = serde_json::Map::new();
    for k in owned {
        match (current.get(*k), wanted.get(k)) {
            (Some(c), Some(w)) if c == w => {}
            (_, Some(w)) => {
                patch.insert((*k).to_owned(), w.clone().into());
            }
            (Some(_), None) => {
                patch.insert((*k).to_owned(), serde_json::Value::Null);
            }
            (None, None) => {}
        }
    }
    patch
}

/// The status keys the agent owns and rewrites.
pub const AGENT_KEYS: &[&str] =
    &[STATE, PROGRESS, BOOTED, TARGET, LAST_CHECK, NOTE, LAST_ERROR, REQUEST_RESULT, REBOOT_REQUEST];

/// The keys the coordinator owns (`cordoned` is written with the cordon itself).
pub const COORDINATOR_KEYS: &[&str] = &[REBOOT_ALLOWED, LOCK, DRAIN];

/// What the agent says about rebooting, in `reboot-request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootRequest {
    /// An update is staged and its window is open: drain me and give me a slot.
    Wanted,
    /// Rebooting or checking the new boot's health: keep my slot.
    Holding,
}

impl RebootRequest {
    /// The annotation's value.
    pub fn as_str(self) -> &'static str {
        match self {
            RebootRequest::Wanted => "wanted",
            RebootRequest::Holding => "holding",
        }
    }

    /// Reads the annotation (anything else: no request).
    pub fn parse(v: Option<&str>) -> Option<Self> {
        match v? {
            "wanted" => Some(RebootRequest::Wanted),
            "holding" => Some(RebootRequest::Holding),
            _ => None,
        }
    }
}

/// A label value for a version: Kubernetes label values allow `[A-Za-z0-9._-]`, 63 at most, so
/// build metadata's `+` becomes `_`.
pub fn label_value(version: &str) -> String {
    let v: String = version
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
        .collect();
    v.chars().take(63).collect::<String>().trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn keys_share_one_versioned_prefix() {
        for k in [UPDATE, ALLOW_DOWNGRADE, ROLLBACK, PAUSED, REBOOT, CORDONED, VERSION_LABEL]
            .iter()
            .chain(AGENT_KEYS)
            .chain(COORDINATOR_KEYS)
        {
            let (prefix, name) = k.split_once('/').unwrap();
            assert_eq!(format!("{prefix}/"), PREFIX);
            assert!(prefix.starts_with("v1."));
            assert!(name.len() <= 63 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{k}");
        }
    }

    #[test]
    fn reads_requests_and_names_bad_values() {
        let r = requests(&map(&[
            (UPDATE, "latest"),
            (ROLLBACK, "now"),
            (PAUSED, "true"),
            (ALLOW_DOWNGRADE, "true"),
        ]));
        assert_eq!(r.update, Some(Ok(None)));
        assert_eq!(r.rollback, Some(Ok(true)));
        assert_eq!(r.paused, Some(Ok(true)));
        assert_eq!((r.allow_downgrade, r.reboot_without_lock, r.problems.len()), (true, false, 0));

        let r = requests(&map(&[(UPDATE, " 2.1.0 "), (ROLLBACK, "next-boot"), (REBOOT, "allowed")]));
        assert_eq!(r.update, Some(Ok(Some("2.1.0".parse().unwrap()))));
        assert_eq!(r.rollback, Some(Ok(false)));
        assert!(r.reboot_without_lock);

        let r = requests(&map(&[
            (UPDATE, "newest"),
            (ROLLBACK, "yes"),
            (PAUSED, "1"),
            (ALLOW_DOWNGRADE, "yes"),
            (REBOOT, "x"),
        ]));
        assert!(r.update.unwrap().unwrap_err().contains("v1.acl-update.dev/update=\"newest\""));
        assert!(r.rollback.unwrap().is_err());
        assert!(!r.allow_downgrade);
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
        assert_eq!(requests(&BTreeMap::new()), Requests::default());
    }

    #[test]
    fn status_patch_touches_only_changed_owned_keys() {
        let current = map(&[(STATE, "idle"), (NOTE, "up to date"), (PROGRESS, "100%"), (UPDATE, "latest")]);
        let wanted: BTreeMap<&str, String> =
            [(STATE, "installing".to_owned()), (NOTE, "up to date".to_owned())].into();
        let p = status_patch(&current, &wanted, AGENT_KEYS);
        assert_eq!(serde_json::Value::Object(p), serde_json::json!({STATE: "installing", PROGRESS: null}));
        let same: BTreeMap<&str, String> =
            [(STATE, "idle".to_owned()), (NOTE, "up to date".to_owned()), (PROGRESS, "100%".to_owned())]
                .into();
        assert!(status_patch(&current, &same, AGENT_KEYS).is_empty());
        assert_eq!(RebootRequest::parse(Some("wanted")), Some(RebootRequest::Wanted));
        assert_eq!(RebootRequest::parse(Some(RebootRequest::Holding.as_str())), Some(RebootRequest::Holding));
        assert_eq!(RebootRequest::parse(Some("please")), None);
    }

    #[test]
    fn the_operator_docs_list_every_key() {
        let doc = include_str!("../../../docs/kubernetes.md");
        for k in [UPDATE, ALLOW_DOWNGRADE, ROLLBACK, PAUSED, REBOOT, CORDONED, VERSION_LABEL]
            .iter()
            .chain(AGENT_KEYS)
            .chain(COORDINATOR_KEYS)
        {
            assert!(doc.contains(&format!("`{k}`")), "docs/kubernetes.md does not list {k}");
        }
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(label_value("2.0.0"), "2.0.0");
        assert_eq!(label_value("2.0.0-rc.1+build.5"), "2.0.0-rc.1_build.5");
        assert_eq!(label_value(&"9".repeat(80)).len(), 63);
    }
}
