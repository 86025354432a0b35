//! The update agent: its state machine ([`machine`]), pure and persisted ([`persist`]); the
//! daemon loop ([`daemon`]) that feeds it events and carries out its actions; the local API
//! ([`api`]), the event history ([`history`]), the Prometheus metrics ([`metrics`]) and
//! Kubernetes mode ([`kube`]: the Node's annotations and Events, the reboot lock, drain). The
//! binary `acl-agentd` wires them to the real machine (clock, reboot, systemd, journald).

pub mod api;
pub mod daemon;
pub mod kube;
pub mod machine;
pub mod metrics;
pub mod persist;

pub use localapi::history;
