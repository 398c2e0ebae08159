//! The node state every feed contributes to: which pods are on this node,
//! which cgroups are ztunnel, and how connects are redirected.

use std::{net::IpAddr, path::PathBuf};

use crate::types::{PodUid, Port};

/// Whether a pod is in the mesh, as its feed decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Captured by ztunnel.
    Ambient,
    /// Explicitly out of the mesh.
    None,
}

/// One pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub uid: PodUid,
    pub name: String,
    pub namespace: String,
    /// The pod-level cgroup v2 directory.
    pub cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
    pub mode: Mode,
}

/// One ztunnel on this node (two during an upgrade).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZtunnelSpec {
    pub cgroup: PathBuf,
}

/// Everything the datapath is derived from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSpec {
    pub pods: Vec<PodSpec>,
    pub ztunnels: Vec<ZtunnelSpec>,
}

/// How redirected connects are addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectSettings {
    /// ztunnel's outbound listener port.
    pub port: Port,
}

impl Default for RedirectSettings {
    fn default() -> Self {
        Self {
            port: Port::ZTUNNEL_OUTBOUND,
        }
    }
}
