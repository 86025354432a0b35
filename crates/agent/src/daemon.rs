//! The daemon loop: feeds [`Event`]s to the state machine, persists each new state, then
//! carries out its [`Action`]s, whose results come back as events.
//!
//! One task owns the state (no locks); long work (checking the repository, installing,
//! health checks) runs in spawned tasks that report back on a channel. The clock and the
//! reboot are behind [`Platform`], so tests run the real daemon in process with a clock they
//! move and a reboot they observe.

use crate::machine::{self, Action, Boot, Event, Phase, Request, State};
use crate::metrics::Metrics;
use crate::persist;
use config::Settings;
use fetch::{FetchOptions, Fetcher};
use jiff::{SignedDuration, Timestamp};
use repo::TrustPolicy;
use repo::state::AcceptedState;
use signing::TrustedKeys;
use slot::choice::{self, Slot};
use slot::{Disk, Tries};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What the daemon needs from the machine it runs on.
pub trait Platform: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
    /// Reboots the machine (returns when the reboot has been requested).
    fn reboot(&self) -> Result<(), String>;
    /// Called every time the loop runs (the systemd watchdog ping).
    fn alive(&self) {}
}

/// The real machine: the system clock and the configured reboot command.
#[derive(Debug)]
pub struct System {
    /// The reboot command and its arguments (`[agent] reboot-command`).
    pub reboot_command: Vec<String>,
}

impl Platform for System {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
    fn reboot(&self) -> Result<(), String> {
        let (cmd, args) = self.reboot_command.split_first().ok_or("no reboot command")?;
        let shown = self.reboot_command.join(" ");
        let status =
            std::process::Command::new(cmd).args(args).status().map_err(|e| format!("{shown}: {e}"))?;
        if status.success() { Ok(()) } else { Err(format!("{shown}: {status}")) }
    }
}

/// Everything the daemon runs with.
#[derive(Debug, Clone)]
pub struct Env {
    /// The validated configuration.
    pub settings: Settings,
    /// The disk with the slots.
    pub disk: PathBuf,
    /// The running slot.
    pub booted: Slot,
    /// A stable machine id (rollout waves).
    pub machine_id: String,
    /// The CPU architecture of images to install.
    pub arch: String,
    /// Clock and reboot.
    pub platform: Arc<dyn Platform>,
    /// How often the loop wakes without events (a repository check happens only when due).
    pub tick: Duration,
    /// The metrics to keep up to date.
    pub metrics: Arc<Metrics>,
    /// The reboot is coordinated from outside (Kubernetes mode): the daemon does not reboot when
    /// a window opens but sets [`Snapshot::reboot_wanted`] and waits for
    /// [`Request::AllowReboot`].
    pub coordinated: bool,
    /// Where the daemon publishes its state after every step, for whoever follows it.
    pub status: Arc<tokio::sync::watch::Sender<Snapshot>>,
    /// Health checks supplied at run time (Kubernetes mode: the Node is Ready).
    pub probes: Vec<Arc<dyn health::Probe>>,
    /// Every change of phase or note, in order and none lost (Kubernetes mode writes an Event
    /// for each; the published [`Snapshot`] only keeps the latest).
    pub transitions: Option<mpsc::UnboundedSender<Transition>>,
}

/// A change of phase or note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The phase before.
    pub from: &'static str,
    /// The phase after.
    pub to: &'static str,
    /// The note after.
    pub note: String,
    /// What the step meant.
    pub outcome: machine::Outcome,
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state could not be persisted: acting without persisting would break crash safety.
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    /// The trusted keys could not be loaded.
    #[error("trusted keys: {0}")]
    Trust(String),
    /// The repository URL is unusable.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
}

/// A request on the local API, and where to send the state after it.
pub type ApiRequest = (Request, oneshot::Sender<Snapshot>);

/// What the API answers: the state, and the running install's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The agent's state.
    pub state: State,
    /// A repository check is running (not part of the persisted state).
    pub checking: bool,
    /// The install in progress, if any.
    pub progress: Option<Progress>,
    /// The booted slot's version, if known.
    #[serde(default)]
    pub booted_version: Option<String>,
    /// An update is staged, its window is open, and (coordinated) it waits for
    /// [`Request::AllowReboot`].
    #[serde(default)]
    pub reboot_wanted: bool,
}

pub use localapi::Progress;

/// Shared between the install task and the loop.
#[derive(Debug, Default)]
struct InstallProgress {
    total: AtomicU64,
    counters: Arc<install::Counters>,
}

impl InstallProgress {
    fn get(&self) -> Progress {
        let c = &self.counters;
        Progress {
            total: self.total.load(Ordering::Relaxed),
            done: c.done.load(Ordering::Relaxed),
            reused: c.reused.load(Ordering::Relaxed),
            resumed: c.resumed.load(Ordering::Relaxed),
            verified: c.read_back.load(Ordering::Relaxed),
        }
    }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    env: Env,
    mut requests: mpsc::Receiver<ApiRequest>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let s = &env.settings;
    let keys = TrustedKeys::load(&s.trust_keys).map_err(|e| AgentError::Trust(e.to_string()))?;
    let policy = TrustPolicy::new(keys, s.threshold.get()).map_err(AgentError::Trust)?;
    let fetch_opts = FetchOptions { ca_file: s.ca_file.clone(), ..FetchOptions::default() };
    let fetcher = Fetcher::new(&s.repository, fetch_opts)?;
    let cfg = machine::Config {
        check_interval: SignedDuration::try_from(s.check_interval).unwrap_or(SignedDuration::from_hours(1)),
        health_deadline: SignedDuration::try_from(s.health_deadline).unwrap_or(SignedDuration::from_mins(10)),
        checks: s.mode != config::Mode::Off,
        installs: s.mode == config::Mode::Automatic,
        paused: s.paused,
    };
    let (results_tx, mut results) = mpsc::unbounded_channel::<Event>();
    let mut d = Daemon {
        env: env.clone(),
        policy: Arc::new(policy),
        fetcher,
        results: results_tx,
        state: persist::load(&s.state_dir)?,
        since: env.platform.now(),
        install: Arc::default(),
        booted_version: None,
    };
    env.metrics.state(&d.state);
    let (fetched, install) = (d.fetcher.clone(), Arc::clone(&d.install));
    env.metrics.set_source(Box::new(move || {
        let p = install.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(|p| p.get());
        (fetched.bytes_fetched(), p.as_ref().map_or(0, |p| p.total), p.map_or(0, |p| p.done))
    }));

    recover_record(&env, &d.policy);
    let slots = Disk::open(&env.disk, false).map(|disk| disk.slots()).ok();
    let boot = Boot {
        version: install::recorded_manifest(&s.state_dir, env.booted).map(|(m, _)| m.version),
        confirmed: slots.is_some_and(|x| x.get(env.booted).successful()),
        other_boots_next: slots.is_some_and(|x| choice::choose(&x) == Some(env.booted.other())),
    };
    d.booted_version = boot.version.as_ref().map(ToString::to_string);
    tracing::info!(
        slot = %env.booted,
        version = d.booted_version.as_deref().unwrap_or("unknown"),
        confirmed = boot.confirmed,
        "agent started: slot {} runs {}{}",
        env.booted,
        d.booted_version.as_deref().unwrap_or("an unknown version"),
        if boot.confirmed { "" } else { " (not confirmed yet)" }
    );
    d.feed(&Event::Started { boot, now: env.platform.now() }, &cfg)?;
    tokio::pin!(shutdown);
    loop {
        env.platform.alive();
        d.publish();
        let wait = next_wake(&d.state, &cfg, env.platform.now()).min(env.tick);
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(wait) => {
                let now = env.platform.now();
                d.feed(&Event::Tick { now }, &cfg)?;
                // A staged update reboots once a window allows it (unless coordinated).
                if !env.coordinated && matches!(d.state.phase, Phase::Staged { .. }) && d.reboot_allowed(now) {
                    d.feed(&Event::RebootAllowed, &cfg)?;
                }
            }
            Some(event) = results.recv() => d.feed(&event, &cfg)?,
            Some((request, reply)) = requests.recv() => {
                d.feed(&Event::Operator(request), &cfg)?;
                let _ = reply.send(d.snapshot());
            }
        }
    }
}

/// How long the loop may sleep: until the next check is due, the health deadline passes, or
/// (with an update staged) a minute to look at the maintenance windows again. An idle agent
/// wakes once per check interval.
fn next_wake(state: &State, cfg: &machine::Config, now: Timestamp) -> Duration {
    let until = |t: Timestamp| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO);
    match &state.phase {
        Phase::Verifying { deadline, .. } => until(*deadline),
        Phase::Staged { .. } => Duration::from_secs(60),
        _ => match state.last_check {
            Some(t) => until(t.saturating_add(cfg.check_interval).unwrap_or(t)),
            None => Duration::ZERO,
        },
    }
}

struct Daemon {
    env: Env,
    policy: Arc<TrustPolicy>,
    fetcher: Fetcher,
    results: mpsc::UnboundedSender<Event>,
    state: State,
    /// When the current phase was entered (or the agent started).
    since: Timestamp,
    /// The running install's progress (shared with the metrics).
    install: Arc<std::sync::Mutex<Option<Arc<InstallProgress>>>>,
    booted_version: Option<String>,
}

impl Daemon {
    /// One step: transition, persist, then act.
    fn feed(&mut self, event: &Event, cfg: &machine::Config) -> Result<(), AgentError> {
        let (next, actions) = machine::step(&self.state, event, cfg);
        let m = &self.env.metrics;
        if let Event::Checked { decision, .. } = event {
            m.checked(decision);
        }
        if let Event::Installed { .. } = event {
            m.refresh();
            if let Some(p) = self.install_slot().take() {
                m.reused(p.get().reused);
            }
        }
        if next != self.state {
            persist::save(&self.env.settings.state_dir, &next)?;
            if next.phase != self.state.phase || next.note != self.state.note {
                self.record(&next, machine::outcome(&self.state, event, &next));
            }
            let now = self.env.platform.now();
            m.transition(&self.state, &next, self.since, now);
            if next.phase.name() != self.state.phase.name() {
                self.since = now;
            }
            self.state = next;
            let target = self.state.phase.version().map(ToString::to_string);
            m.info(&self.env.booted.to_string(), self.booted_version.as_deref(), target.as_deref());
        }
        for a in actions {
            self.act(a, cfg)?;
        }
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        let now = self.env.platform.now();
        Snapshot {
            state: self.state.clone(),
            checking: self.state.checking,
            progress: self.progress(),
            booted_version: self.booted_version.clone(),
            reboot_wanted: self.env.coordinated
                && !self.state.paused
                && matches!(self.state.phase, Phase::Staged { .. })
                && self.reboot_allowed(now),
        }
    }

    /// Tells followers (Kubernetes mode) about a changed state.
    fn publish(&self) {
        let next = self.snapshot();
        self.env.status.send_if_modified(|s| {
            let changed = *s != next;
            if changed {
                *s = next;
            }
            changed
        });
    }

    fn reboot_allowed(&self, now: Timestamp) -> bool {
        let w = &self.env.settings.windows;
        w.is_empty() || w.iter().any(|w| w.contains(now))
    }

    fn install_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<InstallProgress>>> {
        self.install.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn progress(&self) -> Option<Progress> {
        self.install_slot().as_ref().map(|p| p.get())
    }

    /// Adds the new phase and note to the persistent history (a failure to record is logged,
    /// not fatal: the history is for people, the state file is what matters).
    fn record(&self, next: &State, outcome: machine::Outcome) {
        let phase =
            serde_json::to_value(&next.phase).ok().and_then(|v| v["phase"].as_str().map(str::to_owned));
        let entry = crate::history::Entry {
            time: self.env.platform.now(),
            phase: phase.unwrap_or_default(),
            message: next.note.clone(),
        };
        tracing::info!(phase = %entry.phase, "{}", entry.message);
        if let Some(tx) = &self.env.transitions {
            let _ = tx.send(Transition {
                from: self.state.phase.name(),
                to: next.phase.name(),
                note: next.note.clone(),
                outcome,
            });
        }
        if let Err(e) = crate::history::append(&self.env.settings.state_dir, &entry) {
            tracing::warn!("could not add to the event history: {e}");
        }
    }

    fn act(&mut self, action: Action, cfg: &machine::Config) -> Result<(), AgentError> {
        let env = self.env.clone();
        let tx = self.results.clone();
        let now = env.platform.now();
        match action {
            Action::Check(requested) => {
                let (fetcher, policy, state) =
                    (self.fetcher.clone(), Arc::clone(&self.policy), self.state.clone());
                tokio::spawn(async move {
                    let decision = check(&env, &fetcher, &policy, &state, requested.as_ref()).await;
                    if let Err(e) = &decision {
                        tracing::warn!("repository check failed: {e}");
                    }
                    let _ = tx.send(Event::Checked { decision, requested, now: env.platform.now() });
                });
            }
            Action::Install(version, manifest) => {
                let (fetcher, policy) = (self.fetcher.clone(), Arc::clone(&self.policy));
                let progress = Arc::new(InstallProgress::default());
                *self.install_slot() = Some(Arc::clone(&progress));
                tokio::spawn(async move {
                    let result =
                        install_version(&env, &fetcher, &policy, &version, manifest, &progress).await;
                    let _ = tx.send(Event::Installed { result, now: env.platform.now() });
                });
            }
            Action::RequestReboot => {
                if !env.coordinated && self.reboot_allowed(now) {
                    self.feed(&Event::RebootAllowed, cfg)?;
                }
            }
            Action::Reboot => {
                tracing::info!("rebooting");
                if let Err(e) = env.platform.reboot() {
                    tracing::error!("reboot failed: {e}");
                }
            }
            Action::RunHealth => {
                let mut checks = health_checks(&env.settings);
                checks.probes.clone_from(&env.probes);
                tokio::spawn(async move {
                    let report = checks.run().await;
                    let result = if report.passed() { Ok(()) } else { Err(report.failures()) };
                    let _ = tx.send(Event::Health { result, now: env.platform.now() });
                });
            }
            Action::MarkGood => {
                self.slots("mark good", |s| choice::mark_good(s, env.booted));
            }
            Action::MarkBadAndReboot => {
                // Only a slot actually marked bad is left: a reboot without the mark would boot
                // the same slot and spend its tries until nothing boots (issue 12).
                match self.change_slots("mark bad", |s| choice::mark_bad(s, env.booted)) {
                    Ok(_) => {
                        tracing::info!("rebooting into the previous slot");
                        if let Err(e) = env.platform.reboot() {
                            tracing::error!("reboot failed: {e}");
                        }
                    }
                    Err(e) => {
                        let event = Event::MarkBadFailed { slot: env.booted, reason: e.to_string() };
                        self.feed(&event, cfg)?;
                    }
                }
            }
            Action::Rollback { reboot } => {
                // A refused rollback (nothing good to go back to) must not reboot.
                if !self.slots("rollback", |s| choice::rollback(s, env.booted)) {
                    return Ok(());
                }
                // Recorded before the reboot, so that the version rolled back from is not
                // installed again at the next check (it is still the newest release).
                let from = self.booted_version.as_deref().and_then(|v| v.parse().ok());
                self.feed(&Event::RolledBack { from, now: env.platform.now() }, cfg)?;
                if reboot {
                    tracing::info!("rebooting into the other slot (operator rollback)");
                    if let Err(e) = env.platform.reboot() {
                        tracing::error!("reboot failed: {e}");
                    }
                }
            }
            Action::Unstage => {
                self.slots("unstage", |s| choice::prepare(s, env.booted));
            }
            Action::Log(m) => tracing::warn!("{m}"),
        }
        Ok(())
    }

    /// Applies a slot transition; whether it worked (a failure is logged).
    fn slots(
        &self,
        what: &str,
        f: impl FnOnce(&slot::Slots) -> Result<slot::Slots, choice::TransitionError>,
    ) -> bool {
        self.change_slots(what, f).is_ok()
    }

    /// Applies a slot transition; the new bits, or why not (also logged).
    fn change_slots(
        &self,
        what: &str,
        f: impl FnOnce(&slot::Slots) -> Result<slot::Slots, choice::TransitionError>,
    ) -> Result<slot::Slots, slot::DiskError> {
        let result = Disk::open(&self.env.disk, true).and_then(|mut d| d.update(f));
        match &result {
            Ok(s) => tracing::info!(a = %s.a, b = %s.b, "{what}: done"),
            Err(e) => tracing::error!("{what} failed: {e}"),
        }
        result
    }
}

/// Reads the channel index (signed, fresh, not older than the accepted one) and decides.
async fn check(
    env: &Env,
    fetcher: &Fetcher,
    policy: &TrustPolicy,
    state: &State,
    requested: Option<&policy::Wanted>,
) -> Result<policy::Decision, String> {
    let s = &env.settings;
    let index = accepted_index(env, fetcher, policy).await?;
    // The downgrade floor: what the booted slot's signed trailer says it runs.
    let what = format!("slot {} trailer", env.booted);
    let verify = |m: &[u8], sig: &[u8]| policy.manifest(&what, m, sig).map_err(|e| e.to_string());
    let current =
        install::running_manifest(&env.disk, &s.state_dir, env.booted, verify).ok().map(|(m, _)| m.version);
    Ok(policy::decide(&policy::Inputs {
        index: &index,
        arch: &env.arch,
        current: current.as_ref(),
        retry_backoff: SignedDuration::try_from(s.retry_backoff).unwrap_or(policy::FIRST_BACKOFF),
        pinned: s.pinned_version.as_ref(),
        failures: &state.failures,
        machine_id: &env.machine_id,
        now: env.platform.now(),
        requested,
    }))
}

/// The channel index, accepted by the trust policy (signed, fresh, not older than nor different
/// from the one accepted before) and recorded as accepted under the record's lock, against
/// what it holds now (another check may have run meanwhile).
async fn accepted_index(
    env: &Env,
    fetcher: &Fetcher,
    policy: &TrustPolicy,
) -> Result<manifest::ChannelIndex, String> {
    let s = &env.settings;
    let accepted_path = s.state_dir.join("accepted-index.json");
    let accepted = AcceptedState::load(&accepted_path).map_err(|e| e.to_string())?;
    let path = repo::layout::index_path(&s.channel);
    let (index, acc) = fetcher
        .get_signed(&path, |b, sig| {
            policy.index(&s.channel, b, sig, env.platform.now(), accepted.get(&s.channel))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    AcceptedState::commit(&accepted_path, acc).map_err(|e| e.to_string())?;
    Ok(index)
}

/// Fetches the release's manifest again (signed, named by the accepted index) and installs it.
async fn install_version(
    env: &Env,
    fetcher: &Fetcher,
    policy: &TrustPolicy,
    version: &semver::Version,
    checked: Option<manifest::Sha256Digest>,
    progress: &InstallProgress,
) -> Result<(), String> {
    let s = &env.settings;
    // The index again, held to the same rules as at the check: signed, not expired, not older
    // than (nor different from) the one accepted (issue 13: it was read ignoring expiry and
    // replay, so a restart much later, or a replayed index, installed whatever it named).
    let index = accepted_index(env, fetcher, policy).await?;
    let release = index
        .releases
        .iter()
        .find(|r| &r.version == version && r.arch == env.arch)
        .ok_or_else(|| format!("release {version} is no longer in channel {:?}", s.channel))?;
    // Exactly the release the check accepted: a later index naming another manifest for the
    // same version is not followed (the next check decides again).
    if let Some(want) = checked
        && release.manifest_sha256 != want
    {
        return Err(format!(
            "release {version} changed since it was checked (manifest SHA-256 {want} then, {} now): not installed",
            release.manifest_sha256
        ));
    }
    let mbytes = fetcher.get(&release.manifest).await.map_err(|e| e.to_string())?;
    let msig = fetcher.get(&format!("{}.sig", release.manifest)).await.map_err(|e| e.to_string())?;
    let m = policy.release_manifest(release, &mbytes, &msig).map_err(|e| e.to_string())?;
    progress.total.store(m.image_size, Ordering::Relaxed);
    tracing::info!(
        version = %version,
        bytes = m.image_size,
        "installing {version} into slot {} ({} bytes)",
        env.booted.other(),
        m.image_size
    );
    let req = install::InstallRequest {
        disk: &env.disk,
        booted: env.booted,
        manifest: &m,
        manifest_bytes: &mbytes,
        manifest_sig: &msig,
        payload_path: repo::layout::payload_path(&release.manifest, &m.payload.path),
        state_dir: &s.state_dir,
        tries: Tries::new(s.tries).ok_or("tries out of range")?,
        parallel: s.parallel.get(),
        max_request: 4 << 20,
        provision: false,
    };
    let report = install::install(&req, fetcher, &progress.counters).await.map_err(|e| e.to_string())?;
    tracing::info!(
        version = %version,
        fetched = report.fetch_bytes,
        reused = report.reused_bytes,
        resumed = report.resumed_bytes,
        write_ms = report.write_time.as_millis() as u64,
        verify_ms = report.verify_time.as_millis() as u64,
        one_pass = report.one_pass,
        computed = report.computed_bytes,
        // The fields again in the text: `journalctl` and the console show only the message.
        "installed version={version} fetched={} reused={} resumed={} write_ms={} verify_ms={} computed={}",
        report.fetch_bytes,
        report.reused_bytes,
        report.resumed_bytes,
        report.write_time.as_millis(),
        report.verify_time.as_millis(),
        report.computed_bytes
    );
    Ok(())
}

/// The drop-in directories and the built-in checks, as configured. The built-ins may wait the
/// whole health deadline for a system still starting.
fn health_checks(s: &Settings) -> health::Checks {
    use health::builtin::{Builtins, Kubelet, Systemd};
    let wait = s.health_deadline;
    health::Checks {
        probes: Vec::new(),
        probe_wait: wait,
        required_dir: s.required_dir.clone(),
        wanted_dir: s.wanted_dir.clone(),
        timeout: s.check_timeout,
        builtins: Builtins {
            systemd: s.systemd_check.then(|| Systemd { timeout: wait, ..Systemd::default() }),
            kubelet: (s.kubelet != config::Kubelet::Off).then(|| Kubelet {
                url: s.kubelet_healthz.clone(),
                always: s.kubelet == config::Kubelet::Required,
                unit_dirs: Kubelet::unit_dirs(),
                timeout: wait,
            }),
        },
    }
}

/// At start: learn what the booted slot runs from its signed trailer, refreshing the state
/// directory's record when it is missing (a provisioned disk, a lost state directory) or
/// differs, so the agent knows its version and the next install can reuse its chunks.
fn recover_record(env: &Env, policy: &TrustPolicy) {
    let what = format!("slot {} trailer", env.booted);
    let verify = |m: &[u8], sig: &[u8]| policy.manifest(&what, m, sig).map_err(|e| e.to_string());
    match install::running_manifest(&env.disk, &env.settings.state_dir, env.booted, verify) {
        Ok((m, install::RunningSource::Trailer)) => {
            tracing::info!("slot {} runs {} (its signed trailer)", env.booted, m.version)
        }
        Ok((m, install::RunningSource::Record)) => tracing::warn!(
            "slot {} runs {} by the state directory's record only: its trailer is missing or does not verify",
            env.booted,
            m.version
        ),
        Err(e) => tracing::warn!("no record of what slot {} holds: {e}", env.booted),
    }
}
