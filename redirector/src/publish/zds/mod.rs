//! ZDS, the protocol by which the node agent hands each pod's network
//! namespace to ztunnel over a unix socket. ambridge is the server: it
//! listens, ztunnel connects. [`wire`] speaks the protocol, [`server`]
//! keeps the connections, and [`Publisher`] hands the server what each
//! reconcile placed.

pub mod server;
pub mod wire;

use tokio::sync::watch;

use super::{Publish, Reconciled};
use crate::node::spec::Mode;

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
        let mut want = pods(r);
        if !r.complete {
            // ztunnel keeps the pods an unsynced source may still hold.
            for (uid, pod) in self.pods.borrow().iter() {
                want.entry(uid.clone()).or_insert_with(|| pod.clone());
            }
        }
        self.pods.send_if_modified(|current| {
            let changed = *current != want;
            *current = want;
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

/// The pods to hand ztunnel: enrolled pods of the in-pod model whose
/// cgroups are known.
fn pods(r: &Reconciled) -> server::Pods {
    if r.spec.redirect.is_some() {
        return server::Pods::new();
    }
    r.spec
        .pods
        .iter()
        .filter(|p| p.mode == Mode::Ambient)
        .filter_map(|p| {
            let (cgroup, _) = r.desired.placed.get(&p.uid)?;
            Some((
                p.uid.clone(),
                server::ZdsPod {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    cgroup: cgroup.clone(),
                    netns_file: p.netns.clone(),
                    netns: r.desired.pod_netns.get(&p.uid).copied(),
                },
            ))
        })
        .collect()
}
