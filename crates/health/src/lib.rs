//! Health checks after booting a slot that is not yet confirmed.
//!
//! Checks are executables dropped into two directories: every program in `required.d` must
//! exit 0 (one failure fails the slot), a program in `wanted.d` that fails is only reported.
//! Each runs with a timeout and is killed when it runs out; its exit status and the tail of its
//! output are kept for the report, so an operator reading "rolled back" also reads why.
//! Programs run one after another in file-name order, required ones first, so their order can
//! express dependencies ("10-network" before "50-kubelet").
//!
//! Built-in checks ([`builtin`]: systemd reached its target with no failed units, the kubelet
//! healthy when installed) run first and report as the same kind of [`Check`] results; Node
//! Ready joins them with Kubernetes (issue 6).

pub mod builtin;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt as _;

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Passed,
    /// A non-zero exit status or a signal.
    Failed {
        /// "exit status 3", "killed by signal 9".
        status: String,
        /// The last lines of its output (stdout and stderr).
        output: String,
    },
    /// Still running at the timeout; killed.
    TimedOut {
        /// The timeout.
        after: Duration,
    },
    /// Could not be started (not executable, bad interpreter).
    NotRun {
        /// Why.
        reason: String,
    },
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The program's file name.
    pub name: String,
    /// Whether its failure fails the slot.
    pub required: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it ran.
    pub took: Duration,
}

impl Check {
    /// Whether it passed.
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.required { "required" } else { "wanted" };
        match &self.outcome {
            Outcome::Passed => write!(f, "{kind} check {} passed", self.name),
            Outcome::Failed { status, output } if output.is_empty() => {
                write!(f, "{kind} check {} failed ({status})", self.name)
            }
            Outcome::Failed { status, output } => {
                write!(f, "{kind} check {} failed ({status}): {output}", self.name)
            }
            Outcome::TimedOut { after } => {
                write!(f, "{kind} check {} timed out after {:.0} s", self.name, after.as_secs_f64())
            }
            Outcome::NotRun { reason } => write!(f, "{kind} check {} could not run: {reason}", self.name),
        }
    }
}

/// All checks of one health run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// In the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every required check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| !c.required || c.passed())
    }

    /// The failed required checks, one per line; empty when passed.
    pub fn failures(&self) -> String {
        self.checks
            .iter()
            .filter(|c| c.required && !c.passed())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Where the checks are and how long each may take.
#[derive(Debug, Clone)]
pub struct Checks {
    /// Programs that must pass.
    pub required_dir: PathBuf,
    /// Programs whose failure is only reported.
    pub wanted_dir: PathBuf,
    /// Time one program may take.
    pub timeout: Duration,
    /// The built-in checks (run first).
    pub builtins: builtin::Builtins,
    /// Checks the agent adds at run time (Kubernetes mode: the Node is Ready), run after the
    /// built-ins.
    pub probes: Vec<std::sync::Arc<dyn Probe>>,
    /// How long a probe may wait to pass.
    pub probe_wait: Duration,
}

/// A check supplied by the agent rather than a program (it needs the agent's connections).
pub trait Probe: Send + Sync + std::fmt::Debug {
    /// Runs the check, waiting up to `timeout` for it to pass.
    fn check(
        &self,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Check> + Send + '_>>;
}

/// Output kept per check.
const OUTPUT_TAIL: usize = 2000;

impl Checks {
    /// Runs every program of both directories (a missing directory has no checks).
    pub async fn run(&self) -> Report {
        let mut report = Report { checks: self.builtins.run().await };
        for p in &self.probes {
            report.checks.push(p.check(self.probe_wait).await);
        }
        for (dir, required) in [(&self.required_dir, true), (&self.wanted_dir, false)] {
            for program in programs(dir) {
                report.checks.push(run_one(&program, required, self.timeout).await);
            }
        }
        report
    }
}

fn programs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    // Editor backups and disabled checks are not run.
    v.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.') && !n.ends_with('~') && !n.ends_with(".disabled"))
    });
    v.sort();
    v
}

async fn run_one(program: &Path, required: bool, timeout: Duration) -> Check {
    let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let started = Instant::now();
    let spawned = tokio::process::Command::new(program)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Check {
                name,
                required,
                outcome: Outcome::NotRun { reason: e.to_string() },
                took: started.elapsed(),
            };
        }
    };
    let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let collect = async {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let _ = tokio::join!(out.read_to_end(&mut a), err.read_to_end(&mut b));
        a.extend_from_slice(&b);
        a
    };
    let waited = tokio::time::timeout(timeout, async { tokio::join!(child.wait(), collect) }).await;
    let outcome = match waited {
        Err(_) => {
            // Kill the whole process group: a check's own children must not outlive it.
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            Outcome::TimedOut { after: timeout }
        }
        Ok((Err(e), _)) => Outcome::NotRun { reason: e.to_string() },
        Ok((Ok(status), output)) if status.success() => {
            let _ = output;
            Outcome::Passed
        }
        Ok((Ok(status), output)) => {
            let text = String::from_utf8_lossy(&output);
            let text = text.trim();
            let tail = text.char_indices().rev().nth(OUTPUT_TAIL).map_or(text, |(i, _)| &text[i..]);
            let status = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => status.to_string(),
            };
            Outcome::Failed { status, output: tail.replace('\n', " | ") }
        }
    };
    Check { name, required, outcome, took: started.elapsed() }
}
