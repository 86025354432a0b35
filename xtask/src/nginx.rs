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
        Self::start_on(root, work, port)
    }

    /// Serves `root` from 127.0.0.1:`port`.
    pub(crate) fn start_on(root: &Path, work: &Path, port: u16) -> Result<Nginx> {
        std::fs::create_dir_all(work)?;
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!("127.0.0.1:{port} is taken by another program");
        }
        let conf = work.join("nginx.conf");
        let tmp = work.display();
        std::fs::write(
            &conf,
            format!(
                "daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid; error_log stderr;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{ log_format sent '$body_bytes_sent'; access_log {tmp}/access.log sent;\n\
                   sendfile on; tcp_nopush on;\n\
                   client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n\
                   uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
                   server {{ listen 127.0.0.1:{port}; root {}; }} }}\n",
                root.display()
            ),
        )?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg("stderr")
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
