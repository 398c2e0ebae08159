//! The API's picture of the node, refreshed after every reconcile, and the
//! pod-by-pod changes between two pictures that watchers are sent.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use ambridge_common::flags;

use tokio::sync::broadcast;

use super::pb;
use crate::{
    node::desired::Desired,
    node::spec::{Mode, NodeSpec, PodSpec},
    publish::{Publish, Reconciled},
    types::PodUid,
};

/// What the API reports about the node, refreshed after every reconcile.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub state_loaded: bool,
    pub pods: Vec<pb::Pod>,
    pub ztunnels: u32,
    pub unresolved: u32,
}

/// The API's picture of the node after a reconcile: every pod of the node
/// state with where it landed in the datapath.
pub fn view(spec: &NodeSpec, desired: &Desired) -> View {
    let mut problems: BTreeMap<&PodUid, Vec<&str>> = BTreeMap::new();
    for u in &desired.unresolved {
        if let Some(uid) = &u.uid {
            problems.entry(uid).or_default().push(&u.error);
        }
    }
    let pods = spec
        .pods
        .iter()
        .map(|pod| {
            let placed = desired.placed.get(&pod.uid);
            let entry = placed.and_then(|(_, id)| desired.cgroups.get(id));
            let problem = problems
                .get(&pod.uid)
                .map(|p| p.join("; "))
                .unwrap_or_default();
            pb::Pod {
                uid: pod.uid.0.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                mode: match pod.mode {
                    Mode::Ambient => "ambient".into(),
                    Mode::None => "none".into(),
                },
                ips: pod.ips.iter().map(ToString::to_string).collect(),
                cgroup: placed
                    .map(|(p, _)| p.display().to_string())
                    .unwrap_or_default(),
                cgroup_id: placed.map(|(_, id)| id.0).unwrap_or(0),
                in_datapath: placed.is_some(),
                accelerated: entry.is_some_and(|e| e.flags & flags::ACCEL != 0),
                held: entry.is_some_and(|e| e.flags & flags::HELD != 0),
                inbound: inbound_state(pod, spec, desired).into(),
                dns_captured: entry.is_some_and(|e| e.flags & flags::DNS_CAPTURE != 0),
                problem,
            }
        })
        .collect();
    View {
        state_loaded: true,
        pods,
        ztunnels: spec.ztunnels.len() as u32,
        unresolved: desired.unresolved.len() as u32,
    }
}

/// Where a pod's inbound capture stands (see `Pod.inbound` in the proto).
fn inbound_state(pod: &PodSpec, spec: &NodeSpec, desired: &Desired) -> &'static str {
    if pod.mode != Mode::Ambient || spec.redirect.is_some() {
        "none"
    } else if !pod.capture.inbound {
        "bypassed"
    } else if desired
        .pod_netns
        .get(&pod.uid)
        .is_some_and(|n| desired.inbound_netns.contains(n))
    {
        "captured"
    } else {
        "waiting"
    }
}

/// What changed between two views, pod by pod (by UID).
pub fn changes(old: &View, new: &View) -> Vec<pb::Change> {
    use pb::change::Kind;
    let before: BTreeMap<&str, &pb::Pod> = old.pods.iter().map(|p| (p.uid.as_str(), p)).collect();
    let after: BTreeMap<&str, &pb::Pod> = new.pods.iter().map(|p| (p.uid.as_str(), p)).collect();
    let mut out = Vec::new();
    for (uid, pod) in &after {
        let kind = match before.get(uid) {
            None => Kind::Added,
            Some(was) if was != pod => Kind::Updated,
            Some(_) => continue,
        };
        out.push(pb::Change {
            kind: kind as i32,
            pod: Some((*pod).clone()),
        });
    }
    for (uid, pod) in &before {
        if !after.contains_key(uid) {
            out.push(pb::Change {
                kind: Kind::Removed as i32,
                pod: Some((*pod).clone()),
            });
        }
    }
    out
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
        let view = view(r.spec, r.desired);
        let changes = changes(&self.view.read().expect("view lock"), &view);
        *self.view.write().expect("view lock") = view;
        for change in changes {
            // No watcher is not an error.
            let _ = self.changes.send(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, in_datapath: bool) -> pb::Pod {
        pb::Pod {
            uid: uid.into(),
            in_datapath,
            ..pb::Pod::default()
        }
    }

    fn view(pods: Vec<pb::Pod>) -> View {
        View {
            pods,
            ..View::default()
        }
    }

    #[test]
    fn changes_name_every_added_updated_and_removed_pod_once() {
        use pb::change::Kind;
        let old = view(vec![pod("a", true), pod("b", false), pod("c", true)]);
        let new = view(vec![pod("a", true), pod("b", true), pod("d", false)]);
        let got: Vec<(i32, String)> = changes(&old, &new)
            .into_iter()
            .map(|c| (c.kind, c.pod.unwrap().uid))
            .collect();
        assert_eq!(
            got,
            vec![
                (Kind::Updated as i32, "b".into()),
                (Kind::Added as i32, "d".into()),
                (Kind::Removed as i32, "c".into()),
            ]
        );
        assert!(changes(&new, &new).is_empty());
    }
}
