//! The update agent. Today: its state machine ([`machine`]), pure and persisted
//! ([`persist`]). The daemon around it (event loop, local API, metrics, systemd) is issue 5's
//! next step; it will feed [`machine::Event`]s in and carry [`machine::Action`]s out.

pub mod machine;
pub mod persist;
