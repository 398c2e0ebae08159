//! The feeds of node state. Each yields its view of the node (a snapshot,
//! or a delta the daemon folds in) and says when it has delivered once:
//! until every configured source has, nothing is deleted on its behalf.
//!
//! - [`file`]: the workloads file, watched;
//! - [`kubernetes`]: watches of this node's pods, every namespace and
//!   ztunnel's DaemonSet;
//! - [`xds`]: istiod's workload discovery (`istio.workload.Address`);
//! - [`push`]: entries pushed through the local API;
//! - [`cni`]: the sandboxes the chained CNI plugin reports.

pub mod cni;
pub mod file;
pub mod kubernetes;
pub mod push;
pub mod xds;

/// The error for a bad field of an API request, naming it.
fn invalid(field: &str, message: String) -> tonic::Status {
    tonic::Status::invalid_argument(format!("{field}: {message}"))
}
