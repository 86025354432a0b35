//! The systemd unit's hardening, scored by `systemd-analyze security --offline` (no running
//! systemd needed): the exposure must stay at or below 3.0 ("OK"), and the settings the
//! design relies on must be there.

use std::path::Path;
use std::process::Command;

fn unit() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../systemd/acl-agentd.service")
}

#[test]
fn exposure_is_at_most_3() {
    let Some(analyze) = testkit::tool("systemd-analyze", "systemd") else { return };
    let unit = unit();
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .current_dir(unit.parent().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for acl-agentd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {text}{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 3.0, "exposure {score} > 3.0:\n{text}");
}

#[test]
fn the_unit_keeps_its_contract() {
    let text = std::fs::read_to_string(unit()).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "CapabilityBoundingSet=\n",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "DevicePolicy=closed",
        "SystemCallFilter=@system-service",
        "StateDirectory=acl-update",
    ] {
        assert!(text.contains(line), "acl-agentd.service lacks {line:?}");
    }
}
