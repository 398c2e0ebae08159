//! The API's picture of the node, brought up to date after every reconcile
//! pod by pod, and each pod's change, which watchers are sent.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use ambridge_common::flags;

use tokio::sync::broadcast;

use super::pb;
use crate::{
    node::desired::{Desired, Touched},
    node::spec::{Mode, NodeSpec, PodSpec},
    publish::{Publish, Reconciled},
    types::WorkloadId,
};

/// What the API reports about the node, refreshed after every reconcile.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub state_loaded: bool,
    /// By UID.
    pub pods: BTreeMap<WorkloadId, pb::Pod>,
    pub ztunnels: u32,
    pub unresolved: u32,
}

/// Brings `view` to the reconcile `r`, pod by pod; returns each pod's
/// change.
pub fn update(view: &mut View, r: &Reconciled) -> Vec<pb::Change> {
    use pb::change::Kind;
    view.state_loaded = true;
    view.ztunnels = r.node.ztunnels.len() as u32;
    view.unresolved = r.desired.unresolved.len() as u32;
    let before: Vec<WorkloadId> = match r.republish {
        Touched::All => view.pods.keys().cloned().collect(),
        Touched::Pods(_) => Vec::new(),
    };
    let mut out = Vec::new();
    for uid in r.uids(before.iter()) {
        let now = r.pods.get(uid).map(|pod| pod_view(pod, r.node, r.desired));
        let change = match (view.pods.get(uid), now) {
            (None, None) => continue,
            (Some(was), Some(now)) if *was == now => continue,
            (was, Some(now)) => {
                let kind = if was.is_some() {
                    Kind::Updated
                } else {
                    Kind::Added
                };
                view.pods.insert(uid.clone(), now.clone());
                (kind, now)
            }
            (Some(_), None) => {
                let was = view.pods.remove(uid).expect("present");
                (Kind::Removed, was)
            }
        };
        out.push(pb::Change {
            kind: change.0 as i32,
            pod: Some(change.1),
        });
    }
    out
}

/// One pod as the API shows it: where it landed in the datapath.
fn pod_view(pod: &PodSpec, node: &NodeSpec, desired: &Desired) -> pb::Pod {
    let problems: Vec<&str> = desired
        .unresolved
        .of_pod(&pod.uid)
        .iter()
        .map(|u| u.error.as_str())
        .collect();
    let placed = desired.placed.get(&pod.uid);
    let entry = placed.and_then(|(_, id)| desired.cgroups.get(id));
    pb::Pod {
        uid: pod.uid.to_string(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        mode: pb::Mode::from(pod.mode).into(),
        ips: pod.ips.iter().map(ToString::to_string).collect(),
        cgroup: placed
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_default(),
        cgroup_id: placed.map(|(_, id)| id.0).unwrap_or(0),
        in_datapath: placed.is_some(),
        accelerated: entry.is_some_and(|e| e.flags & flags::ACCEL != 0),
        held: entry.is_some_and(|e| e.flags & flags::HELD != 0),
        inbound: inbound_state(pod, node, desired).into(),
        dns_captured: entry.is_some_and(|e| e.flags & flags::DNS_CAPTURE != 0),
        problem: problems.join("; "),
    }
}

/// Where a pod's inbound capture stands.
fn inbound_state(pod: &PodSpec, node: &NodeSpec, desired: &Desired) -> pb::InboundCapture {
    if pod.mode != Mode::Ambient || node.redirect.is_some() {
        pb::InboundCapture::None
    } else if !pod.capture.inbound {
        pb::InboundCapture::Bypassed
    } else if desired
        .pod_netns
        .get(&pod.uid)
        .is_some_and(|n| desired.inbound_netns.contains(n))
    {
        pb::InboundCapture::Captured
    } else {
        pb::InboundCapture::Waiting
    }
}

/// The view shared between the reconcile loop (writer) and the API.
pub type SharedView = Arc<RwLock<View>>;

/// Keeps the API's view equal to the last reconcile, and sends each
/// pod's change to the watchers.
pub struct Publisher {
    pub view: SharedView,
    pub changes: broadcast::Sender<pb::Change>,
}

impl Publish for Publisher {
    fn reconciled(&mut self, r: &Reconciled) {
        let changes = update(&mut self.view.write().expect("view lock"), r);
        for change in changes {
            // No watcher is not an error.
            let _ = self.changes.send(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::spec::fixtures;

    fn pod(uid: &str, name: &str) -> (WorkloadId, PodSpec) {
        (WorkloadId::kubernetes(uid), fixtures::pod(uid, name))
    }

    fn reconcile(
        view: &mut View,
        pods: &BTreeMap<WorkloadId, PodSpec>,
        republish: Touched,
    ) -> Vec<(i32, String)> {
        let r = Reconciled {
            node: &NodeSpec::default(),
            pods,
            republish: &republish,
            desired: &Desired::default(),
            complete: true,
            acknowledged: None,
            kubernetes: None,
            applied_in: std::time::Duration::ZERO,
        };
        update(view, &r)
            .into_iter()
            .map(|c| (c.kind, c.pod.unwrap().uid))
            .collect()
    }

    #[test]
    fn changes_name_every_added_updated_and_removed_pod_once() {
        use pb::change::Kind;
        let mut view = View::default();
        let pods: BTreeMap<_, _> = [pod("a", "a"), pod("b", "b"), pod("c", "c")].into();
        assert_eq!(reconcile(&mut view, &pods, Touched::All).len(), 3);
        let now: BTreeMap<_, _> = [pod("a", "a"), pod("b", "b2"), pod("d", "d")].into();
        let uids = ["b", "c", "d"].map(WorkloadId::kubernetes).into();
        assert_eq!(
            reconcile(&mut view, &now, Touched::Pods(uids)),
            vec![
                (Kind::Updated as i32, "b".into()),
                (Kind::Removed as i32, "c".into()),
                (Kind::Added as i32, "d".into()),
            ]
        );
        // Looking at every pod again finds nothing more to say.
        assert!(reconcile(&mut view, &now, Touched::All).is_empty());
        assert_eq!(
            view.pods.keys().map(WorkloadId::as_str).collect::<Vec<_>>(),
            ["a", "b", "d"]
        );
    }
}
