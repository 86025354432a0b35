//! Kubernetes Events on the agent's Node (`kubectl describe node` lists them).
//!
//! core/v1 Events, one per transition, named like kubectl's (`<node>.<hex time>`). A failure
//! to write one is logged and otherwise ignored: Events are for people, the annotations are
//! the state.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, PostParams};

/// The longest Event message the API server takes, in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Progress.
    Normal,
    /// Something failed or is blocked.
    Warning,
}

/// Writes the Node's Events.
#[derive(Debug, Clone)]
pub struct Recorder {
    api: Api<Event>,
    node: String,
    uid: Option<String>,
    /// Who writes: `source.component`, `reportingComponent`, `reportingInstance`.
    reporter: (String, String, String),
}

impl Recorder {
    /// Events about `node` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, node: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            node: node.to_owned(),
            uid: None,
            reporter: ("acl-agentd".into(), "acl-update.dev/agent".into(), node.to_owned()),
        }
    }

    /// The same Events, written by the coordinator (`instance`: its pod) instead of the agent.
    #[must_use]
    pub fn by_coordinator(mut self, instance: &str) -> Self {
        self.reporter = ("acl-coordinator".into(), "acl-update.dev/coordinator".into(), instance.to_owned());
        self
    }

    /// The Node's uid, once known (Events then stay with this Node, not a same-named new one).
    pub fn set_uid(&mut self, uid: Option<String>) {
        self.uid = uid;
    }

    /// Writes one Event.
    pub async fn publish(&self, kind: Type, reason: &str, message: &str) {
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", self.node, now.as_nanosecond())),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.node.clone()),
                uid: self.uid.clone(),
                ..ObjectReference::default()
            },
            reason: Some(reason.into()),
            message: Some(truncate(message, MAX_MESSAGE).to_owned()),
            type_: Some(
                match kind {
                    Type::Normal => "Normal",
                    Type::Warning => "Warning",
                }
                .into(),
            ),
            source: Some(EventSource {
                component: Some(self.reporter.0.clone()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            reporting_component: Some(self.reporter.1.clone()),
            reporting_instance: Some(self.reporter.2.clone()),
            action: Some(reason.into()),
            ..Event::default()
        };
        if let Err(e) = self.api.create(&PostParams::default(), &event).await {
            tracing::warn!("could not write the event {reason} ({message}): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn messages_are_cut_to_1024_bytes_at_a_character_boundary() {
        let long = "é".repeat(1000); // 2000 bytes
        let cut = super::truncate(&long, super::MAX_MESSAGE);
        assert_eq!(cut.len(), 1024);
        assert_eq!(super::truncate(&format!("x{long}"), 1024).len(), 1023, "not inside a character");
        assert_eq!(super::truncate("short", 1024), "short");
    }
}
