//! Who may do what: bearer tokens name identities, and each request is authorized as the real
//! server would authorize it for that identity.
//!
//! - A node's own credentials (`system:node:<name>`, group `system:nodes`) are judged by the
//!   rules of the Node authorizer and the NodeRestriction admission plugin, as far as the
//!   resources the double serves go: any Node may be read, only its own Node written; Events
//!   may be written in any namespace (the `system:node` role); Pods may be read, and only pods
//!   bound to the node evicted; Leases only in `kube-node-lease` under the node's own name;
//!   PodDisruptionBudgets not at all. (The real plugins also restrict which labels a node may
//!   set on itself and more; not modelled.)
//! - A ServiceAccount is judged by the RBAC rules granted to it ([`Rule`]), cluster-wide or in
//!   one namespace, by verb and resource (with subresource, e.g. `pods/eviction`).
//!
//! Enforcement starts with the first token issued: a double without tokens lets everything
//! through (most tests are about other semantics). An unknown or missing token is then `401`,
//! a request the identity may not make `403 Forbidden` with the real server's wording.

use crate::{ApiError, Kind, err};
use hyper::StatusCode;
use serde_json::Value;

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    /// A node's own credentials: `system:node:<name>`.
    Node(String),
    /// A ServiceAccount: `system:serviceaccount:<namespace>:<name>`.
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl Identity {
    /// The user name the API server gives this identity.
    pub fn user(&self) -> String {
        match self {
            Identity::Node(n) => format!("system:node:{n}"),
            Identity::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }
}

/// One RBAC grant: `verbs` on `resources` (plural, `pods/eviction` for a subresource), in
/// `namespace` (a RoleBinding) or cluster-wide (`None`, a ClusterRoleBinding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Resources, plural; `*` for any.
    pub resources: Vec<String>,
    /// Verbs (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`); `*` for any.
    pub verbs: Vec<String>,
    /// The namespace of the binding, or `None` for cluster-wide.
    pub namespace: Option<String>,
}

/// A request, as the authorizer sees it.
#[derive(Debug)]
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub kind: Kind,
    pub sub: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// The stored object the request is about, when it exists (a pod's node, for evictions).
    pub stored: Option<&'a Value>,
}

fn plural(kind: Kind) -> &'static str {
    match kind {
        Kind::Node => "nodes",
        Kind::Pod => "pods",
        Kind::Event => "events",
        Kind::Lease => "leases",
        Kind::Pdb => "poddisruptionbudgets",
    }
}

fn group(kind: Kind) -> &'static str {
    match kind {
        Kind::Lease => "coordination.k8s.io",
        Kind::Pdb => "policy",
        _ => "",
    }
}

impl Attributes<'_> {
    fn resource(&self) -> String {
        self.sub.map_or(plural(self.kind).to_owned(), |s| format!("{}/{s}", plural(self.kind)))
    }

    fn forbidden(&self, who: &Identity, why: &str) -> ApiError {
        let scope =
            self.namespace.map_or("at the cluster scope".to_owned(), |n| format!("in the namespace \"{n}\""));
        let what = self.name.map_or(self.resource(), |n| format!("{} \"{n}\"", self.resource()));
        let why = if why.is_empty() { String::new() } else { format!(": {why}") };
        err(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{what} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}{why}",
                who.user(),
                self.verb,
                self.resource(),
                group(self.kind)
            ),
        )
    }
}

/// Whether `who` may make the request `a`, given the RBAC `rules` granted to it.
pub(crate) fn authorize(who: &Identity, rules: &[Rule], a: &Attributes<'_>) -> Result<(), ApiError> {
    match who {
        Identity::Node(me) => node_rules(me, a).map_err(|why| a.forbidden(who, why)),
        Identity::ServiceAccount { .. } => {
            let resource = a.resource();
            let granted = rules.iter().any(|r| {
                r.namespace.as_deref().is_none_or(|n| a.namespace == Some(n))
                    && r.resources.iter().any(|x| x == "*" || *x == resource)
                    && r.verbs.iter().any(|v| v == "*" || v == a.verb)
            });
            if granted { Ok(()) } else { Err(a.forbidden(who, "")) }
        }
    }
}

/// The Node authorizer and NodeRestriction, for what the double serves.
fn node_rules(me: &str, a: &Attributes<'_>) -> Result<(), &'static str> {
    let own_name = a.name == Some(me);
    let reading = matches!(a.verb, "get" | "list" | "watch");
    match (a.kind, a.sub) {
        (Kind::Node, None) if reading => Ok(()),
        (Kind::Node, None) if own_name => Ok(()),
        (Kind::Node, None) => Err("a node may modify only its own Node object (NodeRestriction)"),
        (Kind::Event, None) if matches!(a.verb, "create" | "update" | "patch") => Ok(()),
        (Kind::Pod, None) if reading => Ok(()),
        (Kind::Pod, Some("eviction")) if a.verb == "create" => {
            let bound = a.stored.and_then(|p| p["spec"]["nodeName"].as_str());
            if bound == Some(me) {
                Ok(())
            } else {
                Err("a node may evict only pods bound to itself (NodeRestriction)")
            }
        }
        (Kind::Lease, None) if a.namespace == Some("kube-node-lease") && own_name => Ok(()),
        (Kind::Lease, _) => Err("a node may use only its own Lease in kube-node-lease (Node authorizer)"),
        _ => Err("not allowed to nodes (Node authorizer)"),
    }
}

/// The RBAC grants of a manifest (Roles, ClusterRoles and their bindings, with lists written
/// in flow style, `["a", "b"]`, as the repository's manifests write them), per ServiceAccount.
pub fn rbac_from_manifest(yaml: &str) -> Vec<((String, String), Rule)> {
    struct Doc {
        kind: String,
        name: String,
        namespace: Option<String>,
        rules: Vec<(Vec<String>, Vec<String>)>,
        role_ref: Option<(String, String)>,
        subjects: Vec<(String, String, String)>,
    }
    let list = |line: &str| -> Vec<String> {
        let inner = line.split_once('[').and_then(|(_, r)| r.split_once(']')).map_or("", |(l, _)| l);
        inner.split(',').map(|w| w.trim().trim_matches('"').to_owned()).filter(|w| !w.is_empty()).collect()
    };
    let value = |line: &str| line.split_once(':').map_or("", |(_, v)| v).trim().trim_matches('"').to_owned();
    let mut docs = Vec::new();
    for text in yaml.split("\n---") {
        let mut d = Doc {
            kind: String::new(),
            name: String::new(),
            namespace: None,
            rules: Vec::new(),
            role_ref: None,
            subjects: Vec::new(),
        };
        let mut section = "";
        let mut resources = Vec::new();
        for raw in text.lines() {
            let line = raw.trim();
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let top = !raw.starts_with(' ');
            if top {
                section = line.split(':').next().unwrap_or("");
                if line.starts_with("kind:") {
                    d.kind = value(line);
                }
                continue;
            }
            let line = line.trim_start_matches("- ");
            match (section, line.split(':').next().unwrap_or("")) {
                ("metadata", "name") if raw.starts_with("  name") => d.name = value(line),
                ("metadata", "namespace") => d.namespace = Some(value(line)),
                ("rules", "resources") => resources = list(line),
                ("rules", "verbs") => d.rules.push((resources.clone(), list(line))),
                ("roleRef", "kind") => d.role_ref = Some((value(line), String::new())),
                ("roleRef", "name") => {
                    if let Some(r) = &mut d.role_ref {
                        r.1 = value(line);
                    }
                }
                ("subjects", "kind") => d.subjects.push((value(line), String::new(), String::new())),
                ("subjects", "name") => {
                    if let Some(s) = d.subjects.last_mut() {
                        s.1 = value(line);
                    }
                }
                ("subjects", "namespace") => {
                    if let Some(s) = d.subjects.last_mut() {
                        s.2 = value(line);
                    }
                }
                _ => {}
            }
        }
        docs.push(d);
    }
    let mut out = Vec::new();
    for b in docs.iter().filter(|d| d.kind == "RoleBinding" || d.kind == "ClusterRoleBinding") {
        let Some((role_kind, role_name)) = &b.role_ref else { continue };
        let Some(role) = docs.iter().find(|d| &d.kind == role_kind && &d.name == role_name) else { continue };
        let namespace = if b.kind == "RoleBinding" { b.namespace.clone() } else { None };
        for (kind, name, ns) in &b.subjects {
            if kind != "ServiceAccount" {
                continue;
            }
            for (resources, verbs) in &role.rules {
                out.push((
                    (ns.clone(), name.clone()),
                    Rule { resources: resources.clone(), verbs: verbs.clone(), namespace: namespace.clone() },
                ));
            }
        }
    }
    out
}
