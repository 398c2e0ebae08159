//! ambridge: eBPF traffic capture for Istio Ambient.
//!
//! Shape: sources ([`workloads`] file today) produce a [`state::NodeSpec`];
//! pure decisions ([`enroll`], [`reconcile`]) turn it into the map contents
//! the kernel programs need; [`datapath`] owns the programs, links and maps.

pub mod api;
pub mod cgroup;
pub mod daemon;
pub mod datapath;
pub mod enroll;
pub mod kubernetes;
pub mod membership;
pub mod netns;
pub mod pb;
pub mod reconcile;
pub mod state;
pub mod types;
pub mod workloads;
pub mod xds;
pub mod zds;
