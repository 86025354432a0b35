//! Drop-in checks: passing, failing, hanging, broken and optional programs.

use health::{Checks, Outcome};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

fn script(dir: &Path, name: &str, body: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn checks(root: &Path, timeout_ms: u64) -> Checks {
    Checks {
        required_dir: root.join("required.d"),
        wanted_dir: root.join("wanted.d"),
        timeout: Duration::from_millis(timeout_ms),
        builtins: Default::default(),
        probes: Vec::new(),
        probe_wait: Duration::ZERO,
    }
}

#[tokio::test]
async fn all_required_pass_and_wanted_failures_are_only_reported() {
    let d = tempfile::tempdir().unwrap();
    script(&d.path().join("required.d"), "10-network", "exit 0");
    script(&d.path().join("required.d"), "20-disk", "true");
    script(&d.path().join("wanted.d"), "50-nice-to-have", "echo degraded >&2; exit 1");
    script(&d.path().join("required.d"), "30-old.disabled", "exit 1");
    let r = checks(d.path(), 5000).run().await;
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["10-network", "20-disk", "50-nice-to-have"], "order, and .disabled skipped");
    assert!(r.passed());
    assert_eq!(r.failures(), "");
    assert_eq!(r.checks[2].to_string(), "wanted check 50-nice-to-have failed (exit status 1): degraded");
}

#[tokio::test]
async fn a_failing_required_check_fails_with_its_output() {
    let d = tempfile::tempdir().unwrap();
    script(&d.path().join("required.d"), "50-kubelet", "echo 'kubelet: connection refused'; exit 3");
    let r = checks(d.path(), 5000).run().await;
    assert!(!r.passed());
    assert_eq!(r.failures(), "required check 50-kubelet failed (exit status 3): kubelet: connection refused");
}

#[tokio::test]
async fn a_hanging_check_is_killed_with_its_children() {
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("child-survived");
    // The check starts a child that would write the marker later; both must die at the timeout.
    script(
        &d.path().join("required.d"),
        "90-hang",
        &format!("(sleep 1; touch {}) & sleep 30", marker.display()),
    );
    let started = Instant::now();
    let r = checks(d.path(), 300).run().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(r.checks[0].outcome, Outcome::TimedOut { after: Duration::from_millis(300) });
    assert!(!r.passed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!marker.exists(), "the check's child outlived the timeout");
}

#[tokio::test]
async fn a_program_that_cannot_run_fails_a_required_check() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("required.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("10-not-executable"), "exit 0\n").unwrap();
    let r = checks(d.path(), 1000).run().await;
    assert!(
        matches!(&r.checks[0].outcome, Outcome::NotRun { reason } if reason.contains("Permission denied")),
        "{r:?}"
    );
    assert!(!r.passed());
    // No directories at all: nothing to check, nothing failed.
    let r = checks(&d.path().join("none"), 1000).run().await;
    assert!(r.checks.is_empty() && r.passed());
}

/// A probe the agent supplies: it runs after the programs' built-ins with its own wait, and a
/// failing one fails the report like a required program.
#[derive(Debug)]
struct NotReady;

impl health::Probe for NotReady {
    fn check(
        &self,
        wait: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = health::Check> + Send + '_>> {
        Box::pin(async move {
            health::Check {
                name: "node-ready".into(),
                required: true,
                outcome: Outcome::TimedOut { after: wait },
                took: wait,
            }
        })
    }
}

#[tokio::test]
async fn probes_are_checks_too() {
    let d = tempfile::tempdir().unwrap();
    script(&d.path().join("required.d"), "10-ok", "exit 0");
    let mut c = checks(d.path(), 5000);
    c.probes.push(std::sync::Arc::new(NotReady));
    c.probe_wait = Duration::from_secs(7);
    let r = c.run().await;
    assert!(!r.passed());
    assert_eq!(r.checks[0].name, "node-ready", "probes run before the programs");
    assert!(r.failures().contains("node-ready"), "{}", r.failures());
    assert!(r.failures().contains("after 7 s"), "{}", r.failures());
}
