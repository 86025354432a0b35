//! A **test double** of the Kubernetes API server, in process, over real HTTP.
//!
//! No real API server can run on the machines our tests run on, so the agent's Kubernetes mode
//! is tested against this one. It is not a Kubernetes: there is no scheduler, no controllers, no
//! kubelet, no admission beyond NodeRestriction's rules, no protobuf, no validation of object schemas beyond
//! the few rules listed below. It
//! follows the real API's semantics for exactly what the agent uses, and says so here:
//!
//! | what | covered |
//! |---|---|
//! | resources | `nodes` (cluster-scoped), `pods`, `events` (core/v1), `leases` (coordination.k8s.io/v1), `poddisruptionbudgets` (policy/v1) |
//! | verbs | get, list, watch, create (`409 AlreadyExists`), update/PUT, merge patch (`application/merge-patch+json`, RFC 7386), delete |
//! | optimistic concurrency | one cluster-wide `resourceVersion` counter (like etcd's revision); an update or patch that names a `metadata.resourceVersion` other than the stored one gets `409 Conflict` |
//! | list | `resourceVersion` of the list; `fieldSelector` `metadata.name=` and `spec.nodeName=` (others are refused with 400, never ignored); no paging (all items, no `continue`) |
//! | watch | from a `resourceVersion`: every change after it, in order, as newline-delimited JSON; `BOOKMARK` events when `allowWatchBookmarks=true`; ends after `timeoutSeconds` or the server's own limit (clients must reconnect); a version older than the kept history gets an `ERROR` event with a `410 Expired` Status, as the real server does after etcd compaction |
//! | eviction | `POST pods/{name}/eviction`, as pkg/registry/core/pod/storage/eviction.go: a pod being deleted or not running is deleted without asking its budget; under two PodDisruptionBudgets, `201 Created` carrying a `Failure` Status with code 500 (the refusal is the created object, not an error); under one, judged by the budget's **status**: `429` with `Retry-After: 10` while `status.observedGeneration` is behind `metadata.generation`, `429` naming desired and current healthy pods while `disruptionsAllowed` is 0, else one disruption is taken at once and the pod named in `disruptedPods`. The pod is then deleted gracefully |
//! | disruption controller | budgets' status (`observedGeneration`, `disruptionsAllowed`, `currentHealthy`, `desiredHealthy`, `expectedPods`, `disruptedPods`) recomputed after every change of a pod or budget, at once or after [`Options::pdb_sync_delay`]; healthy means phase `Running`, not being deleted and not in `disruptedPods` (the real controller reads the Ready condition); `minAvailable` / `maxUnavailable` as integers only, `matchLabels` only |
//! | deletion | a pod with a grace period (its `spec.terminationGracePeriodSeconds`, else [`Options::eviction_grace`]) or finalizers gets `deletionTimestamp` and stays until the grace period is over and its last finalizer is removed (never, if nobody removes it) |
//! | status | errors are `v1.Status` objects with `reason` and `code` as the real server sends them |
//! | validation | label values (`422 Invalid`); Events with an `eventTime` about a cluster-scoped object only in `default` or `kube-system`, message at most 1024 bytes, reporting fields required; a Lease PUT without `metadata.resourceVersion` (`422`, as Leases allow no unconditional update); nothing else about object schemas |
//! | identities | bearer tokens from [`ApiServer::token_for`]: a node's own identity (`system:node:<name>`) judged by the Node authorizer's and NodeRestriction's rules, a ServiceAccount by the RBAC rules granted to it ([`ApiServer::apply_rbac`] reads the repository's manifests); `401` without a known token, `403 Forbidden` with the real wording; off until the first token is issued (module `authz`) |
//! | no-op writes | an update or patch that changes nothing bumps no resourceVersion and sends no watch event, as the real storage layer does |
//! | faults | tests may have chosen requests (verb and body text) answered `500 InternalError`, `429`, `503` or `504` without being applied ([`ApiServer::fail_requests`], [`ApiServer::fail_requests_with`]): a write the client sent and the server never made; connections closed without an answer, before or after the write was made ([`ApiServer::reset_requests`]); and watches cut by an `ERROR` event carrying such a Status ([`ApiServer::fail_watches`]) or by a lost connection mid-stream ([`ApiServer::reset_watches`]) |
//!
//! Where it differs from kube-apiserver (what a client of ours could notice):
//! - RBAC rules are matched by resource and verb; `apiGroups` and `resourceNames` are not
//!   checked, and [`rbac_from_manifest`] reads flow-style YAML lists only.
//! - One merge-patch content type; no strategic merge, JSON patch or server-side apply; no
//!   `managedFields`; a `PUT` may change `status` (the real server keeps it for the status
//!   subresource).
//! - No paging, no label selectors, two field selectors; `resourceVersionMatch` is ignored.
//! - No priority and fairness: 429s come only from injected faults and budgets.
//! - Budgets: integers only (no percentages), `matchLabels` only, no
//!   `unhealthyPodEvictionPolicy`; pods count as healthy by phase, not by the Ready condition.
//! - Deletions: no `DeleteOptions` (preconditions, propagation, a grace period given by the
//!   client), no garbage collector; `delete` from a test removes at once.
//!
//! Tests change the cluster directly (`create`, `modify`, `delete`, `compact`) as controllers
//! and kubelets would, and follow every change in order with [`ApiServer::subscribe`].

mod authz;

pub use authz::{Identity, Rule, rbac_from_manifest};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// The resources the double serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Node (cluster-scoped).
    Node,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Event.
    Event,
    /// coordination.k8s.io/v1 Lease.
    Lease,
    /// policy/v1 PodDisruptionBudget.
    Pdb,
}

impl Kind {
    fn from_plural(group: &str, plural: &str) -> Option<Kind> {
        Some(match (group, plural) {
            ("", "nodes") => Kind::Node,
            ("", "pods") => Kind::Pod,
            ("", "events") => Kind::Event,
            ("coordination.k8s.io/v1", "leases") => Kind::Lease,
            ("policy/v1", "poddisruptionbudgets") => Kind::Pdb,
            _ => return None,
        })
    }

    /// The object kind (`Node`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Event => "Event",
            Kind::Lease => "Lease",
            Kind::Pdb => "PodDisruptionBudget",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Pdb => "policy/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
pub struct Change {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind_of_change: &'static str,
    /// The resource.
    pub kind: Kind,
    /// The object after the change (for `DELETED`, its last state).
    pub object: Value,
    /// The cluster's resource version after the change.
    pub rv: u64,
}

/// Options of the double.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many changes are kept for watches to resume from; older versions get 410.
    pub history: usize,
    /// The longest a watch stream stays open (the client must reconnect).
    pub max_watch: Duration,
    /// How often a watch sends a bookmark when asked to.
    pub bookmark_every: Duration,
    /// How long an evicted pod stays (with `deletionTimestamp`) before it is gone, unless
    /// the pod names its own `spec.terminationGracePeriodSeconds`.
    pub eviction_grace: Duration,
    /// How long the disruption controller takes to bring budgets' status up to date after a
    /// change of pods or budgets (zero: at once).
    pub pdb_sync_delay: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history: 10_000,
            max_watch: Duration::from_secs(30),
            bookmark_every: Duration::from_secs(1),
            eviction_grace: Duration::ZERO,
            pdb_sync_delay: Duration::ZERO,
        }
    }
}

type Key = (Kind, String, String);

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Change>,
    /// Versions at or below this one are no longer in `log`.
    compacted: u64,
    next_uid: u64,
    requests: BTreeMap<String, u64>,
    /// The same counts per identity (its user name), with refusals as `"403 VERB kind"`.
    requests_by: BTreeMap<String, BTreeMap<String, u64>>,
    credentials: std::collections::BTreeSet<String>,
    faults: Vec<Fault>,
    /// The disruption controller is writing (its writes do not wake it again).
    syncing: bool,
    /// Bearer tokens and whose they are; none: no authorization at all.
    tokens: BTreeMap<String, Identity>,
    /// RBAC grants per ServiceAccount (namespace, name).
    rbac: BTreeMap<(String, String), Vec<Rule>>,
}

/// Requests to answer with an error instead of serving (a lost write, a server hiccup).
#[derive(Debug)]
struct Fault {
    verb: String,
    body_contains: String,
    left: usize,
    hits: usize,
    what: Failure,
    /// A watch that starts, sends what it has, then fails as `what` says.
    mid_watch: bool,
}

/// How a faulty request fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Answered with this HTTP status (500, 429, 503, 504), not applied; a watch gets an
    /// `ERROR` event carrying it.
    Status(u16),
    /// The connection is closed without an answer (a reset, a proxy or load balancer dying).
    /// `applied`: the server made the write first, so the client never learns that it did.
    Reset {
        /// Whether the request was carried out before the connection went.
        applied: bool,
    },
}

/// What the service answers: a response, or a connection closed without one.
#[derive(Debug)]
struct ConnectionReset;

impl std::fmt::Display for ConnectionReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by the test double")
    }
}

impl std::error::Error for ConnectionReset {}

fn fault_error(code: u16) -> ApiError {
    let (status, reason) = match code {
        429 => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
        503 => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        504 => (StatusCode::GATEWAY_TIMEOUT, "Timeout"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
    };
    err(status, reason, "injected by the test")
}

/// The running double.
#[derive(Debug, Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    version: watch::Sender<u64>,
    changes: broadcast::Sender<Change>,
    opts: Options,
    addr: SocketAddr,
}

/// An API error, answered as a `v1.Status`.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    /// `details.causes` as `(type, message)`.
    causes: Vec<(&'static str, String)>,
    /// `Retry-After` (header and `details.retryAfterSeconds`).
    retry_after: Option<u64>,
}

fn err(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { code, reason, message: message.into(), causes: Vec::new(), retry_after: None }
}

fn not_found(kind: Kind, name: &str) -> ApiError {
    err(StatusCode::NOT_FOUND, "NotFound", format!("{} \"{name}\" not found", kind.name().to_lowercase()))
}

fn status_body(e: &ApiError) -> Value {
    let mut v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": e.message, "reason": e.reason, "code": e.code.as_u16(),
    });
    if !e.causes.is_empty() {
        v["details"]["causes"] =
            e.causes.iter().map(|(t, m)| json!({"reason": t, "message": m})).collect::<Vec<_>>().into();
    }
    if let Some(s) = e.retry_after {
        v["details"]["retryAfterSeconds"] = json!(s);
    }
    v
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = full(e.code, &status_body(e));
    if let Some(s) = e.retry_after {
        r.headers_mut().insert("retry-after", s.into());
    }
    r
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).map_err(|e| match e {}).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
    r
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn now_text() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn name_of(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"].as_object().is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A parsed field selector: only what the agent uses.
#[derive(Debug, Clone, Default)]
struct Filter {
    name: Option<String>,
    node: Option<String>,
}

impl Filter {
    fn parse(q: Option<&str>) -> Result<Filter, ApiError> {
        let mut f = Filter::default();
        for term in q.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            match term.split_once('=') {
                Some(("metadata.name", v)) => f.name = Some(v.to_owned()),
                Some(("spec.nodeName", v)) => f.node = Some(v.to_owned()),
                _ => {
                    return Err(err(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("field selector {term:?} is not supported by the test double"),
                    ));
                }
            }
        }
        Ok(f)
    }

    fn matches(&self, v: &Value) -> bool {
        self.name.as_ref().is_none_or(|n| v["metadata"]["name"] == n.as_str())
            && self.node.as_ref().is_none_or(|n| v["spec"]["nodeName"] == n.as_str())
    }
}

/// What a request addresses.
#[derive(Debug)]
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_owned()), None),
        [p, n, s] => (*p, Some((*n).to_owned()), Some((*s).to_owned())),
        _ => return None,
    };
    let kind = Kind::from_plural(&group, plural)?;
    Some(Target { kind, namespace, name, sub })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ApiServer {
    /// Starts the double on a free port of 127.0.0.1.
    pub async fn start(opts: Options) -> std::io::Result<ApiServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            store: Mutex::new(Store { rv: 1, ..Store::default() }),
            version: watch::channel(1).0,
            changes: broadcast::channel(1 << 16).0,
            opts,
            addr,
        });
        let server = ApiServer { inner };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { s.handle(req).await }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Ok(server)
    }

    /// The URL to give a client (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every change from now on, in the order they happened.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// How many requests of each `"VERB kind"` were served: `GET`, `LIST`, `WATCH`, `POST`,
    /// `PUT`, `PATCH`, `DELETE` and subresources as `"POST Pod/eviction"`; `"410 Node"` counts
    /// watches refused as too old.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.store().requests.clone()
    }

    /// [`ApiServer::requests`] of one identity (by its token), with every request refused
    /// (401, 403) also counted as `"403 VERB kind"`.
    pub fn requests_of(&self, identity: &Identity) -> BTreeMap<String, u64> {
        self.store().requests_by.get(&identity.user()).cloned().unwrap_or_default()
    }

    /// Every distinct `Authorization` header seen (the double checks no credentials; tests
    /// check that clients send the ones configured).
    pub fn credentials(&self) -> Vec<String> {
        self.store().credentials.iter().cloned().collect()
    }

    /// Answers the next `times` requests of `verb` (as counted by [`ApiServer::requests`], e.g.
    /// `"PATCH Node"`) whose body contains `body_contains` with `500 InternalError`, without
    /// applying them: a write the client sent and the server never made.
    pub fn fail_requests(&self, verb: &str, body_contains: &str, times: usize) {
        self.fail_requests_with(verb, body_contains, times, 500);
    }

    /// [`ApiServer::fail_requests`] with another status: `429` (priority and fairness
    /// throttling), `503`, `504`, or `500`.
    pub fn fail_requests_with(&self, verb: &str, body_contains: &str, times: usize, code: u16) {
        self.add_fault(verb, body_contains, times, Failure::Status(code), false);
    }

    /// Closes the connection of the next `times` requests of `verb` whose body contains
    /// `body_contains` without answering. With `applied`, the server carries the request out
    /// first: a write that was made, whose client never heard so (it must find out by reading,
    /// and must not do twice what it meant to do once).
    pub fn reset_requests(&self, verb: &str, body_contains: &str, times: usize, applied: bool) {
        self.add_fault(verb, body_contains, times, Failure::Reset { applied }, false);
    }

    /// The next `times` watches of `kind` start normally, then get an `ERROR` event carrying a
    /// Status with `code` (as a real server sends for an internal error mid-stream) and end.
    pub fn fail_watches(&self, kind: Kind, times: usize, code: u16) {
        self.add_fault(&format!("WATCH {}", kind.name()), "", times, Failure::Status(code), true);
    }

    /// The next `times` watches of `kind` start normally, send what they have, then lose their
    /// connection in the middle of the stream (no final chunk).
    pub fn reset_watches(&self, kind: Kind, times: usize) {
        self.add_fault(&format!("WATCH {}", kind.name()), "", times, Failure::Reset { applied: true }, true);
    }

    fn add_fault(&self, verb: &str, body_contains: &str, times: usize, what: Failure, mid_watch: bool) {
        self.store().faults.push(Fault {
            verb: verb.to_owned(),
            body_contains: body_contains.to_owned(),
            left: times,
            hits: 0,
            what,
            mid_watch,
        });
    }

    /// A bearer token for `identity`. From the first one on, every request must carry a known
    /// token and is authorized for its identity (see the `authz` module docs).
    pub fn token_for(&self, identity: Identity) -> String {
        let mut st = self.store();
        let token = format!("acl-test-token-{}", st.tokens.len() + 1);
        st.tokens.insert(token.clone(), identity);
        token
    }

    /// Grants `rule` to the ServiceAccount `namespace/name`.
    pub fn grant(&self, namespace: &str, name: &str, rule: Rule) {
        self.store().rbac.entry((namespace.to_owned(), name.to_owned())).or_default().push(rule);
    }

    /// Grants what the Roles, ClusterRoles and bindings of a manifest grant.
    pub fn apply_rbac(&self, yaml: &str) {
        for ((ns, name), rule) in rbac_from_manifest(yaml) {
            self.grant(&ns, &name, rule);
        }
    }

    /// Serves every request again (the faults still count their hits).
    pub fn clear_faults(&self) {
        for f in &mut self.store().faults {
            f.left = 0;
        }
    }

    /// How many requests were failed by [`ApiServer::fail_requests`].
    pub fn failed_requests(&self) -> usize {
        self.store().faults.iter().map(|f| f.hits).sum()
    }

    /// Forgets the watch history: a watch resuming from any earlier version gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.store();
        st.log.clear();
        st.compacted = st.rv;
    }

    /// The cluster's current resource version.
    pub fn resource_version(&self) -> u64 {
        self.store().rv
    }

    /// Creates an object (as a controller would).
    pub fn create(&self, kind: Kind, object: Value) -> Result<Value, ApiError> {
        let mut st = self.store();
        self.insert(&mut st, kind, object)
    }

    /// The stored object.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.store().objects.get(&(kind, namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Every stored object of a kind.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.store().objects.iter().filter(|(k, _)| k.0 == kind).map(|(_, v)| v.clone()).collect()
    }

    /// Changes an object in place (as a kubelet or controller would); a new resource version.
    pub fn modify(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let mut st = self.store();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut v = st.objects.get(&key)?.clone();
        f(&mut v);
        Some(self.commit(&mut st, key, v, "MODIFIED"))
    }

    /// Deletes an object.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let mut st = self.store();
        self.remove(&mut st, (kind, namespace.to_owned(), name.to_owned()))
    }

    fn insert(&self, st: &mut Store, kind: Kind, mut object: Value) -> Result<Value, ApiError> {
        let name = name_of(&object);
        if name.is_empty() {
            return Err(err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value"));
        }
        let ns = if kind.namespaced() {
            object["metadata"]["namespace"].as_str().unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        let key = (kind, ns.clone(), name.clone());
        if st.objects.contains_key(&key) {
            return Err(err(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.name().to_lowercase()),
            ));
        }
        st.next_uid += 1;
        let m = &mut object["metadata"];
        m["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", st.next_uid));
        m["creationTimestamp"] = json!(now_text());
        if kind.namespaced() {
            m["namespace"] = json!(ns);
        }
        object["kind"] = json!(kind.name());
        object["apiVersion"] = json!(kind.api_version());
        Ok(self.commit(st, key, object, "ADDED"))
    }

    fn commit(&self, st: &mut Store, key: Key, mut object: Value, mut what: &'static str) -> Value {
        if key.0 == Kind::Pdb && what != "DELETED" {
            // `generation` counts changes of the spec (the status is the controller's).
            let stored = st.objects.get(&key);
            let generation = match stored {
                None => 1,
                Some(old) if old["spec"] != object["spec"] => {
                    old["metadata"]["generation"].as_i64().unwrap_or(1) + 1
                }
                Some(old) => old["metadata"]["generation"].as_i64().unwrap_or(1),
            };
            object["metadata"]["generation"] = json!(generation);
        }
        // An object whose deletion is due goes as soon as no finalizer holds it.
        if what == "MODIFIED"
            && !object["metadata"]["deletionTimestamp"].is_null()
            && object["metadata"]["deletionGracePeriodSeconds"].as_u64() == Some(0)
            && object["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty)
        {
            what = "DELETED";
        }
        st.rv += 1;
        let kind = key.0;
        object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let change = Change { kind_of_change: what, kind: key.0, object: object.clone(), rv: st.rv };
        if what == "DELETED" {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key, object.clone());
        }
        st.log.push_back(change.clone());
        while st.log.len() > self.inner.opts.history {
            let old = st.log.pop_front().expect("not empty");
            st.compacted = old.rv;
        }
        let _ = self.inner.changes.send(change);
        self.inner.version.send_replace(st.rv);
        if matches!(kind, Kind::Pod | Kind::Pdb) && !st.syncing {
            self.budgets_changed(st);
        }
        object
    }

    /// Has the disruption controller catch up: at once, or after [`Options::pdb_sync_delay`]
    /// (meanwhile a budget whose spec changed answers evictions with 429 and `Retry-After`).
    fn budgets_changed(&self, st: &mut Store) {
        let delay = self.inner.opts.pdb_sync_delay;
        if delay.is_zero() {
            self.sync_budgets(st);
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut st = me.store();
            me.sync_budgets(&mut st);
        });
    }

    /// 401 without a known token, 403 for what its identity may not do; nothing while no
    /// token was ever issued.
    fn authorize(
        &self,
        authorization: Option<&str>,
        t: &Target,
        method: &Method,
        q: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        let st = self.store();
        if st.tokens.is_empty() {
            return Ok(());
        }
        let token = authorization.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or_default();
        let who = st
            .tokens
            .get(token)
            .cloned()
            .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized"))?;
        let verb = match (method, &t.name) {
            (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        let ns = t.namespace.clone().unwrap_or_default();
        let stored = t.name.as_ref().and_then(|n| st.objects.get(&(t.kind, ns, n.clone())));
        let rules = match &who {
            Identity::ServiceAccount { namespace, name } => {
                st.rbac.get(&(namespace.clone(), name.clone())).cloned().unwrap_or_default()
            }
            Identity::Node(_) => Vec::new(),
        };
        let a = authz::Attributes {
            verb,
            kind: t.kind,
            sub: t.sub.as_deref(),
            namespace: t.namespace.as_deref(),
            name: t.name.as_deref(),
            stored,
        };
        authz::authorize(&who, &rules, &a)
    }

    /// A write that changes nothing is not a write: the real server's storage compares the
    /// bytes and neither bumps the resourceVersion nor tells watchers.
    fn commit_unless_same(&self, st: &mut Store, key: Key, current: &Value, mut next: Value) -> Value {
        next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        if &next == current {
            return next;
        }
        self.commit(st, key, next, "MODIFIED")
    }

    fn remove(&self, st: &mut Store, key: Key) -> Option<Value> {
        let v = st.objects.get(&key)?.clone();
        Some(self.commit(st, key, v, "DELETED"))
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, ConnectionReset> {
        let mut reset = None;
        let answer = match self.route(req, &mut reset).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        match reset {
            // Served (or not) and then the connection goes: the client hears nothing.
            Some(_) => Err(ConnectionReset),
            None => Ok(answer),
        }
    }

    /// Serves a request. A fault that resets the connection sets `reset` (`Some(true)` when
    /// the request is carried out first).
    async fn route(
        &self,
        req: Request<Incoming>,
        reset: &mut Option<bool>,
    ) -> Result<Response<Body>, ApiError> {
        let t = parse_path(req.uri().path()).ok_or_else(|| {
            err(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource")
        })?;
        let q = query(&req);
        let method = req.method().clone();
        let verb = match (&method, t.sub.as_deref(), q.get("watch").map(String::as_str)) {
            (_, Some(sub), _) => format!("{method} {}/{sub}", t.kind.name()),
            (&Method::GET, None, Some("true" | "1")) => format!("WATCH {}", t.kind.name()),
            (&Method::GET, None, _) if t.name.is_none() => format!("LIST {}", t.kind.name()),
            _ => format!("{method} {}", t.kind.name()),
        };
        *self.store().requests.entry(verb.clone()).or_default() += 1;
        let authorization =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let Some(a) = &authorization {
            self.store().credentials.insert(a.clone());
        }
        let user = {
            let st = self.store();
            let token = authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or_default();
            st.tokens.get(token).map(Identity::user)
        };
        let allowed = self.authorize(authorization.as_deref(), &t, &method, &q);
        if let Some(user) = user {
            let mut st = self.store();
            let counts = st.requests_by.entry(user).or_default();
            *counts.entry(verb.clone()).or_default() += 1;
            if let Err(e) = &allowed {
                *counts.entry(format!("{} {verb}", e.code.as_u16())).or_default() += 1;
            }
        }
        allowed?;
        let ctype = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        {
            let mut st = self.store();
            let text = String::from_utf8_lossy(&body);
            if let Some(f) = st
                .faults
                .iter_mut()
                .find(|f| f.left > 0 && !f.mid_watch && f.verb == verb && text.contains(&f.body_contains))
            {
                f.left -= 1;
                f.hits += 1;
                match f.what {
                    Failure::Status(code) => return Err(fault_error(code)),
                    Failure::Reset { applied: false } => {
                        *reset = Some(false);
                        return Err(fault_error(500));
                    }
                    Failure::Reset { applied: true } => *reset = Some(true),
                }
            }
        }
        let parse = || -> Result<Value, ApiError> {
            serde_json::from_slice(&body)
                .map_err(|e| err(StatusCode::BAD_REQUEST, "BadRequest", format!("body is not JSON: {e}")))
        };
        let ns = t.namespace.clone().unwrap_or_default();
        if t.kind.namespaced() == t.namespace.is_none() && t.name.is_some() {
            return Err(err(StatusCode::NOT_FOUND, "NotFound", "namespace missing or not allowed"));
        }
        match (&method, t.name.as_deref(), t.sub.as_deref()) {
            (&Method::GET, None, None) => {
                let filter = Filter::parse(q.get("fieldSelector").map(String::as_str))?;
                if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    return self.watch(t.kind, t.namespace, filter, &q);
                }
                let st = self.store();
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, v)| {
                        k.0 == t.kind && t.namespace.as_ref().is_none_or(|n| &k.1 == n) && filter.matches(v)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                Ok(full(
                    StatusCode::OK,
                    &json!({
                        "kind": format!("{}List", t.kind.name()), "apiVersion": t.kind.api_version(),
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items,
                    }),
                ))
            }
            (&Method::GET, Some(name), None) => {
                let v = self.get(t.kind, &ns, name).ok_or_else(|| not_found(t.kind, name))?;
                Ok(full(StatusCode::OK, &v))
            }
            (&Method::POST, None, None) => {
                let mut v = parse()?;
                if t.kind.namespaced() {
                    v["metadata"]["namespace"] = json!(ns);
                }
                validate(t.kind, &v)?;
                let created = self.create(t.kind, v)?;
                Ok(full(StatusCode::CREATED, &created))
            }
            (&Method::PUT, Some(name), None) => {
                let v = parse()?;
                if name_of(&v) != name {
                    return Err(err(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the name in the body does not match",
                    ));
                }
                let mut st = self.store();
                let key = (t.kind, ns.clone(), name.to_owned());
                let current = st.objects.get(&key).cloned().ok_or_else(|| not_found(t.kind, name))?;
                // Leases allow no unconditional update (their strategy's AllowUnconditionalUpdate
                // is false): a PUT must name the version it replaces.
                if t.kind == Kind::Lease
                    && v["metadata"]["resourceVersion"].as_str().is_none_or(str::is_empty)
                {
                    return Err(invalid(
                        t.kind,
                        name,
                        "metadata.resourceVersion: Invalid value: \"\": must be specified for an update",
                    ));
                }
                check_version(t.kind, name, &current, &v)?;
                validate(t.kind, &v)?;
                let mut next = v;
                next["metadata"]["uid"] = current["metadata"]["uid"].clone();
                next["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
                next["kind"] = json!(t.kind.name());
                next["apiVersion"] = json!(t.kind.api_version());
                Ok(full(StatusCode::OK, &self.commit_unless_same(&mut st, key, &current, next)))
            }
            (&Method::PATCH, Some(name), None) => {
                if !ctype.starts_with("application/merge-patch+json") {
                    return Err(err(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        format!("the test double takes merge patches only, not {ctype:?}"),
                    ));
                }
                let patch = parse()?;
                let mut st = self.store();
                let key = (t.kind, ns.clone(), name.to_owned());
                let current = st.objects.get(&key).cloned().ok_or_else(|| not_found(t.kind, name))?;
                check_version(t.kind, name, &current, &patch)?;
                let mut next = current.clone();
                merge_patch(&mut next, &patch);
                next["metadata"]["name"] = json!(name);
                next["metadata"]["uid"] = current["metadata"]["uid"].clone();
                validate(t.kind, &next)?;
                Ok(full(StatusCode::OK, &self.commit_unless_same(&mut st, key, &current, next)))
            }
            (&Method::DELETE, Some(name), None) if t.kind == Kind::Pod => {
                let mut st = self.store();
                let key = (t.kind, ns.clone(), name.to_owned());
                let v = st.objects.get(&key).cloned().ok_or_else(|| not_found(t.kind, name))?;
                self.delete_gracefully(&mut st, key);
                Ok(full(StatusCode::OK, &v))
            }
            (&Method::DELETE, Some(name), None) => {
                let v = self.delete(t.kind, &ns, name).ok_or_else(|| not_found(t.kind, name))?;
                Ok(full(StatusCode::OK, &v))
            }
            (&Method::POST, Some(name), Some("eviction")) if t.kind == Kind::Pod => {
                match self.evict(&ns, name)? {
                    None => Ok(full(
                        StatusCode::CREATED,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                    )),
                    Some(message) => Ok(full(
                        StatusCode::CREATED,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "code": 500}),
                    )),
                }
            }
            _ => Err(err(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported here"),
            )),
        }
    }

    /// Evicts a pod as pkg/registry/core/pod/storage/eviction.go does; `Some(message)` for a
    /// refusal the real server sends as a 201 carrying a Failure Status.
    fn evict(&self, ns: &str, name: &str) -> Result<Option<&'static str>, ApiError> {
        let mut st = self.store();
        let key = (Kind::Pod, ns.to_owned(), name.to_owned());
        let pod = st.objects.get(&key).cloned().ok_or_else(|| not_found(Kind::Pod, name))?;
        // canIgnorePDB: a pod that is going anyway, or not running, is deleted without asking
        // its budget.
        let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
        if !pod["metadata"]["deletionTimestamp"].is_null()
            || matches!(phase, "Succeeded" | "Failed" | "Pending")
        {
            self.delete_gracefully(&mut st, key);
            return Ok(None);
        }
        let labels = &pod["metadata"]["labels"];
        let budgets: Vec<(Key, Value)> = st
            .objects
            .iter()
            .filter(|(k, v)| k.0 == Kind::Pdb && k.1 == ns && labels_match(&v["spec"]["selector"], labels))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if budgets.len() > 1 {
            // The real server returns this Status as the created object, with no error: HTTP
            // 201 carrying a Failure with code 500.
            return Ok(Some(
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        if let Some((pdb_key, pdb)) = budgets.into_iter().next() {
            let pdb_name = name_of(&pdb);
            let status = &pdb["status"];
            let too_many = |cause: String, retry_after: Option<u64>| {
                let mut e = err(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
                e.causes.push(("DisruptionBudget", cause));
                e.retry_after = retry_after;
                e
            };
            // The disruption controller has not seen this generation of the budget yet.
            if status["observedGeneration"].as_i64().unwrap_or(0)
                < pdb["metadata"]["generation"].as_i64().unwrap_or(1)
            {
                return Err(too_many(
                    format!("The disruption budget {pdb_name} is still being processed by the server."),
                    Some(10),
                ));
            }
            let allowed = status["disruptionsAllowed"].as_i64().unwrap_or(0);
            if allowed < 0 {
                return Err(err(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!(
                        "poddisruptionbudgets.policy \"{pdb_name}\" is forbidden: pdb disruptions allowed is negative"
                    ),
                ));
            }
            if allowed == 0 {
                return Err(too_many(
                    format!(
                        "The disruption budget {pdb_name} needs {} healthy pods and has {} currently",
                        status["desiredHealthy"].as_i64().unwrap_or(0),
                        status["currentHealthy"].as_i64().unwrap_or(0)
                    ),
                    None,
                ));
            }
            // Taken from the budget now, and the pod named in `disruptedPods` so that the
            // controller does not count it as healthy until it is gone.
            let mut next = pdb.clone();
            next["status"]["disruptionsAllowed"] = json!(allowed - 1);
            next["status"]["disruptedPods"][name] = json!(now_text());
            st.syncing = true;
            self.commit(&mut st, pdb_key, next, "MODIFIED");
            st.syncing = false;
        }
        self.delete_gracefully(&mut st, key);
        Ok(None)
    }

    /// Deletes a pod as the kubelet would: at once without a grace period or finalizers;
    /// otherwise it is marked (`deletionTimestamp`) and goes when its grace period is over,
    /// or later, once its last finalizer is removed (never, if nobody removes it).
    fn delete_gracefully(&self, st: &mut Store, key: Key) {
        let Some(mut pod) = st.objects.get(&key).cloned() else { return };
        let grace = pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .map_or(self.inner.opts.eviction_grace, Duration::from_secs);
        let finalizers = pod["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if grace.is_zero() && !finalizers {
            self.remove(st, key);
            return;
        }
        if pod["metadata"]["deletionTimestamp"].is_null() {
            pod["metadata"]["deletionTimestamp"] = json!(now_text());
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace.as_secs());
            self.commit(st, key.clone(), pod, "MODIFIED");
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let mut st = me.store();
            // The kubelet's final delete (grace 0): the object goes unless finalizers hold it.
            if let Some(mut pod) = st.objects.get(&key).cloned() {
                pod["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                me.commit(&mut st, key, pod, "MODIFIED");
            }
        });
    }

    /// What the disruption controller (pkg/controller/disruption) keeps in every budget's
    /// status: pods selected, healthy ones (Running, not being deleted, not just evicted), the
    /// healthy pods the budget needs, and how many may go now.
    fn sync_budgets(&self, st: &mut Store) {
        let budgets: Vec<(Key, Value)> = st
            .objects
            .iter()
            .filter(|(k, _)| k.0 == Kind::Pdb)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = jiff::Timestamp::now();
        for (key, pdb) in budgets {
            let selected: Vec<&Value> = st
                .objects
                .iter()
                .filter(|(k, v)| {
                    k.0 == Kind::Pod
                        && k.1 == key.1
                        && labels_match(&pdb["spec"]["selector"], &v["metadata"]["labels"])
                })
                .map(|(_, v)| v)
                .collect();
            // An eviction's mark lasts until the pod is being deleted, or 2 minutes (the
            // controller's DeletionTimeout).
            let mut disrupted = serde_json::Map::new();
            for (pod, at) in pdb["status"]["disruptedPods"].as_object().into_iter().flatten() {
                let live = selected
                    .iter()
                    .any(|p| name_of(p) == *pod && p["metadata"]["deletionTimestamp"].is_null());
                let recent = at
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| now.duration_since(t) < jiff::SignedDuration::from_secs(120));
                if live && recent {
                    disrupted.insert(pod.clone(), at.clone());
                }
            }
            let expected = selected.len() as i64;
            let healthy = selected
                .iter()
                .filter(|p| {
                    p["metadata"]["deletionTimestamp"].is_null()
                        && p["status"]["phase"] == "Running"
                        && !disrupted.contains_key(&name_of(p))
                })
                .count() as i64;
            let desired = match (pdb["spec"]["minAvailable"].as_i64(), pdb["spec"]["maxUnavailable"].as_i64())
            {
                (Some(min), _) => min,
                (None, Some(max)) => (expected - max).max(0),
                (None, None) => expected,
            };
            let mut next = pdb.clone();
            next["status"] = json!({
                "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(1),
                "disruptionsAllowed": (healthy - desired).max(0),
                "currentHealthy": healthy,
                "desiredHealthy": desired,
                "expectedPods": expected,
                "disruptedPods": disrupted,
            });
            st.syncing = true;
            self.commit_unless_same(st, key, &pdb, next);
            st.syncing = false;
        }
    }

    fn watch(
        &self,
        kind: Kind,
        namespace: Option<String>,
        filter: Filter,
        q: &BTreeMap<String, String>,
    ) -> Result<Response<Body>, ApiError> {
        let opts = &self.inner.opts;
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
        let limit = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(opts.max_watch, Duration::from_secs)
            .min(opts.max_watch);
        let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
        let from: Option<u64> =
            q.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0").and_then(|v| v.parse().ok());
        // A mid-stream reset: what is due is sent, then the connection goes.
        let mut cut = false;
        let mut cursor = {
            let mut st = self.store();
            let cursor = match from {
                Some(rv) if rv < st.compacted => {
                    *st.requests.entry(format!("410 {}", kind.name())).or_default() += 1;
                    let e = err(
                        StatusCode::GONE,
                        "Expired",
                        format!("too old resource version: {rv} ({})", st.compacted + 1),
                    );
                    let _ = tx.try_send(json!({"type": "ERROR", "object": status_body(&e)}));
                    u64::MAX
                }
                Some(rv) => rv,
                None => {
                    // No version: the current objects first, as ADDED.
                    for (k, v) in &st.objects {
                        if k.0 == kind && namespace.as_ref().is_none_or(|n| &k.1 == n) && filter.matches(v) {
                            let _ = tx.try_send(json!({"type": "ADDED", "object": v}));
                        }
                    }
                    st.rv
                }
            };
            let verb = format!("WATCH {}", kind.name());
            if cursor != u64::MAX
                && let Some(f) = st.faults.iter_mut().find(|f| f.left > 0 && f.mid_watch && f.verb == verb)
            {
                f.left -= 1;
                f.hits += 1;
                match f.what {
                    Failure::Status(code) => {
                        let _ =
                            tx.try_send(json!({"type": "ERROR", "object": status_body(&fault_error(code))}));
                        u64::MAX
                    }
                    Failure::Reset { .. } => {
                        cut = true;
                        cursor
                    }
                }
            } else {
                cursor
            }
        };
        let me = self.clone();
        let every = opts.bookmark_every;
        tokio::spawn(async move {
            if cursor == u64::MAX {
                return;
            }
            let mut version = me.inner.version.subscribe();
            let end = tokio::time::Instant::now() + limit;
            let mut next_bookmark = tokio::time::Instant::now() + every;
            loop {
                let batch: Vec<Change> = {
                    let st = me.store();
                    if cursor < st.compacted {
                        // Fell behind the kept history while streaming.
                        let e =
                            err(StatusCode::GONE, "Expired", format!("too old resource version: {cursor}"));
                        let _ = tx.try_send(json!({"type": "ERROR", "object": status_body(&e)}));
                        return;
                    }
                    let batch = st.log.iter().filter(|c| c.rv > cursor).cloned().collect();
                    cursor = st.rv;
                    batch
                };
                for c in batch {
                    let ns = c.object["metadata"]["namespace"].as_str().unwrap_or_default();
                    if c.kind == kind
                        && namespace.as_deref().is_none_or(|n| n == ns)
                        && filter.matches(&c.object)
                        && tx.send(json!({"type": c.kind_of_change, "object": c.object})).await.is_err()
                    {
                        return;
                    }
                }
                if cut {
                    // Let what was due reach the client first (hyper drops unflushed data).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(Value::Null).await;
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(end) => return,
                    _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                        next_bookmark += every;
                        let bm = json!({"type": "BOOKMARK", "object": {
                            "kind": kind.name(), "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": cursor.to_string()},
                        }});
                        if tx.send(bm).await.is_err() {
                            return;
                        }
                    }
                    r = version.changed() => if r.is_err() { return },
                }
            }
        });
        // `Null` stands for the reset: the body fails, and the connection is cut mid-chunk.
        let stream = tokio_stream(rx).map(|v| match v {
            Value::Null => Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "watch cut")),
            v => Ok(Frame::data(Bytes::from(format!("{v}\n")))),
        });
        let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
        r.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
        Ok(r)
    }
}

fn tokio_stream(mut rx: tokio::sync::mpsc::Receiver<Value>) -> impl futures_util::Stream<Item = Value> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn invalid(kind: Kind, name: &str, what: &str) -> ApiError {
    err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("{} \"{name}\" is invalid: {what}", kind.name()))
}

/// What the real server validates that a client of ours could get wrong: label values (every
/// kind), and for core/v1 Events that carry an `eventTime` (new-style) about a cluster-scoped
/// object, the namespace (`default` or `kube-system`), the 1024-byte message limit and the
/// reporting fields (pkg/apis/core/validation/events.go).
fn validate(kind: Kind, v: &Value) -> Result<(), ApiError> {
    let name = name_of(v);
    if let Some(labels) = v["metadata"]["labels"].as_object() {
        for (k, value) in labels {
            let value = value.as_str().unwrap_or_default();
            if !label_value_ok(value) {
                return Err(invalid(
                    kind,
                    &name,
                    &format!(
                        "metadata.labels: Invalid value: {value:?}: a valid label must be an empty string or consist of \
                         alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric \
                         character, at most 63 characters (label {k})"
                    ),
                ));
            }
        }
    }
    if kind == Kind::Event && !v["eventTime"].is_null() {
        let ns = v["metadata"]["namespace"].as_str().unwrap_or_default();
        let involved_ns = v["involvedObject"]["namespace"].as_str().unwrap_or_default();
        if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
            return Err(invalid(
                kind,
                &name,
                &format!(
                    "involvedObject.namespace: Invalid value: \"\": does not match event.namespace ({ns:?})"
                ),
            ));
        }
        let message = v["message"].as_str().unwrap_or_default();
        if message.len() > 1024 {
            return Err(invalid(kind, &name, "message: Too long: may not be more than 1024 bytes"));
        }
        for (field, max) in
            [("reportingComponent", 128), ("reportingInstance", 128), ("action", 128), ("reason", 128)]
        {
            let f = v[field].as_str().unwrap_or_default();
            if f.is_empty() || f.len() > max {
                return Err(invalid(kind, &name, &format!("{field}: Required, at most {max} characters")));
            }
        }
    }
    Ok(())
}

fn label_value_ok(v: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    v.is_empty()
        || (v.len() <= 63
            && alnum(v.chars().next())
            && alnum(v.chars().last())
            && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

fn check_version(kind: Kind, name: &str, current: &Value, incoming: &Value) -> Result<(), ApiError> {
    match incoming["metadata"]["resourceVersion"].as_str() {
        Some(rv) if Some(rv) != current["metadata"]["resourceVersion"].as_str() => Err(err(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.name().to_lowercase()
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
