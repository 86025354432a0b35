//! Loading, merging, provenance and validation.

use super::*;

fn root_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

#[test]
fn the_documented_defaults_are_the_defaults() {
    let parsed: Config = toml::from_str(DEFAULT_TOML).unwrap();
    assert_eq!(parsed, Config::default());
}

#[test]
fn later_files_win_key_by_key_and_origins_are_kept() {
    let dir = root_with(&[
        ("/usr/lib/acl-update/config.d/00-defaults.toml", DEFAULT_TOML),
        (
            "/etc/acl-update/config.toml",
            "[updates]\nrepository = \"https://updates.example.com/acl\"\nchannel = \"beta\"\n",
        ),
        ("/etc/acl-update/config.d/50-pin.toml", "[updates]\n\npinned-version = \"4012.1.0\"\n"),
        ("/etc/acl-update/config.d/90-channel.toml", "[updates]\nchannel = \"stable\"\n"),
        ("/etc/acl-update/config.d/ignored.txt", "not toml"),
    ]);
    let l = load(&Sources::under(dir.path())).unwrap();
    assert_eq!(l.files.len(), 4);
    assert_eq!(l.config.updates.repository, "https://updates.example.com/acl");
    assert_eq!(l.config.updates.channel, "stable");
    assert_eq!(l.config.updates.tries, 3, "untouched keys keep their default");
    assert!(
        l.origin("updates.pinned-version").ends_with("50-pin.toml:3"),
        "{}",
        l.origin("updates.pinned-version")
    );
    assert!(l.origin("updates.channel").ends_with("90-channel.toml:2"));
    let s = Settings::from_loaded(&l).unwrap();
    assert_eq!(s.pinned_version.unwrap().to_string(), "4012.1.0");
    assert_eq!(s.check_interval, std::time::Duration::from_secs(3600));
}

#[test]
fn a_typo_is_named_with_file_and_line() {
    let dir = root_with(&[(
        "/etc/acl-update/config.toml",
        "[updates]\nrepository = \"file:///r\"\nchanel = \"beta\"\n",
    )]);
    let e = load(&Sources::under(dir.path())).unwrap_err().to_string();
    assert!(e.contains("config.toml:3: unknown field `chanel`"), "{e}");
    let dir = root_with(&[("/etc/acl-update/config.toml", "[updates]\ntries = \"three\"\n")]);
    let e = load(&Sources::under(dir.path())).unwrap_err().to_string();
    assert!(e.contains("config.toml:2:"), "{e}");
    let dir = root_with(&[("/etc/acl-update/config.toml", "[updates\n")]);
    let e = load(&Sources::under(dir.path())).unwrap_err().to_string();
    assert!(e.contains("config.toml:1:"), "{e}");
}

#[test]
fn invalid_values_are_named_with_key_and_origin() {
    let cases = [
        ("[updates]\nrepository = \"file:///r\"\ntries = 16\n", "updates.tries: 16 is not in 1..=15"),
        (
            "[updates]\nrepository = \"file:///r\"\nmode = \"sometimes\"\n",
            "updates.mode: \"sometimes\" is not one of",
        ),
        (
            "[updates]\nmode = \"automatic\"\n",
            "default: updates.repository: is required unless mode is \"off\"",
        ),
        ("[updates]\nrepository = \"file:///r\"\ncheck-interval = \"5s\"\n", "shorter than the minimum 60s"),
        (
            "[updates]\nrepository = \"file:///r\"\npinned-version = \"latest\"\n",
            "updates.pinned-version: \"latest\" is not a version",
        ),
        (
            "[updates]\nrepository = \"file:///r\"\n[trust]\nthreshold = 0\n",
            "trust.threshold: must be at least 1",
        ),
        (
            "[updates]\nrepository = \"file:///r\"\n[reboot]\nwindows = [{ days = [\"Mon\", \"Funday\"], start = \"02:00\", length = \"2h\" }]\n",
            "window 1: \"Funday\" is not a weekday",
        ),
        (
            "[updates]\nrepository = \"file:///r\"\n[reboot]\nwindows = [{ days = [\"Mon\"], start = \"02:00\", length = \"2h\", time-zone = \"Mars/Olympus\" }]\n",
            "time zone \"Mars/Olympus\"",
        ),
        (
            "[updates]\nrepository = \"file:///r\"\n[kubernetes]\nenabled = true\nevents-namespace = \"acl-update\"\n",
            "kubernetes.events-namespace: \"acl-update\": Events about a Node must go to \"default\" or \"kube-system\"",
        ),
    ];
    for (text, expect) in cases {
        let dir = root_with(&[("/etc/acl-update/config.toml", text)]);
        let l = load(&Sources::under(dir.path())).unwrap();
        let e = Settings::from_loaded(&l).unwrap_err().to_string();
        let origin_ok = e.contains("config.toml:") || e.starts_with("default: ");
        assert!(e.contains(expect) && origin_ok, "{text}: {e}");
    }
}

#[test]
fn windows_open_and_close_in_their_time_zone() {
    let dir = root_with(&[(
        "/etc/acl-update/config.toml",
        "[updates]\nmode = \"off\"\n[reboot]\nwindows = [{ days = [\"Sat\"], start = \"23:00\", length = \"2h\", time-zone = \"Europe/Berlin\" }]\n",
    )]);
    let s = Settings::from_loaded(&load(&Sources::under(dir.path())).unwrap()).unwrap();
    let w = &s.windows[0];
    // 2026-11-28 is a Saturday; Berlin is UTC+1 in November.
    let at = |t: &str| w.contains(t.parse().unwrap());
    assert!(!at("2026-11-28T21:59:00Z"));
    assert!(at("2026-11-28T22:00:00Z"));
    assert!(at("2026-11-28T23:59:00Z"), "still open after midnight local time");
    assert!(!at("2026-11-29T00:00:00Z"));
    assert!(!at("2026-11-27T22:30:00Z"), "Friday");
}

#[test]
fn kubernetes_mode_is_off_by_default_and_read_when_enabled() {
    let dir = root_with(&[("/etc/acl-update/config.toml", "[updates]\nrepository = \"file:///r\"\n")]);
    let s = Settings::from_loaded(&load(&Sources::under(dir.path())).unwrap()).unwrap();
    assert_eq!(s.kubernetes, None);
    let dir = root_with(&[(
        "/etc/acl-update/config.toml",
        "[updates]\nrepository = \"file:///r\"\n[kubernetes]\nenabled = true\nnode-name = \"w1\"\n\
         kubeconfig = \"/etc/acl-update/kubeconfig\"\ndrain-timeout = \"5m\"\n",
    )]);
    let k = Settings::from_loaded(&load(&Sources::under(dir.path())).unwrap()).unwrap().kubernetes.unwrap();
    assert_eq!(k.node_name.as_deref(), Some("w1"));
    assert_eq!(k.kubeconfig.as_deref(), Some(std::path::Path::new("/etc/acl-update/kubeconfig")));
    assert_eq!(k.events_namespace, "default");
    // A file from before the coordinator still loads; its retired keys are named.
    assert_eq!(k.retired, ["kubernetes.drain-timeout"]);
    let dir = root_with(&[(
        "/etc/acl-update/config.toml",
        "[updates]\nrepository = \"file:///r\"\n[kubernetes]\nenabled = true\n",
    )]);
    let k = Settings::from_loaded(&load(&Sources::under(dir.path())).unwrap()).unwrap().kubernetes.unwrap();
    assert_eq!(
        k.kubeconfig.as_deref(),
        Some(std::path::Path::new("/var/lib/kubelet/kubeconfig")),
        "the node's own"
    );
    assert!(k.retired.is_empty());
}
