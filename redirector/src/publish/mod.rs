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
    node::{
        desired::{Desired, Touched},
        spec::{NodeSpec, PodMap},
    },
    sources::kubernetes,
    types::WorkloadId,
};

/// What one reconcile brought the datapath to.
pub struct Reconciled<'a> {
    /// The node's ztunnels and shared redirect (its pods are `pods`).
    pub node: &'a NodeSpec,
    pub pods: &'a PodMap,
    /// The pods whose state may differ from the last reconcile's: a
    /// publisher looks at these only.
    pub republish: &'a Touched,
    pub desired: &'a Desired,
    /// Whether every configured source has delivered since the daemon
    /// started (before, what an unsynced source may hold is kept).
    pub complete: bool,
    /// With `--zds serve`: the pods ztunnel serves.
    pub acknowledged: Option<&'a BTreeSet<WorkloadId>>,
    /// The Kubernetes feed's last snapshot, if it is a source.
    pub kubernetes: Option<&'a kubernetes::Snapshot>,
    /// From the reconcile's start to its changes written into the maps.
    pub applied_in: std::time::Duration,
}

impl Reconciled<'_> {
    /// The UIDs to look at again: the republished pods, or every pod of
    /// this reconcile and of `before` (what the publisher last had).
    pub fn uids<'b>(
        &'b self,
        before: impl Iterator<Item = &'b WorkloadId>,
    ) -> BTreeSet<&'b WorkloadId> {
        match self.republish {
            Touched::Pods(uids) => uids.iter().collect(),
            Touched::All => self.pods.keys().chain(before).collect(),
        }
    }
}

/// A subscriber to the controller's reconciles.
pub trait Publish {
    fn reconciled(&mut self, r: &Reconciled);
}
