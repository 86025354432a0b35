//! `acl-agentd`: the update agent daemon. Loads the configuration, finds the disk and the
//! running slot, drops every capability it does not need, tells systemd it is ready, and runs
//! the daemon loop until SIGTERM. Logs go to journald with structured fields when systemd
//! connected standard error to the journal (`JOURNAL_STREAM`), else to standard error.

use agent::daemon::{self, Env, Platform};
use anyhow::{Context as _, Result};
use clap::Parser;
use slot::choice::Slot;
use std::path::PathBuf;
use std::sync::Arc;

/// The update agent daemon (normally started by systemd: acl-agentd.service).
#[derive(Debug, Parser)]
#[command(name = "acl-agentd", version)]
struct Args {
    /// Look for the configuration under this directory instead of /.
    #[arg(long, default_value = "/")]
    config_root: PathBuf,
    /// The disk with the slots (default: [agent] disk, else the running system's disk).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// The running slot, A or B (default: from the kernel command line or the /usr mount).
    #[arg(long)]
    booted: Option<Slot>,
}

fn main() -> std::process::ExitCode {
    cliutil::default_sigpipe();
    cliutil::fix_malloc_threshold();
    let args = Args::parse();
    init_logging();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", cliutil::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// journald (structured: PRIORITY, the message, and each event field as its own journal
/// field, e.g. VERSION=2.0.0) when started by systemd with the journal as standard error;
/// plain lines on standard error otherwise.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let level = tracing_subscriber::filter::LevelFilter::INFO;
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|l| l.with_syslog_identifier("acl-agentd".into()));
    match journald {
        Some(j) => tracing_subscriber::registry().with(j.with_filter(level)).init(),
        None => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .with_target(false)
                    .with_filter(level),
            )
            .init(),
    }
    slot::lock::set_wait_notice(|m| tracing::info!("{m}"));
}

/// The real machine, with systemd's watchdog pinged whenever the loop runs.
#[derive(Debug)]
struct Systemd(daemon::System);

impl Platform for Systemd {
    fn now(&self) -> jiff::Timestamp {
        self.0.now()
    }
    fn reboot(&self) -> Result<(), String> {
        self.0.reboot()
    }
    fn alive(&self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }
}

fn run(args: Args) -> Result<()> {
    let loaded = config::load(&config::Sources::under(&args.config_root))?;
    let settings = config::Settings::from_loaded(&loaded)?;
    let cmdline = slot::system::kernel_cmdline();
    let disk = match args.disk.clone().or_else(|| settings.disk.clone()) {
        Some(d) => d,
        None => slot::system::system_disk(cmdline.as_deref()).map_err(anyhow::Error::msg)?,
    };
    let d = slot::Disk::open(&disk, false)?;
    let booted = match args.booted {
        Some(s) => s,
        None => slot::system::booted_slot(&d, cmdline.as_deref()).with_context(|| {
            format!(
                "cannot tell which slot of {} is running (kernel command line or /usr mount)",
                disk.display()
            )
        })?,
    };
    drop(d);
    let machine_id = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .context("read /etc/machine-id (the stable id that places this machine in rollout waves)")?;
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("create {}", settings.state_dir.display()))?;
    drop_capabilities()?;

    // Wake at least as often as the watchdog needs; the loop itself sleeps until something is due.
    let tick = sd_notify::watchdog_enabled().map_or(settings.check_interval, |w| w / 2);
    let platform = Arc::new(Systemd(daemon::System { reboot_command: settings.reboot_command.clone() }));
    let metrics = Arc::new(agent::metrics::Metrics::new());
    let status = Arc::new(tokio::sync::watch::channel(daemon::Snapshot::default()).0);
    let (probes, ready_feed) = match settings.kubernetes {
        Some(_) => {
            let (probe, feed) = agent::kube::node_ready_probe();
            (vec![probe as Arc<dyn health::Probe>], Some(feed))
        }
        None => (Vec::new(), None),
    };
    let (transitions, transitions_rx) = tokio::sync::mpsc::unbounded_channel();
    let env = Env {
        transitions: settings.kubernetes.is_some().then_some(transitions),
        coordinated: settings.kubernetes.is_some(),
        status: Arc::clone(&status),
        probes,
        settings,
        disk,
        booted,
        machine_id,
        arch: std::env::consts::ARCH.into(),
        platform,
        tick,
        metrics: Arc::clone(&metrics),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let (requests, rx) = tokio::sync::mpsc::channel(16);
        let requests_k8s = requests.clone();
        let socket = env.settings.socket.clone();
        tokio::spawn(async move {
            if let Err(e) = agent::api::serve(&socket, requests).await {
                tracing::error!("local API on {}: {e}", socket.display());
            }
        });
        if let Some(addr) = env.settings.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics on {addr} (agent.metrics-listen)"))?;
            let addr = listener.local_addr().unwrap_or(addr);
            tracing::info!("serving metrics on http://{addr}/metrics");
            tokio::spawn(agent::metrics::serve(listener, metrics));
        }
        if let (Some(k), Some(feed)) = (env.settings.kubernetes.clone(), ready_feed) {
            let node = match &k.node_name {
                Some(n) => n.clone(),
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .context("the Node's name (kubernetes.node-name unset, and no host name)")?,
            };
            let client = cluster::client(k.kubeconfig.as_deref()).await?;
            let opts = agent::kube::Options::new(&k, node.clone());
            tracing::info!(
                node = %node,
                "Kubernetes mode with {}: reboots wait for the coordinator",
                k.kubeconfig.as_ref().map_or("the inferred credentials".into(), |p| p.display().to_string())
            );
            for key in &k.retired {
                tracing::warn!(
                    "{key} is ignored: the coordinator holds the reboot lock and drains now (its own flags)"
                );
            }
            tokio::spawn(agent::kube::run(
                client,
                opts,
                requests_k8s,
                status.subscribe(),
                transitions_rx,
                feed,
            ));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        daemon::run(env, rx, shutdown).await?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        Ok(())
    })
}

/// The agent needs no capability: it writes block devices it owns as root, and reboots by
/// asking systemd. Dropping them all, CAP_SYS_ADMIN first, means the process that talks to the
/// network cannot mount, load modules or change the system even if it is compromised.
fn drop_capabilities() -> Result<()> {
    for set in
        [caps::CapSet::Ambient, caps::CapSet::Inheritable, caps::CapSet::Effective, caps::CapSet::Permitted]
    {
        // Under its unit the agent starts with none, and capset(2) is outside its system-call
        // filter (@privileged): only a set that holds something is cleared.
        if caps::read(None, set).with_context(|| format!("read capabilities ({set:?})"))?.is_empty() {
            continue;
        }
        caps::clear(None, set).with_context(|| format!("drop capabilities ({set:?})"))?;
    }
    // The bounding set can only shrink while CAP_SETPCAP is held, so it is shrunk by the
    // systemd unit (CapabilityBoundingSet=); outside systemd nothing above is left to raise.
    Ok(())
}
