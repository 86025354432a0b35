//! The double's own semantics, over real HTTP with a plain client.

use super::*;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

struct Http {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new(s: &ApiServer) -> Self {
        Http { base: s.url(), client: Client::builder(TokioExecutor::new()).build_http() }
    }

    async fn send(&self, method: &str, path: &str, ctype: &str, body: Option<Value>) -> (u16, Value) {
        self.send_as(None, method, path, ctype, body).await
    }

    async fn send_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        ctype: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", ctype);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default()))).unwrap();
        let r = self.client.request(req).await.unwrap();
        let code = r.status().as_u16();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.send(method, path, "application/json", body).await
    }

    /// Reads a watch stream until it ends or `n` events came.
    async fn watch(&self, path: &str, n: usize) -> Vec<Value> {
        let req =
            Request::builder().uri(format!("{}{path}", self.base)).body(Full::new(Bytes::new())).unwrap();
        let mut body = self.client.request(req).await.unwrap().into_body();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while out.len() < n {
            let Some(frame) = body.frame().await else { break };
            buf.extend_from_slice(frame.unwrap().data_ref().unwrap());
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                out.push(serde_json::from_slice(&line).unwrap());
            }
        }
        out
    }
}

fn node(name: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"pool": "a"}}, "spec": {}})
}

#[tokio::test]
async fn stale_writes_conflict_and_merge_patch_applies() {
    let s = ApiServer::start(Options::default()).await.unwrap();
    let h = Http::new(&s);
    let (code, created) = h.json("POST", "/api/v1/nodes", Some(node("n1"))).await;
    assert_eq!(code, 201);
    let rv = created["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    assert_eq!(h.json("POST", "/api/v1/nodes", Some(node("n1"))).await.1["reason"], "AlreadyExists");

    let patch = json!({"metadata": {"resourceVersion": rv, "annotations": {"a": "1", "b": "2"}}});
    let (code, patched) =
        h.send("PATCH", "/api/v1/nodes/n1", "application/merge-patch+json", Some(patch.clone())).await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["metadata"]["annotations"], json!({"a": "1", "b": "2"}));
    assert_eq!(patched["metadata"]["labels"], json!({"pool": "a"}), "merge keeps what the patch omits");
    // The same precondition again is stale now.
    let (code, status) =
        h.send("PATCH", "/api/v1/nodes/n1", "application/merge-patch+json", Some(patch)).await;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));
    // null removes a key; no version means no precondition.
    let (_, patched) = h
        .send(
            "PATCH",
            "/api/v1/nodes/n1",
            "application/merge-patch+json",
            Some(json!({"metadata": {"annotations": {"a": null}}})),
        )
        .await;
    assert_eq!(patched["metadata"]["annotations"], json!({"b": "2"}));
    // A PUT with a stale version conflicts too; strategic merge is refused, not misapplied.
    let mut stale = created.clone();
    stale["spec"]["unschedulable"] = json!(true);
    assert_eq!(h.json("PUT", "/api/v1/nodes/n1", Some(stale)).await.0, 409);
    let smp =
        h.send("PATCH", "/api/v1/nodes/n1", "application/strategic-merge-patch+json", Some(json!({}))).await;
    assert_eq!(smp.0, 415);
    assert_eq!(h.json("GET", "/api/v1/nodes/nx", None).await.1["reason"], "NotFound");
    assert_eq!(h.json("GET", "/api/v1/nodes?fieldSelector=status.phase%3DReady", None).await.0, 400);
}

#[tokio::test]
async fn watch_resumes_sends_bookmarks_and_expires() {
    let opts = Options { history: 3, bookmark_every: Duration::from_millis(100), ..Options::default() };
    let s = ApiServer::start(opts).await.unwrap();
    let h = Http::new(&s);
    s.create(Kind::Node, node("n1")).unwrap();
    s.create(Kind::Node, node("n2")).unwrap();
    let (_, list) = h.json("GET", "/api/v1/nodes?fieldSelector=metadata.name%3Dn1", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    s.modify(Kind::Node, "", "n2", |v| v["spec"]["x"] = json!(1));
    s.modify(Kind::Node, "", "n1", |v| v["spec"]["x"] = json!(1));
    // From the list's version: only n1's change (the selector), then a bookmark.
    let path = format!(
        "/api/v1/nodes?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&fieldSelector=metadata.name%3Dn1"
    );
    let ev = h.watch(&path, 2).await;
    assert_eq!(ev[0]["type"], "MODIFIED");
    assert_eq!(ev[0]["object"]["metadata"]["name"], "n1");
    assert_eq!(ev[1]["type"], "BOOKMARK");
    assert_eq!(ev[1]["object"]["metadata"]["resourceVersion"], s.resource_version().to_string());
    // History of 3: the list's version has been compacted away after three more changes.
    for i in 0..3 {
        s.modify(Kind::Node, "", "n2", |v| v["spec"]["x"] = json!(i));
    }
    let ev = h.watch(&path, 1).await;
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["reason"], "Expired");
}

#[tokio::test]
async fn eviction_honours_disruption_budgets() {
    let s = ApiServer::start(Options::default()).await.unwrap();
    let h = Http::new(&s);
    for (name, app) in [("web-1", "web"), ("web-2", "web"), ("db-1", "db")] {
        s.create(
            Kind::Pod,
            json!({"metadata": {"name": name, "namespace": "prod", "labels": {"app": app}},
                   "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}),
        )
        .unwrap();
    }
    let pdb = |name: &str, app: &str| {
        json!({"metadata": {"name": name, "namespace": "prod"},
               "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": app}}}})
    };
    s.create(Kind::Pdb, pdb("web", "web")).unwrap();
    s.create(Kind::Pdb, pdb("db", "db")).unwrap();
    let evict = |pod: &str| format!("/api/v1/namespaces/prod/pods/{pod}/eviction");
    // db has one pod and needs one: blocked. web has two and needs one: one may go.
    let (code, st) = h.json("POST", &evict("db-1"), Some(json!({}))).await;
    assert_eq!((code, st["reason"].as_str()), (429, Some("TooManyRequests")));
    assert_eq!(h.json("POST", &evict("web-1"), Some(json!({}))).await.0, 201);
    assert!(s.get(Kind::Pod, "prod", "web-1").is_none());
    assert_eq!(h.json("POST", &evict("web-2"), Some(json!({}))).await.0, 429);
    // The budget relaxed: the eviction goes through.
    s.modify(Kind::Pdb, "prod", "db", |v| v["spec"]["minAvailable"] = json!(0));
    assert_eq!(h.json("POST", &evict("db-1"), Some(json!({}))).await.0, 201);
    assert_eq!(h.json("POST", &evict("db-1"), Some(json!({}))).await.0, 404);
    let (_, pods) = h.json("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1", None).await;
    assert_eq!(pods["items"].as_array().unwrap().len(), 1);
    // Two budgets over one pod: the real server's answer is a 201 whose body is a Failure
    // Status with code 500, and the pod stays.
    s.create(Kind::Pdb, pdb("web-too", "web")).unwrap();
    let (code, st) = h.json("POST", &evict("web-2"), Some(json!({}))).await;
    assert_eq!((code, st["status"].as_str(), st["code"].as_i64()), (201, Some("Failure"), Some(500)));
    assert!(st["message"].as_str().unwrap().contains("more than one PodDisruptionBudget"), "{st}");
    assert!(s.get(Kind::Pod, "prod", "web-2").is_some());
}

#[tokio::test]
async fn leases_are_namespaced_objects_with_optimistic_concurrency() {
    let s = ApiServer::start(Options::default()).await.unwrap();
    let h = Http::new(&s);
    let path = "/apis/coordination.k8s.io/v1/namespaces/acl/leases";
    let lease = json!({"metadata": {"name": "l0"}, "spec": {"holderIdentity": "a"}});
    let (code, created) = h.json("POST", path, Some(lease)).await;
    assert_eq!(code, 201);
    assert_eq!(created["metadata"]["namespace"], "acl");
    let mut mine = created.clone();
    mine["spec"]["holderIdentity"] = json!("b");
    let mut theirs = created.clone();
    theirs["spec"]["holderIdentity"] = json!("c");
    assert_eq!(h.json("PUT", &format!("{path}/l0"), Some(mine)).await.0, 200);
    assert_eq!(h.json("PUT", &format!("{path}/l0"), Some(theirs)).await.0, 409, "two takers: one wins");
    assert_eq!(s.get(Kind::Lease, "acl", "l0").unwrap()["spec"]["holderIdentity"], "b");
    assert_eq!(h.json("GET", "/apis/coordination.k8s.io/v1/namespaces/other/leases/l0", None).await.0, 404);
}

/// What the real server validates that our client could get wrong, and no-op writes.
#[tokio::test]
async fn validation_and_no_op_writes() {
    let s = ApiServer::start(Options::default()).await.unwrap();
    let h = Http::new(&s);
    let merge = "application/merge-patch+json";
    s.create(Kind::Node, json!({"metadata": {"name": "n1"}})).unwrap();
    // A label value with a '+' (a semver build suffix) is refused; a clean one is taken.
    let (code, st) = h
        .send("PATCH", "/api/v1/nodes/n1", merge, Some(json!({"metadata": {"labels": {"v": "1.0.0+b1"}}})))
        .await;
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")), "{st}");
    assert_eq!(
        h.send("PATCH", "/api/v1/nodes/n1", merge, Some(json!({"metadata": {"labels": {"v": "1.0.0_b1"}}})))
            .await
            .0,
        200
    );
    // A patch that changes nothing bumps nothing and tells no watcher.
    let rv = s.resource_version();
    let (code, n) = h
        .send("PATCH", "/api/v1/nodes/n1", merge, Some(json!({"metadata": {"labels": {"v": "1.0.0_b1"}}})))
        .await;
    assert_eq!((code, s.resource_version()), (200, rv));
    assert_eq!(n["metadata"]["resourceVersion"], rv.to_string());

    // Events about a Node with an eventTime: only in default or kube-system, at most 1024 bytes.
    let event = |message: &str| {
        json!({"metadata": {"name": format!("n1.{}", message.len())}, "involvedObject": {"kind": "Node", "name": "n1"},
               "reason": "R", "action": "R", "message": message, "eventTime": "2026-11-30T00:00:00.000000Z",
               "reportingComponent": "acl-update.dev/agent", "reportingInstance": "n1", "type": "Normal"})
    };
    let post = |ns: &'static str, e: Value| {
        let h = &h;
        async move { h.json("POST", &format!("/api/v1/namespaces/{ns}/events"), Some(e)).await }
    };
    let (code, st) = post("acl-update", event("hi")).await;
    assert_eq!(code, 422, "{st}");
    assert!(st["message"].as_str().unwrap().contains("does not match event.namespace"), "{st}");
    assert_eq!(post("kube-system", event("hi")).await.0, 201);
    assert_eq!(post("default", event(&"x".repeat(1024))).await.0, 201);
    assert_eq!(post("default", event(&"x".repeat(1025))).await.0, 422);

    // A Lease PUT must name the version it replaces.
    let path = "/apis/coordination.k8s.io/v1/namespaces/acl/leases";
    let (_, created) = h.json("POST", path, Some(json!({"metadata": {"name": "l0"}, "spec": {}}))).await;
    let mut unconditional = created.clone();
    unconditional["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    unconditional["spec"]["holderIdentity"] = json!("a");
    let (code, st) = h.json("PUT", &format!("{path}/l0"), Some(unconditional)).await;
    assert_eq!(code, 422, "{st}");
    assert!(st["message"].as_str().unwrap().contains("must be specified for an update"), "{st}");
}

/// Who may do what, with node identities and the repository's RBAC manifest: each row is a
/// request made over HTTP with that identity's token. Printed as the table of the closing note.
#[tokio::test]
async fn identities_are_authorized_as_the_real_server_would() {
    let s = ApiServer::start(Options::default()).await.unwrap();
    let h = Http::new(&s);
    for n in ["node-a", "node-b"] {
        s.create(Kind::Node, json!({"metadata": {"name": n}})).unwrap();
    }
    for (pod, node) in [("web-a", "node-a"), ("web-b", "node-b")] {
        s.create(Kind::Pod, json!({"metadata": {"name": pod, "namespace": "prod"}, "spec": {"nodeName": node}, "status": {"phase": "Running"}}))
            .unwrap();
    }
    s.create(
        Kind::Lease,
        json!({"metadata": {"name": "acl-reboot-0", "namespace": "acl-update"}, "spec": {}}),
    )
    .unwrap();
    s.create(
        Kind::Lease,
        json!({"metadata": {"name": "node-a", "namespace": "kube-node-lease"}, "spec": {}}),
    )
    .unwrap();
    s.apply_rbac(include_str!("../../../integration/kubernetes/coordinator.yaml"));
    let node_a = s.token_for(Identity::Node("node-a".into()));
    let sa = s.token_for(Identity::ServiceAccount {
        namespace: "acl-update".into(),
        name: "acl-coordinator".into(),
    });
    let merge = "application/merge-patch+json";
    let ann = json!({"metadata": {"annotations": {"x": "1"}}});
    let event = json!({"metadata": {"name": "e1"}, "involvedObject": {"kind": "Node", "name": "node-a"}, "reason": "R"});
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/acl-update/leases/acl-reboot-0";
    let lease = s.get(Kind::Lease, "acl-update", "acl-reboot-0").unwrap();
    let own_lease = s.get(Kind::Lease, "kube-node-lease", "node-a").unwrap();
    type Row<'a> = (&'a str, &'a str, &'a str, &'a str, Option<Value>, u16);
    let rows: Vec<Row<'_>> = vec![
        ("system:node:node-a", "GET", "/api/v1/nodes/node-b", "application/json", None, 200),
        ("system:node:node-a", "PATCH", "/api/v1/nodes/node-a", merge, Some(ann.clone()), 200),
        ("system:node:node-a", "PATCH", "/api/v1/nodes/node-b", merge, Some(ann.clone()), 403),
        (
            "system:node:node-a",
            "POST",
            "/api/v1/namespaces/default/events",
            "application/json",
            Some(event.clone()),
            201,
        ),
        (
            "system:node:node-a",
            "POST",
            "/api/v1/namespaces/prod/pods/web-b/eviction",
            "application/json",
            Some(json!({})),
            403,
        ),
        (
            "system:node:node-a",
            "POST",
            "/api/v1/namespaces/prod/pods/web-a/eviction",
            "application/json",
            Some(json!({})),
            201,
        ),
        ("system:node:node-a", "PUT", lease_path, "application/json", Some(lease.clone()), 403),
        ("system:node:node-a", "GET", lease_path, "application/json", None, 403),
        (
            "system:node:node-a",
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-a",
            "application/json",
            Some(own_lease),
            200,
        ),
        ("system:node:node-a", "DELETE", "/api/v1/nodes/node-b", "application/json", None, 403),
        ("sa:acl-coordinator", "PATCH", "/api/v1/nodes/node-b", merge, Some(ann.clone()), 200),
        (
            "sa:acl-coordinator",
            "POST",
            "/api/v1/namespaces/prod/pods/web-b/eviction",
            "application/json",
            Some(json!({})),
            201,
        ),
        ("sa:acl-coordinator", "PUT", lease_path, "application/json", Some(lease), 200),
        (
            "sa:acl-coordinator",
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-a",
            "application/json",
            None,
            403,
        ),
        ("sa:acl-coordinator", "DELETE", "/api/v1/nodes/node-b", "application/json", None, 403),
        ("sa:acl-coordinator", "DELETE", "/api/v1/namespaces/prod/pods/web-a", "application/json", None, 403),
        ("nobody", "GET", "/api/v1/nodes/node-a", "application/json", None, 401),
    ];
    eprintln!("| identity | verb | path | answer |\n|---|---|---|---|");
    for (who, method, path, ctype, body, want) in rows {
        let token = match who {
            "system:node:node-a" => Some(node_a.as_str()),
            "sa:acl-coordinator" => Some(sa.as_str()),
            _ => Some("not-a-token"),
        };
        let (code, st) = h.send_as(token, method, path, ctype, body).await;
        eprintln!("| {who} | {method} | {path} | {code} |");
        assert_eq!(code, want, "{who} {method} {path}: {st}");
        if code == 403 {
            let m = st["message"].as_str().unwrap_or_default();
            assert!(m.contains("is forbidden: User \""), "{m}");
        }
    }
}

/// A reset closes the connection without an answer; before or after the write was made.
#[tokio::test]
async fn resets_close_the_connection_before_or_after_the_write() {
    let s = ApiServer::start(Options::default()).await.unwrap();
    s.create(Kind::Node, json!({"metadata": {"name": "n1"}})).unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let patch = |v: &str| {
        Request::builder()
            .method("PATCH")
            .uri(format!("{}/api/v1/nodes/n1", s.url()))
            .header("content-type", "application/merge-patch+json")
            .body(Full::new(Bytes::from(json!({"metadata": {"labels": {"x": v}}}).to_string())))
            .unwrap()
    };
    s.reset_requests("PATCH Node", "lost", 1, false);
    assert!(client.request(patch("lost")).await.is_err(), "no answer");
    assert!(s.get(Kind::Node, "", "n1").unwrap()["metadata"]["labels"]["x"].is_null(), "not applied");
    s.reset_requests("PATCH Node", "made", 1, true);
    assert!(client.request(patch("made")).await.is_err(), "no answer");
    assert_eq!(s.get(Kind::Node, "", "n1").unwrap()["metadata"]["labels"]["x"], "made", "applied");
    assert_eq!(client.request(patch("again")).await.unwrap().status(), 200, "served again");
    // A watch cut mid-stream: what was due arrives, then the body fails.
    let rv = s.resource_version();
    s.modify(Kind::Node, "", "n1", |n| n["metadata"]["labels"]["y"] = json!("1"));
    s.reset_watches(Kind::Node, 1);
    let req = Request::builder()
        .uri(format!("{}/api/v1/nodes?watch=true&resourceVersion={rv}", s.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = client.request(req).await.unwrap();
    let mut body = r.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"MODIFIED\""));
    assert!(body.frame().await.is_some_and(|f| f.is_err()), "cut, not ended");
    assert_eq!(s.failed_requests(), 3);
}

/// Budgets as kube-apiserver and the disruption controller keep them: status from the spec
/// and the pods, 429 with `Retry-After: 10` while a new spec is not processed, evictions
/// counted in `disruptionsAllowed` and `disruptedPods` at once.
#[tokio::test]
async fn budgets_follow_their_status() {
    let opts = Options { pdb_sync_delay: Duration::from_millis(300), ..Options::default() };
    let s = ApiServer::start(opts).await.unwrap();
    let http = Http::new(&s);
    for p in ["a", "b", "c"] {
        s.create(
            Kind::Pod,
            json!({"metadata": {"name": p, "namespace": "ns", "labels": {"app": "w"}},
            "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}),
        )
        .unwrap();
    }
    s.create(
        Kind::Pdb,
        json!({"metadata": {"name": "w", "namespace": "ns"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "w"}}}}),
    )
    .unwrap();
    let evict = |p: &str| {
        let path = format!("/api/v1/namespaces/ns/pods/{p}/eviction");
        let body = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": p}});
        (path, body)
    };
    let (path, body) = evict("a");
    let (code, v) = http.send("POST", &path, "application/json", Some(body.clone())).await;
    assert_eq!((code, v["details"]["retryAfterSeconds"].as_u64()), (429, Some(10)), "{v}");
    assert!(v["details"]["causes"][0]["message"].as_str().unwrap().contains("still being processed"), "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = s.get(Kind::Pdb, "ns", "w").unwrap()["status"].clone();
    assert_eq!(
        (st["disruptionsAllowed"].as_i64(), st["observedGeneration"].as_i64()),
        (Some(2), Some(1)),
        "{st}"
    );
    assert_eq!(http.send("POST", &path, "application/json", Some(body)).await.0, 201);
    let st = s.get(Kind::Pdb, "ns", "w").unwrap()["status"].clone();
    assert_eq!(st["disruptionsAllowed"], 1, "taken at once, before the controller runs: {st}");
    let (path, body) = evict("b");
    assert_eq!(http.send("POST", &path, "application/json", Some(body)).await.0, 201);
    let (path, body) = evict("c");
    let (code, v) = http.send("POST", &path, "application/json", Some(body)).await;
    assert_eq!((code, v["details"]["retryAfterSeconds"].as_u64()), (429, None), "{v}");
    assert!(
        v["details"]["causes"][0]["message"].as_str().unwrap().contains("needs 1 healthy pods and has"),
        "{v}"
    );
    // A spec change is a new generation: 429 with Retry-After again until processed.
    s.modify(Kind::Pdb, "ns", "w", |p| p["spec"]["minAvailable"] = json!(0));
    let (path, body) = evict("c");
    let (code, v) = http.send("POST", &path, "application/json", Some(body.clone())).await;
    assert_eq!((code, v["details"]["retryAfterSeconds"].as_u64()), (429, Some(10)), "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(http.send("POST", &path, "application/json", Some(body)).await.0, 201);
}
