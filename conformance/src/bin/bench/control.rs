//! The control plane's figures, for the workloads file and the Kubernetes
//! feed: a node of synthetic pods (cgroups without processes) filled from
//! empty, one pod added, changed or removed, and a steady churn, each timed
//! from the event (the file renamed into place, the API server's object
//! changed) to the kernel: the benchmark polls the pinned cgroup map itself
//! for the entry the event changes, every 20 us for one pod's event, every
//! millisecond for a fill. Also the daemon's RSS,
//! idle and loaded, and its CPU during the churn.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use ambridge_common::{CgroupInfo, flags, map_names};
use ambridge_conformance::{Daemon, Node, kubeapi::KubeApi};
use aya::maps::{HashMap, Map, MapData};
use serde_json::{Value, json};

/// How much to measure.
pub struct Plan {
    pub pods: usize,
    /// Fills from empty (each figure is the median, with the range).
    pub repetitions: usize,
    /// One-pod events of each kind.
    pub events: usize,
    pub churn: Duration,
    /// Pod changes per second during the churn.
    pub churn_rate: u32,
}

/// The daemon's pinned cgroup map, read as the kernel programs read it.
struct CgroupMap(HashMap<MapData, u64, CgroupInfo>);

impl CgroupMap {
    fn open(node: &Node) -> Self {
        let pin = node.bpffs().join("maps").join(map_names::CGROUPS);
        let data =
            MapData::from_pin(&pin).unwrap_or_else(|e| panic!("opening {}: {e}", pin.display()));
        Self(HashMap::try_from(Map::HashMap(data)).expect("the cgroup map"))
    }

    fn get(&self, id: u64) -> Option<CgroupInfo> {
        self.0.get(&id, 0).ok()
    }

    /// How long after `since` the entry of `id` satisfied `done`, looked
    /// at every `poll`.
    fn until(
        &self,
        id: u64,
        since: Instant,
        poll: Duration,
        done: impl Fn(Option<CgroupInfo>) -> bool,
    ) -> f64 {
        loop {
            if done(self.get(id)) {
                return since.elapsed().as_secs_f64();
            }
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "cgroup {id} never reached the state waited for"
            );
            std::thread::sleep(poll);
        }
    }
}

/// How often a one-pod event's entry is looked at: its figures are
/// fractions of a millisecond.
const EVENT_POLL: Duration = Duration::from_micros(20);

/// How often a fill's last entry is looked at. Looking every 20 us took
/// much of one of the machine's two CPUs from the daemon filling the maps
/// on several threads; a millisecond is a fraction of a percent of a fill.
const FILL_POLL: Duration = Duration::from_millis(1);

fn enrolled(e: Option<CgroupInfo>) -> bool {
    e.is_some_and(|e| e.flags & flags::ENROLLED != 0)
}

fn listed_not_enrolled(e: Option<CgroupInfo>) -> bool {
    e.is_some_and(|e| e.flags & flags::ENROLLED == 0)
}

/// A cgroup's id (its cgroupfs inode).
fn cgroup_id(path: &PathBuf) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The daemon's resident size once it has settled after a large change:
/// it hands the memory such a change freed back to the kernel a little
/// later (`ambridge::heap::SETTLE`), so a node at rest is measured, not
/// the garbage of its last fill.
fn settled_rss_kib(pid: u32) -> u64 {
    std::thread::sleep(ambridge::heap::SETTLE + Duration::from_secs(1));
    rss_kib(pid)
}

/// The daemon's CPU time so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = fields.get(11..13).map_or(0.0, |t| {
        t.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Median, min and max, in milliseconds.
fn spread(mut secs: Vec<f64>) -> Value {
    if secs.is_empty() {
        return Value::Null;
    }
    secs.sort_by(f64::total_cmp);
    let ms = |s: f64| (s * 1e5).round() / 100.0;
    json!({
        "median_ms": ms(secs[secs.len() / 2]),
        "min_ms": ms(secs[0]),
        "max_ms": ms(secs[secs.len() - 1]),
        "runs": secs.len(),
    })
}

/// p50, p99 and max, in milliseconds.
fn percentiles(mut secs: Vec<f64>) -> Value {
    if secs.is_empty() {
        return Value::Null;
    }
    secs.sort_by(f64::total_cmp);
    let at = |q: f64| secs[((secs.len() as f64 - 1.0) * q).round() as usize];
    let ms = |s: f64| (s * 1e5).round() / 100.0;
    json!({
        "p50_ms": ms(at(0.5)),
        "p99_ms": ms(at(0.99)),
        "max_ms": ms(secs[secs.len() - 1]),
        "events": secs.len(),
    })
}

/// The synthetic pod `i`'s address (unique on the node).
fn pod_ip(i: usize) -> String {
    format!("100.64.{}.{}", i / 250, i % 250 + 1)
}

/// The workloads file's pod entries.
struct FileNode {
    node: Node,
    cgroups: Vec<PathBuf>,
    ids: Vec<u64>,
    ztunnel: PathBuf,
}

impl FileNode {
    fn new(pods: usize) -> Self {
        let mut node = Node::new();
        let ztunnel = node.add_cgroup("ztunnel");
        node.add_cgroup("cp");
        let cgroups: Vec<PathBuf> = (0..pods)
            .map(|i| node.add_cgroup(&format!("cp/p{i}")))
            .collect();
        let ids = cgroups.iter().map(cgroup_id).collect();
        Self {
            node,
            cgroups,
            ids,
            ztunnel,
        }
    }

    /// The file with pods `0..n` (less `missing`), pod `none` out of the
    /// mesh. Made before an event's clock starts: the event is the write.
    fn text(&self, n: usize, missing: Option<usize>, none: Option<usize>) -> String {
        let mut y = String::from(if n == 0 {
            "workloads: []\n"
        } else {
            "workloads:\n"
        });
        for (i, cg) in self.cgroups.iter().take(n).enumerate() {
            if Some(i) == missing {
                continue;
            }
            let mode = if Some(i) == none { "none" } else { "ambient" };
            let _ = write!(
                y,
                "  - uid: cp-{i}\n    name: cp-{i}\n    namespace: bench\n    cgroup: {}\n    ips: [{}]\n    mode: {mode}\n",
                cg.display(),
                pod_ip(i),
            );
        }
        let _ = write!(y, "ztunnel:\n  cgroup: {}\n", self.ztunnel.display());
        y
    }

    /// Puts `text` in the file's place, written beside it first; returns
    /// when the event happened: the rename, not the writing before it.
    fn write(&self, text: &str) -> Instant {
        self.node.stage_workloads_text(text);
        let renamed = Instant::now();
        self.node.commit_workloads_text();
        renamed
    }
}

/// The pods' common figures: fills from empty, then single events at the
/// full node.
struct Figures {
    fill: Vec<f64>,
    empty: Vec<f64>,
    added: Vec<f64>,
    changed: Vec<f64>,
    removed: Vec<f64>,
}

impl Figures {
    fn json(self) -> Value {
        json!({
            "fill": spread(self.fill),
            "empty": spread(self.empty),
            "one_pod_added": percentiles(self.added),
            "one_pod_changed": percentiles(self.changed),
            "one_pod_removed": percentiles(self.removed),
        })
    }
}

fn file_feed(plan: &Plan) -> Value {
    let f = FileNode::new(plan.pods);
    let (empty, full) = (f.text(0, None, None), f.text(plan.pods, None, None));
    f.write(&empty);
    // The daemon's own defaults, not the test harness's one-second ones.
    let daemon = Daemon::start_with(
        &f.node,
        &["--resync-seconds", "5", "--full-resync-seconds", "60"],
    );
    let pid = daemon.pid().expect("daemon running");
    let map = CgroupMap::open(&f.node);
    let rss_idle = rss_kib(pid);
    let last = *f.ids.iter().max().expect("pods");
    let n = plan.pods;
    let mut figures = Figures {
        fill: vec![],
        empty: vec![],
        added: vec![],
        changed: vec![],
        removed: vec![],
    };
    for _ in 0..plan.repetitions {
        let t0 = f.write(&full);
        figures.fill.push(map.until(last, t0, FILL_POLL, enrolled));
        assert!(f.ids.iter().all(|id| enrolled(map.get(*id))));
        let t0 = f.write(&empty);
        figures
            .empty
            .push(map.until(last, t0, FILL_POLL, |e| e.is_none()));
        assert!(f.ids.iter().all(|id| map.get(*id).is_none()));
    }
    let t0 = f.write(&full);
    map.until(last, t0, FILL_POLL, enrolled);
    let rss_loaded = settled_rss_kib(pid);
    for k in 0..plan.events {
        let i = (k * 7919) % n;
        let id = f.ids[i];
        let (changed, removed) = (f.text(n, None, Some(i)), f.text(n, Some(i), None));
        let t0 = f.write(&changed);
        figures
            .changed
            .push(map.until(id, t0, EVENT_POLL, listed_not_enrolled));
        let t0 = f.write(&removed);
        figures
            .removed
            .push(map.until(id, t0, EVENT_POLL, |e| e.is_none()));
        let t0 = f.write(&full);
        figures.added.push(map.until(id, t0, EVENT_POLL, enrolled));
    }
    let mut out = figures.json();
    out["rss_idle_kib"] = json!(rss_idle);
    out["rss_loaded_kib"] = json!(rss_loaded);
    out
}

const NODE: &str = "bench-node";

fn pod_json(i: usize, uid: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("cp-{i}"), "namespace": "bench", "uid": uid, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}],
                 "serviceAccountName": "default"},
        "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]}
    })
}

fn kubernetes_feed(plan: &Plan) -> Value {
    let mut node = Node::new();
    for dir in ["kubepods", "kubepods/besteffort"] {
        node.add_cgroup(dir);
    }
    let uids: Vec<String> = (0..plan.pods)
        .map(|_| ambridge_conformance::kubelet_pod_uid())
        .collect();
    let ids: Vec<u64> = uids
        .iter()
        .map(|uid| cgroup_id(&node.add_cgroup(&format!("kubepods/besteffort/pod{uid}"))))
        .collect();
    let api = KubeApi::start();
    api.put_namespace(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "bench", "labels": {}}}));
    // The API server holds every pod before the daemon starts: the fill
    // is the daemon's initial list, from its request to the kernel map.
    for (i, uid) in uids.iter().enumerate() {
        api.put_pod(pod_json(i, uid, true));
    }
    let source = api.source_args(&node, NODE);
    let mut args: Vec<&str> = source.iter().map(String::as_str).collect();
    args.extend(["--resync-seconds", "5", "--full-resync-seconds", "60"]);
    let last_id = ids[plan.pods - 1];
    // Each fill is a daemon's first list on an empty node: the one before
    // is stopped and uninstalled (its guard dropped) first.
    let (mut fills, mut from_start) = (Vec::new(), Vec::new());
    let mut daemon = None;
    for _ in 0..plan.repetitions.max(1) {
        drop(daemon.take());
        let t0 = Instant::now();
        let started = Daemon::spawn_with(&node, &args);
        let pin = node.bpffs().join("maps").join(map_names::CGROUPS);
        while !pin.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the daemon never pinned its maps"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let map = CgroupMap::open(&node);
        let end = map.until(last_id, t0, FILL_POLL, enrolled);
        assert!(ids.iter().all(|id| enrolled(map.get(*id))));
        let listed = api
            .pods_listed_since(t0)
            .expect("the daemon listed the pods");
        fills.push(end - listed.duration_since(t0).as_secs_f64());
        from_start.push(end);
        daemon = Some(started);
    }
    let mut daemon = daemon.expect("at least one fill");
    let map = CgroupMap::open(&node);
    daemon.wait_ready();
    let pid = daemon.pid().expect("daemon running");
    let rss_loaded = settled_rss_kib(pid);
    let mut figures = Figures {
        fill: fills,
        empty: vec![],
        added: vec![],
        changed: vec![],
        removed: vec![],
    };
    for k in 0..plan.events {
        let i = (k * 7919) % plan.pods;
        let (uid, id) = (&uids[i], ids[i]);
        let t0 = Instant::now();
        api.put_pod(pod_json(i, uid, false));
        figures
            .changed
            .push(map.until(id, t0, EVENT_POLL, listed_not_enrolled));
        let t0 = Instant::now();
        api.delete_pod(uid);
        figures
            .removed
            .push(map.until(id, t0, EVENT_POLL, |e| e.is_none()));
        let t0 = Instant::now();
        api.put_pod(pod_json(i, uid, true));
        figures.added.push(map.until(id, t0, EVENT_POLL, enrolled));
    }
    // The churn: one pod's label flipped every 1/rate s, each change timed
    // to the kernel.
    let period = Duration::from_secs(1) / plan.churn_rate;
    let mut churn = Vec::new();
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let mut k = 0usize;
    while started.elapsed() < plan.churn {
        let slot = started + period * k as u32;
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let i = (k * 7919) % plan.pods;
        let ambient = k / plan.pods % 2 == 1;
        let t0 = Instant::now();
        api.put_pod(pod_json(i, &uids[i], ambient));
        churn.push(if ambient {
            map.until(ids[i], t0, EVENT_POLL, enrolled)
        } else {
            map.until(ids[i], t0, EVENT_POLL, listed_not_enrolled)
        });
        k += 1;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let mut out = figures.json();
    out["churn"] = percentiles(churn);
    out["churn"]["changes_per_s"] = json!((k as f64 / wall).round());
    out["churn"]["daemon_cpu_percent"] = json!((cpu / wall * 1000.0).round() / 10.0);
    out["fill_from_daemon_start"] = spread(from_start);
    out["rss_loaded_kib"] = json!(rss_loaded);
    out
}

/// Every control-plane figure.
pub fn measure(plan: &Plan) -> Value {
    eprintln!("[bench] control plane: workloads file, {} pods", plan.pods);
    let file = file_feed(plan);
    eprintln!("[bench] control plane: Kubernetes, {} pods", plan.pods);
    let kubernetes = kubernetes_feed(plan);
    json!({"pods": plan.pods, "file": file, "kubernetes": kubernetes})
}

/// The figures as Markdown.
pub fn markdown(cp: &Value) -> String {
    if cp.is_null() {
        return String::new();
    }
    let mut md = format!(
        "\nControl plane, {} pods (event to kernel map; median and range over fills, p50/p99/max over events):\n\n",
        cp["pods"]
    );
    md += "The Kubernetes fill is a new daemon's initial list on an empty node: from its request for the pods to the last pod in the kernel map";
    let from_start = &cp["kubernetes"]["fill_from_daemon_start"];
    if !from_start.is_null() {
        let _ = write!(
            md,
            "; from the daemon's start (programs loaded and attached) it is {} ms ({}-{})",
            from_start["median_ms"], from_start["min_ms"], from_start["max_ms"],
        );
    }
    md += ".\n\n";
    md += "| feed | fill from empty | empty again | one pod added | one pod changed | one pod removed | churn | daemon CPU in churn | RSS idle / loaded |\n|---|---|---|---|---|---|---|---|---|\n";
    let s = |v: &Value| {
        if v.is_null() {
            "-".to_string()
        } else if v.get("median_ms").is_some() {
            format!("{} ms ({}-{})", v["median_ms"], v["min_ms"], v["max_ms"])
        } else {
            format!("{}/{}/{} ms", v["p50_ms"], v["p99_ms"], v["max_ms"])
        }
    };
    for feed in ["file", "kubernetes"] {
        let f = &cp[feed];
        let churn = &f["churn"];
        let _ = writeln!(
            md,
            "| {feed} | {} | {} | {} | {} | {} | {} | {} | {} / {} MiB |",
            s(&f["fill"]),
            s(&f["empty"]),
            s(&f["one_pod_added"]),
            s(&f["one_pod_changed"]),
            s(&f["one_pod_removed"]),
            if churn.is_null() {
                "-".into()
            } else {
                format!("{} at {}/s", s(churn), churn["changes_per_s"])
            },
            if churn.is_null() {
                "-".into()
            } else {
                format!("{}%", churn["daemon_cpu_percent"])
            },
            f["rss_idle_kib"]
                .as_u64()
                .map_or_else(|| "-".into(), |k| (k / 1024).to_string()),
            f["rss_loaded_kib"].as_u64().unwrap_or(0) / 1024,
        );
    }
    md
}
