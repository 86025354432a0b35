//! The built-in checks against a stand-in `systemctl` (a script answering as systemd does) and
//! a real HTTP server playing the kubelet's healthz.

use health::Outcome;
use health::builtin::{Builtins, Kubelet, Systemd};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn systemctl(dir: &Path, state: &str, failed: &str) -> Systemd {
    let p = dir.join("systemctl");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  is-system-running) echo {state}; [ {state} = running ];;\n  \
             list-units) printf '{failed}';;\n  *) exit 2;;\nesac\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    Systemd { systemctl: p, booted_marker: dir.to_owned(), timeout: Duration::from_secs(5) }
}

#[tokio::test]
async fn systemd_running_passes_degraded_names_the_failed_units() {
    let d = tempfile::tempdir().unwrap();
    let b = Builtins { systemd: Some(systemctl(d.path(), "running", "")), kubelet: None };
    let r = b.run().await;
    assert_eq!(r.len(), 1);
    assert!(r[0].passed() && r[0].required, "{:?}", r[0]);

    let b = Builtins {
        systemd: Some(systemctl(
            d.path(),
            "degraded",
            "app.service loaded failed failed My app\\nvar-lib.mount loaded failed failed Data\\n",
        )),
        kubelet: None,
    };
    let c = &b.run().await[0];
    assert!(!c.passed() && c.required);
    assert_eq!(
        c.to_string(),
        "required check systemd failed (system is degraded): failed units: app.service, var-lib.mount"
    );
}

#[tokio::test]
async fn without_systemd_as_init_the_check_is_reported_not_run_and_does_not_fail() {
    let d = tempfile::tempdir().unwrap();
    let mut s = systemctl(d.path(), "running", "");
    s.booted_marker = d.path().join("no-such-dir");
    let c = &Builtins { systemd: Some(s), kubelet: None }.run().await[0];
    assert!(!c.required && matches!(c.outcome, Outcome::NotRun { .. }), "{c:?}");
}

/// Serves `answers` in turn (status, body), then the last one forever.
async fn healthz(answers: Vec<(u16, &'static str)>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/healthz", l.local_addr().unwrap());
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let (code, body) = answers[n.min(answers.len() - 1)];
            n += 1;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    url
}

fn kubelet(url: String, unit_dir: &Path, always: bool, secs: u64) -> Builtins {
    Builtins {
        systemd: None,
        kubelet: Some(Kubelet {
            url,
            always,
            unit_dirs: vec![unit_dir.to_owned()],
            timeout: Duration::from_secs(secs),
        }),
    }
}

#[tokio::test]
async fn kubelet_runs_only_when_installed_and_waits_for_ok() {
    let units = tempfile::tempdir().unwrap();
    // Not installed: no check at all.
    let url = healthz(vec![(500, "down")]).await;
    assert!(kubelet(url.clone(), units.path(), false, 3).run().await.is_empty());
    // Installed: not ready at first, then ok within the timeout.
    std::fs::write(units.path().join("kubelet.service"), "[Service]\n").unwrap();
    let url = healthz(vec![(500, "[-]syncloop failed"), (200, "ok")]).await;
    let c = &kubelet(url, units.path(), false, 5).run().await[0];
    assert!(c.passed() && c.required, "{c:?}");
    // Never ok: fails with the last answer.
    let url = healthz(vec![(500, "[-]syncloop failed")]).await;
    let c = &kubelet(url, units.path(), false, 2).run().await[0];
    assert!(!c.passed(), "{c:?}");
    assert!(c.to_string().contains("HTTP 500: [-]syncloop failed"), "{c}");
}

#[tokio::test]
async fn a_required_kubelet_that_does_not_listen_fails_naming_the_url() {
    let units = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let c = &kubelet(url.clone(), units.path(), true, 1).run().await[0];
    assert!(!c.passed() && c.to_string().contains(&url), "{c}");
    assert!(c.to_string().to_lowercase().contains("refused"), "{c}");
}
