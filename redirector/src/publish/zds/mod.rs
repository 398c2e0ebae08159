//! ZDS, the protocol by which the node agent hands each pod's network
//! namespace to ztunnel over a unix socket. ambridge is the server: it
//! listens, ztunnel connects. [`wire`] speaks the protocol, [`server`]
//! keeps the connections, and [`Publisher`] hands the server what each
//! reconcile placed.

pub mod server;
pub mod wire;

use tokio::sync::watch;

use super::{Publish, Reconciled};
use crate::{node::desired::Touched, node::spec::Mode, types::WorkloadId};

/// Where the ZDS server is told which pods to hand ztunnel and which
/// cgroups are ztunnel.
pub struct Publisher {
    pub pods: watch::Sender<server::Pods>,
    /// Whether the published pods are every source's (each has delivered
    /// since the daemon started): until then a ztunnel's snapshot stays
    /// open, so it drops none of the pods an unsynced source may hold.
    pub pods_complete: watch::Sender<bool>,
    /// The ztunnel cgroups, the only ones allowed to speak ZDS.
    pub ztunnels: watch::Sender<server::ZtunnelCgroups>,
}

impl Publish for Publisher {
    fn reconciled(&mut self, r: &Reconciled) {
        let ztunnels = Some(r.desired.ztunnel_cgroups.clone());
        self.ztunnels.send_if_modified(|current| {
            let changed = *current != ztunnels;
            *current = ztunnels;
            changed
        });
        let before: Vec<WorkloadId> = match r.republish {
            Touched::All => self.pods.borrow().keys().cloned().collect(),
            Touched::Pods(_) => Vec::new(),
        };
        let uids = r.uids(before.iter());
        self.pods.send_if_modified(|current| {
            let mut changed = false;
            for uid in uids {
                match pod(r, uid) {
                    Some(pod) if current.get(uid) != Some(&pod) => {
                        current.insert(uid.clone(), pod);
                        changed = true;
                    }
                    Some(_) => {}
                    // ztunnel keeps the pods an unsynced source may still
                    // hold.
                    None if r.complete => changed |= current.remove(uid).is_some(),
                    None => {}
                }
            }
            changed
        });
        // After the pods: a snapshot ends with them all.
        self.pods_complete.send_if_modified(|complete| {
            let changed = *complete != r.complete;
            *complete = r.complete;
            changed
        });
    }
}

/// The pod `uid` as handed to ztunnel: an enrolled pod of the in-pod
/// model whose cgroup is known.
fn pod(r: &Reconciled, uid: &WorkloadId) -> Option<server::ZdsPod> {
    if r.node.redirect.is_some() {
        return None;
    }
    let p = r.pods.get(uid).filter(|p| p.mode == Mode::Ambient)?;
    let (cgroup, _) = r.desired.placed.get(uid)?;
    Some(server::ZdsPod {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service_account: p.service_account.clone(),
        cgroup: cgroup.clone(),
        netns_file: p.netns.clone(),
        netns: r.desired.pod_netns.get(uid).copied(),
    })
}
