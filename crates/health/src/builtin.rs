//! The checks every node gets without a drop-in: systemd reached its target with no failed
//! units, and the kubelet answers "ok" on its health endpoint when a kubelet is installed.
//! They run before the drop-ins and report like them (a [`Check`] each), so an operator reads
//! one list. Both wait up to their timeout for a system still starting, since the agent judges
//! a fresh boot.

use crate::{Check, Outcome};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The built-in checks to run.
#[derive(Debug, Clone, Default)]
pub struct Builtins {
    /// systemd's state, if enabled.
    pub systemd: Option<Systemd>,
    /// The kubelet's health, if enabled.
    pub kubelet: Option<Kubelet>,
}

/// `systemctl is-system-running --wait`, and the failed units when degraded.
#[derive(Debug, Clone)]
pub struct Systemd {
    /// The systemctl program.
    pub systemctl: PathBuf,
    /// Exists when systemd is the init system (`/run/systemd/system`); otherwise the check is
    /// reported as not run, and does not fail the slot.
    pub booted_marker: PathBuf,
    /// How long to wait for the boot to finish.
    pub timeout: Duration,
}

impl Default for Systemd {
    fn default() -> Self {
        Self {
            systemctl: "systemctl".into(),
            booted_marker: "/run/systemd/system".into(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// The kubelet's `healthz` endpoint.
#[derive(Debug, Clone)]
pub struct Kubelet {
    /// The endpoint, e.g. `http://127.0.0.1:10248/healthz`.
    pub url: String,
    /// Required even when no kubelet unit is installed.
    pub always: bool,
    /// Where a `kubelet.service` unit file means a kubelet is present.
    pub unit_dirs: Vec<PathBuf>,
    /// How long to keep asking while it does not answer "ok".
    pub timeout: Duration,
}

impl Kubelet {
    /// The usual unit directories.
    pub fn unit_dirs() -> Vec<PathBuf> {
        ["/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"]
            .into_iter()
            .map(PathBuf::from)
            .collect()
    }

    fn present(&self) -> bool {
        self.always || self.unit_dirs.iter().any(|d| d.join("kubelet.service").exists())
    }
}

impl Builtins {
    /// Runs the enabled checks.
    pub async fn run(&self) -> Vec<Check> {
        let mut out = Vec::new();
        if let Some(s) = &self.systemd {
            out.push(s.run().await);
        }
        if let Some(k) = self.kubelet.as_ref().filter(|k| k.present()) {
            out.push(k.run().await);
        }
        out
    }
}

impl Systemd {
    async fn run(&self) -> Check {
        let started = Instant::now();
        let done = |required: bool, outcome: Outcome| Check {
            name: "systemd".into(),
            required,
            outcome,
            took: started.elapsed(),
        };
        if !self.booted_marker.exists() {
            return done(
                false,
                Outcome::NotRun {
                    reason: format!(
                        "systemd is not the init system ({} missing)",
                        self.booted_marker.display()
                    ),
                },
            );
        }
        let state = match capture(&self.systemctl, &["is-system-running", "--wait"], self.timeout).await {
            Ok((_, text)) => text.trim().to_owned(),
            Err(Outcome::TimedOut { after }) => return done(true, Outcome::TimedOut { after }),
            Err(o) => return done(true, o),
        };
        if state == "running" {
            return done(true, Outcome::Passed);
        }
        let listed = capture(
            &self.systemctl,
            &["list-units", "--state=failed", "--no-legend", "--plain", "--no-pager"],
            self.timeout,
        )
        .await;
        let units: Vec<String> = match listed {
            Ok((_, text)) => {
                text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
            }
            Err(_) => Vec::new(),
        };
        let output =
            if units.is_empty() { String::new() } else { format!("failed units: {}", units.join(", ")) };
        done(true, Outcome::Failed { status: format!("system is {state}"), output })
    }
}

impl Kubelet {
    async fn run(&self) -> Check {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let last = loop {
            let why = match get(&self.url).await {
                Ok((200, body)) if body.trim() == "ok" => {
                    return Check {
                        name: "kubelet".into(),
                        required: true,
                        outcome: Outcome::Passed,
                        took: started.elapsed(),
                    };
                }
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => e,
            };
            if Instant::now() + Duration::from_secs(1) > deadline {
                break why;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        Check {
            name: "kubelet".into(),
            required: true,
            outcome: Outcome::Failed {
                status: format!("not healthy after {:.0} s", self.timeout.as_secs_f64()),
                output: format!("{}: {last}", self.url),
            },
            took: started.elapsed(),
        }
    }
}

/// Runs `cmd args`, returning its status and standard output, or why not.
async fn capture(
    cmd: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String), Outcome> {
    let run = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(Outcome::TimedOut { after: timeout }),
        Ok(Err(e)) => Err(Outcome::NotRun { reason: format!("{}: {e}", cmd.display()) }),
        Ok(Ok(o)) => Ok((o.status, String::from_utf8_lossy(&o.stdout).into_owned())),
    }
}

/// One plain-HTTP GET (the kubelet's healthz listens on loopback), with a 5 s limit.
async fn get(url: &str) -> Result<(u16, String), String> {
    use http_body_util::BodyExt as _;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let call = async {
        let resp = client.get(uri).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            msg
        })?;
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((code, String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), call).await.map_err(|_| "no answer in 5 s".to_owned())?
}
