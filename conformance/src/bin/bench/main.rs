//! `ambridge-bench`: the datapath benchmark. Builds one sandbox node with a
//! pod per path, the same tokio echo server, DNS server and relay for all
//! of them, runs every measurement on every path in interleaved rounds (so
//! machine drift hits all paths alike), and reports each figure with its
//! ratio to iptables capture and to the floors.
//!
//! Groups of paths, each its own table:
//! - outbound, an enrolled client to a server: `no-mesh` (straight to the
//!   server, the floor), `explicit` (the client dials the relay's 15001, the
//!   floor for any capture mechanism), `iptables` (Istio's in-pod nat
//!   REDIRECT, `SO_ORIGINAL_DST` from conntrack), `ambridge` (connect-time
//!   rewrite and `SO_ORIGINAL_DST` emulation) and `ambridge+sockmap`
//!   (msg_redirect acceleration);
//! - sidecar, a sidecar-injected client to a server, through its own proxy
//!   (the relay, as uid and gid 1337 in the pod's cgroup and netns, on
//!   15001): `no-mesh` (the outbound group's), `iptables` (istio-iptables'
//!   nat OUTPUT rules, REDIRECT mode) and `ambridge` (`--sidecar on`,
//!   `mode: sidecar`);
//! - inbound, a client outside the mesh to an enrolled server, through the
//!   relay's 15006 in the server's netns: `no-mesh`, `explicit` (the client
//!   dials 15006), `iptables` (Istio's in-pod PREROUTING REDIRECT) and
//!   `ambridge` (`sk_lookup`);
//! - DNS over UDP from a pod to a server's port 53: `direct` (the server
//!   answers), `explicit` (the pod asks the in-pod proxy on 127.0.0.1:15053
//!   itself), `iptables` (Istio's in-pod OUTPUT REDIRECT to 15053) and
//!   `ambridge` (`connect`/`sendmsg`/`recvmsg` rewrite). The proxy answers
//!   from the pod's loopback, as ztunnel answers the names it knows.
//!
//! Output: `results.json`, `results.md` and `chart.svg` under `--out`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

mod control;

use ambridge_conformance::{Background, Daemon, Node, Pod, ProbeEvent, event, sandbox::iptables};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// A quick run (about a minute) that checks the benchmark still works;
    /// its figures are too short to compare.
    #[arg(long)]
    quick: bool,
    /// Directory for results.json, results.md and chart.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Interleaved rounds; each figure is the median over them.
    #[arg(long)]
    rounds: Option<usize>,
    /// Only these groups (comma-separated: outbound, sidecar, inbound, dns,
    /// sustained, control); every group by default.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Pods of the control-plane node [default: 10,000; 1,000 quick].
    #[arg(long)]
    control_pods: Option<usize>,
}

/// A group of paths measured alike and reported in one table.
struct Group {
    name: &'static str,
    title: &'static str,
    /// In report order; every group has an `iptables` path, the baseline.
    paths: &'static [&'static str],
    /// The paths without capture that every figure is also compared to.
    floors: &'static [&'static str],
    traffic: Traffic,
}

/// What a group's load generator sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Tcp,
    Dns,
    /// New connections for a long while, to many destinations, the client
    /// closing first: what TIME_WAIT and 4-tuple reuse allow.
    Sustained,
}

const BASELINE: &str = "iptables";

const GROUPS: [Group; 5] = [
    Group {
        name: "outbound",
        title: "Outbound: an enrolled client pod to a server pod",
        paths: &[
            "no-mesh",
            "explicit",
            "iptables",
            "ambridge",
            "ambridge+sockmap",
        ],
        floors: &["no-mesh", "explicit"],
        traffic: Traffic::Tcp,
    },
    Group {
        name: "sidecar",
        title: "Sidecar: a sidecar-injected client pod to a server pod, through its own proxy's 15001 (uid 1337, in the pod)",
        paths: &["no-mesh", "iptables", "ambridge"],
        floors: &["no-mesh"],
        traffic: Traffic::Tcp,
    },
    Group {
        name: "inbound",
        title: "Inbound: a client outside the mesh to an enrolled server pod, through 15006",
        paths: &["no-mesh", "explicit", "iptables", "ambridge"],
        floors: &["no-mesh", "explicit"],
        traffic: Traffic::Tcp,
    },
    Group {
        name: "dns",
        title: "DNS over UDP from a captured pod to a server's port 53, answered by the in-pod proxy",
        paths: &["direct", "explicit", "iptables", "ambridge"],
        floors: &["direct", "explicit"],
        traffic: Traffic::Dns,
    },
    Group {
        name: "sustained",
        title: "Sustained new connections: one client pod to 64 destinations, the client closing first, default sysctls",
        paths: &["no-mesh", "iptables", "ambridge"],
        floors: &["no-mesh"],
        traffic: Traffic::Sustained,
    },
];

/// Destinations of the sustained group: ports from [`SUSTAINED_PORT`] on.
const SUSTAINED_DESTINATIONS: u16 = 64;
const SUSTAINED_PORT: u16 = 9000;

/// One measured path: its group and its name there.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Route {
    group: &'static str,
    path: &'static str,
}

impl Route {
    /// Every route of the groups a run measures.
    fn all(plan: &Plan) -> impl Iterator<Item = Route> + '_ {
        GROUPS
            .iter()
            .filter(|g| plan.measures(g.name))
            .flat_map(|g| {
                g.paths.iter().map(|path| Route {
                    group: g.name,
                    path,
                })
            })
    }
}

/// Durations and sizes of one run.
struct Plan {
    rounds: usize,
    cps_ms: u64,
    rr_ms: u64,
    dns_ms: u64,
    /// Each sustained path runs once (in the first round), this long.
    sustained_ms: u64,
    bulk_bytes: usize,
    control: control::Plan,
    /// The datapath groups measured.
    groups: Vec<&'static str>,
    /// Whether the control plane is measured.
    control_plane: bool,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let mut plan = if args.quick {
            Plan {
                rounds: 1,
                cps_ms: 300,
                rr_ms: 300,
                dns_ms: 300,
                sustained_ms: 1_000,
                bulk_bytes: 16 << 20,
                control: control::Plan {
                    pods: 1_000,
                    repetitions: 1,
                    events: 5,
                    churn: Duration::from_secs(3),
                    churn_rate: 100,
                },
                groups: Vec::new(),
                control_plane: false,
            }
        } else {
            Plan {
                rounds: 5,
                cps_ms: 1_500,
                rr_ms: 2_000,
                dns_ms: 1_500,
                sustained_ms: 60_000,
                bulk_bytes: 512 << 20,
                control: control::Plan {
                    pods: 10_000,
                    repetitions: 5,
                    events: 100,
                    churn: Duration::from_secs(60),
                    churn_rate: 100,
                },
                groups: Vec::new(),
                control_plane: false,
            }
        };
        if let Some(r) = args.rounds {
            plan.rounds = r.max(1);
        }
        if let Some(n) = args.control_pods {
            plan.control.pods = n.max(1);
        }
        plan.control_plane = args.groups.is_empty();
        for name in &args.groups {
            if name == "control" {
                plan.control_plane = true;
                continue;
            }
            let group = GROUPS
                .iter()
                .find(|g| g.name == name)
                .unwrap_or_else(|| panic!("--groups: no group {name:?}"));
            plan.groups.push(group.name);
        }
        if args.groups.is_empty() {
            plan.groups = GROUPS.iter().map(|g| g.name).collect();
        }
        plan
    }

    fn measures(&self, group: &str) -> bool {
        self.groups.contains(&group)
    }
}

/// One measurement: its key in the results, and the load generator's
/// arguments.
struct Phase {
    key: String,
    load: Vec<String>,
}

fn phases(plan: &Plan, traffic: Traffic) -> Vec<Phase> {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut out = Vec::new();
    if traffic == Traffic::Sustained {
        let destinations = SUSTAINED_DESTINATIONS.to_string();
        out.push(Phase {
            key: "sustained_c16".into(),
            load: args(&[
                "cps",
                "--concurrency",
                "16",
                "--duration-ms",
                &plan.sustained_ms.to_string(),
                "--destinations",
                &destinations,
            ]),
        });
        return out;
    }
    if traffic == Traffic::Dns {
        let ms = plan.dns_ms.to_string();
        for (key, c, per_query) in [
            ("dns_c1", "1", false),
            ("dns_c16", "16", false),
            ("dns_new_socket_c1", "1", true),
        ] {
            let mut load = args(&["dns", "--concurrency", c, "--duration-ms", &ms]);
            if per_query {
                load.push("--socket-per-query".into());
            }
            out.push(Phase {
                key: key.into(),
                load,
            });
        }
        return out;
    }
    for c in [1, 16, 128] {
        out.push(Phase {
            key: format!("cps_c{c}"),
            load: args(&[
                "cps",
                "--concurrency",
                &c.to_string(),
                "--duration-ms",
                &plan.cps_ms.to_string(),
            ]),
        });
    }
    for (name, size) in [("1B", 1), ("4KiB", 4096)] {
        out.push(Phase {
            key: format!("rr_{name}"),
            load: args(&[
                "rr",
                "--size",
                &size.to_string(),
                "--duration-ms",
                &plan.rr_ms.to_string(),
            ]),
        });
    }
    out.push(Phase {
        key: "bulk".into(),
        load: args(&["bulk", "--bytes", &plan.bulk_bytes.to_string()]),
    });
    out
}

/// The sandbox the benchmark runs in. Field order is drop order.
struct Bench {
    _relay: Background,
    /// The sidecar pods' proxies.
    _proxies: Vec<Background>,
    _servers: Vec<Background>,
    daemon: Daemon,
    server: Pod,
    /// The outbound paths' client pods (also the DNS paths' clients).
    clients: BTreeMap<&'static str, Pod>,
    /// The sidecar paths' client pods, each with its proxy, but
    /// `no-mesh`'s, which is the outbound group's.
    sidecar_clients: BTreeMap<&'static str, Pod>,
    /// The inbound paths' server pods, but `no-mesh`'s, which is `server`.
    inbound_servers: BTreeMap<&'static str, Pod>,
    /// The sustained paths' client pods, with the kernel's default sysctls,
    /// and their server, listening on every destination port.
    sustained_clients: BTreeMap<&'static str, Pod>,
    sustained_server: Pod,
    /// Last: its pods' processes and the daemon go first.
    _node: Node,
}

/// The YAML of one workload.
fn workload_yaml(pod: &Pod, mode: &str, accelerate: Option<bool>) -> String {
    let mut y = format!(
        "  - uid: {}\n    name: {}\n    namespace: bench\n    cgroup: {}\n    ips: [{}, \"{}\"]\n    mode: {mode}\n",
        pod.uid,
        pod.name,
        pod.cgroup.display(),
        pod.ip4,
        pod.ip6
    );
    if let Some(a) = accelerate {
        let _ = writeln!(y, "    accelerate: {a}");
    }
    y
}

/// Where the in-pod DNS proxy listens.
const DNS_PROXY: &str = "127.0.0.1:15053";

/// The uid and gid a sidecar proxy runs as (Istio's `ISTIO_PROXY_UID` and
/// `ISTIO_PROXY_GID`): what istio-iptables' rules and ambridge's
/// `--sidecar-proxy-uid`/`-gid` leave alone.
const SIDECAR_PROXY_USER: &str = "1337:1337";
/// The sidecar proxy's outbound port (`istio-iptables -p`).
const SIDECAR_PROXY_PORT: u16 = 15001;

/// A container cgroup `istio-proxy` in `pod`'s cgroup, where its sidecar
/// proxy runs.
fn add_proxy_cgroup(node: &mut Node, pod: &Pod) -> PathBuf {
    let pod_cgroup = pod
        .cgroup
        .strip_prefix(&node.cgroup)
        .expect("the pod cgroup is under the node's")
        .display()
        .to_string();
    node.add_cgroup(&format!("{pod_cgroup}/istio-proxy"))
}

impl Bench {
    fn new() -> Self {
        let mut node = Node::new();
        let server = node.add_pod("server");
        let mut clients = BTreeMap::new();
        for (path, name) in GROUPS[0]
            .paths
            .iter()
            .zip(["nomesh", "explicit", "iptables", "ambridge", "accel"])
        {
            clients.insert(*path, node.add_pod(name));
        }
        let mut inbound_servers = BTreeMap::new();
        for (path, name) in [
            ("explicit", "inexpl"),
            ("iptables", "inipt"),
            ("ambridge", "inamb"),
        ] {
            inbound_servers.insert(path, node.add_pod(name));
        }
        let mut sidecar_clients = BTreeMap::new();
        for (path, name) in [("iptables", "sideipt"), ("ambridge", "sideamb")] {
            sidecar_clients.insert(path, node.add_pod(name));
        }
        let proxy_cgroups: Vec<(PathBuf, PathBuf)> = sidecar_clients
            .values()
            .map(|pod| (add_proxy_cgroup(&mut node, pod), pod.netns.clone()))
            .collect();
        let sustained_server = node.add_pod("susserver");
        let mut sustained_clients = BTreeMap::new();
        for (path, name) in [
            ("no-mesh", "susnomesh"),
            ("iptables", "susipt"),
            ("ambridge", "susamb"),
        ] {
            sustained_clients.insert(path, node.add_pod(name));
        }
        let ztunnel = node.add_cgroup("ztunnel");
        let mut workloads = Self::base_yaml(&server, &clients, &inbound_servers);
        workloads += &workload_yaml(&sustained_server, "none", None);
        workloads += &workload_yaml(&sustained_clients["no-mesh"], "none", None);
        workloads += &workload_yaml(&sustained_clients["iptables"], "none", None);
        workloads += &workload_yaml(&sustained_clients["ambridge"], "ambient", Some(false));
        workloads += &workload_yaml(&sidecar_clients["iptables"], "none", None);
        workloads += &workload_yaml(&sidecar_clients["ambridge"], "sidecar", None);
        workloads += &format!("ztunnel:\n  cgroup: {}\n", ztunnel.display());
        fs::write(node.workloads_path(), workloads).expect("writing the workloads file");
        // Sockmap stays off node-wide; the accelerated path's pod opts in.
        // Sidecar capture is on node-wide; only the sidecar path's pod is
        // `mode: sidecar`.
        let daemon = Daemon::start_with(&node, &["--resync-seconds", "300", "--sidecar", "on"]);
        for pod in [
            &clients["ambridge"],
            &inbound_servers["ambridge"],
            &sustained_clients["ambridge"],
        ] {
            daemon.wait_for_mode(&pod.uid, Some("ambient"));
        }
        daemon.wait_for_mode(&sidecar_clients["ambridge"].uid, Some("sidecar"));
        install_istio_outbound(&clients["iptables"].netns_name);
        install_istio_outbound(&sustained_clients["iptables"].netns_name);
        install_istio_inbound(&inbound_servers["iptables"].netns_name);
        install_istio_sidecar_outbound(&sidecar_clients["iptables"].netns_name);
        // Connection storms leave thousands of TIME_WAIT sockets towards one
        // destination; without reuse every later connect searches past them
        // and the rate collapses (about 14k/s to 1k/s here, with or without
        // a mesh). Clients and the relay's upstream side reuse them, as many
        // production nodes are set up to; so does each sidecar proxy, whose
        // upstream side is in its client's netns.
        let namespaces = clients
            .values()
            .chain(inbound_servers.values())
            .chain(sidecar_clients.values())
            .map(|p| p.netns_name.clone())
            .chain([node.netns_name.clone()]);
        for ns in namespaces {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_tw_reuse=1",
                ])
                .output()
                .expect("running sysctl");
            assert!(
                out.status.success(),
                "sysctl in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let probe = ambridge_conformance::workspace_bin("ambridge-probe");
        let in_pod = |pod: &Pod, role: &[&str]| {
            let mut c = Command::new(&probe);
            c.arg("--cgroup")
                .arg(&pod.container)
                .arg("--netns")
                .arg(&pod.netns)
                .args(role);
            let p = Background::spawn(c);
            p.wait_first::<event::Listening>(Duration::from_secs(10));
            p
        };
        let mut servers = vec![
            in_pod(&server, &["bench-echo", "--listen", "[::]:8080"]),
            in_pod(&server, &["bench-dns", "--listen", "0.0.0.0:53"]),
        ];
        for pod in inbound_servers.values() {
            servers.push(in_pod(pod, &["bench-echo", "--listen", "[::]:8080"]));
        }
        servers.push(in_pod(
            &sustained_server,
            &[
                "bench-echo",
                "--listen",
                &format!("[::]:{SUSTAINED_PORT}"),
                "--ports",
                &SUSTAINED_DESTINATIONS.to_string(),
            ],
        ));
        let relay = Background::spawn({
            let mut c = Command::new(&probe);
            c.arg("--cgroup")
                .arg(&ztunnel)
                .arg("--netns")
                .arg(format!("/run/netns/{}", node.netns_name))
                .args([
                    "bench-relay",
                    "--default-upstream",
                    &format!("{}:8080", server.ip4),
                ]);
            for path in ["explicit", "iptables", "ambridge", "ambridge+sockmap"] {
                c.arg("--pod-netns").arg(&clients[path].netns);
            }
            for path in ["iptables", "ambridge"] {
                c.arg("--pod-netns").arg(&sustained_clients[path].netns);
            }
            for pod in inbound_servers.values() {
                c.arg("--inbound-pod-netns").arg(&pod.netns);
            }
            for path in ["explicit", "iptables", "ambridge"] {
                c.arg("--dns-pod-netns").arg(&clients[path].netns);
            }
            c
        });
        relay.wait_first::<event::RelayListening>(Duration::from_secs(10));
        // Each sidecar pod's proxy: the same relay, in the pod's netns and
        // its `istio-proxy` container cgroup, as 1337 (which neither
        // capture takes: a proxy not recognised would be sent to itself,
        // and `check_paths` would see its path fail).
        let proxies = proxy_cgroups
            .iter()
            .map(|(cgroup, netns)| {
                let mut c = Command::new(&probe);
                c.arg("--cgroup")
                    .arg(cgroup)
                    .arg("--netns")
                    .arg(netns)
                    .args([
                        "--user",
                        SIDECAR_PROXY_USER,
                        "bench-relay",
                        "--in-own-netns",
                        "--port",
                        &SIDECAR_PROXY_PORT.to_string(),
                    ]);
                let p = Background::spawn(c);
                p.wait_first::<event::RelayListening>(Duration::from_secs(10));
                p
            })
            .collect();
        Bench {
            _relay: relay,
            _proxies: proxies,
            _servers: servers,
            daemon,
            server,
            clients,
            sidecar_clients,
            inbound_servers,
            sustained_clients,
            sustained_server,
            _node: node,
        }
    }

    fn base_yaml(
        server: &Pod,
        clients: &BTreeMap<&str, Pod>,
        inbound_servers: &BTreeMap<&str, Pod>,
    ) -> String {
        let mut y = String::from("workloads:\n");
        y += &workload_yaml(server, "none", None);
        y += &workload_yaml(&clients["no-mesh"], "none", None);
        y += &workload_yaml(&clients["explicit"], "none", None);
        y += &workload_yaml(&clients["iptables"], "none", None);
        y += &workload_yaml(&clients["ambridge"], "ambient", Some(false));
        y += &workload_yaml(&clients["ambridge+sockmap"], "ambient", Some(true));
        y += &workload_yaml(&inbound_servers["explicit"], "none", None);
        y += &workload_yaml(&inbound_servers["iptables"], "none", None);
        y += &workload_yaml(&inbound_servers["ambridge"], "ambient", Some(false));
        y
    }

    /// The pod a route's load runs in, and where it sends.
    fn endpoints(&self, r: Route) -> (&Pod, String) {
        match (r.group, r.path) {
            ("outbound", "explicit") => (
                &self.clients[r.path],
                format!("{}:15001", self.clients[r.path].ip4),
            ),
            ("outbound", _) => (&self.clients[r.path], format!("{}:8080", self.server.ip4)),
            ("sidecar", "no-mesh") => (
                &self.clients["no-mesh"],
                format!("{}:8080", self.server.ip4),
            ),
            ("sidecar", _) => (
                &self.sidecar_clients[r.path],
                format!("{}:8080", self.server.ip4),
            ),
            ("inbound", "no-mesh") => (
                &self.clients["no-mesh"],
                format!("{}:8080", self.server.ip4),
            ),
            ("inbound", "explicit") => (
                &self.clients["no-mesh"],
                format!("{}:15006", self.inbound_servers[r.path].ip4),
            ),
            ("inbound", _) => (
                &self.clients["no-mesh"],
                format!("{}:8080", self.inbound_servers[r.path].ip4),
            ),
            ("dns", "direct") => (&self.clients["no-mesh"], format!("{}:53", self.server.ip4)),
            ("dns", "explicit") => (&self.clients["explicit"], DNS_PROXY.into()),
            ("dns", _) => (&self.clients[r.path], format!("{}:53", self.server.ip4)),
            ("sustained", _) => (
                &self.sustained_clients[r.path],
                format!("{}:{SUSTAINED_PORT}", self.sustained_server.ip4),
            ),
            _ => unreachable!("unknown route {r:?}"),
        }
    }

    /// The netns whose conntrack table a route fills, if any: the client's
    /// for outbound and DNS, the server's for inbound.
    fn conntrack_netns(&self, r: Route) -> &str {
        match (r.group, r.path) {
            ("inbound", "no-mesh") => &self.server.netns_name,
            ("inbound", _) => &self.inbound_servers[r.path].netns_name,
            _ => &self.endpoints(r).0.netns_name,
        }
    }

    fn load(&self, r: Route, args: &[String]) -> ProbeEvent {
        let (pod, target) = self.endpoints(r);
        let mut full = vec!["bench-load", "--to", &target];
        full.extend(args.iter().map(String::as_str));
        pod.run(&full)
            .into_iter()
            .find(|e| {
                matches!(
                    e,
                    ProbeEvent::Cps(_)
                        | ProbeEvent::Rr(_)
                        | ProbeEvent::Bulk(_)
                        | ProbeEvent::DnsLoad(_)
                )
            })
            .unwrap_or_else(|| panic!("no result from the load generator on {r:?}"))
    }

    /// Checks that every path takes the route it claims before measuring:
    /// the counter of its capture moves on its own path only, the iptables
    /// paths leave conntrack entries, and the sidecar iptables path's are
    /// of connections REDIRECT sent to the proxy.
    fn check_paths(&self, plan: &Plan) {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for r in Route::all(plan) {
            let (warm, counter) = match r.group {
                "outbound" => (
                    args(&["cps", "--concurrency", "1", "--duration-ms", "100"]),
                    "connect_redirected_ipv4",
                ),
                "sustained" => (
                    args(&[
                        "cps",
                        "--concurrency",
                        "1",
                        "--duration-ms",
                        "100",
                        "--destinations",
                        &SUSTAINED_DESTINATIONS.to_string(),
                    ]),
                    "connect_redirected_ipv4",
                ),
                "sidecar" => (
                    args(&["cps", "--concurrency", "1", "--duration-ms", "100"]),
                    "sidecar_redirected",
                ),
                "inbound" => (
                    args(&["cps", "--concurrency", "1", "--duration-ms", "100"]),
                    "inbound_captured",
                ),
                _ => (
                    args(&["dns", "--concurrency", "1", "--duration-ms", "100"]),
                    "dns_redirected",
                ),
            };
            let proto = conntrack_proto(r.group);
            let conntrack_before = conntrack_count(self.conntrack_netns(r), proto);
            let before = self.daemon.stats();
            let result = self.load(r, &warm);
            let works = match &result {
                ProbeEvent::Cps(c) => c.ok > 0 && c.failed == 0,
                ProbeEvent::DnsLoad(d) => d.ok > 0 && d.failed == 0,
                _ => false,
            };
            assert!(works, "{r:?} does not work: {result}");
            let after = self.daemon.stats();
            let moved = after[counter] - before[counter];
            let inserted = after["sockhash_inserted"] - before["sockhash_inserted"];
            match r.path {
                "ambridge" => assert!(moved > 0 && inserted == 0, "{r:?}: {after:?}"),
                "ambridge+sockmap" => assert!(moved > 0 && inserted > 0, "{r:?}: {after:?}"),
                _ => assert_eq!(moved, 0, "{r:?} was captured by ambridge"),
            }
            let conntrack_after = conntrack_count(self.conntrack_netns(r), proto);
            if r.path == BASELINE {
                assert!(
                    conntrack_after > conntrack_before,
                    "{r:?} created no conntrack entry"
                );
            }
            if r.group == "sidecar" && r.path == BASELINE {
                assert!(
                    conntrack_replies_from(self.conntrack_netns(r), SIDECAR_PROXY_PORT) > 0,
                    "{r:?}: no connection was redirected to the proxy"
                );
            }
        }
    }
}

/// Istio's in-pod nat OUTPUT rules (see the reference): DNS to 15053, TCP
/// to 15001. The nat rules alone, which is what the captured path costs;
/// istio-cni's mangle rules for ztunnel's own legs are left out.
fn install_istio_outbound(ns: &str) {
    for rule in [
        "-t nat -N ISTIO_OUTPUT",
        "-t nat -A OUTPUT -j ISTIO_OUTPUT",
        "-t nat -A ISTIO_OUTPUT -d 169.254.7.127/32 -j ACCEPT",
        "-t nat -A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "-t nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
        "-t nat -A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "-t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -j ACCEPT",
        "-t nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
    ] {
        iptables(ns, rule);
    }
}

/// Istio's in-pod nat PREROUTING rules (see the reference): TCP to 15006.
fn install_istio_inbound(ns: &str) {
    for rule in [
        "-t nat -N ISTIO_PRERT",
        "-t nat -A PREROUTING -j ISTIO_PRERT",
        "-t nat -A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -j ACCEPT",
        "-t nat -A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
    ] {
        iptables(ns, rule);
    }
}

/// istio-iptables' nat OUTPUT rules for a sidecar pod in REDIRECT mode
/// (its defaults: proxy uid and gid 1337, every outbound range captured,
/// no port excluded, no DNS capture), as `istio-iptables` writes them:
/// the proxy's own connections and loopback are left alone, the rest of
/// TCP goes to the proxy's 15001. The nat OUTPUT rules alone, which is
/// what the captured outbound path costs; the PREROUTING (inbound) rules
/// are left out, the client pod taking no connection.
fn install_istio_sidecar_outbound(ns: &str) {
    for rule in [
        "-t nat -N ISTIO_REDIRECT",
        "-t nat -N ISTIO_IN_REDIRECT",
        "-t nat -N ISTIO_OUTPUT",
        "-t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-t nat -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-t nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-t nat -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-t nat -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ] {
        iptables(ns, rule);
    }
}

/// Conntrack entries of TCP connections answered from local `port` in a
/// netns: the connections REDIRECT sent there.
fn conntrack_replies_from(ns: &str, port: u16) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "conntrack", "-L", "-p", "tcp"])
        .args(["--reply-port-src", &port.to_string()])
        .output()
        .expect("running conntrack (scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout).lines().count() as u64
}

/// Conntrack entries of `proto` in a netns (0 where conntrack is not
/// active).
fn conntrack_count(ns: &str, proto: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "conntrack", "-L", "-p", proto])
        .output()
        .expect("running conntrack (scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout).lines().count() as u64
}

/// The protocol a group's conntrack entries are counted for.
fn conntrack_proto(group: &str) -> &'static str {
    if group == "dns" { "udp" } else { "tcp" }
}

/// Busy CPU time of the whole machine so far, in seconds (every process
/// and the kernel, softirqs included).
fn busy_cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = fields[0]
        + fields[1]
        + fields[2]
        + fields[5]
        + fields[6]
        + fields.get(7).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    busy as f64 / hz
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The figures of one path: metric name -> median over the rounds.
type Figures = BTreeMap<String, f64>;
/// The spread of one path's figures: metric name -> (min, max) over the
/// rounds.
type Spread = BTreeMap<String, (f64, f64)>;

/// What one run measured: medians, spreads, and the 1-byte latency
/// distribution of each TCP path (its last round's).
#[derive(Default)]
struct Measured {
    figures: BTreeMap<Route, Figures>,
    spread: BTreeMap<Route, Spread>,
    cdfs: BTreeMap<Route, Vec<f64>>,
}

fn measure(bench: &Bench, plan: &Plan) -> Measured {
    let mut samples: BTreeMap<(Route, String), Vec<f64>> = BTreeMap::new();
    let mut cdfs: BTreeMap<Route, Vec<f64>> = BTreeMap::new();
    for round in 0..plan.rounds {
        eprintln!("[bench] round {}/{}", round + 1, plan.rounds);
        for group in GROUPS.iter().filter(|g| plan.measures(g.name)) {
            if group.traffic == Traffic::Sustained && round > 0 {
                continue;
            }
            for phase in phases(plan, group.traffic) {
                for &path in group.paths {
                    let route = Route {
                        group: group.name,
                        path,
                    };
                    let cpu_before = busy_cpu_seconds();
                    let r = bench.load(route, &phase.load);
                    let cpu = busy_cpu_seconds() - cpu_before;
                    let mut put = |k: &str, v: f64| {
                        samples.entry((route, k.to_string())).or_default().push(v)
                    };
                    let per_10k = |count: u64| cpu / (count as f64).max(1.0) * 10_000.0;
                    match r {
                        ProbeEvent::Cps(r) => {
                            put(&format!("{}_per_s", phase.key), r.per_second);
                            if group.traffic == Traffic::Sustained {
                                put(&format!("{}_failed", phase.key), r.failed as f64);
                            }
                        }
                        ProbeEvent::Rr(r) => {
                            for (p, us) in
                                [("p50", r.p50_us), ("p99", r.p99_us), ("p999", r.p999_us)]
                            {
                                put(&format!("{}_{p}_us", phase.key), us);
                            }
                            put(&format!("{}_cpu_s_per_10k", phase.key), per_10k(r.count));
                            if phase.key == "rr_1B" {
                                cdfs.insert(route, r.cdf_us);
                            }
                        }
                        ProbeEvent::Bulk(r) => put("bulk_gbit_per_s", r.gbit_per_s),
                        ProbeEvent::DnsLoad(r) => {
                            put(&format!("{}_per_s", phase.key), r.per_second);
                            for (p, us) in [("p50", r.p50_us), ("p99", r.p99_us)] {
                                put(&format!("{}_{p}_us", phase.key), us);
                            }
                            put(&format!("{}_cpu_s_per_10k", phase.key), per_10k(r.ok));
                            put(&format!("{}_failed", phase.key), r.failed as f64);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    let mut figures: BTreeMap<Route, Figures> = BTreeMap::new();
    let mut spread: BTreeMap<Route, Spread> = BTreeMap::new();
    for ((route, key), v) in samples {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        spread
            .entry(route)
            .or_default()
            .insert(key.clone(), (lo, hi));
        figures.entry(route).or_default().insert(key, median(v));
    }
    for route in Route::all(plan) {
        let n = conntrack_count(bench.conntrack_netns(route), conntrack_proto(route.group)) as f64;
        figures
            .entry(route)
            .or_default()
            .insert("conntrack_entries".into(), n);
        spread
            .entry(route)
            .or_default()
            .insert("conntrack_entries".into(), (n, n));
    }
    Measured {
        figures,
        spread,
        cdfs,
    }
}

/// Kernel-side cost of each ambridge program: runs and nanoseconds per run,
/// from the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`).
fn program_costs() -> Value {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("running bpftool (scripts/setup.sh installs it)");
    let progs: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut costs = serde_json::Map::new();
    for p in progs.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        if ![
            "connect4",
            "connect6",
            "bind4",
            "bind6",
            "getpeername4",
            "getpeername6",
            "getsockopt",
            "sock_ops",
            "redirect",
            "inbound",
            "sendmsg4",
            "sendmsg6",
            "recvmsg4",
            "recvmsg6",
            "sock_release",
        ]
        .contains(&name)
        {
            continue;
        }
        let runs = p["run_cnt"].as_u64().unwrap_or(0);
        let ns = p["run_time_ns"].as_u64().unwrap_or(0);
        let entry = costs
            .entry(name.to_string())
            .or_insert(json!({"runs": 0, "run_time_ns": 0}));
        entry["runs"] = json!(entry["runs"].as_u64().unwrap_or(0) + runs);
        entry["run_time_ns"] = json!(entry["run_time_ns"].as_u64().unwrap_or(0) + ns);
    }
    for v in costs.values_mut() {
        let runs = v["runs"].as_u64().unwrap_or(0);
        v["ns_per_run"] = json!(if runs > 0 {
            v["run_time_ns"].as_u64().unwrap_or(0) as f64 / runs as f64
        } else {
            0.0
        });
    }
    Value::Object(costs)
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
    })
}

/// Whether a larger value of `metric` is better.
fn higher_is_better(metric: &str) -> bool {
    metric.ends_with("_per_s")
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!((a / b * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

fn report(
    measured: &Measured,
    cp: &Value,
    machine: &Value,
    plan: &Plan,
    quick: bool,
) -> (Value, String) {
    let fmt = |x: f64| {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.2}")
        }
    };
    let mut groups = serde_json::Map::new();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), Linux {}. {} round(s){}; each figure is the median over the rounds, then its ratio to iptables capture, then the range over the rounds.",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        plan.rounds,
        if quick {
            ", quick mode (not comparable)"
        } else {
            ""
        }
    );
    for group in GROUPS.iter().filter(|g| plan.measures(g.name)) {
        let route = |path: &'static str| Route {
            group: group.name,
            path,
        };
        let figures = |path| &measured.figures[&route(path)];
        let value = |path, m: &str| figures(path).get(m).copied().unwrap_or(f64::NAN);
        let metrics: Vec<String> = figures(BASELINE).keys().cloned().collect();
        let mut table = serde_json::Map::new();
        for m in &metrics {
            let mut row = serde_json::Map::new();
            for &path in group.paths {
                let v = value(path, m);
                let spread = measured.spread[&route(path)].get(m);
                let mut cell = json!({
                    "value": v,
                    "min": spread.map(|s| s.0),
                    "max": spread.map(|s| s.1),
                    "vs_iptables": ratio(v, value(BASELINE, m)),
                });
                for floor in group.floors {
                    cell[format!("vs_{}", floor.replace('-', "_"))] = ratio(v, value(floor, m));
                }
                row.insert(path.to_string(), cell);
            }
            table.insert(m.clone(), Value::Object(row));
        }
        groups.insert(group.name.to_string(), Value::Object(table));

        let _ = writeln!(md, "\n### {}\n", group.title);
        let _ = writeln!(md, "| figure | {} |", group.paths.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(group.paths.len()));
        for m in &metrics {
            let arrow = if higher_is_better(m) {
                "higher is better"
            } else {
                "lower is better"
            };
            let _ = write!(md, "| {m} ({arrow}) |");
            for &path in group.paths {
                let v = value(path, m);
                let r = value(BASELINE, m);
                let (lo, hi) = measured.spread[&route(path)]
                    .get(m)
                    .copied()
                    .unwrap_or((v, v));
                let range = if lo == hi {
                    String::new()
                } else {
                    format!(" [{}–{}]", fmt(lo), fmt(hi))
                };
                if r > 0.0 {
                    let _ = write!(md, " {} ({:.2}x){range} |", fmt(v), v / r);
                } else {
                    let _ = write!(md, " {}{range} |", fmt(v));
                }
            }
            md.push('\n');
        }
    }
    md += &control::markdown(cp);
    let json = json!({
        "machine": machine,
        "quick": quick,
        "rounds": plan.rounds,
        "paths": GROUPS.iter().map(|g| (g.name, g.paths)).collect::<BTreeMap<_, _>>(),
        "datapath": groups,
        "control_plane": cp,
    });
    (json, md)
}

/// One path of the chart, and its colour.
struct Series {
    route: Route,
    color: &'static str,
}

const fn series(group: &'static str, path: &'static str, color: &'static str) -> Series {
    Series {
        route: Route { group, path },
        color,
    }
}

impl Series {
    /// The path's name, after its group's but in the outbound group.
    fn label(&self) -> String {
        let Route { group, path } = self.route;
        if group == GROUPS[0].name {
            path.to_string()
        } else {
            format!("{group} {path}")
        }
    }
}

/// The chart's paths, in legend order: every outbound path, then the
/// sidecar group's captured ones (its `no-mesh` is the outbound one's).
const CHART: [Series; 7] = [
    series("outbound", "no-mesh", "#7f7f7f"),
    series("outbound", "explicit", "#1f77b4"),
    series("outbound", "iptables", "#d62728"),
    series("outbound", "ambridge", "#2ca02c"),
    series("outbound", "ambridge+sockmap", "#9467bd"),
    series("sidecar", "iptables", "#ff7f0e"),
    series("sidecar", "ambridge", "#17becf"),
];

/// Two panels: connection rates by concurrency, and the latency
/// distribution of 1-byte request/response, of the [`CHART`] paths
/// measured.
fn chart(measured: &Measured) -> String {
    let paths: Vec<(&Series, &Figures)> = CHART
        .iter()
        .filter_map(|s| Some((s, measured.figures.get(&s.route)?)))
        .collect();
    let (w, h, pad) = (1100.0, 440.0, 50.0);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    // Panel 1: new connections per second.
    let (x0, y0, pw, ph) = (pad, pad, 480.0, h - 2.0 * pad - 40.0);
    let keys = ["cps_c1_per_s", "cps_c16_per_s", "cps_c128_per_s"];
    let max = keys
        .iter()
        .flat_map(|k| {
            paths
                .iter()
                .map(move |(_, f)| f.get(*k).copied().unwrap_or(0.0))
        })
        .fold(1.0, f64::max);
    let _ = writeln!(
        s,
        "<text x='{x0}' y='{}' font-weight='bold'>New connections per second</text>",
        y0 - 15.0
    );
    let group = pw / keys.len() as f64;
    let bar = group / (paths.len() as f64 + 1.5);
    for (gi, k) in keys.iter().enumerate() {
        for (pi, (p, f)) in paths.iter().enumerate() {
            let v = f.get(*k).copied().unwrap_or(0.0);
            let bh = v / max * ph;
            let x = x0 + gi as f64 * group + (pi as f64 + 0.5) * bar;
            let _ = writeln!(
                s,
                "<rect x='{x:.1}' y='{:.1}' width='{:.1}' height='{bh:.1}' fill='{}'><title>{}: {v:.0}/s</title></rect>",
                y0 + ph - bh,
                bar * 0.9,
                p.color,
                p.label()
            );
        }
        let label = k.trim_start_matches("cps_c").trim_end_matches("_per_s");
        let _ = writeln!(
            s,
            "<text x='{:.1}' y='{:.1}'>{label} concurrent</text>",
            x0 + gi as f64 * group + bar,
            y0 + ph + 15.0
        );
    }
    let _ = writeln!(
        s,
        "<text x='{x0}' y='{:.1}'>max {max:.0}/s</text>",
        y0 + ph + 32.0
    );
    // Panel 2: latency percentiles (x: latency, y: percentile).
    let (x1, pw2) = (x0 + pw + 80.0, 480.0);
    let cdfs: Vec<(&Series, &Vec<f64>)> = paths
        .iter()
        .filter_map(|(p, _)| Some((*p, measured.cdfs.get(&p.route)?)))
        .collect();
    let lmax = cdfs
        .iter()
        .filter_map(|(_, c)| c.get(99).copied())
        .fold(1.0, f64::max);
    let _ = writeln!(
        s,
        "<text x='{x1}' y='{}' font-weight='bold'>1-byte request/response latency, percentiles to p99</text>",
        y0 - 15.0
    );
    let _ = writeln!(
        s,
        "<line x1='{x1}' y1='{:.1}' x2='{:.1}' y2='{:.1}' stroke='black'/>",
        y0 + ph,
        x1 + pw2,
        y0 + ph
    );
    let _ = writeln!(
        s,
        "<line x1='{x1}' y1='{y0}' x2='{x1}' y2='{:.1}' stroke='black'/>",
        y0 + ph
    );
    for (p, cdf) in &cdfs {
        let points: Vec<String> = cdf
            .iter()
            .take(100)
            .enumerate()
            .map(|(i, us)| {
                format!(
                    "{:.1},{:.1}",
                    x1 + (us / lmax).min(1.0) * pw2,
                    y0 + ph - i as f64 / 99.0 * ph
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill='none' stroke='{}' stroke-width='2' points='{}'/>",
            p.color,
            points.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "<text x='{:.1}' y='{:.1}'>{lmax:.0} us</text>",
        x1 + pw2 - 40.0,
        y0 + ph + 15.0
    );
    // Legend.
    let step = ((w - 2.0 * pad) / paths.len() as f64).min(190.0).floor();
    for (pi, (p, _)) in paths.iter().enumerate() {
        let x = x0 + pi as f64 * step;
        let y = h - 15.0;
        let _ = writeln!(
            s,
            "<rect x='{x}' y='{}' width='12' height='12' fill='{}'/><text x='{}' y='{y}'>{}</text>",
            y - 11.0,
            p.color,
            x + 16.0,
            p.label()
        );
    }
    s.push_str("</svg>\n");
    s
}

fn main() {
    let args = Args::parse();
    let plan = Plan::new(&args);
    let started = Instant::now();
    // Per-program run-time statistics cost a little on every run; they are
    // on for the whole run, so every path pays it alike.
    let stats_flag = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let stats_before = fs::read_to_string(stats_flag).unwrap_or_else(|_| "0".into());
    fs::write(stats_flag, "1").expect("enabling kernel.bpf_stats_enabled");
    let (measured, costs) = if plan.groups.is_empty() {
        (Measured::default(), Value::Null)
    } else {
        let bench = Bench::new();
        bench.check_paths(&plan);
        (measure(&bench, &plan), program_costs())
    };
    fs::write(stats_flag, stats_before.trim()).expect("restoring kernel.bpf_stats_enabled");
    let cp = if plan.control_plane {
        control::measure(&plan.control)
    } else {
        Value::Null
    };
    let (mut json, mut md) = report(&measured, &cp, &machine(), &plan, args.quick);
    json["kernel_programs"] = costs.clone();
    let _ = writeln!(md, "\nKernel programs (runs, ns per run): {costs}");
    fs::create_dir_all(&args.out).expect("creating the output directory");
    fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("writing results.json");
    fs::write(args.out.join("results.md"), &md).expect("writing results.md");
    // The chart is of the outbound and sidecar groups.
    if CHART.iter().any(|s| plan.measures(s.route.group)) {
        fs::write(args.out.join("chart.svg"), chart(&measured)).expect("writing chart.svg");
    }
    println!("{md}");
    println!(
        "wrote {}/results.json, results.md and chart.svg in {:.0} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
}
