//! The lock and the drain against the test API server (a test double: see its crate docs).

use cluster::annotations::CORDONED;
use cluster::drain::{Drainer, Outcome};
use cluster::lock::{RebootLock, lease_name};
use cluster::{k8s_openapi, kube};
use serde_json::{Value, json};
use std::time::Duration;
use test_apiserver::{ApiServer, Kind, Options};

async fn server() -> (ApiServer, kube::Client) {
    server_with(Options::default()).await
}

async fn server_with(opts: Options) -> (ApiServer, kube::Client) {
    let s = ApiServer::start(opts).await.unwrap();
    let c = cluster::plain_client(&s.url()).unwrap();
    (s, c)
}

fn node(name: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {}})
}

fn holder(s: &ApiServer, i: u32) -> Option<String> {
    s.get(Kind::Lease, "acl", &lease_name(i))?["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn the_lock_admits_n_holders_and_recovers_lost_ones() {
    let (s, c) = server().await;
    for n in ["a", "b", "c"] {
        s.create(Kind::Node, node(n)).unwrap();
    }
    let lock = |me: &str| RebootLock::new(c.clone(), "acl", me, Duration::from_secs(2));
    let (a, b, cc) = (lock("a"), lock("b"), lock("c"));
    // Two slots: a and b get them, c waits.
    assert_eq!(a.acquire(2).await.unwrap().unwrap().name, "acl-reboot-0");
    assert_eq!(b.acquire(2).await.unwrap().unwrap().name, "acl-reboot-1");
    assert_eq!(cc.acquire(2).await.unwrap(), None);
    // Taking again is idempotent; a restarted agent finds its slot.
    assert_eq!(a.acquire(2).await.unwrap().unwrap().name, "acl-reboot-0");
    assert_eq!(a.held().await.unwrap().as_deref(), Some("acl-reboot-0"));
    // a releases: c gets slot 0.
    a.release("acl-reboot-0").await.unwrap();
    assert_eq!(holder(&s, 0), None);
    assert_eq!(cc.acquire(2).await.unwrap().unwrap().name, "acl-reboot-0");
    // b's Node is deleted while it holds slot 1: a recovers it at once.
    s.delete(Kind::Node, "", "b");
    let got = a.acquire(2).await.unwrap().unwrap();
    assert_eq!((got.name.as_str(), got.taken_over.as_deref()), ("acl-reboot-1", Some("b")));
    // c stops renewing: after its 2 s the slot is recovered; c's renewal then says it lost it.
    s.create(Kind::Node, node("d")).unwrap();
    let d = lock("d");
    assert_eq!(d.acquire(2).await.unwrap(), None, "c renewed recently");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let got = d.acquire(2).await.unwrap().unwrap();
    assert_eq!((got.name.as_str(), got.taken_over.as_deref()), ("acl-reboot-0", Some("c")));
    assert!(!cc.renew("acl-reboot-0").await.unwrap());
    assert!(d.renew("acl-reboot-0").await.unwrap());
    // A holder about to reboot extends its hold past the usual duration.
    assert!(d.extend("acl-reboot-0", Duration::from_secs(600)).await.unwrap());
    assert_eq!(s.get(Kind::Lease, "acl", "acl-reboot-0").unwrap()["spec"]["leaseDurationSeconds"], 600);
}

/// Issue 14: expiry is judged by the observer's own clock from when it last saw the record
/// change. A taker whose wall clock runs 90 s ahead does not take a slot its holder renews;
/// once the holder stops, the slot is recovered after one lease duration of the taker's own
/// observation.
#[tokio::test]
async fn a_skewed_clock_does_not_take_a_live_lock() {
    let (s, c) = server().await;
    for n in ["a", "b"] {
        s.create(Kind::Node, node(n)).unwrap();
    }
    let a = RebootLock::new(c.clone(), "acl", "a", Duration::from_secs(2));
    let ahead = jiff::SignedDuration::from_secs(90);
    let b = RebootLock::new(c.clone(), "acl", "b", Duration::from_secs(2)).with_clock_offset(ahead);
    assert_eq!(a.acquire(1).await.unwrap().unwrap().name, "acl-reboot-0");
    // a renews every 0.5 s for 4 s (twice its duration); b keeps trying.
    for _ in 0..8 {
        assert_eq!(b.acquire(1).await.unwrap(), None, "b took a live lock");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(a.renew("acl-reboot-0").await.unwrap());
    }
    assert_eq!(holder(&s, 0).as_deref(), Some("a"));
    // a stops renewing: b recovers the slot only after 2 s of its own observation.
    let stopped = std::time::Instant::now();
    let got = loop {
        if let Some(got) = b.acquire(1).await.unwrap() {
            break got;
        }
        assert!(stopped.elapsed() < Duration::from_secs(10), "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(stopped.elapsed() >= Duration::from_secs(2), "recovered after {:?}", stopped.elapsed());
    assert_eq!(got.taken_over.as_deref(), Some("a"));
    // What b wrote carries its own (skewed) clock: for people, never for judging.
    let renewed: jiff::Timestamp = s.get(Kind::Lease, "acl", "acl-reboot-0").unwrap()["spec"]["renewTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(renewed > jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60), "{renewed}");
}

#[tokio::test]
async fn racing_takers_get_distinct_slots() {
    let (s, c) = server().await;
    let names: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
    for n in &names {
        s.create(Kind::Node, node(n)).unwrap();
    }
    let tasks: Vec<_> = names
        .iter()
        .map(|n| {
            let l = RebootLock::new(c.clone(), "acl", n, Duration::from_secs(60));
            tokio::spawn(async move { l.acquire(3).await.unwrap().map(|a| a.name) })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap());
    }
    got.sort();
    assert_eq!(got, ["acl-reboot-0", "acl-reboot-1", "acl-reboot-2"], "exactly three winners");
    assert!(s.requests().get("PUT Lease").copied().unwrap_or(0) + s.requests()["POST Lease"] >= 3);
}

fn pod(name: &str, node: &str, app: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "prod", "labels": {"app": app}},
           "spec": {"nodeName": node}, "status": {"phase": "Running"}})
}

#[tokio::test]
async fn drain_evicts_what_it_should_and_waits_for_budgets() {
    let (s, c) = server().await;
    s.create(Kind::Node, node("n1")).unwrap();
    s.create(Kind::Pod, pod("web-1", "n1", "web")).unwrap();
    s.create(Kind::Pod, pod("db-1", "n1", "db")).unwrap();
    s.create(Kind::Pod, pod("other", "n2", "web")).unwrap();
    let mut ds = pod("fluentd-x", "n1", "logs");
    ds["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "fluentd", "uid": "u", "controller": true}]);
    s.create(Kind::Pod, ds).unwrap();
    let mut mirror = pod("etcd-n1", "n1", "etcd");
    mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "abc"});
    s.create(Kind::Pod, mirror).unwrap();
    let mut done = pod("job-1", "n1", "job");
    done["status"]["phase"] = json!("Succeeded");
    s.create(Kind::Pod, done).unwrap();
    s.create(
        Kind::Pdb,
        json!({"metadata": {"name": "db", "namespace": "prod"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}}}),
    )
    .unwrap();

    let mut d = Drainer::new(c.clone(), "n1");
    d.poll = Duration::from_millis(50);
    assert!(d.cordon().await.unwrap());
    let n = s.get(Kind::Node, "", "n1").unwrap();
    assert_eq!(
        (n["spec"]["unschedulable"].as_bool(), n["metadata"]["annotations"][CORDONED].as_str()),
        (Some(true), Some("true"))
    );
    let said = std::sync::Mutex::new(Vec::new());
    let out = d.drain(Duration::from_millis(300), &|m| said.lock().unwrap().push(m)).await.unwrap();
    let Outcome::TimedOut { blocking } = out else { panic!("{out:?}") };
    assert_eq!(blocking.len(), 1);
    assert!(
        blocking[0]
            .starts_with("prod/db-1: Cannot evict pod as it would violate the pod's disruption budget"),
        "{blocking:?}"
    );
    assert!(said.lock().unwrap().iter().any(|m| m.starts_with("draining: 1 of ") && m.contains("prod/db-1")));
    assert!(s.get(Kind::Pod, "prod", "web-1").is_none(), "the unprotected pod went at once");
    for kept in ["fluentd-x", "etcd-n1", "job-1", "other"] {
        assert!(s.get(Kind::Pod, "prod", kept).is_some(), "{kept} must stay");
    }
    // The budget allows it now (a replica elsewhere): the drain finishes.
    s.create(Kind::Pod, pod("db-2", "n2", "db")).unwrap();
    assert_eq!(d.drain(Duration::from_secs(5), &|_| {}).await.unwrap(), Outcome::Done { evicted: 1 });
    assert!(d.uncordon_if_ours().await.unwrap());
    let n = s.get(Kind::Node, "", "n1").unwrap();
    assert!(n["spec"]["unschedulable"].is_null() && n["metadata"]["annotations"][CORDONED].is_null(), "{n}");
}

/// A pod covered by two budgets: the API server answers each eviction with a 201 carrying a
/// Failure Status (code 500). The drain counts it as blocking, not evicted, waits between
/// rounds instead of spinning, and times out naming the reason.
#[tokio::test]
async fn a_pod_under_two_budgets_blocks_the_drain() {
    let (s, c) = server().await;
    s.create(Kind::Node, node("n1")).unwrap();
    s.create(Kind::Pod, pod("web-1", "n1", "web")).unwrap();
    s.create(Kind::Pod, pod("web-2", "n2", "web")).unwrap();
    for name in ["web-a", "web-b"] {
        s.create(
            Kind::Pdb,
            json!({"metadata": {"name": name, "namespace": "prod"},
                   "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        )
        .unwrap();
    }
    let mut d = Drainer::new(c.clone(), "n1");
    d.poll = Duration::from_millis(200);
    let out = d.drain(Duration::from_secs(1), &|_| {}).await.unwrap();
    let Outcome::TimedOut { blocking } = out else { panic!("{out:?}") };
    assert_eq!(blocking.len(), 1, "{blocking:?}");
    assert!(
        blocking[0].contains("more than one PodDisruptionBudget") && blocking[0].contains("code 500"),
        "{blocking:?}"
    );
    assert!(s.get(Kind::Pod, "prod", "web-1").is_some());
    // One second at one round per 200 ms: a handful of evictions, not a spin.
    let tries = s.requests().get("POST Pod/eviction").copied().unwrap_or(0);
    assert!((3..=8).contains(&tries), "{tries} eviction requests in 1 s");
}

#[tokio::test]
async fn a_node_the_operator_cordoned_stays_cordoned() {
    let (s, c) = server().await;
    s.create(Kind::Node, json!({"metadata": {"name": "n1"}, "spec": {"unschedulable": true}})).unwrap();
    let d = Drainer::new(c, "n1");
    assert!(!d.cordon().await.unwrap(), "not ours");
    assert!(!d.uncordon_if_ours().await.unwrap());
    assert_eq!(s.get(Kind::Node, "", "n1").unwrap()["spec"]["unschedulable"], true);
}

#[tokio::test]
async fn a_kubeconfig_file_gives_the_server_and_the_token() {
    let (s, _) = server().await;
    s.create(Kind::Node, node("n1")).unwrap();
    let dir = std::env::temp_dir().join(format!("acl-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n\
             users:\n- name: agent\n  user:\n    token: s3cret-token\n\
             contexts:\n- name: ctx\n  context:\n    cluster: c\n    user: agent\ncurrent-context: ctx\n",
            s.url()
        ),
    )
    .unwrap();
    let client = cluster::client(Some(&path)).await.unwrap();
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    assert!(nodes.get("n1").await.is_ok());
    assert_eq!(s.credentials(), ["Bearer s3cret-token"]);
    // A missing file is named.
    let Err(e) = cluster::client(Some(&dir.join("nope"))).await else { panic!("no kubeconfig, no client") };
    let e = e.to_string();
    assert!(e.contains("nope"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn budget(name: &str, app: &str, min: i64) -> Value {
    json!({"metadata": {"name": name, "namespace": "prod"},
           "spec": {"minAvailable": min, "selector": {"matchLabels": {"app": app}}}})
}

/// A budget the disruption controller has not processed yet: the real server answers 429 with
/// `Retry-After: 10`. The drain waits those 10 s instead of asking every round, then evicts.
#[tokio::test]
async fn a_budget_being_processed_is_asked_again_after_retry_after() {
    let (s, c) = server_with(Options { pdb_sync_delay: Duration::from_secs(2), ..Options::default() }).await;
    s.create(Kind::Node, node("n1")).unwrap();
    s.create(Kind::Pod, pod("db-1", "n1", "db")).unwrap();
    s.create(Kind::Pod, pod("db-2", "n2", "db")).unwrap();
    s.create(Kind::Pdb, budget("db", "db", 1)).unwrap();
    let mut d = Drainer::new(c, "n1");
    d.poll = Duration::from_millis(100);
    let said = std::sync::Mutex::new(Vec::new());
    let started = std::time::Instant::now();
    let out = d.drain(Duration::from_secs(30), &|m| said.lock().unwrap().push(m)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(out, Outcome::Done { evicted: 1 });
    let tries = s.requests().get("POST Pod/eviction").copied().unwrap_or(0);
    // The first try came before the controller (2 s): refused with Retry-After 10; the next
    // one, 10 s later, passed. Polling every 100 ms would have made about 20 tries.
    assert_eq!(tries, 2, "eviction requests");
    assert!(took >= Duration::from_secs(10), "asked again after {took:?}");
    let said = said.lock().unwrap();
    assert!(said.iter().any(|m| m.contains("is still being processed by the server")), "{said:?}");
}

/// The budget as the disruption controller keeps it: each eviction takes one from
/// `status.disruptionsAllowed` at once (and names the pod in `disruptedPods`), so two evictions
/// in quick succession cannot both pass on a budget that allows one.
#[tokio::test]
async fn evictions_are_counted_against_the_budget_status() {
    let (s, c) = server_with(Options { eviction_grace: Duration::from_secs(1), ..Options::default() }).await;
    s.create(Kind::Node, node("n1")).unwrap();
    for p in ["web-1", "web-2"] {
        s.create(Kind::Pod, pod(p, "n1", "web")).unwrap();
    }
    s.create(Kind::Pod, pod("web-3", "n2", "web")).unwrap();
    s.create(Kind::Pdb, budget("web", "web", 2)).unwrap();
    let st = s.get(Kind::Pdb, "prod", "web").unwrap()["status"].clone();
    assert_eq!(
        (st["disruptionsAllowed"].as_i64(), st["currentHealthy"].as_i64()),
        (Some(1), Some(3)),
        "{st}"
    );
    let mut d = Drainer::new(c, "n1");
    d.poll = Duration::from_millis(100);
    let out = d.drain(Duration::from_millis(600), &|_| {}).await.unwrap();
    let Outcome::TimedOut { blocking } = out else { panic!("{out:?}") };
    // One pod was evicted (terminating, its grace period running), the other refused.
    assert_eq!(blocking.len(), 2, "{blocking:?}");
    assert!(blocking.iter().any(|b| b.contains("terminating (grace period 1s)")), "{blocking:?}");
    assert!(blocking.iter().any(|b| b.contains("needs 2 healthy pods and has 2 currently")), "{blocking:?}");
    // A replica comes up elsewhere: the drain finishes.
    s.create(Kind::Pod, pod("web-4", "n2", "web")).unwrap();
    assert_eq!(d.drain(Duration::from_secs(10), &|_| {}).await.unwrap(), Outcome::Done { evicted: 1 });
}

/// A pod whose finalizer never clears is never gone: the drain waits for it until its
/// deadline and names the finalizer; once the finalizer is removed, the pod goes.
#[tokio::test]
async fn a_finalizer_that_never_clears_times_the_drain_out() {
    let (s, c) = server().await;
    s.create(Kind::Node, node("n1")).unwrap();
    let mut held = pod("stuck", "n1", "batch");
    held["metadata"]["finalizers"] = json!(["example.com/hold"]);
    s.create(Kind::Pod, held).unwrap();
    let mut d = Drainer::new(c.clone(), "n1");
    d.poll = Duration::from_millis(100);
    let out = d.drain(Duration::from_millis(800), &|_| {}).await.unwrap();
    assert_eq!(
        out,
        Outcome::TimedOut {
            blocking: vec!["prod/stuck: terminating, held by finalizer example.com/hold".into()]
        }
    );
    assert_eq!(s.requests().get("POST Pod/eviction").copied(), Some(1), "evicted once, then waited for");
    s.modify(Kind::Pod, "prod", "stuck", |p| p["metadata"]["finalizers"] = json!([]));
    assert!(s.get(Kind::Pod, "prod", "stuck").is_none(), "gone once its finalizer cleared");
    assert_eq!(d.drain(Duration::from_secs(1), &|_| {}).await.unwrap(), Outcome::Done { evicted: 0 });
}

/// Our mark without the cordon (an operator ran `kubectl uncordon`, which clears only the spec
/// field, and the drain is taken up again): the node is cordoned again, not drained while
/// schedulable.
#[tokio::test]
async fn a_node_marked_ours_but_uncordoned_is_cordoned_again() {
    let (s, c) = server().await;
    s.create(Kind::Node, json!({"metadata": {"name": "n1", "annotations": {CORDONED: "true"}}, "spec": {}}))
        .unwrap();
    let d = Drainer::new(c, "n1");
    assert!(d.cordon().await.unwrap());
    assert_eq!(s.get(Kind::Node, "", "n1").unwrap()["spec"]["unschedulable"], true);
}
