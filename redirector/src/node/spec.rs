//! The node state every feed contributes to: which pods are on this node,
//! which cgroups are ztunnel, and how connects are redirected.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    node::sidecar::SidecarRules,
    types::{PodUid, Port, WorkloadId},
};

/// Pods by workload id. A pod is shared, not copied, between the source
/// that gave it, the merged state and the publishers: one copy per holder
/// was megabytes at 10,000 pods. A pod the CNI plugin completes (its
/// sandbox's namespace and addresses) is merged into a copy of its own.
pub type PodMap = BTreeMap<WorkloadId, Arc<PodSpec>>;

/// Gives each pod of `new` that equals its entry in `old` that entry: a
/// source that rebuilds its whole map (a relist, a full parse, istiod's
/// next push) keeps the copy the merged state and the publishers hold
/// rather than a second one beside it.
pub fn keep_shared(new: &mut PodMap, old: &PodMap) {
    for (uid, pod) in new.iter_mut() {
        if let Some(was) = old.get(uid)
            && !Arc::ptr_eq(was, pod)
            && was == pod
        {
            *pod = was.clone();
        }
    }
}

/// Whether a pod is in the mesh, as its feed decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Captured by ztunnel.
    Ambient,
    /// Explicitly out of the mesh.
    None,
    /// Sidecar-injected, captured to its own proxy (`--sidecar=on`), by
    /// the rules in its [`CaptureOverrides::sidecar`].
    Sidecar,
}

/// One pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub uid: WorkloadId,
    pub name: String,
    pub namespace: String,
    /// Its Kubernetes service account (`default` when not set), handed to
    /// ztunnel with the pod over ZDS.
    pub service_account: String,
    /// Where its pod-level cgroup v2 directory is.
    pub cgroup: PodCgroup,
    /// Its network namespace's file, where a source knows it (the CNI
    /// plugin's `CNI_NETNS`, before any process runs in the pod); otherwise
    /// the namespace of the sandbox process in its cgroup.
    pub netns: Option<PathBuf>,
    pub ips: Vec<IpAddr>,
    pub mode: Mode,
    /// Same-node acceleration for this pod, overriding the node's
    /// `--sockmap`: opt in pods whose applications use non-blocking
    /// sockets, or opt out those that block.
    pub accelerate: Option<bool>,
    /// Its capture overrides (Istio's per-pod annotations).
    pub capture: CaptureOverrides,
    /// Why this is the pod's last good state and not what its source says
    /// now (a malformed annotation, named with its value); shown with the
    /// pod until the source says something usable again.
    pub kept_because: Option<Arc<str>>,
}

/// A pod's own say on what is captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureOverrides {
    /// Inbound TCP goes through ztunnel; false under
    /// `ambient.istio.io/bypass-inbound-capture: "true"`.
    pub inbound: bool,
    /// `ambient.istio.io/dns-capture`, when the pod sets it; the node's
    /// `--dns-capture` otherwise.
    pub dns: Option<bool>,
    /// A [`Mode::Sidecar`] pod's outbound rules, from its
    /// `traffic.sidecar.istio.io/` annotations; `None`: Istio's defaults
    /// (every destination captured), as most pods have.
    pub sidecar: Option<Arc<SidecarRules>>,
    /// A [`Mode::Sidecar`] pod's proxy container, by the runtime's ID for
    /// it, where its source knows it: its cgroup, not the proxy's uid,
    /// then tells the proxy's sockets apart (a uid is shared by anything
    /// running as it).
    pub sidecar_proxy: Option<Arc<str>>,
}

impl Default for CaptureOverrides {
    fn default() -> Self {
        Self {
            inbound: true,
            dns: None,
            sidecar: None,
            sidecar_proxy: None,
        }
    }
}

impl PodSpec {
    pub fn ip4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }
}

/// A pod's service account as a feed gives it: Kubernetes's `default` when
/// it gives none (or an empty one, as istiod elides it).
pub fn service_account_or_default(given: Option<String>) -> String {
    given
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// How a pod's cgroup is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodCgroup {
    /// This directory (shared with the desired state that places the pod
    /// there).
    Path(Arc<Path>),
    /// From the pod's UID (a Kubernetes pod UID), in the kubelet's layout.
    Uid,
    /// The kubelet pod cgroup whose network namespace holds the pod's IPs:
    /// for feeds that do not know the Kubernetes UID (istiod's workload
    /// discovery names pods `<cluster>//Pod/<namespace>/<name>`).
    Address,
}

/// Where a cgroup is: a directory, or the pod-level cgroup of a pod UID in
/// the kubelet's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupRef {
    Path(PathBuf),
    Pod(PodUid),
}

/// One ztunnel on this node (two during an upgrade).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZtunnelSpec {
    pub cgroup: CgroupRef,
    /// It relays with `splice(2)`, which cannot read what `msg_redirect`
    /// delivers: keep its connections out of the sockhash.
    pub zero_copy: bool,
}

/// The shared-ztunnel model (Istio 1.18-1.20, the original Merbridge ambient
/// work): ztunnel has its own IPs, and every enrolled pod's connects go there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedRedirect {
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    /// Overrides the node's `--redirect-port`.
    pub port: Option<Port>,
}

/// Everything the datapath is derived from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSpec {
    pub pods: Vec<PodSpec>,
    pub ztunnels: Vec<ZtunnelSpec>,
    /// `None`: the in-pod model, each pod redirects to its own IP.
    pub redirect: Option<SharedRedirect>,
}

/// Which enrolled pods ztunnel serves. Observed (what ztunnel acknowledged
/// over ZDS), so an input beside the [`NodeSpec`], never part of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Readiness {
    /// Nothing gates the pods: istio-cni talks to ztunnel, or the shared
    /// model, where one ztunnel takes no pods.
    #[default]
    Ungated,
    /// With ambridge serving ZDS: the pods ztunnel acknowledged. Other
    /// enrolled pods are held (their connects refused) until it does.
    Acknowledged(BTreeSet<WorkloadId>),
}

impl Readiness {
    /// Whether the enrolled pod `uid` is held until ztunnel acknowledges it.
    pub fn holds(&self, uid: &WorkloadId) -> bool {
        match self {
            Readiness::Ungated => false,
            Readiness::Acknowledged(ready) => !ready.contains(uid),
        }
    }
}

impl NodeSpec {
    /// Whether the node's proxy relays with `splice(2)`. With two ztunnels
    /// (an upgrade) either one being zero-copy is enough: a pod may be
    /// served by both.
    pub fn zero_copy(&self) -> bool {
        self.ztunnels.iter().any(|z| z.zero_copy)
    }
}

/// What to do with a ztunnel's original-source binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OriginalSrc {
    /// Rewrite them to the netns's own address (no TPROXY routing needed);
    /// the application still sees the client IP through `getpeername()`.
    Undo,
    /// Leave them alone: istio-cni's return routing is in place.
    Preserve,
}

/// Node-wide datapath settings (command-line flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// ztunnel's outbound listener port.
    pub port: Port,
    pub original_src: OriginalSrc,
    /// Same-node acceleration with sockmap + `msg_redirect` (off by
    /// default, see `--sockmap`).
    pub sockmap: bool,
    /// Enrolled pods' DNS goes to ztunnel's DNS proxy unless a pod says
    /// otherwise (`--dns-capture`, on by default as in Istio).
    pub dns_capture: bool,
    /// Sources whose connections to enrolled pods are never captured
    /// inbound, besides the node's own addresses (`--probe-source`).
    pub probe_sources: Vec<ipnet::IpNet>,
    /// ambridge is the only capture (`--zds serve`): inbound connections
    /// ztunnel cannot take are refused rather than left to istio-cni's
    /// rules.
    pub inbound_fail_closed: bool,
    /// The sidecar-mode fallback (`--sidecar=on`): how sidecar proxies
    /// are told apart; `None` when off, and [`Mode::Sidecar`] pods are
    /// captured by nothing.
    pub sidecar: Option<SidecarSettings>,
}

/// The sidecar-mode fallback's settings: who a sidecar-captured pod's
/// proxy is, besides its own container's cgroup (Istio's `ISTIO_PROXY_UID`
/// and `ISTIO_PROXY_GID`), and whether its DNS is captured when its proxy
/// config does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SidecarSettings {
    pub uid: u32,
    pub gid: u32,
    /// `--sidecar-dns-capture` (off by default, as in Istio).
    pub dns_capture: bool,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self {
            uid: 1337,
            gid: 1337,
            dns_capture: false,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            port: Port::ZTUNNEL_OUTBOUND,
            original_src: OriginalSrc::Undo,
            sockmap: false,
            dns_capture: true,
            probe_sources: Vec::new(),
            inbound_fail_closed: false,
            sidecar: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuilt_map_keeps_the_shared_copy_of_each_unchanged_pod() {
        let pod = |name: &str| Arc::new(fixtures::pod("a", name));
        let uid = WorkloadId::kubernetes("a");
        let old: PodMap = [(uid.clone(), pod("a"))].into();
        let mut same: PodMap = [(uid.clone(), pod("a"))].into();
        keep_shared(&mut same, &old);
        assert!(Arc::ptr_eq(&same[&uid], &old[&uid]));
        let mut renamed: PodMap = [(uid.clone(), pod("b"))].into();
        keep_shared(&mut renamed, &old);
        assert_eq!(renamed[&uid].name, "b");
    }
}

/// Fixtures for the unit tests of the modules that take node state.
#[cfg(test)]
pub mod fixtures {
    use super::*;

    /// An ambient pod in `default`, found by its UID, with no address.
    pub fn pod(uid: &str, name: &str) -> PodSpec {
        PodSpec {
            kept_because: None,
            uid: WorkloadId::kubernetes(uid),
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: PodCgroup::Uid,
            netns: None,
            ips: vec![],
            mode: Mode::Ambient,
            accelerate: None,
            capture: Default::default(),
        }
    }
}
