//! The update agent: its state machine ([`machine`]), pure and persisted ([`persist`]); the
//! daemon loop ([`daemon`]) that feeds it events and carries out its actions; the local API
//! ([`api`]), the event history ([`history`]) and the Prometheus metrics ([`metrics`]). The
//! binary `acl-agentd` wires them to the real machine (clock, reboot, systemd, journald).

pub mod api;
pub mod daemon;
pub mod history;
pub mod kube;
pub mod machine;
pub mod metrics;
pub mod persist;
