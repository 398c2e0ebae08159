//! Newtypes for the identifiers and numbers that travel between modules, so a
//! cgroup id is never mistaken for a cookie or a port for a count.

use std::fmt;

use serde::Deserialize;

/// A Kubernetes pod UID.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(transparent)]
pub struct PodUid(pub String);

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
