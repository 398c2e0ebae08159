//! Nodes and pods made of network namespaces, virtual links and cgroups.
//!
//! A [`Node`] is a cgroup plus a node network namespace; each [`Pod`] is a
//! network namespace with one interface, `eth0`, on the node's pod network
//! (198.18.0.0/24 and fd00:18::/64), a pod cgroup and a pause process. How
//! `eth0` is attached is the node's [`Topology`], chosen per node
//! ([`Node::with_topology`]) or for the whole run by
//! `AMBRIDGE_TEST_TOPOLOGY` ([`Topology::from_env`], what [`Node::new`]
//! uses):
//!
//! - [`Topology::Veth`] (the default, as bridge and ptp CNIs do): the node
//!   netns holds a bridge `br0` with the node's addresses (198.18.0.1,
//!   fd00:18::1), and each pod is a veth pair, `veth<n>` on the bridge and
//!   `eth0` in the pod.
//! - [`Topology::Macvlan`] (as macvlan CNI clusters do): the node netns
//!   holds a parent interface `mvparent` (one end of a veth pair whose other
//!   end, `mvpeer`, is up and goes nowhere; this kernel has no `dummy`
//!   driver), and each pod's `eth0` is a macvlan child of it in bridge mode:
//!   no veth per pod, no host-side peer, no bridge. The node reaches its
//!   pods, as a kubelet's probes must, through a macvlan "host shim" child
//!   `mvshim` of the same parent in the node netns, which holds the node's
//!   addresses.
//!
//! Either way pods reach each other and the node at layer 2 on one subnet,
//! and a probe the test runner starts in the node netns outside the node's
//! cgroup ([`Node::run_on_node`]) is what a kubelet on the host looks like.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::eventually;

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// How a node's pods are attached to its pod network (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// A bridge `br0` in the node netns, a veth pair per pod.
    #[default]
    Veth,
    /// Macvlan (bridge mode) children of one parent interface, one per pod,
    /// and a macvlan host shim holding the node's addresses.
    Macvlan,
}

impl Topology {
    /// The environment variable [`Topology::from_env`] reads.
    pub const ENV: &'static str = "AMBRIDGE_TEST_TOPOLOGY";

    /// The topology `AMBRIDGE_TEST_TOPOLOGY` names: `veth` (or unset) is
    /// [`Topology::Veth`], `macvlan` is [`Topology::Macvlan`]; anything else
    /// panics, so a typo never silently runs the default.
    pub fn from_env() -> Self {
        match std::env::var(Self::ENV) {
            Ok(v) => Self::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Self::parse(None),
            Err(std::env::VarError::NotUnicode(v)) => panic!(
                "{}={v:?} is not a topology: accepted values are `veth` (the default) and `macvlan`",
                Self::ENV
            ),
        }
    }

    fn parse(value: Option<&str>) -> Self {
        match value {
            None | Some("veth") => Topology::Veth,
            Some("macvlan") => Topology::Macvlan,
            Some(other) => panic!(
                "{}={other:?} is not a topology: accepted values are `veth` (the default) and `macvlan`",
                Self::ENV
            ),
        }
    }
}

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (install iproute2: scripts/setup.sh does)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `iptables <rule>` inside network namespace `ns`, panicking with its
/// stderr on failure.
pub fn iptables(ns: &str, rule: &str) {
    let mut args = vec!["netns", "exec", ns, "iptables"];
    args.extend(rule.split(' '));
    let out = Command::new("ip")
        .args(&args)
        .output()
        .expect("running iptables (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "iptables {rule} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails (never skips) when the machine cannot run the suite, saying why.
pub fn preflight() -> PathBuf {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the conformance suite needs root (BPF, cgroups, netns): run README's test command as root"
    );
    let mounts = fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")),
        "bpffs is not mounted at /sys/fs/bpf: run scripts/setup.sh (mount -t bpf bpf /sys/fs/bpf)"
    );
    let cgroup2 = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup2 mount in /proc/self/mounts: ambridge needs cgroup v2");
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "`ip` (iproute2) is missing: run scripts/setup.sh"
    );
    cgroup2
}

/// One sandbox pod. Plain data: the [`Node`] that made it owns its cleanup.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub uid: String,
    /// Name under /run/netns.
    pub netns_name: String,
    pub netns: PathBuf,
    /// The pod-level cgroup (what the workloads file names).
    pub cgroup: PathBuf,
    /// The `app` container cgroup below it, where the pod's processes run.
    pub container: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// A sandbox node. Dropping it kills every process in its cgroups, deletes
/// its network namespaces and removes its cgroups and files.
pub struct Node {
    pub id: String,
    /// The node cgroup: where the daemon attaches.
    pub cgroup: PathBuf,
    /// The node netns (name under /run/netns), holding the node's addresses
    /// (198.18.0.1, fd00:18::1): on the bridge `br0` in [`Topology::Veth`],
    /// on the macvlan host shim `mvshim` in [`Topology::Macvlan`].
    pub netns_name: String,
    pub pods: Vec<Pod>,
    /// Scratch directory for the workloads file and logs.
    pub dir: PathBuf,
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
    /// Pause processes (reaped on drop; killed with the node's cgroups).
    sandboxes: Vec<std::process::Child>,
    topology: Topology,
}

/// The macvlan parent in the node netns (one end of a veth pair).
const MACVLAN_PARENT: &str = "mvparent";
/// The other, otherwise unused, end of the parent's veth pair.
const MACVLAN_PARENT_PEER: &str = "mvpeer";
/// The node's own macvlan child, holding the node's addresses.
const MACVLAN_SHIM: &str = "mvshim";

impl Node {
    /// Builds an empty node in the topology `AMBRIDGE_TEST_TOPOLOGY` names
    /// ([`Topology::from_env`]).
    pub fn new() -> Self {
        Self::with_topology(Topology::from_env())
    }

    /// Builds an empty node in `topology`: cgroup, node netns and the node's
    /// side of the pod network (the bridge, or the macvlan parent and host
    /// shim).
    pub fn with_topology(topology: Topology) -> Self {
        let cgroup2 = preflight();
        let id = format!(
            "{}x{}",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = cgroup2.join(format!("ambridge-test-{id}"));
        let dir = std::env::temp_dir().join(format!("ambridge-test-{id}"));
        let mut node = Node {
            netns_name: format!("ambr{id}-node"),
            id,
            cgroup: cgroup.clone(),
            pods: Vec::new(),
            dir: dir.clone(),
            cgroups: Vec::new(),
            netns: Vec::new(),
            sandboxes: Vec::new(),
            topology,
        };
        fs::create_dir_all(&dir).expect("creating the node's scratch directory");
        node.mkdir_cgroup(&cgroup);
        let ns = node.netns_name.clone();
        node.add_netns(&ns);
        let node_if = match topology {
            Topology::Veth => {
                ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
                "br0"
            }
            Topology::Macvlan => {
                // No `dummy` driver here: a veth pair, both ends up (so the
                // parent has carrier), is the parent.
                ip(&[
                    "-n",
                    &ns,
                    "link",
                    "add",
                    MACVLAN_PARENT,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    MACVLAN_PARENT_PEER,
                ]);
                ip(&["-n", &ns, "link", "set", MACVLAN_PARENT_PEER, "up"]);
                ip(&["-n", &ns, "link", "set", MACVLAN_PARENT, "up"]);
                ip(&[
                    "-n",
                    &ns,
                    "link",
                    "add",
                    "link",
                    MACVLAN_PARENT,
                    "name",
                    MACVLAN_SHIM,
                    "type",
                    "macvlan",
                    "mode",
                    "bridge",
                ]);
                MACVLAN_SHIM
            }
        };
        ip(&["-n", &ns, "addr", "add", "198.18.0.1/24", "dev", node_if]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            "fd00:18::1/64",
            "dev",
            node_if,
            "nodad",
        ]);
        ip(&["-n", &ns, "link", "set", node_if, "up"]);
        node
    }

    /// How this node's pods are attached.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// Path of the node netns (`/run/netns/<netns_name>`).
    pub fn node_netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns_name))
    }

    /// Runs `ambridge-probe --netns <node netns> <args>` to completion and
    /// returns its events. The probe runs in the test runner's own cgroup,
    /// not under the node cgroup: that is how a kubelet (its health probes,
    /// say) or any other host process looks to the daemon, which must leave
    /// it alone. It reaches the pods through the node's addresses (the
    /// bridge, or the macvlan host shim).
    pub fn run_on_node(&self, args: &[&str]) -> Vec<crate::ProbeEvent> {
        crate::probe::run_in(None, &self.node_netns_path(), args)
    }

    fn mkdir_cgroup(&mut self, path: &Path) {
        fs::create_dir(path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        self.cgroups.push(path.to_path_buf());
    }

    fn add_netns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.netns.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// Adds pod number `n` (1..=240): netns with eth0 on the pod network
    /// (per the node's [`Topology`]) at 198.18.0.(10+n) and
    /// fd00:18::(10+n), pod cgroup `pod-<name>` with an
    /// `app` container cgroup, and a pause process in a `pause` container
    /// cgroup holding the netns, as a pod sandbox does.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        self.add_pod_in(name, &format!("pod-{name}"))
    }

    /// As [`Node::add_pod`], with the pod cgroup at `cgroup` (relative to
    /// the node cgroup; its parents must exist), e.g. a kubelet layout.
    pub fn add_pod_in(&mut self, name: &str, cgroup: &str) -> Pod {
        let pod = self.add_pod_network(name, cgroup);
        self.add_pod_cgroups(&pod);
        self.start_pause(&pod);
        pod
    }

    /// A pod as a container runtime has it when it runs the CNI plugins:
    /// its network namespace wired and addressed as [`Node::add_pod_in`]
    /// does, but no cgroup ([`Node::add_pod_cgroups`]) and no process yet.
    pub fn add_pod_network(&mut self, name: &str, cgroup: &str) -> Pod {
        let n = self.pods.len() as u8 + 1;
        let host = 10 + n;
        let pod = Pod {
            name: name.to_string(),
            uid: format!("{}-uid-{name}", self.id),
            netns_name: format!("ambr{}-{name}", self.id),
            netns: PathBuf::from(format!("/run/netns/ambr{}-{name}", self.id)),
            cgroup: self.cgroup.join(cgroup),
            container: self.cgroup.join(cgroup).join("app"),
            ip4: Ipv4Addr::new(198, 18, 0, host),
            ip6: format!("fd00:18::{host:x}").parse().unwrap(),
        };
        self.add_netns(&pod.netns_name);
        self.wire(&pod, n);
        self.pods.push(pod.clone());
        pod
    }

    /// Creates `pod`'s cgroups: the pod cgroup with its `app` and `pause`
    /// container cgroups.
    pub fn add_pod_cgroups(&mut self, pod: &Pod) {
        self.mkdir_cgroup(&pod.cgroup.clone());
        self.mkdir_cgroup(&pod.container.clone());
        self.mkdir_cgroup(&pod.cgroup.join("pause"));
    }

    /// Recreates `pod`'s sandbox as a kubelet does after the sandbox dies:
    /// its processes are killed and a new network namespace (same name,
    /// same addresses) with a new pause process takes the old one's place,
    /// in the same pod cgroup.
    pub fn recreate_sandbox(&mut self, pod: &Pod) {
        let n = self
            .pods
            .iter()
            .position(|p| p.name == pod.name)
            .expect("a pod of this node") as u8
            + 1;
        fs::write(pod.cgroup.join("cgroup.kill"), "1").expect("killing the pod's processes");
        let emptied = eventually(Duration::from_secs(5), || {
            let procs = fs::read_to_string(pod.cgroup.join("pause").join("cgroup.procs"))
                .unwrap_or_default();
            procs.trim().is_empty().then_some(())
        });
        assert!(
            emptied.is_some(),
            "the old sandbox of {} would not die",
            pod.name
        );
        // Deleting the old interface now takes it off the pod network even
        // while the old netns lives on through fds held elsewhere
        // (ztunnel's, say): left there, it would still answer for the pod's
        // addresses.
        match self.topology {
            // The node's end of the veth pair takes the pod's end with it.
            Topology::Veth => {
                ip(&["-n", &self.netns_name, "link", "del", &format!("veth{n}")]);
            }
            // A macvlan child has no node-side end: it goes by itself.
            Topology::Macvlan => ip(&["-n", &pod.netns_name, "link", "del", "eth0"]),
        }
        ip(&["netns", "del", &pod.netns_name]);
        ip(&["netns", "add", &pod.netns_name]);
        ip(&["-n", &pod.netns_name, "link", "set", "lo", "up"]);
        self.wire(pod, n);
        self.start_pause(pod);
    }

    /// Gives `pod`'s netns its `eth0` on the pod network (pod number `n`)
    /// and its addresses.
    fn wire(&self, pod: &Pod, n: u8) {
        match self.topology {
            Topology::Veth => self.wire_veth(pod, n),
            Topology::Macvlan => self.wire_macvlan(pod, n),
        }
        let ns = &pod.netns_name;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", pod.ip4),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/64", pod.ip6),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
    }

    /// Connects `pod`'s netns to the bridge with veth number `n`, the pod's
    /// end named `eth0`.
    fn wire_veth(&self, pod: &Pod, n: u8) {
        let veth = format!("veth{n}");
        ip(&[
            "-n",
            &self.netns_name,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.netns_name,
        ]);
        ip(&[
            "-n",
            &self.netns_name,
            "link",
            "set",
            &veth,
            "master",
            "br0",
            "up",
        ]);
    }

    /// Gives `pod`'s netns a fresh macvlan child (bridge mode) of the
    /// node's parent as `eth0`, as macvlan CNI does: made in the node netns
    /// under a name unique to pod `n` there, moved into the pod's netns and
    /// renamed there.
    fn wire_macvlan(&self, pod: &Pod, n: u8) {
        // At most "mvpod200": well within IFNAMSIZ.
        let tmp = format!("mvpod{n}");
        ip(&[
            "-n",
            &self.netns_name,
            "link",
            "add",
            "link",
            MACVLAN_PARENT,
            "name",
            &tmp,
            "type",
            "macvlan",
            "mode",
            "bridge",
        ]);
        ip(&[
            "-n",
            &self.netns_name,
            "link",
            "set",
            &tmp,
            "netns",
            &pod.netns_name,
        ]);
        ip(&["-n", &pod.netns_name, "link", "set", &tmp, "name", "eth0"]);
    }

    /// Starts the pause process holding `pod`'s netns, in its `pause`
    /// container cgroup.
    fn start_pause(&mut self, pod: &Pod) {
        let pause = pod.cgroup.join("pause");
        let child = std::process::Command::new(crate::workspace_bin("ambridge-probe"))
            .arg("--cgroup")
            .arg(&pause)
            .arg("--netns")
            .arg(&pod.netns)
            .arg("pause")
            .spawn()
            .expect("starting the pod's pause process");
        self.sandboxes.push(child);
    }

    /// Adds a network namespace of no pod, `/run/netns/ambr<node id>-<name>`
    /// with only `lo` (up), removed with the node: one a pod's container
    /// can move into.
    pub fn add_loose_netns(&mut self, name: &str) -> PathBuf {
        let ns = format!("ambr{}-{name}", self.id);
        self.add_netns(&ns);
        PathBuf::from(format!("/run/netns/{ns}"))
    }

    /// Creates a cgroup directory below the node cgroup (e.g. for ztunnel).
    pub fn add_cgroup(&mut self, relative: &str) -> PathBuf {
        let path = self.cgroup.join(relative);
        self.mkdir_cgroup(&path.clone());
        path
    }

    /// Creates the cgroup of a container `name` below `pod`'s cgroup (e.g.
    /// a sidecar's `istio-proxy`), as the kubelet's cgroupfs driver names
    /// it.
    pub fn add_container(&mut self, pod: &Pod, name: &str) -> PathBuf {
        let path = pod.cgroup.join(name);
        assert!(
            path.starts_with(&self.cgroup),
            "{pod:?} is not on this node"
        );
        self.mkdir_cgroup(&path.clone());
        path
    }

    /// Where the daemon of this node pins its maps and links.
    pub fn bpffs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/ambridge-test-{}", self.id))
    }

    /// Removes every record of an established connection from the node's
    /// pinned connection map, as a full map's evictions would; returns how
    /// many there were.
    pub fn evict_connection_records(&self) -> usize {
        use ambridge_common::{ConnKey, ConnRecord, map_names};
        let pin = self.bpffs().join("maps").join(map_names::CONNS);
        let data = aya::maps::MapData::from_pin(&pin)
            .unwrap_or_else(|e| panic!("opening {}: {e}", pin.display()));
        let mut conns: aya::maps::HashMap<_, ConnKey, ConnRecord> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
        let keys: Vec<ConnKey> = conns.keys().filter_map(Result::ok).collect();
        for key in &keys {
            conns
                .remove(key)
                .unwrap_or_else(|e| panic!("deleting from {}: {e}", pin.display()));
        }
        keys.len()
    }

    /// Makes every insert into the socket-cookie record map `name`
    /// (`map_names::PENDING` or `map_names::DNS`) fail, as a kernel that
    /// cannot find a free element would: before the daemon first loads, a
    /// plain hash map with the record map's key and value, one entry and
    /// that entry taken, is pinned where the daemon looks for the record
    /// map, and the daemon's programs adopt it. Inserting into it returns
    /// `E2BIG`; the least-recently-used original would evict instead.
    pub fn fail_record_inserts(&self, name: &str) {
        use ambridge_common::ConnRecord;
        let maps = self.bpffs().join("maps");
        fs::create_dir_all(&maps).unwrap_or_else(|e| panic!("creating {}: {e}", maps.display()));
        let mut full: aya::maps::HashMap<_, u64, ConnRecord> =
            aya::maps::HashMap::create(1, 0).expect("creating a one-entry hash map");
        full.insert(0, ConnRecord::default(), 0)
            .expect("filling the one-entry hash map");
        let pin = maps.join(name);
        full.pin(&pin)
            .unwrap_or_else(|e| panic!("pinning {}: {e}", pin.display()));
    }

    /// Path of this node's workloads file.
    pub fn workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml")
    }

    /// Writes the workloads file atomically (rename), as an operator's
    /// editor or a ConfigMap update would replace it.
    pub fn write_workloads(&self, pods: &[(&Pod, &str)], ztunnel: Option<&Path>) {
        let tail = ztunnel
            .map(|z| format!("ztunnel:\n  cgroup: {}\n", z.display()))
            .unwrap_or_default();
        self.write_workloads_yaml(pods, &tail);
    }

    /// As [`Node::write_workloads`], with `tail` (raw YAML: the `ztunnel`
    /// and `redirect` blocks) after the workloads.
    pub fn write_workloads_yaml(&self, pods: &[(&Pod, &str)], tail: &str) {
        self.write_workloads_text(&Self::workloads_yaml(pods, tail));
    }

    /// The text [`Node::write_workloads_yaml`] writes, for a test to
    /// change before writing it.
    pub fn workloads_yaml(pods: &[(&Pod, &str)], tail: &str) -> String {
        let mut text = String::from("workloads:\n");
        for (pod, mode) in pods {
            text += &format!(
                "  - uid: {}\n    name: {}\n    namespace: default\n    cgroup: {}\n    ips: [{}, \"{}\"]\n    mode: {mode}\n",
                pod.uid,
                pod.name,
                pod.cgroup.display(),
                pod.ip4,
                pod.ip6
            );
        }
        if pods.is_empty() {
            text = "workloads: []\n".into();
        }
        text + tail
    }

    /// Replaces the workloads file with `text` as it is.
    pub fn write_workloads_text(&self, text: &str) {
        self.stage_workloads_text(text);
        self.commit_workloads_text();
    }

    /// Writes `text` beside the workloads file, for
    /// [`Node::commit_workloads_text`] to put in its place.
    pub fn stage_workloads_text(&self, text: &str) {
        fs::write(self.staged_workloads_path(), text).expect("writing the workloads file");
    }

    /// Renames the staged text into the workloads file's place, as editors
    /// and ConfigMap mounts replace a file.
    pub fn commit_workloads_text(&self) {
        fs::rename(self.staged_workloads_path(), self.workloads_path())
            .expect("renaming the workloads file");
    }

    fn staged_workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml.tmp")
    }

    fn kill_all(&self) {
        // cgroup.kill (Linux 5.14) kills the whole subtree at once.
        let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        for cg in self.cgroups.iter().rev() {
            eventually(Duration::from_secs(5), || {
                let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
                procs.trim().is_empty().then_some(())
            });
        }
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_all();
        for child in &mut self.sandboxes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for cg in self.cgroups.iter().rev() {
            if let Err(e) = fs::remove_dir(cg) {
                eprintln!("warning: removing cgroup {}: {e}", cg.display());
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        // Pins made before a daemon started (the daemon's own drop
        // uninstalls the rest).
        let _ = fs::remove_dir_all(self.bpffs());
    }
}

#[cfg(test)]
mod tests {
    use std::{process::Command, time::Duration};

    use super::{Node, Pod, Topology};
    use crate::eventually;

    fn link_kind(ns: &str, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "-d", "link", "show", dev])
            .output()
            .expect("running ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn links(ns: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show"])
            .output()
            .expect("running ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `from` (a pod, or the node with `None`) reaches `to`'s echo server
    /// on both of its addresses.
    fn reaches(node: &Node, from: Option<&Pod>, to: &Pod) {
        for addr in [format!("{}:8080", to.ip4), format!("[{}]:8080", to.ip6)] {
            let connect = || {
                let args = ["connect", "--to", addr.as_str(), "--bytes", "16"];
                let events = match from {
                    Some(pod) => pod.run(&args),
                    None => node.run_on_node(&args),
                };
                let ok = crate::event::all::<crate::event::Connect>(&events)
                    .iter()
                    .any(|c| c.ok);
                ok.then_some(())
            };
            assert!(
                eventually(Duration::from_secs(10), connect).is_some(),
                "{:?} from {} to {addr}",
                node.topology(),
                from.map_or("the node", |p| p.name.as_str())
            );
        }
    }

    /// Both topologies: pods reach each other, the node (from outside its
    /// cgroup) reaches them, and a recreated sandbox reaches and is reached
    /// by its peers and the node while its old netns is still held open.
    #[test]
    fn both_topologies_wire_pods_the_node_reaches() {
        for topology in [Topology::Veth, Topology::Macvlan] {
            let mut node = Node::with_topology(topology);
            assert_eq!(node.topology(), topology);
            let a = node.add_pod("a");
            let b = node.add_pod("b");
            let node_links = links(&node.netns_name);
            let eth0 = link_kind(&b.netns_name, "eth0");
            match topology {
                Topology::Veth => {
                    assert!(node_links.contains("br0"), "{node_links}");
                    assert!(eth0.contains("veth"), "{eth0}");
                }
                Topology::Macvlan => {
                    assert!(!node_links.contains("br0"), "{node_links}");
                    assert!(!node_links.contains("mvpod"), "{node_links}");
                    assert!(eth0.contains("macvlan mode bridge"), "{eth0}");
                }
            }
            let server = b.echo_server("[::]:8080");
            reaches(&node, Some(&a), &b);
            reaches(&node, None, &b);
            drop(server);

            let held = std::fs::File::open(&b.netns).expect("holding b's netns");
            node.recreate_sandbox(&b);
            let new_eth0 = link_kind(&b.netns_name, "eth0");
            assert!(new_eth0.contains(",UP"), "{new_eth0}");
            // The new sandbox has the old addresses on a new MAC, which
            // `a` and the node learn when it first speaks to them (nothing
            // announces it; their caches would send to the old MAC for up
            // to a minute): it speaks first, as its connects would.
            let _a_server = a.echo_server("[::]:8080");
            let mut cmd = Command::new(crate::workspace_bin("ambridge-probe"));
            cmd.arg("--netns")
                .arg(node.node_netns_path())
                .args(["echo", "--listen", "[::]:8080"]);
            let node_server = crate::Background::spawn(cmd);
            node_server.wait_first::<crate::event::Listening>(Duration::from_secs(10));
            let node_pod = Pod {
                name: "the node".into(),
                ip4: "198.18.0.1".parse().unwrap(),
                ip6: "fd00:18::1".parse().unwrap(),
                ..b.clone()
            };
            reaches(&node, Some(&b), &a);
            reaches(&node, Some(&b), &node_pod);
            let _server = b.echo_server("[::]:8080");
            reaches(&node, Some(&a), &b);
            reaches(&node, None, &b);
            drop(held);
        }
    }

    #[test]
    fn topology_names() {
        assert_eq!(Topology::parse(None), Topology::Veth);
        assert_eq!(Topology::parse(Some("veth")), Topology::Veth);
        assert_eq!(Topology::parse(Some("macvlan")), Topology::Macvlan);
    }

    #[test]
    #[should_panic(expected = "AMBRIDGE_TEST_TOPOLOGY=\"ipvlan\" is not a topology")]
    fn unknown_topology_panics() {
        Topology::parse(Some("ipvlan"));
    }
}
