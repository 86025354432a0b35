//! `acl-coordinator`: the cluster side of Kubernetes mode, run as a Deployment (see the
//! library's docs and `integration/kubernetes/coordinator.yaml`). Logs to standard error.

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// Holds the reboot lock, cordons, drains and uncordons nodes for their update agents.
#[derive(Debug, Parser)]
#[command(name = "acl-coordinator", version)]
struct Args {
    /// A kubeconfig file (default: in-cluster credentials, else $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This replica's name, the leader Lease's holder (default: $POD_NAME, else the host name).
    #[arg(long)]
    identity: Option<String>,
    /// Where the Leases live: the lock's slots and the leader's.
    #[arg(long, default_value = "acl-update")]
    namespace: String,
    /// At most this many nodes drain or reboot at once (1 to 64).
    #[arg(long, default_value_t = 1)]
    max_rebooting: u32,
    /// A lock slot or the leadership not renewed for this long is presumed gone.
    #[arg(long, default_value = "60s", value_parser = duration)]
    lease_duration: Duration,
    /// How long a slot is held across a reboot and its health checks (longer than the agents'
    /// health deadline plus a boot).
    #[arg(long, default_value = "30m", value_parser = duration)]
    reboot_hold: Duration,
    /// How long a drain may take before the node is put off (and retried after as long).
    #[arg(long, default_value = "10m", value_parser = duration)]
    drain_timeout: Duration,
    /// Where Events about Nodes are written: "default" or "kube-system" (coordinator.yaml grants
    /// "default"; grant the other namespace too before choosing it).
    #[arg(long, default_value = "default")]
    events_namespace: String,
}

/// A duration from 1 s to 7 days.
fn duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration =
        s.parse().map_err(|e| format!("{s:?}: not a duration like 60s or 10m ({e})"))?;
    let d = Duration::try_from(d).map_err(|_| format!("{s:?}: must not be negative"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!("{s:?}: from 1s to 7 days"));
    }
    Ok(d)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(a: Args) -> Result<()> {
    if !(1..=cluster::annotations::MAX_SLOTS).contains(&a.max_rebooting) {
        bail!("--max-rebooting {}: from 1 to {}", a.max_rebooting, cluster::annotations::MAX_SLOTS);
    }
    if !["default", "kube-system"].contains(&a.events_namespace.as_str()) {
        bail!(
            "--events-namespace {}: the API server takes Events about Nodes only in \"default\" or \"kube-system\"",
            a.events_namespace
        );
    }
    let identity = match a.identity.or_else(|| std::env::var("POD_NAME").ok()) {
        Some(i) if !i.is_empty() => i,
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .context("no --identity, no $POD_NAME, and the host name cannot be read")?,
    };
    let client = cluster::client(a.kubeconfig.as_deref()).await?;
    let mut opts = coordinator::Options::new(&identity);
    opts.namespace = a.namespace;
    opts.max_rebooting = a.max_rebooting;
    opts.lease_duration = a.lease_duration;
    opts.reboot_hold = a.reboot_hold;
    opts.drain_timeout = a.drain_timeout;
    opts.events_namespace = a.events_namespace;
    opts.retry = (a.lease_duration / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    opts.drain_poll = opts.retry;
    tracing::info!("acl-coordinator {} as {identity}", env!("CARGO_PKG_VERSION"));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    coordinator::run(client, opts, async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
    .await;
    Ok(())
}
