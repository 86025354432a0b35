//! A simulated cluster: many real agents (the daemon and its Kubernetes mode, in process, each
//! on its own GPT disk-image file) and the real coordinator, against one test API server
//! (`test-apiserver`, a test double of the Kubernetes API: see its crate docs for what it
//! covers). Every agent talks with its own node identity (`system:node:<name>`), the
//! coordinator with its ServiceAccount and the RBAC of `integration/kubernetes/coordinator.yaml`:
//! the double refuses what the real API server would refuse them.
//!
//! The harness plays what is neither: the kubelet (a Node's Ready condition, with a fresh
//! heartbeat after each boot, not Ready while the machine is down), the power button (a
//! reboot stops the node's agent, runs the boot path's slot choice on its disk, and starts the
//! agent again from the chosen slot) and the operator (`kubectl annotate`).

mod common;

use agent::daemon::{self, Env, Platform, Snapshot};
use agent::metrics::Metrics;
use common::Fixture;
use jiff::Timestamp;
use serde_json::{Value, json};
use slot::Disk;
use slot::choice;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use test_apiserver::Identity;
use test_apiserver::{ApiServer, Change, Kind, Options};

const PREFIX: &str = "v1.acl-update.dev/";

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// The real clock; reboots are counted for the harness.
#[derive(Debug, Default)]
struct Machine {
    reboots: AtomicUsize,
}

impl Platform for Machine {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
    fn reboot(&self) -> Result<(), String> {
        self.reboots.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct SimNode {
    name: String,
    dir: PathBuf,
    disk: PathBuf,
}

fn node_object(name: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"agentpool": "pool1"}}, "spec": {},
           "status": {"conditions": [{"type": "Ready", "status": "False"}]}})
}

/// The kubelet's Ready condition.
fn set_ready(server: &ApiServer, node: &str, ready: bool) {
    let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    server.modify(Kind::Node, "", node, |n| {
        n["status"]["conditions"] = json!([{"type": "Ready", "status": if ready { "True" } else { "False" },
            "lastHeartbeatTime": now, "lastTransitionTime": now}]);
    });
}

/// Starts the API server with the coordinator's RBAC applied.
async fn api_server(opts: Options) -> ApiServer {
    let server = ApiServer::start(opts).await.unwrap();
    server.apply_rbac(RBAC);
    server
}

const RBAC: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../integration/kubernetes/coordinator.yaml"));

/// One replica of the coordinator Deployment (its ServiceAccount's token), until aborted.
fn coordinator(
    server: &ApiServer,
    replica: &str,
    tune: impl FnOnce(&mut coordinator::Options),
) -> tokio::task::JoinHandle<()> {
    let token = server.token_for(Identity::ServiceAccount {
        namespace: "acl-update".into(),
        name: "acl-coordinator".into(),
    });
    let client = cluster::token_client(&server.url(), &token).unwrap();
    let mut o = coordinator::Options::new(replica);
    o.lease_duration = Duration::from_secs(2);
    o.reboot_hold = Duration::from_secs(20);
    o.drain_timeout = Duration::from_secs(3);
    o.drain_poll = Duration::from_millis(200);
    o.retry = Duration::from_millis(200);
    tune(&mut o);
    tokio::spawn(coordinator::run(client, o, std::future::pending()))
}

impl SimNode {
    fn new(f: &Fixture, sgdisk: &std::path::Path, name: &str, extra: &str) -> SimNode {
        let dir = f.path(name);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let disk = testkit::flatcar_image(sgdisk, &dir, 64, 16);
        std::fs::copy(f.path("build-1.0.0/manifest.json"), dir.join("state/slot-A.manifest.json")).unwrap();
        let etc = dir.join("root/etc/acl-update");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("config.toml"),
            format!(
                "[updates]\nrepository = \"file://{}\"\nmode = \"check\"\ntries = 2\n\
                 [trust]\nkeys = [\"{}\"]\n\
                 [health]\nrequired-dir = \"{dir}/none\"\nwanted-dir = \"{dir}/none\"\nsystemd = false\n\
                 kubelet = \"off\"\ndeadline = \"60s\"\n\
                 [agent]\nstate-dir = \"{dir}/state\"\n\
                 [kubernetes]\nenabled = true\nnode-name = \"{name}\"\n",
                f.path("repo").display(),
                f.path("keys").display(),
                dir = dir.display(),
            ),
        )
        .unwrap();
        // The test's own settings, as an administrator's drop-in.
        std::fs::create_dir_all(etc.join("config.d")).unwrap();
        std::fs::write(etc.join("config.d/50-test.toml"), extra).unwrap();
        SimNode { name: name.into(), dir, disk }
    }

    fn settings(&self) -> config::Settings {
        let loaded = config::load(&config::Sources::under(&self.dir.join("root"))).unwrap();
        config::Settings::from_loaded(&loaded).unwrap()
    }

    /// Powers the machine on and off until `stop`: boot path, agent + Kubernetes mode, kubelet.
    async fn live(self, server: ApiServer, stop: Arc<AtomicBool>) {
        let machine = Arc::new(Machine::default());
        while !stop.load(Ordering::SeqCst) {
            let booted = {
                let mut d = Disk::open(&self.disk, true).unwrap();
                let (chosen, _) = choice::boot_attempt(&d.slots()).unwrap();
                d.update(|s| Ok(choice::boot_attempt(s).unwrap().1)).unwrap();
                chosen
            };
            let settings = self.settings();
            let k = settings.kubernetes.clone().unwrap();
            let (probe, feed) = agent::kube::node_ready_probe();
            let status = Arc::new(tokio::sync::watch::channel(Snapshot::default()).0);
            let (transitions, transitions_rx) = tokio::sync::mpsc::unbounded_channel();
            let env = Env {
                settings: settings.clone(),
                disk: self.disk.clone(),
                booted,
                machine_id: self.name.clone(),
                arch: "x86_64".into(),
                platform: machine.clone(),
                tick: Duration::from_millis(50),
                metrics: Arc::new(Metrics::new()),
                coordinated: true,
                status: Arc::clone(&status),
                probes: vec![probe],
                transitions: Some(transitions),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let (off, off_rx) = tokio::sync::oneshot::channel::<()>();
            let agent = tokio::spawn(daemon::run(env, rx, async move {
                let _ = off_rx.await;
            }));
            let mut opts = agent::kube::Options::new(&k, self.name.clone());
            opts.retry = Duration::from_millis(200);
            // This simulated machine booted just now.
            opts.booted_at = Timestamp::now();
            // The node's own credentials, as the kubelet's kubeconfig gives them.
            let token = server.token_for(Identity::Node(self.name.clone()));
            let client = cluster::token_client(&server.url(), &token).unwrap();
            let kube =
                tokio::spawn(agent::kube::run(client, opts, tx, status.subscribe(), transitions_rx, feed));
            // The kubelet comes up after the agent.
            tokio::time::sleep(Duration::from_millis(100)).await;
            set_ready(&server, &self.name, true);
            let reboots = machine.reboots.load(Ordering::SeqCst);
            while machine.reboots.load(Ordering::SeqCst) == reboots && !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Power off: everything on the machine stops.
            kube.abort();
            let _ = off.send(());
            agent.await.unwrap().unwrap();
            if server.get(Kind::Node, "", &self.name).is_some() {
                set_ready(&server, &self.name, false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Follows every change the server makes, keeping the highest counts seen at once.
#[derive(Debug, Default)]
struct Watch {
    cordoned: BTreeSet<String>,
    down: BTreeSet<String>,
    holders: BTreeMap<String, String>,
    max_cordoned: usize,
    max_down: usize,
    max_holders: usize,
}

impl Watch {
    /// Counts from now on.
    fn reset(&mut self) {
        self.max_cordoned = self.cordoned.len();
        self.max_down = self.down.len();
        self.max_holders = self.holders.len();
    }

    fn see(&mut self, c: &Change) {
        let name = c.object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        match c.kind {
            Kind::Node => {
                let gone = c.kind_of_change == "DELETED";
                let cordoned = c.object["spec"]["unschedulable"] == true && !gone;
                let down = !gone
                    && c.object["status"]["conditions"][0]["status"] == "False"
                    && c.object["metadata"]["annotations"][key("booted-version")].is_string();
                set(&mut self.cordoned, &name, cordoned);
                set(&mut self.down, &name, down);
            }
            // The reboot lock's slots (not the coordinator's leader Lease).
            Kind::Lease if !name.starts_with("acl-reboot-") => {}
            Kind::Lease => match c.object["spec"]["holderIdentity"].as_str() {
                Some(h) if c.kind_of_change != "DELETED" => {
                    self.holders.insert(name, h.to_owned());
                }
                _ => {
                    self.holders.remove(&name);
                }
            },
            _ => {}
        }
        self.max_cordoned = self.max_cordoned.max(self.cordoned.len());
        self.max_down = self.max_down.max(self.down.len());
        self.max_holders = self.max_holders.max(self.holders.len());
    }
}

fn set(s: &mut BTreeSet<String>, name: &str, on: bool) {
    if on {
        s.insert(name.to_owned());
    } else {
        s.remove(name);
    }
}

fn follow(server: &ApiServer) -> Arc<Mutex<Watch>> {
    let w = Arc::new(Mutex::new(Watch::default()));
    let mut rx = server.subscribe();
    let w2 = Arc::clone(&w);
    tokio::spawn(async move {
        while let Ok(c) = rx.recv().await {
            w2.lock().unwrap().see(&c);
        }
    });
    w
}

fn annotation(server: &ApiServer, node: &str, name: &str) -> Option<String> {
    server.get(Kind::Node, "", node)?["metadata"]["annotations"][key(name)].as_str().map(str::to_owned)
}

/// Updated, healthy, lock given back, schedulable.
fn done(server: &ApiServer, node: &str) -> bool {
    let Some(n) = server.get(Kind::Node, "", node) else { return false };
    let a = &n["metadata"]["annotations"];
    a[key("booted-version")] == "2.0.0"
        && a[key("state")] == "idle"
        && a[key("lock")].is_null()
        && n["spec"]["unschedulable"].is_null()
}

/// `kubectl annotate node NAME KEY=VALUE --overwrite`.
fn annotate(server: &ApiServer, node: &str, kv: &[(&str, &str)]) {
    server.modify(Kind::Node, "", node, |n| {
        for (k, v) in kv {
            n["metadata"]["annotations"][key(k)] = json!(v);
        }
    });
}

fn pod(name: &str, node: &str, app: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "prod", "labels": {"app": app}},
           "spec": {"nodeName": node}, "status": {"phase": "Running"}})
}

/// The pod `prod/db-0` on `node`, with a PodDisruptionBudget `db` that allows no eviction.
fn pod_without_disruptions(server: &ApiServer, node: &str) {
    server.create(Kind::Pod, pod("db-0", node, "db")).unwrap();
    server
        .create(
            Kind::Pdb,
            json!({"metadata": {"name": "db", "namespace": "prod"},
                   "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}}}),
        )
        .unwrap();
}

async fn until(what: &str, secs: u64, cond: impl Fn() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(std::time::Instant::now() < end, "timed out after {secs} s waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `("get", "nodes")` for the double's `"GET Node"`.
fn verb_resource(request: &str) -> Option<(String, String)> {
    let (verb, what) = request.split_once(' ')?;
    let verb = match verb {
        "GET" => "get",
        "LIST" => "list",
        "WATCH" => "watch",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => return None,
    };
    let (kind, sub) = what.split_once('/').map_or((what, None), |(k, s)| (k, Some(s)));
    let plural = match kind {
        "Node" => "nodes",
        "Pod" => "pods",
        "Event" => "events",
        "Lease" => "leases",
        "PodDisruptionBudget" => "poddisruptionbudgets",
        _ => return None,
    };
    Some((verb.into(), sub.map_or(plural.to_owned(), |s| format!("{plural}/{s}"))))
}

/// Every (verb, resource) the Roles and ClusterRoles of a manifest grant (flow-style lists, as
/// rbac.yaml writes them).
fn rbac_grants(yaml: &str) -> BTreeSet<(String, String)> {
    let list = |line: &str| -> Vec<String> {
        let inner = line.split_once('[').and_then(|(_, r)| r.split_once(']')).map_or("", |(l, _)| l);
        inner.split(',').map(|w| w.trim().trim_matches('"').to_owned()).filter(|w| !w.is_empty()).collect()
    };
    let mut out = BTreeSet::new();
    for doc in yaml.split("\n---") {
        if !doc.lines().any(|l| l == "kind: Role" || l == "kind: ClusterRole") {
            continue;
        }
        let mut resources = Vec::new();
        for line in doc.lines().map(str::trim) {
            if line.starts_with("resources:") {
                resources = list(line);
            } else if line.starts_with("verbs:") {
                for v in list(line) {
                    for r in &resources {
                        out.insert((v.clone(), r.clone()));
                    }
                }
            }
        }
    }
    out
}

fn reasons(server: &ApiServer, node: &str) -> Vec<String> {
    server
        .list(Kind::Event)
        .into_iter()
        .filter(|e| e["involvedObject"]["name"] == node)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Twenty nodes, two at a time, with per-node identities and two coordinator replicas; the
/// leader is killed (no release, its drains die with it) while it drains a node, and the other
/// replica finishes the job: no slot lost, no node left cordoned, never more than two down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_update_two_at_a_time() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let opts = Options {
        max_watch: Duration::from_secs(3),
        eviction_grace: Duration::from_millis(100),
        ..Options::default()
    };
    let server = api_server(opts).await;
    let watch = follow(&server);
    let names: Vec<String> = (0..20).map(|i| format!("node-{i:02}")).collect();
    let blocked = "node-07";
    for n in &names {
        server.create(Kind::Node, node_object(n)).unwrap();
        server.create(Kind::Pod, pod(&format!("web-{n}"), n, "web")).unwrap();
        let mut ds = pod(&format!("logs-{n}"), n, "logs");
        ds["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "logs", "uid": "u1", "controller": true}]);
        server.create(Kind::Pod, ds).unwrap();
    }
    // One pod whose budget allows no disruption: only its node must wait.
    pod_without_disruptions(&server, blocked);
    let two = |o: &mut coordinator::Options| o.max_rebooting = 2;
    let first = coordinator(&server, "coordinator-a", two);
    until("coordinator-a leads", 10, || leader(&server).as_deref() == Some("coordinator-a")).await;
    let second = coordinator(&server, "coordinator-b", two);

    let stop = Arc::new(AtomicBool::new(false));
    let mut lives = Vec::new();
    for n in &names {
        let node = SimNode::new(&f, &sgdisk, n, "");
        lives.push(tokio::spawn(node.live(server.clone(), Arc::clone(&stop))));
    }
    until("every agent reports 1.0.0, idle", 60, || {
        names.iter().all(|n| {
            annotation(&server, n, "booted-version").as_deref() == Some("1.0.0")
                && annotation(&server, n, "state").as_deref() == Some("idle")
        })
    })
    .await;
    let labels = server.get(Kind::Node, "", "node-00").unwrap()["metadata"]["labels"].clone();
    assert_eq!(labels[key("version")], "1.0.0", "{labels}");
    // Idle: what the agents and the coordinator ask of the API server per minute.
    let idle_before = requests_per_identity(&server, &names);
    let idle_started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let idle = rate_per_minute(&idle_before, &requests_per_identity(&server, &names), idle_started.elapsed());

    // etcd compacts under the watches now and then.
    let compactor = tokio::spawn({
        let server = server.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                server.compact();
            }
        }
    });
    // The operator: update the whole pool (the coordinator lets two reboot at a time).
    watch.lock().unwrap().reset();
    let busy_before = requests_per_identity(&server, &names);
    let started = std::time::Instant::now();
    for n in &names {
        annotate(&server, n, &[("update", "latest")]);
    }
    // Kill the leader while it drains the blocked node (its drain cannot finish).
    until("the leader drains the blocked node", 120, || {
        annotation(&server, blocked, "drain").is_some_and(|d| d.starts_with("draining"))
    })
    .await;
    let held_at_kill: BTreeMap<String, String> = watch.lock().unwrap().holders.clone();
    let killed = leader(&server).unwrap();
    let mut replicas =
        BTreeMap::from([("coordinator-a".to_owned(), first), ("coordinator-b".to_owned(), second)]);
    replicas.remove(&killed).unwrap().abort();
    let killed_at = std::time::Instant::now();
    let (survivor, second) = replicas.into_iter().next().unwrap();
    eprintln!("killed the leader {killed} while it drained {blocked}");
    until("the other replica leads", 30, || leader(&server).as_deref() == Some(survivor.as_str())).await;
    let takeover = killed_at.elapsed();
    assert!(takeover >= Duration::from_secs(1), "the survivor waited for the Lease to expire: {takeover:?}");
    // Every slot held at the kill was still held by the same node when the new leader came,
    // or given back by it after that node finished.
    for (lease, holder) in &held_at_kill {
        let now = server.get(Kind::Lease, "acl-update", lease).unwrap()["spec"]["holderIdentity"].clone();
        assert!(
            now == holder.as_str() || now.is_null() && done(&server, holder),
            "{lease}: {holder} -> {now}"
        );
    }

    until("every node but the blocked one is updated", 300, || {
        names.iter().filter(|n| *n != blocked).all(|n| done(&server, n))
    })
    .await;
    let others = started.elapsed();
    // The blocked node is still on 1.0.0, and says why.
    assert_eq!(annotation(&server, blocked, "booted-version").as_deref(), Some("1.0.0"));
    until("the blocked node reports the blocked drain", 30, || {
        reasons(&server, blocked).iter().any(|r| r == "DrainBlocked")
    })
    .await;
    assert!(!done(&server, blocked));
    let drain = || annotation(&server, blocked, "drain").unwrap_or_default();
    until("drain names the blocking pod", 10, || drain().contains("prod/db-0: Cannot evict pod")).await;
    assert_eq!(annotation(&server, blocked, "state").as_deref(), Some("staged"));

    // The budget allows it now: the blocked node follows.
    server.modify(Kind::Pdb, "prod", "db", |p| p["spec"]["minAvailable"] = json!(0));
    until("the blocked node is updated", 120, || done(&server, blocked)).await;
    let all = started.elapsed();
    let updating = rate_per_minute(&busy_before, &requests_per_identity(&server, &names), all);
    compactor.abort();
    let w = std::mem::take(&mut *watch.lock().unwrap());
    stop.store(true, Ordering::SeqCst);
    for l in lives {
        l.await.unwrap();
    }
    second.abort();

    eprintln!(
        "20 nodes: 19 updated in {:.1} s, the PDB-blocked one {:.1} s after the start; at most {} cordoned, \
         {} down, {} lock holders at once; the leader was killed mid-drain and the other replica led {:.1} s later",
        others.as_secs_f64(),
        all.as_secs_f64(),
        w.max_cordoned,
        w.max_down,
        w.max_holders,
        takeover.as_secs_f64(),
    );
    eprintln!("requests per minute (idle | during the update): {}", table(&idle, &updating));
    assert!(w.max_cordoned <= 2, "{} nodes were cordoned at once", w.max_cordoned);
    assert!(w.max_holders <= 2, "{} lock holders at once", w.max_holders);
    assert!(w.max_down <= 2, "{} nodes were down at once", w.max_down);
    assert!(w.max_cordoned >= 1 && w.max_down >= 1, "the harness saw the drains and reboots");
    for n in &names {
        let node = server.get(Kind::Node, "", n).unwrap();
        assert!(node["spec"]["unschedulable"].is_null(), "{n} left cordoned");
        assert_eq!(node["metadata"]["labels"][key("version")], "2.0.0");
        assert!(node["metadata"]["annotations"][key("update")].is_null(), "{n}: the request was taken");
        for k in ["cordoned", "reboot-allowed", "reboot-request", "lock", "drain"] {
            assert!(node["metadata"]["annotations"][key(k)].is_null(), "{n}: {k} left behind");
        }
        let r = reasons(&server, n);
        for want in [
            "AgentStarted",
            "UpdateInstalling",
            "UpdateStaged",
            "RebootLockAcquired",
            "Draining",
            "Drained",
            "RebootAllowed",
            "Rebooting",
            "VerifyingBoot",
            "UpdateSucceeded",
            "Uncordoned",
            "RebootLockReleased",
        ] {
            assert!(r.iter().any(|x| x == want), "{n}: no {want} event in {r:?}");
        }
        // DaemonSet pods stay, the others were evicted.
        assert!(server.get(Kind::Pod, "prod", &format!("logs-{n}")).is_some());
        assert!(server.get(Kind::Pod, "prod", &format!("web-{n}")).is_none());
        // A node's identity was never refused: the agent asks for nothing beyond its Node.
        let mine = server.requests_of(&Identity::Node(n.clone()));
        assert!(mine.keys().all(|k| !k.starts_with("40")), "{n}: {mine:?}");
        let kinds: BTreeSet<&str> = mine.keys().filter_map(|k| k.split_whitespace().nth(1)).collect();
        assert!(kinds.iter().all(|k| *k == "Node" || *k == "Event"), "{n} asked for {kinds:?}");
    }
    // Every lock slot is free again.
    for l in server
        .list(Kind::Lease)
        .iter()
        .filter(|l| l["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("acl-reboot-")))
    {
        assert!(l["spec"]["holderIdentity"].is_null(), "{l}");
    }
    // The watches were cut every 3 s (the double's limit) and resumed, and the history was
    // compacted under them: resumed watches got 410 Gone and the clients listed again.
    let req = server.requests();
    let n = |k: &str| req.get(k).copied().unwrap_or(0);
    eprintln!("requests: {req:?}");
    assert!(n("WATCH Node") > 40 && n("410 Node") > 0 && n("LIST Node") > 20, "{req:?}");
    assert!(n("POST Pod/eviction") >= 20, "{req:?}");
    // The coordinator's RBAC grants exactly what it used, and it was never refused.
    let sa = Identity::ServiceAccount { namespace: "acl-update".into(), name: "acl-coordinator".into() };
    let theirs = server.requests_of(&sa);
    eprintln!("coordinator's requests: {theirs:?}");
    assert!(theirs.keys().all(|k| !k.starts_with("40")), "{theirs:?}");
    let used: BTreeSet<(String, String)> = theirs.keys().filter_map(|k| verb_resource(k)).collect();
    assert_eq!(
        used,
        rbac_grants(RBAC),
        "used (left) vs granted by integration/kubernetes/coordinator.yaml (right)"
    );
}

/// The current coordinator leader.
fn leader(server: &ApiServer) -> Option<String> {
    server.get(Kind::Lease, "acl-update", "acl-coordinator-0")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// Request counts: "node" (all agents together) and "coordinator".
fn requests_per_identity(server: &ApiServer, nodes: &[String]) -> BTreeMap<&'static str, u64> {
    let total = |m: BTreeMap<String, u64>| {
        m.iter().filter(|(k, _)| !k.starts_with("40")).map(|(_, v)| v).sum::<u64>()
    };
    let agents: u64 = nodes.iter().map(|n| total(server.requests_of(&Identity::Node(n.clone())))).sum();
    let sa = Identity::ServiceAccount { namespace: "acl-update".into(), name: "acl-coordinator".into() };
    BTreeMap::from([("agents", agents), ("coordinator", total(server.requests_of(&sa)))])
}

/// Per minute between two counts; the agents' figure per node.
fn rate_per_minute(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
    took: Duration,
) -> BTreeMap<&'static str, f64> {
    let minutes = took.as_secs_f64() / 60.0;
    after
        .iter()
        .map(|(k, v)| {
            let per = if *k == "agents" { 20.0 } else { 1.0 };
            #[allow(clippy::cast_precision_loss)]
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0)) as f64;
            (*k, d / per / minutes)
        })
        .collect()
}

fn table(idle: &BTreeMap<&'static str, f64>, busy: &BTreeMap<&'static str, f64>) -> String {
    let g = |m: &BTreeMap<&'static str, f64>, k| m.get(k).copied().unwrap_or(0.0);
    format!(
        "per agent {:.1} | {:.1}; coordinator {:.1} | {:.1}",
        g(idle, "agents"),
        g(busy, "agents"),
        g(idle, "coordinator"),
        g(busy, "coordinator")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_while_holding_the_lock_does_not_block_the_others() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let server = api_server(Options::default()).await;
    let names: Vec<String> = (0..4).map(|i| format!("node-{i}")).collect();
    // A lease that outlives the test: only the holder's disappearance can free it.
    let c = coordinator(&server, "coordinator-a", |o| {
        o.lease_duration = Duration::from_secs(600);
        o.drain_timeout = Duration::from_secs(600);
    });
    let extra = "";
    for n in &names {
        server.create(Kind::Node, node_object(n)).unwrap();
    }
    // node-0 gets stuck draining (a budget that never allows its pod to go) while holding the
    // only slot of the lock.
    pod_without_disruptions(&server, "node-0");
    let stop = Arc::new(AtomicBool::new(false));
    let mut lives = BTreeMap::new();
    for n in &names {
        let node = SimNode::new(&f, &sgdisk, n, extra);
        lives.insert(n.clone(), tokio::spawn(node.live(server.clone(), Arc::clone(&stop))));
    }
    until("every agent reports", 60, || {
        names.iter().all(|n| annotation(&server, n, "state").as_deref() == Some("idle"))
    })
    .await;
    annotate(&server, "node-0", &[("update", "latest")]);
    until("node-0 holds the lock and drains", 60, || {
        annotation(&server, "node-0", "lock").is_some() && annotation(&server, "node-0", "drain").is_some()
    })
    .await;
    // The machine is removed from the cluster: its agent is gone and so is its Node.
    lives.remove("node-0").unwrap().abort();
    server.delete(Kind::Node, "", "node-0");
    let held = server.get(Kind::Lease, "acl-update", "acl-reboot-0").unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "node-0");

    for n in &names[1..] {
        annotate(&server, n, &[("update", "latest")]);
    }
    until("the other nodes are updated", 180, || names[1..].iter().all(|n| done(&server, n))).await;
    stop.store(true, Ordering::SeqCst);
    for (_, l) in lives {
        l.await.unwrap();
    }
    c.abort();
    let recovered = server
        .list(Kind::Event)
        .into_iter()
        .filter(|e| e["reason"] == "RebootLockAcquired")
        .any(|e| e["message"].as_str().unwrap_or_default().contains("recovered from node-0"));
    assert!(recovered, "a node took the slot over from node-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_through_annotations() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let server = api_server(Options::default()).await;
    let c = coordinator(&server, "coordinator-a", |_| {});
    // Every write of the version label is refused at first (as a 422 for a bad value would be):
    // the status annotations, written in their own patch, still arrive.
    server.fail_requests("PATCH Node", "\"labels\"", usize::MAX);
    let names = ["node-a", "node-b"];
    let stop = Arc::new(AtomicBool::new(false));
    let mut lives = Vec::new();
    for n in names {
        server.create(Kind::Node, node_object(n)).unwrap();
        let node = SimNode::new(&f, &sgdisk, n, "");
        lives.push(tokio::spawn(node.live(server.clone(), Arc::clone(&stop))));
    }
    let state = |n: &str| annotation(&server, n, "state");
    until("both agents report", 60, || names.iter().all(|n| state(n).as_deref() == Some("idle"))).await;
    assert!(server.failed_requests() >= 2, "the label writes were refused");
    let label =
        |n: &str| server.get(Kind::Node, "", n).unwrap()["metadata"]["labels"][key("version")].clone();
    assert!(label("node-a").is_null());
    server.clear_faults();

    // Pause everything: an update asked for meanwhile is refused, and says so. The first
    // writes of the paused state fail (500, not applied): the agents write them again by
    // themselves, with nothing else changing on the Node.
    let before = server.failed_requests();
    server.fail_requests("PATCH Node", "\"v1.acl-update.dev/state\":\"paused\"", 4);
    for n in names {
        annotate(&server, n, &[("paused", "true")]);
    }
    until("both are paused", 30, || names.iter().all(|n| state(n).as_deref() == Some("paused"))).await;
    assert_eq!(server.failed_requests() - before, 4, "the status writes failed first");
    annotate(&server, "node-a", &[("update", "latest")]);
    // The removal's marker ("taking ...") comes first, the answer after it.
    until("the request is answered", 30, || {
        annotation(&server, "node-a", "request-result").is_some_and(|r| !r.starts_with("taking "))
    })
    .await;
    let result = annotation(&server, "node-a", "request-result").unwrap();
    assert!(result.contains("paused"), "{result}");
    assert_eq!(annotation(&server, "node-a", "update"), None, "a one-shot request is taken");

    // A value the agent cannot read is named back, and nothing happens.
    annotate(&server, "node-b", &[("update", "newest")]);
    until("the bad request is answered", 30, || {
        annotation(&server, "node-b", "request-result").is_some_and(|r| r.contains("\"newest\""))
    })
    .await;

    // Resume, and update one node to an exact version; the reboot may skip the lock.
    for n in names {
        annotate(&server, n, &[("paused", "false")]);
    }
    until("both resumed", 30, || names.iter().all(|n| state(n).as_deref() == Some("idle"))).await;
    annotate(&server, "node-a", &[("update", "2.0.0"), ("reboot", "allowed")]);
    until("node-a runs 2.0.0", 60, || done(&server, "node-a")).await;
    let slots_held = || {
        server
            .list(Kind::Lease)
            .iter()
            .filter(|l| l["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("acl-reboot-")))
            .filter(|l| !l["spec"]["holderIdentity"].is_null())
            .count()
    };
    assert_eq!(slots_held(), 0, "no lock taken");
    assert!(reasons(&server, "node-a").iter().any(|r| r == "Drained"), "drained all the same");
    assert_eq!(annotation(&server, "node-b", "booted-version").as_deref(), Some("1.0.0"), "only node-a");

    // A downgrade asked for by version needs allow-downgrade as well.
    annotate(&server, "node-a", &[("update", "1.0.0")]);
    until("the downgrade is refused", 30, || {
        annotation(&server, "node-a", "request-result").is_some_and(|r| r.contains("update 1.0.0: refused"))
    })
    .await;
    let result = annotation(&server, "node-a", "request-result").unwrap();
    assert!(result.contains("v1.acl-update.dev/allow-downgrade=true"), "{result}");
    assert_eq!(state("node-a").as_deref(), Some("idle"));

    // Roll node-a back now. While the request's removal cannot be stored (500, not applied),
    // the agent does not act: acting first, the request survived the reboot it caused and
    // rolled the node back again after every boot (issue 14). Once the removal is stored, the
    // node reboots into 1.0.0 exactly once.
    let down_count = |changes: &mut tokio::sync::broadcast::Receiver<test_apiserver::Change>,
                      up: &mut bool| {
        let mut downs = 0;
        while let Ok(c) = changes.try_recv() {
            if c.kind == Kind::Node && c.object["metadata"]["name"] == "node-a" {
                let ready = c.object["status"]["conditions"][0]["status"] == "True";
                downs += usize::from(*up && !ready);
                *up = ready;
            }
        }
        downs
    };
    let (mut changes, mut up) = (server.subscribe(), true);
    server.fail_requests("PATCH Node", "rollback\":null", usize::MAX);
    annotate(&server, "node-a", &[("rollback", "now")]);
    until("removals were tried", 30, || server.failed_requests() >= 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(down_count(&mut changes, &mut up), 0, "acted on a request whose removal was not stored");
    assert_eq!(annotation(&server, "node-a", "rollback").as_deref(), Some("now"));
    server.clear_faults();
    until("node-a runs 1.0.0 again", 60, || {
        annotation(&server, "node-a", "booted-version").as_deref() == Some("1.0.0")
            && state("node-a").as_deref() == Some("idle")
    })
    .await;
    assert_eq!(annotation(&server, "node-a", "rollback"), None);
    // Long enough for a replayed request to show as a second reboot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(down_count(&mut changes, &mut up), 1, "one rollback request, one reboot");
    assert_eq!(label("node-a"), "1.0.0", "the label arrived once it was accepted");
    assert_eq!(annotation(&server, "node-a", "booted-version").as_deref(), Some("1.0.0"));
    stop.store(true, Ordering::SeqCst);
    for l in lives {
        l.await.unwrap();
    }
    c.abort();
}

/// The API server hiccups the way real ones do: watches cut by an `ERROR` event carrying a 500
/// Status or by a lost connection, writes answered 503, 429 (priority and fairness) and 504,
/// evictions and Lease updates failing now and then, connections reset before a write is made
/// and after (the client never hears that it was). The agents and the coordinator ride it
/// out: the update completes, and nothing is left cordoned or held. Then a rollback request
/// whose removal was stored but whose answer was lost is carried out exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_on_writes_and_mid_watch_are_ridden_out() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let opts = Options { max_watch: Duration::from_secs(2), ..Options::default() };
    let server = api_server(opts).await;
    let c = coordinator(&server, "coordinator-a", |_| {});
    let names = ["node-a", "node-b"];
    let stop = Arc::new(AtomicBool::new(false));
    let mut lives = Vec::new();
    for n in names {
        server.create(Kind::Node, node_object(n)).unwrap();
        server.create(Kind::Pod, pod(&format!("web-{n}"), n, "web")).unwrap();
        let node = SimNode::new(&f, &sgdisk, n, "");
        lives.push(tokio::spawn(node.live(server.clone(), Arc::clone(&stop))));
    }
    until("both agents report", 60, || {
        names.iter().all(|n| annotation(&server, n, "state").as_deref() == Some("idle"))
    })
    .await;
    let before = server.failed_requests();
    // Resets first: the faults are matched in the order they were added.
    server.reset_requests("PATCH Node", "update\":null", 1, true);
    server.reset_requests("PUT Lease", "", 1, true);
    server.reset_requests("POST Pod/eviction", "", 1, true);
    server.reset_requests("PATCH Node", "", 2, false);
    server.reset_watches(Kind::Node, 4);
    server.fail_watches(Kind::Node, 6, 500);
    server.fail_requests_with("PATCH Node", "", 3, 503);
    server.fail_requests_with("PATCH Node", "", 3, 429);
    server.fail_requests_with("POST Pod/eviction", "", 2, 504);
    server.fail_requests_with("PUT Lease", "", 2, 503);
    for n in names {
        annotate(&server, n, &[("update", "latest")]);
    }
    until("both nodes are updated", 120, || names.iter().all(|n| done(&server, n))).await;
    let hits = server.failed_requests() - before;
    assert_eq!(hits, 25, "every injected failure was met");
    // A rollback whose removal is stored, its answer lost: done once, not lost, not twice.
    let mut changes = server.subscribe();
    server.reset_requests("PATCH Node", "rollback\":null", 1, true);
    annotate(&server, "node-a", &[("rollback", "now")]);
    until("node-a runs 1.0.0 again", 90, || {
        annotation(&server, "node-a", "booted-version").as_deref() == Some("1.0.0")
            && annotation(&server, "node-a", "state").as_deref() == Some("idle")
    })
    .await;
    assert_eq!(server.failed_requests() - before, 26);
    // Long enough for a replayed request to show as a second reboot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut up, mut downs) = (true, 0);
    while let Ok(c) = changes.try_recv() {
        if c.kind == Kind::Node && c.object["metadata"]["name"] == "node-a" {
            let ready = c.object["status"]["conditions"][0]["status"] == "True";
            downs += usize::from(up && !ready);
            up = ready;
        }
    }
    assert_eq!(downs, 1, "one rollback request, one reboot");
    let result = annotation(&server, "node-a", "request-result").unwrap_or_default();
    assert!(result.starts_with("rollback: "), "{result}");
    stop.store(true, Ordering::SeqCst);
    for l in lives {
        l.await.unwrap();
    }
    c.abort();
    for n in names {
        let node = server.get(Kind::Node, "", n).unwrap();
        assert!(node["spec"]["unschedulable"].is_null(), "{n} left cordoned");
        for k in ["cordoned", "reboot-allowed", "reboot-request", "lock", "drain", "update"] {
            assert!(node["metadata"]["annotations"][key(k)].is_null(), "{n}: {k} left behind");
        }
    }
    assert!(
        server.get(Kind::Lease, "acl-update", "acl-reboot-0").unwrap()["spec"]["holderIdentity"].is_null()
    );
}
