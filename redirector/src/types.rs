//! Newtypes for the identifiers and numbers that travel between modules, so a
//! cgroup id is never mistaken for a cookie or a port for a count.

use std::{fmt, sync::Arc};

/// The hasher of the daemon's in-memory maps. Their keys (paths, UIDs,
/// addresses) come from root's files, the kubelet and the API server, and
/// a reconcile at 10,000 pods hashes tens of thousands of them: foldhash
/// (seeded per map) instead of SipHash, whose resistance to chosen keys
/// costs several times as much a key.
pub type FastHash = foldhash::fast::RandomState;

use serde::Deserialize;

/// A Kubernetes pod UID (`metadata.uid`): what the API server, the
/// kubelet's cgroup layout, the CNI runtime and the workloads file name a
/// pod by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(transparent)]
pub struct PodUid(pub Arc<str>);

impl PodUid {
    pub fn new(uid: impl Into<Arc<str>>) -> Self {
        Self(uid.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `uid` may name a Kubernetes pod: never with a `/`, which
    /// istiod's workload names (`<cluster>//Pod/<namespace>/<name>`) have,
    /// so the two kinds of [`WorkloadId`] never meet on the wire.
    pub fn may_be(uid: &str) -> bool {
        !uid.contains('/')
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a workload is, as the feed that names it knows it. A workload
/// named by istiod is never the same key as one named by its Kubernetes
/// UID: istiod's workload discovery does not carry the UID, so such a pod
/// is found by its addresses, and a CNI sandbox (named by UID) never
/// attaches to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadId {
    /// A Kubernetes pod, by UID.
    Kubernetes(PodUid),
    /// A workload as istiod's workload discovery names it
    /// (`<cluster>//Pod/<namespace>/<name>`).
    Istio(Arc<str>),
}

impl WorkloadId {
    /// A Kubernetes pod by UID.
    pub fn kubernetes(uid: impl Into<Arc<str>>) -> Self {
        Self::Kubernetes(PodUid::new(uid))
    }

    /// The Kubernetes pod UID, when this workload has one.
    pub fn pod_uid(&self) -> Option<&PodUid> {
        match self {
            Self::Kubernetes(uid) => Some(uid),
            Self::Istio(_) => None,
        }
    }

    /// The id as it goes on the wire (ZDS's `uid`, the API's `uid`).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Kubernetes(uid) => uid.as_str(),
            Self::Istio(name) => name,
        }
    }
}

impl From<PodUid> for WorkloadId {
    fn from(uid: PodUid) -> Self {
        Self::Kubernetes(uid)
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cgroup v2 id: the inode number of the cgroup's directory, which is what
/// `bpf_get_current_ancestor_cgroup_id` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CgroupId(pub u64);

impl fmt::Display for CgroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A TCP port, host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(transparent)]
pub struct Port(pub u16);

impl Port {
    /// ztunnel's outbound capture listener.
    pub const ZTUNNEL_OUTBOUND: Port = Port(15001);
    /// A sidecar proxy's (Envoy's) outbound capture listener.
    pub const SIDECAR_OUTBOUND: Port = Port(15001);
    /// ztunnel's inbound plaintext listener.
    pub const ZTUNNEL_INBOUND_PLAINTEXT: Port = Port(15006);
    /// ztunnel's inbound HBONE listener.
    pub const ZTUNNEL_HBONE: Port = Port(15008);
    /// ztunnel's DNS proxy (UDP and TCP, on the pod's loopback).
    pub const ZTUNNEL_DNS: Port = Port(15053);
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A network namespace cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsCookie(pub u64);

impl fmt::Display for NetnsCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
