//! Debian's nginx serving a directory on a free loopback port, for the demo and benchmarks.

use anyhow::{Context as _, Result, bail};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

/// A running nginx; stopped on drop.
#[derive(Debug)]
pub(crate) struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    /// Serves `root` from 127.0.0.1 on a free port; `work` holds its config, pid and temp files.
    pub(crate) fn start(root: &Path, work: &Path) -> Result<Nginx> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(root, work, port, "")
    }

    /// Serves `root` from 127.0.0.1:`port`; `server` is added to the server block (a
    /// `location` with a `limit_rate`, say).
    pub(crate) fn start_on(root: &Path, work: &Path, port: u16, server: &str) -> Result<Nginx> {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!("127.0.0.1:{port} is taken by another program");
        }
        let child = Command::new("nginx")
            .args(Self::args(root, work, port, server)?)
            .spawn()
            .context("start nginx")?;
        let server = Nginx { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("nginx did not listen on 127.0.0.1:{port}")
    }

    /// Serves `root` from 127.0.0.1:`port` of the network namespace `ns`.
    pub(crate) fn start_in(ns: &Netns, root: &Path, work: &Path, port: u16) -> Result<Nginx> {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nginx"])
            .args(Self::args(root, work, port, "")?)
            .spawn()
            .context("start nginx in a network namespace")?;
        let server = Nginx { child, port };
        // Reached from inside the namespace (bash's /dev/tcp: no other tool needed).
        let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
        for _ in 0..200 {
            let ok = Command::new("ip")
                .args(["netns", "exec", &ns.name, "bash", "-c", &probe])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("nginx did not listen on 127.0.0.1:{port} in network namespace {}", ns.name)
    }

    /// The configuration (written into `work`) and nginx's arguments.
    fn args(root: &Path, work: &Path, port: u16, server: &str) -> Result<Vec<std::ffi::OsString>> {
        std::fs::create_dir_all(work)?;
        let conf = work.join("nginx.conf");
        let tmp = work.display();
        std::fs::write(
            &conf,
            format!(
                "daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid; error_log stderr;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{ log_format sent '$body_bytes_sent'; access_log {tmp}/access.log sent;\n\
                   sendfile on; tcp_nopush on; gzip_static on;\n\
                   client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n\
                   uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
                   server {{ listen 127.0.0.1:{port}; root {}; {server} }} }}\n",
                root.display()
            ),
        )?;
        Ok(vec!["-c".into(), conf.into(), "-e".into(), "stderr".into()])
    }

    /// Body bytes sent so far, from the access log (written when each request completes).
    pub(crate) fn bytes_sent(&self, work: &Path) -> u64 {
        std::fs::read_to_string(work.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum()
    }

    /// The base URL.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace of our own (`ip netns add`), with its loopback up; deleted on drop.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    /// Creates `name` (a stale one of that name, left by a killed run, is replaced). Names
    /// are `<prefix>-<pid>`: namespaces of this prefix whose process is gone (a run killed
    /// before it could delete its own) are deleted first.
    pub(crate) fn new(name: &str) -> Result<Netns> {
        if let Some((prefix, _)) = name.rsplit_once('-')
            && let Ok(out) = Command::new("ip").args(["netns", "list"]).output()
        {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                let Some(old) = l.split_whitespace().next() else { continue };
                let pid = old.strip_prefix(prefix).and_then(|r| r.strip_prefix('-'));
                if let Some(pid) = pid.filter(|p| !Path::new("/proc").join(p).exists()) {
                    let _ = Command::new("ip").args(["netns", "delete", old]).status();
                    let _ = pid;
                }
            }
        }
        let ip = |args: &[&str]| -> Result<()> {
            let status = Command::new("ip").args(args).status().context("run ip (iproute2)")?;
            if !status.success() {
                bail!("ip {} failed ({status})", args.join(" "));
            }
            Ok(())
        };
        let _ =
            Command::new("ip").args(["netns", "delete", name]).stderr(std::process::Stdio::null()).status();
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        ip(&["netns", "exec", name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}
