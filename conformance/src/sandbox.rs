//! Nodes and pods made of network namespaces, veths and cgroups.

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
    /// The node netns, holding the bridge (198.18.0.1, fd00:18::1).
    pub netns_name: String,
    pub pods: Vec<Pod>,
    /// Scratch directory for the workloads file and logs.
    pub dir: PathBuf,
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
    /// Pause processes (reaped on drop; killed with the node's cgroups).
    sandboxes: Vec<std::process::Child>,
}

impl Node {
    /// Builds an empty node: cgroup, node netns and bridge.
    pub fn new() -> Self {
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
        };
        fs::create_dir_all(&dir).expect("creating the node's scratch directory");
        node.mkdir_cgroup(&cgroup);
        let ns = node.netns_name.clone();
        node.add_netns(&ns);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", "198.18.0.1/24", "dev", "br0"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            "fd00:18::1/64",
            "dev",
            "br0",
            "nodad",
        ]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        node
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

    /// Adds pod number `n` (1..=200): netns with eth0 on the bridge at
    /// 198.18.0.(10+n) and fd00:18::(10+n), pod cgroup `pod-<name>` with an
    /// `app` container cgroup, and a pause process in a `pause` container
    /// cgroup holding the netns, as a pod sandbox does.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        self.add_pod_in(name, &format!("pod-{name}"))
    }

    /// As [`Node::add_pod`], with the pod cgroup at `cgroup` (relative to
    /// the node cgroup; its parents must exist), e.g. a kubelet layout.
    pub fn add_pod_in(&mut self, name: &str, cgroup: &str) -> Pod {
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
        self.mkdir_cgroup(&pod.cgroup.clone());
        self.mkdir_cgroup(&pod.container.clone());
        self.mkdir_cgroup(&pod.cgroup.join("pause"));
        self.start_pause(&pod);
        self.pods.push(pod.clone());
        pod
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
        // Deleting the node's end removes the pair now, even while the old
        // netns lives on through fds held elsewhere (ztunnel's, say).
        ip(&["-n", &self.netns_name, "link", "del", &format!("veth{n}")]);
        ip(&["netns", "del", &pod.netns_name]);
        ip(&["netns", "add", &pod.netns_name]);
        ip(&["-n", &pod.netns_name, "link", "set", "lo", "up"]);
        self.wire(pod, n);
        self.start_pause(pod);
    }

    /// Connects `pod`'s netns to the bridge with veth number `n` and gives
    /// it its addresses.
    fn wire(&self, pod: &Pod, n: u8) {
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

    /// Creates a cgroup directory below the node cgroup (e.g. for ztunnel).
    pub fn add_cgroup(&mut self, relative: &str) -> PathBuf {
        let path = self.cgroup.join(relative);
        self.mkdir_cgroup(&path.clone());
        path
    }

    /// Where the daemon of this node pins its maps and links.
    pub fn bpffs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/ambridge-test-{}", self.id))
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
        text += tail;
        self.write_workloads_text(&text);
    }

    /// Replaces the workloads file with `text` as it is.
    pub fn write_workloads_text(&self, text: &str) {
        let staging = self.dir.join("workloads.yaml.tmp");
        fs::write(&staging, text).expect("writing the workloads file");
        fs::rename(&staging, self.workloads_path()).expect("renaming the workloads file");
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
    }
}
