//! The API's picture of the node, brought up to date after every reconcile
//! pod by pod, and each pod's change, which watchers are sent.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::Path,
    sync::{Arc, RwLock},
};

use ambridge_common::flags;

use tokio::sync::broadcast;

use super::pb;
use crate::{
    node::desired::{Desired, Touched},
    node::spec::{Mode, NodeSpec, PodSpec},
    publish::{Publish, Reconciled},
    types::{CgroupId, WorkloadId},
};

/// What the API reports about the node, refreshed after every reconcile.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub state_loaded: bool,
    /// By UID.
    pub pods: BTreeMap<WorkloadId, PodRow>,
    pub ztunnels: u32,
    pub unresolved: u32,
}

/// Brings `view` to the reconcile `r`, pod by pod; returns each pod's
/// change if `watched` (rendering 10,000 pods for no watcher was a tenth
/// of a fill's reconcile).
pub fn update(view: &mut View, r: &Reconciled, watched: bool) -> Vec<pb::Change> {
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
        let now = r
            .pods
            .get(uid)
            .map(|pod| PodRow::new(pod, r.node, r.desired));
        let change = match (view.pods.get(uid), now) {
            (None, None) => continue,
            (Some(was), Some(now)) if *was == now => continue,
            (_, Some(now)) if !watched => {
                view.pods.insert(uid.clone(), now);
                continue;
            }
            (Some(_), None) if !watched => {
                view.pods.remove(uid);
                continue;
            }
            // A change the API does not show (a service account, say):
            // the row follows the spec, and no watcher is told.
            (Some(was), Some(now)) if was.to_pb() == now.to_pb() => {
                view.pods.insert(uid.clone(), now);
                continue;
            }
            (was, Some(now)) => {
                let kind = if was.is_some() {
                    Kind::Updated
                } else {
                    Kind::Added
                };
                let pod = now.to_pb();
                view.pods.insert(uid.clone(), now);
                (kind, pod)
            }
            (Some(_), None) => {
                let was = view.pods.remove(uid).expect("present");
                (Kind::Removed, was.to_pb())
            }
        };
        out.push(pb::Change {
            kind: change.0 as i32,
            pod: Some(change.1),
        });
    }
    out
}

/// One pod as the API shows it: where it landed in the datapath. Kept
/// for every pod of the node, so it shares what the controller holds (the
/// spec, the cgroup's path, the reasons) and is rendered as a [`pb::Pod`]
/// only when a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRow {
    pub spec: Arc<PodSpec>,
    /// Its cgroup, where the datapath has placed it.
    pub placed: Option<(Arc<Path>, CgroupId)>,
    /// The flags of its cgroup map entry (none without one).
    pub flags: u32,
    pub inbound: pb::InboundCapture,
    /// Captured to its own sidecar proxy (`--sidecar on`), whether or not
    /// it is in the datapath yet.
    pub sidecar: bool,
    /// What is not found yet; empty when nothing.
    pub problems: Box<[Cow<'static, str>]>,
}

impl PodRow {
    fn new(pod: &Arc<PodSpec>, node: &NodeSpec, desired: &Desired) -> Self {
        let placed = desired.placed.get(&pod.uid).cloned();
        let flags = placed
            .as_ref()
            .and_then(|(_, id)| desired.cgroups.get(id))
            .map_or(0, |e| e.flags);
        Self {
            spec: pod.clone(),
            placed,
            flags,
            inbound: inbound_state(pod, node, desired),
            sidecar: pod.mode == Mode::Sidecar && desired.sidecar,
            problems: pod
                .kept_because
                .iter()
                .map(|because| Cow::Owned(because.to_string()))
                .chain(
                    desired
                        .unresolved
                        .of_pod(&pod.uid)
                        .iter()
                        .map(|u| u.error.clone()),
                )
                .collect(),
        }
    }

    /// Enrolled, and its connects refused until ztunnel acknowledges it.
    pub fn held(&self) -> bool {
        self.flags & flags::HELD != 0
    }

    /// The row as the API sends it.
    pub fn to_pb(&self) -> pb::Pod {
        let pod = &self.spec;
        pb::Pod {
            uid: pod.uid.to_string(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            mode: pb::Mode::from(pod.mode).into(),
            ips: pod.ips.iter().map(ToString::to_string).collect(),
            cgroup: self
                .placed
                .as_ref()
                .map(|(p, _)| p.display().to_string())
                .unwrap_or_default(),
            cgroup_id: self.placed.as_ref().map_or(0, |(_, id)| id.0),
            in_datapath: self.placed.is_some(),
            accelerated: self.flags & flags::ACCEL != 0,
            held: self.held(),
            inbound: self.inbound.into(),
            dns_captured: self.flags & flags::DNS_CAPTURE != 0,
            sidecar_captured: self.sidecar,
            problem: self.problems.join("; "),
        }
    }
}

/// Where a pod's inbound capture stands.
fn inbound_state(pod: &PodSpec, node: &NodeSpec, desired: &Desired) -> pb::InboundCapture {
    let in_netns = || {
        desired
            .pod_netns
            .get(&pod.uid)
            .is_some_and(|n| desired.inbound_netns.contains(n))
    };
    if pod.mode == Mode::Sidecar {
        // To its own proxy, under `--sidecar=on` only.
        return match (desired.sidecar, in_netns()) {
            (false, _) => pb::InboundCapture::None,
            (true, true) => pb::InboundCapture::Captured,
            (true, false) => pb::InboundCapture::Waiting,
        };
    }
    if pod.mode != Mode::Ambient || node.redirect.is_some() {
        pb::InboundCapture::None
    } else if !pod.capture.inbound {
        pb::InboundCapture::Bypassed
    } else if in_netns() {
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
        let mut view = self.view.write().expect("view lock");
        // Counted under the lock: a watcher subscribes before it reads its
        // snapshot, so one that subscribes after this sees the new view.
        let watched = self.changes.receiver_count() > 0;
        let changes = update(&mut view, r, watched);
        drop(view);
        for change in changes {
            // No watcher is not an error.
            let _ = self.changes.send(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::spec::{PodMap, fixtures};

    fn pod(uid: &str, name: &str) -> (WorkloadId, Arc<PodSpec>) {
        (
            WorkloadId::kubernetes(uid),
            Arc::new(fixtures::pod(uid, name)),
        )
    }

    fn reconcile(view: &mut View, pods: &PodMap, republish: Touched) -> Vec<(i32, String)> {
        reconcile_watched(view, pods, republish, true)
    }

    fn reconcile_watched(
        view: &mut View,
        pods: &PodMap,
        republish: Touched,
        watched: bool,
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
        update(view, &r, watched)
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

    #[test]
    fn with_no_watcher_the_rows_follow_the_reconcile_and_no_change_is_made() {
        let pods: BTreeMap<_, _> = [pod("a", "a"), pod("b", "b"), pod("c", "c")].into();
        let now: BTreeMap<_, _> = [pod("a", "a"), pod("b", "b2"), pod("d", "d")].into();
        // A change the API does not show, to one pod.
        let mut edited: PodMap = now.clone();
        let mut a = fixtures::pod("a", "a");
        a.service_account = "other".into();
        edited.insert(WorkloadId::kubernetes("a"), Arc::new(a));
        let one: Touched = Touched::Pods([WorkloadId::kubernetes("a")].into());
        let (mut watched, mut unwatched) = (View::default(), View::default());
        for (pods, republish) in [(&pods, Touched::All), (&now, Touched::All), (&edited, one)] {
            reconcile(&mut watched, pods, republish.clone());
            assert!(reconcile_watched(&mut unwatched, pods, republish, false).is_empty());
            assert_eq!(unwatched.pods, watched.pods);
        }
    }

    #[test]
    fn a_change_the_api_does_not_show_reaches_the_row_and_no_watcher() {
        let mut view = View::default();
        let pods: PodMap = [pod("a", "a")].into();
        reconcile(&mut view, &pods, Touched::All);
        let mut edited = fixtures::pod("a", "a");
        edited.service_account = "other".into();
        let now: PodMap = [(WorkloadId::kubernetes("a"), Arc::new(edited))].into();
        assert!(reconcile(&mut view, &now, Touched::All).is_empty());
        // The row holds the pod the controller holds, not the one before.
        let row = &view.pods[&WorkloadId::kubernetes("a")];
        assert!(Arc::ptr_eq(&row.spec, &now[&WorkloadId::kubernetes("a")]));
    }

    #[test]
    fn a_row_renders_what_the_desired_maps_say_of_its_pod() {
        let (uid, spec) = pod("a", "a");
        let mut desired = Desired::default();
        let path: Arc<Path> = Path::new("/cg/a").into();
        desired
            .placed
            .insert(uid.clone(), (path.clone(), CgroupId(7)));
        desired.cgroups.insert(
            CgroupId(7),
            ambridge_common::CgroupInfo {
                flags: flags::ENROLLED | flags::HELD | flags::DNS_CAPTURE,
                ..Default::default()
            },
        );
        let row = PodRow::new(&spec, &NodeSpec::default(), &desired);
        assert!(Arc::ptr_eq(&row.placed.as_ref().unwrap().0, &path));
        let shown = row.to_pb();
        assert_eq!(
            (shown.uid.as_str(), shown.cgroup.as_str(), shown.cgroup_id),
            ("a", "/cg/a", 7)
        );
        assert!(shown.in_datapath && shown.held && shown.dns_captured && !shown.accelerated);
        assert_eq!(shown.problem, "");
    }
}
