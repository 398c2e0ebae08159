//! What the controller's reconciles are published to. Each publisher gets
//! every [`Reconciled`], in order, once its maps are written; none touches a
//! map or cgroupfs.
//!
//! - [`zds`]: the ZDS server, handing ztunnel each enrolled pod's netns
//!   (and reporting back which pods ztunnel has: the readiness input);
//! - [`annotator`]: `ambient.istio.io/redirection` on each pod, through
//!   `pods/status`, as istio-cni writes it;
//! - [`crate::api::view`]: the local API's view and watch stream.

pub mod annotator;
pub mod zds;

use std::collections::BTreeSet;

use crate::{
    node::{desired::Desired, spec::NodeSpec},
    sources::kubernetes,
    types::PodUid,
};

/// What one reconcile brought the datapath to.
pub struct Reconciled<'a> {
    pub spec: &'a NodeSpec,
    pub desired: &'a Desired,
    /// Whether every configured source has delivered since the daemon
    /// started (before, what an unsynced source may hold is kept).
    pub complete: bool,
    /// With `--zds serve`: the pods ztunnel serves.
    pub acknowledged: Option<&'a BTreeSet<PodUid>>,
    /// The Kubernetes feed's last snapshot, if it is a source.
    pub kubernetes: Option<&'a kubernetes::Snapshot>,
}

/// A subscriber to the controller's reconciles.
pub trait Publish {
    fn reconciled(&mut self, r: &Reconciled);
}
