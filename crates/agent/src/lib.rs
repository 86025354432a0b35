//! The update agent: its state machine ([`machine`]), pure and persisted ([`persist`]), and
//! the daemon loop ([`daemon`]) that feeds it events and carries out its actions. Still to
//! come (issue 5): the binary, the Unix-socket API, journald logging, metrics, event history
//! and the systemd units.

pub mod api;
pub mod daemon;
pub mod history;
pub mod machine;
pub mod persist;
