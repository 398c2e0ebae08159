//! ambridge: eBPF traffic capture for Istio Ambient.
//!
//! The folders follow a pod from a feed to the kernel:
//!
//! - [`sources`]: each feed (the workloads file, Kubernetes, istiod's
//!   workload discovery, pushes through the local API, sandboxes from the
//!   CNI plugin) yields its view of the node and says when it is synced;
//! - [`node`]: pure decisions, no I/O: the feeds merged into one
//!   [`node::spec::NodeSpec`], Istio's enrollment rules, and the map
//!   contents the kernel programs need ([`node::desired`]);
//! - [`host`]: what the decisions look up on the live system (cgroup ids,
//!   network namespace cookies and addresses);
//! - [`controller`]: the one loop that turns inputs into the desired
//!   datapath, applies the difference, and publishes what it reconciled;
//! - [`datapath`]: the only owner of the programs, links and maps;
//! - [`publish`] and [`api`]: what the rest of the world sees (ZDS for
//!   ztunnel, the redirection annotation, the local API's view).
//!
//! [`daemon`] wires them together, once [`capabilities`] has checked that
//! the process may; [`cni`] is the chained plugin the container runtime
//! runs.

pub mod api;
pub mod capabilities;
pub mod cni;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod heap;
pub mod host;
pub mod local_socket;
pub mod node;
pub mod pb;
pub mod publish;
pub mod sources;
pub mod supervise;
pub mod types;
