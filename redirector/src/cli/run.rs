//! `ambridge run`: the node agent.

use std::{path::PathBuf, time::Duration};

use ambridge::{
    daemon::{self, Options},
    datapath::Pins,
    host::cgroup,
    node::spec::{OriginalSrc, Settings, SidecarSettings},
    types::Port,
};
use anyhow::Context as _;

use super::{DEFAULT_API, DEFAULT_BPFFS};

/// Install the datapath and keep it equal to the node's workloads.
#[derive(clap::Args)]
pub struct Run {
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
    /// How often the maps are re-checked against the workloads, and pods
    /// not (fully) found yet are looked for again.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    resync_seconds: u64,
    /// How often every pod's cgroup and sandbox are looked up again and the
    /// kernel's maps read again, rather than taken as found before (a pod's
    /// cgroup or sandbox recreated without any feed saying so is noticed
    /// at the latest then).
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    full_resync_seconds: u64,
    /// Unix socket of the local API (mode 0600, root only).
    #[arg(long, default_value = DEFAULT_API)]
    api_socket: PathBuf,
    /// Where Prometheus metrics (`/metrics`) and the health probes
    /// (`/healthz`, `/readyz`) are served over HTTP, as `ADDRESS:PORT`
    /// (the pod IP, or `0.0.0.0`; an IPv6 address with or without
    /// brackets); `off` serves none.
    #[arg(long, default_value = "0.0.0.0:15014", value_parser = monitoring_address)]
    monitoring_address: Monitoring,
    #[command(flatten)]
    cni: CniArgs,
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
}

impl Run {
    pub fn run(self) -> anyhow::Result<()> {
        let Run {
            cgroup_root,
            bpffs,
            kubepods_parent,
            workloads,
            redirect_port,
            original_src,
            sockmap,
            resync_seconds,
            full_resync_seconds,
            api_socket,
            monitoring_address,
            cni,
            sources,
            node_name,
            kube_api,
            xds,
            zds,
            zds_socket,
            capture,
        } = self;

        let CaptureArgs {
            dns_capture,
            node_netns,
            probe_sources,
            sidecar,
            sidecar_proxy_uid,
            sidecar_proxy_gid,
            sidecar_dns_capture,
        } = *capture;
        let sidecar = (sidecar == Switch::On).then_some(SidecarSettings {
            uid: sidecar_proxy_uid,
            gid: sidecar_proxy_gid,
            dns_capture: sidecar_dns_capture == Switch::On,
        });
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
                mesh: ambridge::node::membership::MeshSettings {
                    sidecar: sidecar.is_some(),
                    ..Default::default()
                },
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
        let cni_install = cni.install(&api_socket)?;
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
                sidecar,
            },
            resync: Duration::from_secs(resync_seconds.max(1)),
            full_resync: Duration::from_secs(full_resync_seconds.max(1)),
            api_socket,
            monitoring: monitoring_address.0,
            cni_install,
            file_source: sources.contains(&Source::File),
            kubernetes,
            xds,
            zds_socket: (zds == Zds::Serve).then_some(zds_socket),
            node_netns: (node_netns != "none").then(|| PathBuf::from(node_netns)),
        };
        // The controller's loop runs on this thread (`block_on`), and the
        // sources, the local API and the ZDS server on two workers: a long
        // reconcile (cgroupfs and procfs reads, setns threads, map writes)
        // never stalls ztunnel's socket or the API.
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ambridge-worker")
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(daemon::run(opts))
    }
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

/// Where the daemon installs the chained CNI plugin, if it does.
#[derive(clap::Args)]
struct CniArgs {
    /// Install `ambridge-cni` into this CNI bin directory (the node's, as
    /// mounted where the daemon runs: `/host/opt/cni/bin` in deploy/'s
    /// DaemonSet) and keep its entry last in the conflist of
    /// `--cni-conf-dir`.
    #[arg(long, requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// The CNI configuration directory whose first conflist (by name, as
    /// the runtime loads it) gets the plugin's entry.
    #[arg(long, requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// The plugin binary to install [default: `ambridge-cni` beside this
    /// executable].
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
}

impl CniArgs {
    fn install(
        self,
        api_socket: &std::path::Path,
    ) -> anyhow::Result<Option<ambridge::cni::install::Install>> {
        let (Some(bin_dir), Some(conf_dir)) = (self.cni_bin_dir, self.cni_conf_dir) else {
            return Ok(None);
        };
        let binary = match self.cni_plugin {
            Some(path) => path,
            None => std::env::current_exe()
                .context("finding this executable, beside which ambridge-cni is")?
                .with_file_name(ambridge::cni::install::PLUGIN_TYPE),
        };
        Ok(Some(ambridge::cni::install::Install::new(
            bin_dir,
            conf_dir,
            binary,
            api_socket.to_path_buf(),
        )))
    }
}

/// `--monitoring-address`: an address, or none for `off`.
#[derive(Clone, Copy, Debug)]
struct Monitoring(Option<std::net::SocketAddr>);

fn monitoring_address(s: &str) -> Result<Monitoring, String> {
    if s == "off" {
        return Ok(Monitoring(None));
    }
    // `$(INSTANCE_IP):15014` in a manifest gives an IPv6 pod IP without
    // brackets: the port is after the last colon.
    let unbracketed = || {
        let (ip, port) = s.rsplit_once(':')?;
        Some(std::net::SocketAddr::new(
            ip.parse().ok()?,
            port.parse().ok()?,
        ))
    };
    s.parse()
        .ok()
        .or_else(unbracketed)
        .map(|a| Monitoring(Some(a)))
        .ok_or_else(|| {
            format!("{s:?}: expected ADDRESS:PORT (e.g. 0.0.0.0:15014, [::]:15014, fd00::1:15014) or off")
        })
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
    /// The sidecar-mode fallback: capture sidecar-injected pods' outbound
    /// TCP to their own proxy (15001 in the pod), by Istio's
    /// `traffic.sidecar.istio.io/` annotations, as istio-init's iptables
    /// would. Off: such pods are left alone.
    #[arg(long, value_enum, default_value = "off")]
    sidecar: Switch,
    /// The uid sidecar proxies run as (Istio's `ISTIO_PROXY_UID`): their
    /// sockets are never captured.
    #[arg(long, default_value_t = 1337)]
    sidecar_proxy_uid: u32,
    /// The gid sidecar proxies run as (`ISTIO_PROXY_GID`).
    #[arg(long, default_value_t = 1337)]
    sidecar_proxy_gid: u32,
    /// Send sidecar-captured pods' DNS (UDP and TCP to port 53) to their
    /// istio-agent's DNS proxy (127.0.0.1:15053); a pod's
    /// `proxy.istio.io/config` `proxyMetadata.ISTIO_META_DNS_CAPTURE`
    /// overrides it.
    #[arg(long, value_enum, default_value = "off")]
    sidecar_dns_capture: Switch,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monitoring_address_takes_either_family_bracketed_or_not() {
        let parsed = |s| monitoring_address(s).map(|m| m.0.map(|a| a.to_string()));
        assert_eq!(parsed("10.0.0.1:15014"), Ok(Some("10.0.0.1:15014".into())));
        assert_eq!(
            parsed("[fd00::1]:15014"),
            Ok(Some("[fd00::1]:15014".into()))
        );
        assert_eq!(parsed("fd00::1:15014"), Ok(Some("[fd00::1]:15014".into())));
        assert_eq!(parsed("off"), Ok(None));
        for bad in [
            "10.0.0.1",
            "fd00::1",
            ":15014",
            "node:15014",
            "10.0.0.1:99999",
        ] {
            let e = parsed(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("ADDRESS:PORT"), "{e}");
        }
    }
}
