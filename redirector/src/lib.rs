//! ambridge: eBPF traffic capture for Istio Ambient.
//!
//! Shape: sources (the [`workloads`] file, [`kubernetes`], istiod's
//! workload discovery [`xds`], pushes through the local [`api`], sandboxes from the
//! [`cni`] plugin) produce one
//! [`state::NodeSpec`]; pure decisions ([`membership`], [`enroll`],
//! [`reconcile`]) turn it into the map contents the kernel programs need;
//! [`datapath`] owns the programs, links and maps. In replacement mode
//! [`zds`] hands ztunnel the enrolled pods and reports which it has.

pub mod api;
pub mod cgroup;
pub mod cni;
pub mod daemon;
pub mod datapath;
pub mod enroll;
pub mod kubernetes;
pub mod local_socket;
pub mod membership;
pub mod netns;
pub mod pb;
pub mod reconcile;
pub mod state;
pub mod supervise;
pub mod types;
pub mod workloads;
pub mod xds;
pub mod zds;
