//! `ambridge`: the node agent (`run`) and its operator commands.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use ambridge::{
    api,
    daemon::{self, Options},
    datapath::{self, Pins},
    host::cgroup,
    node::spec::{OriginalSrc, PodCgroup, Settings},
    sources::file,
    types::Port,
};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/ambridge";
const DEFAULT_API: &str = ambridge::api::DEFAULT_SOCKET;

/// Counters or map sizes, by name, as `ambridge stats` prints them.
type NamedValues = Vec<(String, u64)>;

#[derive(Parser)]
#[command(version, about = "eBPF traffic capture for Istio Ambient")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the datapath and keep it equal to the node's workloads.
    Run {
        /// cgroup v2 directory the programs attach to [default: the cgroup2
        /// mount found in /proc/self/mounts].
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// bpffs directory where maps and links are pinned.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Where the kubelet's `kubepods` cgroups live, for workloads named
        /// only by pod UID [default: the cgroup2 mount].
        #[arg(long)]
        kubepods_parent: Option<PathBuf>,
        /// Workloads file (watched; edits apply without restart).
        #[arg(long, default_value = "/etc/ambridge/workloads.yaml")]
        workloads: PathBuf,
        /// ztunnel's outbound listener port.
        #[arg(long, default_value_t = Port::ZTUNNEL_OUTBOUND.0)]
        redirect_port: u16,
        /// What to do with ztunnel's original-source (IP_TRANSPARENT)
        /// binds: `undo` where the node has no TPROXY return routing,
        /// `preserve` where istio-cni's routing is in place.
        #[arg(long, value_enum, default_value = "undo")]
        original_src: OriginalSrc,
        /// Same-node acceleration with sockmap and msg_redirect. Off by
        /// default: on Linux 6.18 a *blocking* reader of an accelerated
        /// socket can get EAGAIN on a wakeup without data (see README);
        /// turn it on where applications use non-blocking sockets.
        #[arg(long, value_enum, default_value = "off")]
        sockmap: Switch,
        /// How often the maps are re-checked against the workloads.
        #[arg(long, default_value = "5", value_name = "SECONDS")]
        resync_seconds: u64,
        /// Unix socket of the local API (mode 0600, root only).
        #[arg(long, default_value = DEFAULT_API)]
        api_socket: PathBuf,
        /// Where the node state comes from (repeat to combine; later
        /// sources replace pods of the same UID: file, then kubernetes or
        /// xds; with both kubernetes and xds, istiod only cross-checks).
        #[arg(long = "source", value_enum, default_values_t = [Source::File])]
        sources: Vec<Source>,
        /// This node's name, for `--source kubernetes` and `--source xds`.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Kubernetes API server URL [default: kubeconfig or in-cluster].
        #[arg(long)]
        kube_api: Option<String>,
        #[command(flatten)]
        xds: Box<XdsArgs>,
        /// `serve`: ambridge is the ZDS server and the only capture (no
        /// istio-cni): it hands ztunnel each enrolled pod's netns and
        /// refuses a pod's connects until ztunnel acknowledged it. `off`:
        /// istio-cni serves ZDS and ambridge accelerates beside it.
        #[arg(long, value_enum, default_value = "off")]
        zds: Zds,
        /// The ZDS socket ztunnel connects to (`INPOD_UDS` in ztunnel).
        #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
        zds_socket: PathBuf,
        #[command(flatten)]
        capture: Box<CaptureArgs>,
    },
    /// Show the daemon, its settings and the datapath counters (local API).
    Status {
        #[arg(long, default_value = DEFAULT_API)]
        api: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the node's workloads and where they stand (local API).
    Pods {
        #[arg(long, default_value = DEFAULT_API)]
        api: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Detach every program and remove every pin: traffic flows directly.
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print the datapath counters and how full the maps are (through the
    /// local API, or from the pinned maps while the daemon is down).
    Stats {
        #[arg(long, default_value = DEFAULT_API)]
        api: PathBuf,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a workloads file and print what it enrolls.
    Validate { file: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// The workloads file (`--workloads`).
    File,
    /// This node's pods and every namespace, from the Kubernetes API.
    Kubernetes,
    /// This node's workloads from istiod's workload discovery (delta ADS,
    /// `istio.workload.Address`), connecting as ztunnel does.
    Xds,
}

/// How to reach istiod, for `--source xds` (defaults: ztunnel's).
#[derive(clap::Args)]
struct XdsArgs {
    /// istiod's discovery address.
    #[arg(
        long,
        env = "XDS_ADDRESS",
        default_value = "https://istiod.istio-system.svc:15012"
    )]
    xds_address: String,
    /// The Istio root CA that istiod's certificate chains to (PEM).
    #[arg(long, default_value = "/var/run/secrets/istio/root-cert.pem")]
    xds_root_cert: PathBuf,
    /// A token of audience `istio-ca`, sent as a bearer token ("" for none).
    #[arg(long, default_value = "/var/run/secrets/tokens/istio-token")]
    xds_token: PathBuf,
    /// The name istiod's certificate must carry [default: the address's
    /// host].
    #[arg(long)]
    xds_server_name: Option<String>,
    /// The cluster's Istio id.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// This agent's pod name (in the node id istiod sees).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This agent's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pod_namespace: String,
    /// This agent's IP (in the node id istiod sees).
    #[arg(long, env = "INSTANCE_IP")]
    instance_ip: Option<String>,
}

impl XdsArgs {
    fn source(
        self,
        node_name: Option<String>,
    ) -> anyhow::Result<ambridge::sources::xds::XdsSource> {
        Ok(ambridge::sources::xds::XdsSource {
            address: self.xds_address,
            root_cert: self.xds_root_cert,
            token: (!self.xds_token.as_os_str().is_empty()).then_some(self.xds_token),
            server_name: self.xds_server_name,
            node_name: node_name
                .context("--source xds needs the node's name (--node-name or NODE_NAME)")?,
            cluster_id: self.cluster_id,
            pod_name: self
                .pod_name
                .context("--source xds needs this agent's pod name (--pod-name or POD_NAME)")?,
            pod_namespace: self.pod_namespace,
            instance_ip: self
                .instance_ip
                .context("--source xds needs this agent's IP (--instance-ip or INSTANCE_IP)")?,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Zds {
    Off,
    Serve,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// What `ambridge run` captures besides outbound TCP, and what it exempts.
#[derive(clap::Args)]
struct CaptureArgs {
    /// Send enrolled pods' DNS (UDP and TCP to port 53) to ztunnel's
    /// DNS proxy; a pod's `ambient.istio.io/dns-capture` overrides it.
    #[arg(long, value_enum, default_value = "on")]
    dns_capture: Switch,
    /// The node's own network namespace: connections to enrolled pods
    /// from its addresses (kubelet probes, host-network pods) are not
    /// captured inbound. `none`: no node address is exempt. The daemon
    /// runs with the host's network, so the default is its own.
    #[arg(long, default_value = "/proc/self/ns/net")]
    node_netns: String,
    /// Another source prefix whose connections to enrolled pods are
    /// not captured inbound (repeat for more), e.g. a prober outside
    /// the node.
    #[arg(long = "probe-source", value_name = "CIDR")]
    probe_sources: Vec<ipnet::IpNet>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an API client call on a small runtime.
fn client_value<T>(
    call: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(call)
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            cgroup_root,
            bpffs,
            kubepods_parent,
            workloads,
            redirect_port,
            original_src,
            sockmap,
            resync_seconds,
            api_socket,
            sources,
            node_name,
            kube_api,
            xds,
            zds,
            zds_socket,
            capture,
        } => {
            let CaptureArgs {
                dns_capture,
                node_netns,
                probe_sources,
            } = *capture;
            let xds = if sources.contains(&Source::Xds) {
                Some(xds.source(node_name.clone())?)
            } else {
                None
            };
            let kubernetes = if sources.contains(&Source::Kubernetes) {
                Some(daemon::KubernetesSource {
                    node_name: node_name.context(
                        "--source kubernetes needs the node's name (--node-name or NODE_NAME)",
                    )?,
                    api_url: kube_api,
                    mesh: ambridge::node::membership::MeshSettings::default(),
                })
            } else {
                None
            };
            let cgroup_root = match cgroup_root {
                Some(dir) => dir,
                None => cgroup::cgroup2_mount()?,
            };
            let kubepods_parent = match kubepods_parent {
                Some(dir) => dir,
                None => cgroup::cgroup2_mount()?,
            };
            let opts = Options {
                cgroup_root,
                kubepods_parent,
                pins: Pins::new(bpffs),
                workloads,
                settings: Settings {
                    port: Port(redirect_port),
                    original_src,
                    sockmap: sockmap == Switch::On,
                    dns_capture: dns_capture == Switch::On,
                    probe_sources,
                    inbound_fail_closed: zds == Zds::Serve,
                },
                resync: Duration::from_secs(resync_seconds.max(1)),
                api_socket,
                file_source: sources.contains(&Source::File),
                kubernetes,
                xds,
                zds_socket: (zds == Zds::Serve).then_some(zds_socket),
                node_netns: (node_netns != "none").then(|| PathBuf::from(node_netns)),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(daemon::run(opts))
        }
        Command::Status { api, json } => client_value(async move {
            let status = api::connect(&api)
                .await?
                .status(api::pb::StatusRequest {})
                .await?
                .into_inner();
            if json {
                let counters: serde_json::Map<_, _> = status
                    .counters
                    .iter()
                    .map(|c| (c.name.clone(), serde_json::Value::from(c.value)))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "version": status.version, "cgroup_root": status.cgroup_root,
                        "bpffs": status.bpffs, "state_loaded": status.state_loaded,
                        "pods": status.pods, "enrolled": status.enrolled,
                        "ztunnels": status.ztunnels, "unresolved": status.unresolved,
                        "original_src": status.original_src, "sockmap": status.sockmap,
                        "counters": counters,
                        "zds": status.zds.as_ref().map(|z| serde_json::json!({
                            "connections": z.connections, "peers_refused": z.peers_refused,
                        })),
                        "ready": status.ready,
                        "components": status.components.iter().map(|c| serde_json::json!({
                            "name": c.name, "state": c.state, "last_error": c.last_error,
                            "restarts": c.restarts, "since_unix_seconds": c.since_unix_seconds,
                        })).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!("ambridge {}", status.version);
                println!(
                    "  ready         {}",
                    if status.ready { "yes" } else { "no" }
                );
                println!("  cgroup root   {}", status.cgroup_root);
                println!("  bpffs         {}", status.bpffs);
                println!(
                    "  node state    {}",
                    if status.state_loaded {
                        "loaded"
                    } else {
                        "not loaded yet"
                    }
                );
                println!(
                    "  pods          {} ({} enrolled, {} not in the datapath yet)",
                    status.pods, status.enrolled, status.unresolved
                );
                println!("  ztunnels      {}", status.ztunnels);
                println!("  original-src  {}", status.original_src);
                println!(
                    "  sockmap       {}",
                    if status.sockmap { "on" } else { "off" }
                );
                match &status.zds {
                    Some(z) => println!(
                        "  zds           serving: {} ztunnel connections, {} peers refused",
                        z.connections, z.peers_refused
                    ),
                    None => println!("  zds           off (istio-cni serves it)"),
                }
                println!("components");
                for c in &status.components {
                    let since = std::time::UNIX_EPOCH
                        .checked_add(Duration::from_secs(c.since_unix_seconds))
                        .and_then(|t| t.elapsed().ok())
                        .map_or_else(String::new, |ago| format!(", for {}s", ago.as_secs()));
                    let error = if c.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(", last error: {}", c.last_error)
                    };
                    println!(
                        "  {:<16} {:<9} {} restarts{since}{error}",
                        c.name, c.state, c.restarts
                    );
                }
                println!("counters");
                for c in status.counters {
                    println!("  {:<28} {}", c.name, c.value);
                }
            }
            Ok(())
        }),
        Command::Pods { api, json } => client_value(async move {
            let pods = api::connect(&api)
                .await?
                .list_pods(api::pb::ListPodsRequest {})
                .await?
                .into_inner()
                .pods;
            if json {
                let rows: Vec<_> = pods
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "uid": p.uid, "namespace": p.namespace, "name": p.name,
                            "mode": p.mode, "ips": p.ips, "cgroup": p.cgroup,
                            "cgroup_id": p.cgroup_id, "in_datapath": p.in_datapath,
                            "accelerated": p.accelerated, "held": p.held,
                            "inbound": p.inbound, "dns_captured": p.dns_captured,
                            "problem": p.problem,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<16} {:<24} {:<8} {:<11} {:<9} {:<4} {:<5} {:<32} PROBLEM",
                    "NAMESPACE", "NAME", "MODE", "DATAPATH", "INBOUND", "DNS", "ACCEL", "IPS"
                );
                for p in pods {
                    println!(
                        "{:<16} {:<24} {:<8} {:<11} {:<9} {:<4} {:<5} {:<32} {}",
                        p.namespace,
                        p.name,
                        p.mode,
                        match (p.in_datapath, p.held) {
                            (false, _) => "not yet",
                            (true, true) => "held",
                            (true, false) => "in",
                        },
                        p.inbound,
                        if p.dns_captured { "yes" } else { "no" },
                        if p.accelerated { "yes" } else { "no" },
                        p.ips.join(","),
                        p.problem
                    );
                }
            }
            Ok(())
        }),
        Command::Uninstall { bpffs } => {
            let removed = datapath::uninstall(&Pins::new(&bpffs))?;
            if removed.links.is_empty() && removed.maps.is_empty() {
                println!("nothing installed under {}", bpffs.display());
            } else {
                println!(
                    "detached {} ({}) and removed {} maps from {}",
                    removed.links.len(),
                    removed.links.join(", "),
                    removed.maps.len(),
                    bpffs.display()
                );
            }
            Ok(())
        }
        Command::Stats { api, bpffs, json } => {
            // The daemon's API first; the pinned maps when it is down (the
            // datapath keeps working without it, and so does this).
            let from_api: anyhow::Result<(NamedValues, NamedValues)> = client_value(async {
                let s = api::connect(&api)
                    .await?
                    .status(api::pb::StatusRequest {})
                    .await?
                    .into_inner();
                let pairs =
                    |v: Vec<api::pb::Counter>| v.into_iter().map(|c| (c.name, c.value)).collect();
                Ok((pairs(s.counters), pairs(s.map_entries)))
            });
            let (counters, maps, source) = match from_api {
                Ok((c, m)) => (c, m, "the daemon's API".to_string()),
                Err(e) => {
                    let pins = Pins::new(&bpffs);
                    let counters = datapath::read_counters(&pins).with_context(|| {
                        format!("daemon not reachable ({e:#}), and reading counters pinned under {} failed", bpffs.display())
                    })?;
                    let maps = datapath::map_occupancy(&pins).with_context(|| {
                        format!("reading maps pinned under {}", bpffs.display())
                    })?;
                    (
                        counters
                            .into_iter()
                            .map(|(c, v)| (c.name().to_string(), v))
                            .collect(),
                        maps.into_iter()
                            .map(|(n, v)| (n.to_string(), v as u64))
                            .collect(),
                        format!(
                            "pinned maps under {} (daemon not reachable)",
                            bpffs.display()
                        ),
                    )
                }
            };
            if json {
                let obj = |v: &[(String, u64)]| -> serde_json::Map<String, serde_json::Value> {
                    v.iter()
                        .map(|(k, n)| (k.clone(), serde_json::Value::from(*n)))
                        .collect()
                };
                println!(
                    "{}",
                    serde_json::json!({"counters": obj(&counters), "map_entries": obj(&maps), "source": source})
                );
            } else {
                println!("from {source}");
                println!("counters");
                for (name, v) in counters {
                    println!("  {name:<28} {v}");
                }
                println!("map entries");
                for (name, n) in maps {
                    println!("  {name:<28} {n}");
                }
            }
            Ok(())
        }
        Command::Validate { file } => {
            let spec = file::load(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for pod in &spec.pods {
                let cgroup = match &pod.cgroup {
                    PodCgroup::Path(path) => path.display().to_string(),
                    PodCgroup::Uid => "(from the pod UID)".to_string(),
                    PodCgroup::Address => "(from the pod's addresses)".to_string(),
                };
                println!(
                    "pod {}/{} uid={} mode={:?} cgroup={cgroup}",
                    pod.namespace, pod.name, pod.uid, pod.mode
                );
            }
            for z in &spec.ztunnels {
                println!("ztunnel cgroup={:?}", z.cgroup);
            }
            Ok(())
        }
    }
}
