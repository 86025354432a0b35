//! Prometheus metrics: what a fleet dashboard needs to see from every node without logging in.
//!
//! The daemon updates them as its state changes ([`Metrics::transition`]) and as an install
//! moves bytes; [`serve`] answers `GET /metrics` in the OpenMetrics text format on the address
//! given by `[agent] metrics-listen` (off by default: a node exporter or a sidecar may prefer
//! to scrape the local API instead, and an open port is an operator's choice).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `acl_agent_phase` | gauge | `phase` | 1 for the current phase, 0 for the others |
//! | `acl_agent_paused` | gauge | | 1 while updates are paused |
//! | `acl_agent_info` | gauge | `booted_slot`, `booted_version`, `target_version` | always 1; the versions as labels |
//! | `acl_agent_checks_total` | counter | `result` | repository checks by outcome (`update`, `up-to-date`, `wait`, `blocked`, `error`) |
//! | `acl_agent_failures_total` | counter | `reason` | failed updates by where they failed (`install`, `boot`, `health`) |
//! | `acl_agent_bytes_fetched_total` | counter | | bytes received from the repository |
//! | `acl_agent_bytes_reused_total` | counter | | image bytes copied from the other slot instead |
//! | `acl_agent_phase_duration_seconds` | histogram | `phase` | time spent in each phase (since the agent started, for the first) |
//! | `acl_agent_last_check_timestamp_seconds` | gauge | | when the repository was last checked |
//! | `acl_agent_install_bytes` / `acl_agent_install_done_bytes` | gauge | | the running install's size and progress |

use crate::machine::{Phase, State};
use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const PHASES: [&str; 5] = ["idle", "installing", "staged", "rebooting", "verifying"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    booted_slot: String,
    booted_version: String,
    target_version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Where counters kept elsewhere are read at scrape time: (bytes fetched so far in total, the
/// running install's size, its bytes in place).
pub type Source = Box<dyn Fn() -> (u64, u64, u64) + Send + Sync>;

/// The agent's metrics and their registry.
pub struct Metrics {
    source: std::sync::Mutex<Option<Source>>,
    fetched_seen: AtomicU64,
    registry: Registry,
    phase: Family<PhaseLabel, Gauge>,
    paused: Gauge,
    info: Family<InfoLabels, Gauge>,
    checks: Family<ResultLabel, Counter>,
    failures: Family<ReasonLabel, Counter>,
    fetched: Counter,
    reused: Counter,
    durations: Family<PhaseLabel, Histogram>,
    last_check: Gauge<f64, AtomicU64>,
    install_total: Gauge,
    install_done: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric (all phases present from the start, at 0).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("acl_agent");
        let phase = Family::<PhaseLabel, Gauge>::default();
        for p in PHASES {
            phase.get_or_create(&PhaseLabel { phase: p }).set(0);
        }
        let durations = Family::<PhaseLabel, Histogram>::new_with_constructor(
            // 1 s to ~3 days in factors of 4: an install takes minutes, a staged update may wait
            // days for its window.
            || Histogram::new(exponential_buckets(1.0, 4.0, 10)),
        );
        let m = Self {
            source: std::sync::Mutex::new(None),
            fetched_seen: AtomicU64::new(0),
            registry: Registry::default(),
            phase,
            paused: Gauge::default(),
            info: Family::default(),
            checks: Family::default(),
            failures: Family::default(),
            fetched: Counter::default(),
            reused: Counter::default(),
            durations,
            last_check: Gauge::default(),
            install_total: Gauge::default(),
            install_done: Gauge::default(),
        };
        registry.register("phase", "1 for the agent's current phase", m.phase.clone());
        registry.register("paused", "1 while updates are paused", m.paused.clone());
        registry.register("info", "Booted slot and versions (always 1)", m.info.clone());
        registry.register("checks", "Repository checks by result", m.checks.clone());
        registry.register("failures", "Failed updates by where they failed", m.failures.clone());
        registry.register("bytes_fetched", "Bytes received from the repository", m.fetched.clone());
        registry.register("bytes_reused", "Image bytes copied from the other slot", m.reused.clone());
        registry.register("phase_duration_seconds", "Time spent in each phase", m.durations.clone());
        registry.register(
            "last_check_timestamp_seconds",
            "When the repository was last checked (Unix time)",
            m.last_check.clone(),
        );
        registry.register("install_bytes", "Size of the image being installed", m.install_total.clone());
        registry.register(
            "install_done_bytes",
            "Image bytes of the running install in place",
            m.install_done.clone(),
        );
        Self { registry, ..m }
    }

    /// Records a state change: the phase gauges, the time spent in the phase left (entered at
    /// `since`), a new failure, the last check.
    pub fn transition(&self, prev: &State, next: &State, since: Timestamp, now: Timestamp) {
        if prev.phase.name() != next.phase.name() {
            let spent = now.duration_since(since).as_secs_f64().max(0.0);
            self.durations.get_or_create(&PhaseLabel { phase: prev.phase.name() }).observe(spent);
        }
        self.state(next);
        let count = |s: &State| s.failures.iter().map(|f| u64::from(f.count)).sum::<u64>();
        if count(next) > count(prev) {
            let reason = match prev.phase {
                Phase::Installing { .. } => "install",
                Phase::Rebooting { .. } => "boot",
                _ => "health",
            };
            self.failures.get_or_create(&ReasonLabel { reason }).inc();
        }
    }

    /// Sets the gauges that follow the state.
    pub fn state(&self, s: &State) {
        for p in PHASES {
            self.phase.get_or_create(&PhaseLabel { phase: p }).set(i64::from(p == s.phase.name()));
        }
        self.paused.set(i64::from(s.paused));
        if let Some(t) = s.last_check {
            self.last_check.set(t.as_millisecond() as f64 / 1000.0);
        }
    }

    /// Sets the info labels: the booted slot and version, and the version being worked on.
    pub fn info(&self, booted_slot: &str, booted_version: Option<&str>, target: Option<&str>) {
        self.info.clear();
        self.info
            .get_or_create(&InfoLabels {
                booted_slot: booted_slot.to_owned(),
                booted_version: booted_version.unwrap_or("").to_owned(),
                target_version: target.unwrap_or("").to_owned(),
            })
            .set(1);
    }

    /// Counts a repository check by its result.
    pub fn checked(&self, decision: &Result<policy::Decision, String>) {
        let result = match decision {
            Ok(policy::Decision::Update(_)) => "update",
            Ok(policy::Decision::UpToDate) => "up-to-date",
            Ok(policy::Decision::Wait { .. }) => "wait",
            Ok(policy::Decision::Blocked { .. }) => "blocked",
            Err(_) => "error",
        };
        self.checks.get_or_create(&ResultLabel { result }).inc();
    }

    /// Adds image bytes an install copied from the other slot (bytes fetched come from the
    /// [`Source`]).
    pub fn reused(&self, bytes: u64) {
        self.reused.inc_by(bytes);
    }

    /// The running install's progress.
    pub fn install_progress(&self, total: u64, done: u64) {
        self.install_total.set(i64::try_from(total).unwrap_or(i64::MAX));
        self.install_done.set(i64::try_from(done).unwrap_or(i64::MAX));
    }

    /// Sets where [`Metrics::refresh`] reads the byte counters.
    pub fn set_source(&self, source: Source) {
        *self.source.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(source);
    }

    /// Reads the byte counters from the source: the fetch counter grows by what was fetched
    /// since the last refresh, the install gauges show the running install.
    pub fn refresh(&self) {
        let got = self.source.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(|f| f());
        if let Some((fetched, total, done)) = got {
            let before = self.fetched_seen.fetch_max(fetched, Ordering::Relaxed);
            self.fetched.inc_by(fetched.saturating_sub(before));
            self.install_progress(total, done);
        }
    }

    /// The metrics in the OpenMetrics text format (after a [`Metrics::refresh`]).
    pub fn encode(&self) -> String {
        self.refresh();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Answers `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let answer = if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
                    Response::builder()
                        .header(
                            hyper::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(metrics.encode())))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"only GET /metrics is served here\n")))
                };
                std::future::ready(answer)
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn transitions_move_the_gauges_histograms_and_failure_counters() {
        let m = Metrics::new();
        let idle = State::default();
        let installing = State {
            phase: Phase::Installing { version: "2.0.0".parse().unwrap(), manifest: None },
            ..idle.clone()
        };
        m.transition(&idle, &installing, at("2026-11-10T00:00:00Z"), at("2026-11-10T00:00:30Z"));
        let mut failed = idle.clone();
        failed.failures.push(policy::Failure {
            version: "2.0.0".parse().unwrap(),
            count: 1,
            last: at("2026-11-10T00:05:00Z"),
            reason: "x".into(),
        });
        m.transition(&installing, &failed, at("2026-11-10T00:00:30Z"), at("2026-11-10T00:05:30Z"));
        m.checked(&Err("down".into()));
        m.set_source(Box::new(|| (1000, 0, 0)));
        m.reused(24);
        let text = m.encode();
        for line in [
            "acl_agent_phase{phase=\"idle\"} 1",
            "acl_agent_phase{phase=\"installing\"} 0",
            "acl_agent_failures_total{reason=\"install\"} 1",
            "acl_agent_checks_total{result=\"error\"} 1",
            "acl_agent_bytes_fetched_total 1000",
            "acl_agent_bytes_reused_total 24",
            // 30 s idle, 300 s installing: each in its own histogram.
            "acl_agent_phase_duration_seconds_sum{phase=\"idle\"} 30.0",
            "acl_agent_phase_duration_seconds_sum{phase=\"installing\"} 300.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
    }

    #[tokio::test]
    async fn serves_get_metrics_over_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        m.info("B", Some("2.0.0"), None);
        let calls = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&calls);
        m.set_source(Box::new(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            (n * 100, 4096, 1024)
        }));
        let server = tokio::spawn(serve(listener, Arc::clone(&m)));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("acl_agent_info{booted_slot=\"B\",booted_version=\"2.0.0\",target_version=\"\"} 1"),
            "{ok}"
        );
        assert!(ok.trim_end().ends_with("# EOF"), "{ok}");
        assert!(ok.contains("\nacl_agent_install_done_bytes 1024\n"), "{ok}");
        assert!(ok.contains("\nacl_agent_bytes_fetched_total 100\n"), "{ok}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        // The second scrape adds only what was fetched since the first.
        assert!(get("/metrics").await.contains("\nacl_agent_bytes_fetched_total 200\n"));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "refreshed once per scrape");
        server.abort();
    }
}
