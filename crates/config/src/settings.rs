//! The validated settings: parsed types, checked ranges, nothing optional that is required.

use crate::{ConfigError, Loaded};
use jiff::civil::{Time, Weekday};
use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

/// What the agent does about updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Check, install and reboot when allowed.
    Automatic,
    /// Check and report; install nothing.
    CheckOnly,
    /// Nothing.
    Off,
}

/// A maintenance window: on these weekdays, from `start` for `length`, in `time_zone`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The weekdays the window opens on.
    pub days: Vec<Weekday>,
    /// Local opening time.
    pub start: Time,
    /// How long it stays open.
    pub length: Duration,
    /// The time zone of `start`.
    pub time_zone: TimeZone,
}

impl Window {
    /// Whether `t` falls inside the window (including a window opened on an earlier day that
    /// is still open).
    pub fn contains(&self, t: Timestamp) -> bool {
        let today = t.to_zoned(self.time_zone.clone()).date();
        (0..=7).any(|back| {
            let Ok(day) = today.checked_sub(jiff::Span::new().days(back)) else { return false };
            if !self.days.contains(&day.weekday()) {
                return false;
            }
            let Ok(open) = day.to_datetime(self.start).to_zoned(self.time_zone.clone()) else { return false };
            let open = open.timestamp();
            let len = SignedDuration::try_from(self.length).unwrap_or(SignedDuration::MAX);
            open <= t && open.checked_add(len).is_ok_and(|close| t < close)
        })
    }
}

/// Everything the agent needs, checked.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct Settings {
    pub mode: Mode,
    pub repository: String,
    pub channel: String,
    pub check_interval: Duration,
    /// Wait before a failed release is tried again (doubling after each failure).
    pub retry_backoff: Duration,
    pub pinned_version: Option<semver::Version>,
    pub tries: u8,
    pub paused: bool,
    pub parallel: NonZeroUsize,
    pub trust_keys: Vec<PathBuf>,
    pub threshold: NonZeroUsize,
    pub ca_file: Option<PathBuf>,
    pub windows: Vec<Window>,
    pub health_deadline: Duration,
    /// When `acl-boot-deadline.service` gives up an unconfirmed boot: this long after the
    /// health deadline, counted from the kernel's start.
    pub fallback_grace: Duration,
    pub check_timeout: Duration,
    pub required_dir: PathBuf,
    pub wanted_dir: PathBuf,
    pub state_dir: PathBuf,
    pub disk: Option<PathBuf>,
    pub socket: PathBuf,
    pub reboot_command: Vec<String>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub systemd_check: bool,
    pub kubelet: Kubelet,
    pub kubelet_healthz: String,
    /// Kubernetes mode, when enabled.
    pub kubernetes: Option<KubeSettings>,
}

/// `[kubernetes]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// A kubeconfig file, or `None` to infer (in-cluster, `$KUBECONFIG`, `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// The Node's name, or `None` for the host name.
    pub node_name: Option<String>,
    /// The namespace of the Node's Events.
    pub events_namespace: String,
    /// Retired keys the files still set (ignored; the agent warns).
    pub retired: Vec<&'static str>,
}

/// When the built-in kubelet health check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kubelet {
    /// When a kubelet unit is installed.
    Auto,
    /// Always (no kubelet is a failure).
    Required,
    /// Never.
    Off,
}

/// The `[trust]` section alone, checked: what signed documents must carry. The agent reads it
/// as part of [`Settings`]; the boot path's initramfs reads it from the same files (installed
/// into the initramfs with the keys they name), so a node and its boot path never disagree about
/// how many signatures a release needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSettings {
    /// Key files and directories of `*.pub` files.
    pub keys: Vec<PathBuf>,
    /// How many distinct trusted keys must have signed.
    pub threshold: NonZeroUsize,
}

impl TrustSettings {
    /// Validates the `[trust]` keys of a loaded configuration.
    pub fn from_loaded(l: &Loaded) -> Result<Self, ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            origin: l.origin(key),
            key: key.into(),
            reason,
        };
        let t = &l.config.trust;
        let threshold = NonZeroUsize::new(t.threshold)
            .ok_or_else(|| bad("trust.threshold", "must be at least 1".into()))?;
        if t.keys.is_empty() {
            return Err(bad("trust.keys", "at least one key file or directory is required".into()));
        }
        Ok(Self { keys: t.keys.clone(), threshold })
    }
}

impl Settings {
    /// Validates a loaded configuration; the first problem found is the error.
    pub fn from_loaded(l: &Loaded) -> Result<Self, ConfigError> {
        let c = &l.config;
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            origin: l.origin(key),
            key: key.into(),
            reason,
        };
        let duration = |key: &str, text: &str, min: Duration| -> Result<Duration, ConfigError> {
            let d: SignedDuration = text.parse().map_err(|e| {
                bad(key, format!("{text:?} is not a duration like \"90s\", \"10m\" or \"1h 30m\": {e}"))
            })?;
            let d = Duration::try_from(d).map_err(|_| bad(key, format!("{text:?} is negative")))?;
            if d < min {
                return Err(bad(key, format!("{text:?} is shorter than the minimum {}s", min.as_secs())));
            }
            Ok(d)
        };
        let mode = match c.updates.mode.as_str() {
            "automatic" => Mode::Automatic,
            "check" => Mode::CheckOnly,
            "off" => Mode::Off,
            other => {
                return Err(bad(
                    "updates.mode",
                    format!("{other:?} is not one of \"automatic\", \"check\", \"off\""),
                ));
            }
        };
        let repo = c.updates.repository.trim();
        let scheme_ok = ["http://", "https://", "file://", "/"].iter().any(|p| repo.starts_with(p));
        if mode != Mode::Off && !scheme_ok {
            let why = if repo.is_empty() {
                "is required unless mode is \"off\"".to_owned()
            } else {
                format!("{repo:?} is not an http://, https:// or file:// URL")
            };
            return Err(bad("updates.repository", why));
        }
        let channel = &c.updates.channel;
        if channel.is_empty()
            || !channel.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(bad(
                "updates.channel",
                format!("{channel:?} must be lowercase letters, digits, '.', '_' or '-'"),
            ));
        }
        let pinned_version = match c.updates.pinned_version.trim() {
            "" => None,
            v => Some(
                v.parse()
                    .map_err(|e| bad("updates.pinned-version", format!("{v:?} is not a version: {e}")))?,
            ),
        };
        if !(1..=15).contains(&c.updates.tries) {
            return Err(bad(
                "updates.tries",
                format!("{} is not in 1..=15 (4 bits in the GPT)", c.updates.tries),
            ));
        }
        let parallel = NonZeroUsize::new(c.updates.parallel)
            .filter(|n| n.get() <= 64)
            .ok_or_else(|| bad("updates.parallel", format!("{} is not in 1..=64", c.updates.parallel)))?;
        let TrustSettings { keys: trust_keys, threshold } = TrustSettings::from_loaded(l)?;
        let mut windows = Vec::new();
        for (i, w) in c.reboot.windows.iter().enumerate() {
            let key = "reboot.windows";
            let at = |reason: String| bad(key, format!("window {}: {reason}", i + 1));
            let days = w
                .days
                .iter()
                .map(|d| weekday(d).ok_or_else(|| at(format!("{d:?} is not a weekday (Mon..Sun)"))))
                .collect::<Result<Vec<_>, _>>()?;
            if days.is_empty() {
                return Err(at("no days".into()));
            }
            let start: Time = w
                .start
                .parse()
                .map_err(|_| at(format!("start {:?} is not a time like \"02:30\"", w.start)))?;
            let length = duration(key, &w.length, Duration::from_secs(60))
                .map_err(|_| at(format!("length {:?} is not a duration of at least 1m", w.length)))?;
            if length > Duration::from_secs(7 * 86400) {
                return Err(at(format!("length {:?} is longer than a week", w.length)));
            }
            let time_zone =
                TimeZone::get(&w.time_zone).map_err(|e| at(format!("time zone {:?}: {e}", w.time_zone)))?;
            windows.push(Window { days, start, length, time_zone });
        }
        let opt_path = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
        let metrics_listen = match c.agent.metrics_listen.trim() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                bad("agent.metrics-listen", format!("{a:?} is not an address like \"127.0.0.1:9851\""))
            })?),
        };
        let kubelet = match c.health.kubelet.as_str() {
            "auto" => Kubelet::Auto,
            "required" => Kubelet::Required,
            "off" => Kubelet::Off,
            other => {
                return Err(bad(
                    "health.kubelet",
                    format!("{other:?} is not one of \"auto\", \"required\", \"off\""),
                ));
            }
        };
        if kubelet != Kubelet::Off && !c.health.kubelet_healthz.starts_with("http://") {
            return Err(bad(
                "health.kubelet-healthz",
                format!("{:?} is not an http:// URL", c.health.kubelet_healthz),
            ));
        }
        let k = &c.kubernetes;
        // The API server takes an Event about a cluster-scoped object (our Node) that carries an
        // eventTime only in "default" or "kube-system" (core/v1 event validation).
        if k.enabled && !["default", "kube-system"].contains(&k.events_namespace.as_str()) {
            return Err(bad(
                "kubernetes.events-namespace",
                format!(
                    "{:?}: Events about a Node must go to \"default\" or \"kube-system\" (the API server refuses others)",
                    k.events_namespace
                ),
            ));
        }
        let kubernetes = if k.enabled {
            Some(KubeSettings {
                kubeconfig: opt_path(&k.kubeconfig),
                node_name: (!k.node_name.trim().is_empty()).then(|| k.node_name.trim().to_owned()),
                events_namespace: k.events_namespace.clone(),
                retired: [
                    ("kubernetes.lock-namespace", k.lock_namespace.is_some()),
                    ("kubernetes.lease-duration", k.lease_duration.is_some()),
                    ("kubernetes.drain-timeout", k.drain_timeout.is_some()),
                ]
                .into_iter()
                .filter_map(|(key, set)| set.then_some(key))
                .collect(),
            })
        } else {
            None
        };
        Ok(Settings {
            kubernetes,
            metrics_listen,
            systemd_check: c.health.systemd,
            kubelet,
            kubelet_healthz: c.health.kubelet_healthz.clone(),
            mode,
            repository: repo.to_owned(),
            channel: channel.clone(),
            check_interval: duration(
                "updates.check-interval",
                &c.updates.check_interval,
                Duration::from_secs(60),
            )?,
            retry_backoff: duration(
                "updates.retry-backoff",
                &c.updates.retry_backoff,
                Duration::from_secs(60),
            )?,
            pinned_version,
            tries: c.updates.tries,
            paused: c.updates.paused,
            parallel,
            trust_keys,
            threshold,
            ca_file: opt_path(&c.trust.ca_file),
            windows,
            health_deadline: duration("health.deadline", &c.health.deadline, Duration::from_secs(10))?,
            fallback_grace: duration("health.fallback-grace", &c.health.fallback_grace, Duration::ZERO)?,
            check_timeout: duration("health.check-timeout", &c.health.check_timeout, Duration::from_secs(1))?,
            required_dir: c.health.required_dir.clone(),
            wanted_dir: c.health.wanted_dir.clone(),
            state_dir: c.agent.state_dir.clone(),
            disk: opt_path(&c.agent.disk),
            socket: c.agent.socket.clone(),
            reboot_command: {
                let words: Vec<String> =
                    c.agent.reboot_command.split_whitespace().map(str::to_owned).collect();
                if words.is_empty() {
                    return Err(bad("agent.reboot-command", "must name a command".into()));
                }
                words
            },
        })
    }
}

fn weekday(s: &str) -> Option<Weekday> {
    Some(match s.to_ascii_lowercase().get(..3)? {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return None,
    })
}
