//! Kubernetes mode's building blocks, each usable and testable alone: the annotation contract
//! ([`annotations`]), the cluster-wide reboot lock ([`lock`]), cordon and drain ([`drain`]),
//! and the Node's Events ([`events`]).
//!
//! This crate knows Kubernetes and nothing of the agent; `agent::kube` wires these to the
//! daemon's state machine. Every write is a merge patch or an update carrying the
//! `resourceVersion` it was computed from, so two writers never silently undo each other.

pub mod annotations;
pub mod drain;
pub mod events;
pub mod lock;

use std::path::Path;

pub use kube::Client;
pub use {k8s_openapi, kube};

/// A Kubernetes call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable credentials.
    #[error("kubernetes credentials: {0}")]
    Credentials(String),
    /// The API server answered with an error, or could not be reached.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

/// Wraps a client error with what was being done.
pub(crate) fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Api { what, source }
}

/// A client from a kubeconfig file, or inferred: in-cluster (service account) when run in a
/// pod, else `$KUBECONFIG` or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClusterError> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| ClusterError::Credentials(format!("{}: {e}", p.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| ClusterError::Credentials(format!("{}: {e}", p.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| ClusterError::Credentials(e.to_string()))?,
    };
    build(config)
}

/// kube retries 429/503/504 by itself by default, with a backoff growing to 1000 s over 15
/// tries: an eviction refused by a PodDisruptionBudget would stall the drain far past its
/// deadline. Every caller here has its own retry loop and deadline, so that layer is off.
fn build(mut config: kube::Config) -> Result<Client, ClusterError> {
    config.default_retry = false;
    Client::try_from(config).map_err(|e| ClusterError::Credentials(e.to_string()))
}

/// A client for an API server URL without credentials (the test double).
pub fn plain_client(url: &str) -> Result<Client, ClusterError> {
    let uri = url.parse().map_err(|e| ClusterError::Credentials(format!("{url}: {e}")))?;
    build(kube::Config::new(uri))
}

/// A client for an API server URL with a bearer token (the test double's identities).
pub fn token_client(url: &str, token: &str) -> Result<Client, ClusterError> {
    let uri = url.parse().map_err(|e| ClusterError::Credentials(format!("{url}: {e}")))?;
    let mut config = kube::Config::new(uri);
    config.auth_info.token = Some(token.to_owned().into());
    build(config)
}
