//! The Kubernetes feed: this node's pods (watched, each kept as a lean
//! [`KeptPod`]), every namespace and ztunnel's DaemonSet (kube-rs
//! reflectors), turned into node state with Istio's rules ([`crate::node::membership`]). Pods are named by UID; the daemon
//! finds their cgroups in the kubelet's layout. A pod is ztunnel only if
//! the DaemonSet object it names as its controller is the one the API
//! server holds under ztunnel's name (same UID).

pub mod pod;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Namespace};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use self::pod::Pod;
use crate::{
    node::membership::{self, DaemonSetUid, Decision, MeshSettings, Owner, PodFacts},
    node::spec::{CaptureOverrides, Mode, PodCgroup, PodMap, PodSpec, keep_shared},
    types::{PodUid, WorkloadId},
};

/// What the feed says about the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By UID.
    pub pods: PodMap,
    /// ztunnel pods, by UID (their cgroups are found like any pod's).
    pub ztunnels: Vec<PodUid>,
    /// Pods carrying [`REDIRECTION`], with its value.
    pub redirection: BTreeMap<WorkloadId, String>,
}

/// The annotation a node agent writes on a pod through `pods/status`:
/// `pending` once it is enrolled, `enabled` once ztunnel acknowledged it.
/// istiod marks the workload HBONE only when it reads `enabled`.
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

/// What the feed keeps of a pod between watch events: what Istio's rules
/// and the pod's spec read. Not the decoded object, whose k8s-openapi
/// metadata (and the reflector's key and `Arc` around it) was about 1 KB a
/// pod before its first value: 10 MB at 10,000 pods.
#[derive(Clone, Debug)]
pub struct KeptPod {
    pub uid: PodUid,
    pub name: String,
    pub facts: PodFacts,
    /// Its [`REDIRECTION`] annotation.
    pub redirection: Option<String>,
    pub ips: Vec<IpAddr>,
    /// The runtime's ID of its sidecar proxy's container (Istio's
    /// `istio-proxy`), once created.
    pub proxy_container: Option<Arc<str>>,
}

impl KeptPod {
    /// What is kept of `pod`; `None` for a pod without a UID (the API
    /// server gives every pod one).
    pub fn of(pod: &Pod) -> Option<Self> {
        Some(Self {
            uid: PodUid::new(pod.metadata.uid.clone()?),
            name: pod.metadata.name.clone().unwrap_or_default(),
            facts: facts(pod),
            redirection: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION))
                .cloned(),
            ips: pod_ips(pod),
            proxy_container: proxy_container(pod),
        })
    }
}

/// The name of the container Istio's injector runs the sidecar proxy in.
const PROXY_CONTAINER: &str = "istio-proxy";

/// The runtime's ID of the pod's `istio-proxy` container, without the
/// runtime's `<name>://` prefix.
fn proxy_container(pod: &Pod) -> Option<Arc<str>> {
    let status = pod.status.as_ref()?;
    let id = status
        .container_statuses
        .iter()
        .chain(&status.init_container_statuses)
        .flatten()
        .find(|c| c.name == PROXY_CONTAINER)?
        .container_id
        .as_deref()?;
    let id = id.split_once("://").map_or(id, |(_, id)| id);
    (!id.is_empty()).then(|| id.into())
}

/// The pods the watch listed and changed since, as [`KeptPod`]s: what
/// kube's reflector does with whole objects. A relist fills a new set,
/// which replaces the old one when the list ends.
#[derive(Default)]
struct PodStore {
    pods: BTreeMap<PodUid, KeptPod>,
    relisting: Option<BTreeMap<PodUid, KeptPod>>,
}

impl PodStore {
    /// Takes one pod watch event in; returns what it asks of the feed.
    fn apply(&mut self, event: watcher::Event<Pod>) -> Step {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                Step::Nothing
            }
            watcher::Event::InitApply(pod) => match KeptPod::of(&pod) {
                Some(kept) => {
                    self.relisting
                        .get_or_insert_default()
                        .insert(kept.uid.clone(), kept.clone());
                    Step::Pod(Box::new(kept))
                }
                None => Step::Nothing,
            },
            watcher::Event::InitDone => {
                self.pods = self.relisting.take().unwrap_or_default();
                Step::All { listed: true }
            }
            watcher::Event::Apply(pod) => match KeptPod::of(&pod) {
                Some(kept) => {
                    self.pods.insert(kept.uid.clone(), kept.clone());
                    Step::Pod(Box::new(kept))
                }
                None => Step::Nothing,
            },
            watcher::Event::Delete(pod) => match pod.metadata.uid.clone().map(PodUid::new) {
                Some(uid) => {
                    self.pods.remove(&uid);
                    Step::Gone(uid)
                }
                None => Step::Nothing,
            },
        }
    }
}

fn facts(pod: &Pod) -> PodFacts {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    PodFacts {
        namespace: meta.namespace.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        service_account: spec.and_then(|s| s.service_account_name.clone()),
        owners: meta
            .owner_references
            .iter()
            .flatten()
            .map(|o| Owner {
                kind: o.kind.clone(),
                name: o.name.clone(),
                uid: o.uid.clone(),
                controller: o.controller == Some(true),
            })
            .collect(),
    }
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok());
    let single: Option<IpAddr> = status
        .and_then(|s| s.pod_ip.as_ref())
        .and_then(|ip| ip.parse().ok());
    let mut ips: Vec<IpAddr> = listed.collect();
    if ips.is_empty() {
        ips.extend(single);
    }
    ips
}

/// The UID of ztunnel's DaemonSet among `daemonsets` (those the watch of
/// its name in its namespace lists).
pub fn ztunnel_daemonset(
    daemonsets: &[Arc<DaemonSet>],
    mesh: &MeshSettings,
) -> Option<DaemonSetUid> {
    daemonsets
        .iter()
        .find(|ds| {
            ds.metadata.namespace.as_deref() == Some(mesh.ztunnel_namespace.as_str())
                && ds.metadata.name.as_deref() == Some(mesh.ztunnel_daemonset.as_str())
        })
        .and_then(|ds| ds.metadata.uid.clone())
        .map(DaemonSetUid)
}

/// What the feed says about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodState {
    /// A pod, in the mesh or not, with the [`REDIRECTION`] value it shows.
    Pod {
        spec: Arc<PodSpec>,
        redirection: Option<String>,
    },
    /// ztunnel itself (identity proven).
    Ztunnel,
}

/// A change of the feed's view, as the controller receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The whole view: the first after a (re)list, or after a namespace
    /// or ztunnel's DaemonSet changed.
    Snapshot(Snapshot),
    /// One pod's new state (`None`: gone, or left out).
    Pod(PodUid, Option<PodState>),
}

impl Snapshot {
    /// What the feed says about `uid`.
    pub fn state(&self, uid: &PodUid) -> Option<PodState> {
        if self.ztunnels.contains(uid) {
            return Some(PodState::Ztunnel);
        }
        let id = WorkloadId::Kubernetes(uid.clone());
        self.pods.get(&id).map(|spec| PodState::Pod {
            spec: spec.clone(),
            redirection: self.redirection.get(&id).cloned(),
        })
    }

    /// Sets what the feed says about `uid`.
    pub fn set(&mut self, uid: &PodUid, state: Option<PodState>) {
        let id = WorkloadId::Kubernetes(uid.clone());
        let was = self.pods.remove(&id);
        self.redirection.remove(&id);
        self.ztunnels.retain(|z| z != uid);
        match state {
            None => {}
            Some(PodState::Ztunnel) => self.ztunnels.push(uid.clone()),
            Some(PodState::Pod { spec, redirection }) => {
                if let Some(value) = redirection {
                    self.redirection.insert(id.clone(), value);
                }
                // A new redirection value alone (ambridge's own annotation)
                // keeps the spec everyone shares.
                let spec = match was {
                    Some(was) if was == spec => was,
                    _ => spec,
                };
                self.pods.insert(id, spec);
            }
        }
    }
}

/// The namespaces' labels, by name.
type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

fn namespace_labels(namespaces: &[Arc<Namespace>]) -> NamespaceLabels {
    namespaces
        .iter()
        .filter_map(|ns| {
            Some((
                ns.metadata.name.clone()?,
                ns.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect()
}

/// Applies Istio's rules to one pod, with `ztunnel_daemonset` the UID of
/// ztunnel's DaemonSet (if it exists). `last` is the pod's previous state:
/// a pod whose annotations cannot be read keeps it (and is left out if it
/// had none), so a bad edit never changes the datapath. `None` for a pod
/// without a UID.
fn pod_state(
    pod: &KeptPod,
    ns_labels: &NamespaceLabels,
    ztunnel_daemonset: Option<&DaemonSetUid>,
    mesh: &MeshSettings,
    last: impl FnOnce(&PodUid) -> Option<PodState>,
) -> Option<(PodUid, Option<PodState>)> {
    let uid = pod.uid.clone();
    let facts = &pod.facts;
    let empty = BTreeMap::new();
    let labels = ns_labels.get(&facts.namespace).unwrap_or(&empty);
    let (mode, capture) = match membership::decide(facts, labels, mesh, ztunnel_daemonset) {
        Ok(Decision::Ztunnel) => return Some((uid, Some(PodState::Ztunnel))),
        Ok(Decision::Enrolled {
            inbound_capture,
            dns_capture,
        }) => (
            Mode::Ambient,
            CaptureOverrides {
                inbound: inbound_capture,
                dns: dns_capture,
                ..CaptureOverrides::default()
            },
        ),
        Ok(Decision::Sidecar { rules, dns_capture }) => (
            Mode::Sidecar,
            CaptureOverrides {
                sidecar: rules,
                sidecar_proxy: pod.proxy_container.clone(),
                dns: dns_capture,
                ..CaptureOverrides::default()
            },
        ),
        Ok(Decision::NotEnrolled(_)) => (Mode::None, CaptureOverrides::default()),
        Err(e) => {
            error!(
                pod = %uid,
                name = %pod.name,
                namespace = %facts.namespace,
                annotation = e.annotation,
                value = %e.value,
                "keeping the pod's last good state: {e}"
            );
            let because: Arc<str> = e.to_string().into();
            let kept = match last(&uid) {
                Some(PodState::Pod { spec, redirection }) => Some(PodState::Pod {
                    spec: Arc::new(PodSpec {
                        kept_because: Some(because),
                        ..PodSpec::clone(&spec)
                    }),
                    redirection,
                }),
                other => other,
            };
            return Some((uid, kept));
        }
    };
    let redirection = pod.redirection.clone();
    let spec = PodSpec {
        kept_because: None,
        uid: uid.clone().into(),
        name: pod.name.clone(),
        service_account: crate::node::spec::service_account_or_default(
            facts.service_account.clone(),
        ),
        namespace: facts.namespace.clone(),
        cgroup: PodCgroup::Uid,
        netns: None,
        ips: pod.ips.clone(),
        mode,
        accelerate: None,
        capture,
    };
    Some((
        uid,
        Some(PodState::Pod {
            spec: Arc::new(spec),
            redirection,
        }),
    ))
}

/// Applies Istio's rules to every pod, with `ztunnel_daemonset` the UID of
/// ztunnel's DaemonSet (if it exists). `last` is the previous snapshot: a
/// pod whose annotations cannot be read keeps its entry from it (and is
/// left out if it had none), so a bad edit never changes the datapath.
pub fn snapshot<'a>(
    pods: impl IntoIterator<Item = &'a KeptPod>,
    namespaces: &[Arc<Namespace>],
    ztunnel_daemonset: Option<&DaemonSetUid>,
    mesh: &MeshSettings,
    last: &Snapshot,
) -> Snapshot {
    let ns_labels = namespace_labels(namespaces);
    let mut out = Snapshot::default();
    for pod in pods {
        if let Some((uid, state)) = pod_state(pod, &ns_labels, ztunnel_daemonset, mesh, |uid| {
            last.state(uid)
        }) {
            out.set(&uid, state);
        }
    }
    keep_shared(&mut out.pods, &last.pods);
    out
}

/// The watched kinds, as their events come in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Feed {
    Pods,
    Namespaces,
    DaemonSets,
}

/// What a watch event asks of the feed.
enum Step {
    /// Look at this pod again (it was applied).
    Pod(Box<KeptPod>),
    /// This pod is gone.
    Gone(PodUid),
    /// Look at every pod again: a (re)list ended, or a namespace or
    /// ztunnel's DaemonSet changed.
    All {
        listed: bool,
    },
    Nothing,
}

/// A watch event: a pod's, which the loop takes into its [`PodStore`], or
/// what a namespace or DaemonSet event asks of the feed.
enum Watched {
    Pod(Box<watcher::Event<Pod>>),
    Other((Feed, Step)),
}

/// What a namespace or DaemonSet watch event asks of the feed.
fn other_step<K>(feed: Feed) -> impl Fn(watcher::Event<K>) -> (Feed, Step) {
    move |event| {
        let step = match event {
            watcher::Event::Init | watcher::Event::InitApply(_) => Step::Nothing,
            watcher::Event::InitDone => Step::All { listed: true },
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => Step::All { listed: false },
        };
        (feed, step)
    }
}

/// Watches `node`'s pods, every namespace and ztunnel's DaemonSet,
/// sending each change: the whole view once every kind has listed (and
/// after a relist, a namespace or DaemonSet change), then pod by pod.
/// Runs until the receiver is gone; watch errors are retried with backoff
/// by the watchers.
pub async fn run(
    client: Client,
    node: String,
    mesh: MeshSettings,
    out: mpsc::UnboundedSender<Update>,
    health: crate::supervise::Health,
) {
    let mut pod_store = PodStore::default();
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let (ds_store, ds_writer) = reflector::store::<DaemonSet>();
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .default_backoff()
    .map(|e| e.map(|e| Watched::Pod(Box::new(e))));
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(ns_writer)
    .map(|e| e.map(|e| Watched::Other(other_step(Feed::Namespaces)(e))));
    let daemonsets = watcher(
        Api::<DaemonSet>::namespaced(client, &mesh.ztunnel_namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", mesh.ztunnel_daemonset)),
    )
    .default_backoff()
    .reflect(ds_writer)
    .map(|e| e.map(|e| Watched::Other(other_step(Feed::DaemonSets)(e))));
    let mut events = std::pin::pin!(futures::stream::select(
        futures::stream::select(pods, namespaces),
        daemonsets
    ));
    let mut last = Snapshot::default();
    // `None` until the first snapshot, so the first one says what it found.
    let mut last_daemonset: Option<Option<DaemonSetUid>> = None;
    let mut ns_labels = NamespaceLabels::new();
    let mut listed = std::collections::BTreeSet::new();
    // Whether the whole view went out since every kind listed.
    let mut sent = false;
    while let Some(event) = events.next().await {
        let (feed, step) = match event {
            Err(e) => {
                // The watcher relists on its own, with backoff.
                warn!("Kubernetes watch: {e}");
                health.failed(
                    crate::supervise::Component::Kubernetes,
                    format!("watch: {e}"),
                );
                continue;
            }
            Ok(Watched::Pod(event)) => (Feed::Pods, pod_store.apply(*event)),
            Ok(Watched::Other(tagged)) => tagged,
        };
        if let Step::All { listed: true } = step {
            listed.insert(feed);
        }
        // Every store must have listed before a snapshot means anything.
        if ![Feed::Pods, Feed::Namespaces, Feed::DaemonSets]
            .iter()
            .all(|feed| listed.contains(feed))
        {
            continue;
        }
        health.running(crate::supervise::Component::Kubernetes);
        let update = match step {
            Step::Nothing => continue,
            Step::Pod(_) | Step::Gone(_) if !sent => continue,
            Step::Pod(pod) => {
                let daemonset = last_daemonset.clone().flatten();
                let Some((uid, state)) =
                    pod_state(&pod, &ns_labels, daemonset.as_ref(), &mesh, |uid| {
                        last.state(uid)
                    })
                else {
                    continue;
                };
                if last.state(&uid) == state {
                    continue;
                }
                last.set(&uid, state.clone());
                Update::Pod(uid, state)
            }
            Step::Gone(uid) => {
                if last.state(&uid).is_none() {
                    continue;
                }
                last.set(&uid, None);
                Update::Pod(uid, None)
            }
            Step::All { .. } => {
                let daemonset = ztunnel_daemonset(&ds_store.state(), &mesh);
                if last_daemonset.as_ref() != Some(&daemonset) {
                    match &daemonset {
                        Some(uid) => {
                            info!(namespace = %mesh.ztunnel_namespace, name = %mesh.ztunnel_daemonset, uid = %uid.0, "ztunnel's DaemonSet: only pods it controls are trusted as ztunnel")
                        }
                        None => {
                            warn!(namespace = %mesh.ztunnel_namespace, name = %mesh.ztunnel_daemonset, "no ztunnel DaemonSet: no pod is trusted as ztunnel")
                        }
                    }
                    last_daemonset = Some(daemonset.clone());
                }
                ns_labels = namespace_labels(&ns_store.state());
                let snap = snapshot(
                    pod_store.pods.values(),
                    &ns_store.state(),
                    daemonset.as_ref(),
                    &mesh,
                    &last,
                );
                // The first snapshot goes out even when it is empty: a node
                // with no pod yet has delivered all the same.
                if snap == last && sent {
                    continue;
                }
                sent = true;
                last = snap.clone();
                Update::Snapshot(snap)
            }
        };
        if out.send(update).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(value: serde_json::Value) -> KeptPod {
        KeptPod::of(&serde_json::from_value(value).expect("a Pod")).expect("a UID")
    }

    fn namespace(name: &str, labels: serde_json::Value) -> Arc<Namespace> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                .expect("a Namespace"),
        )
    }

    fn app(
        uid: &str,
        ns: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) -> KeptPod {
        pod(json!({
            "metadata": {"name": format!("app-{uid}"), "namespace": ns, "uid": uid,
                         "labels": labels, "annotations": annotations},
            "spec": {"containers": [], "serviceAccountName": "default"},
            "status": {"phase": "Running", "podIP": "10.1.0.7",
                       "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]}
        }))
    }

    fn watched(uid: Option<&str>) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns", "uid": uid}}))
            .expect("a Pod")
    }

    fn kept(store: &PodStore) -> Vec<&str> {
        store.pods.keys().map(PodUid::as_str).collect()
    }

    #[test]
    fn the_proxy_container_is_found_among_containers_or_native_sidecars() {
        let with = |statuses: serde_json::Value| {
            pod(json!({"metadata": {"uid": "a"}, "status": statuses})).proxy_container
        };
        let app = json!({"name": "app", "containerID": "containerd://aaa"});
        let proxy = json!({"name": "istio-proxy", "containerID": "containerd://bbb"});
        assert_eq!(
            with(json!({"containerStatuses": [app, proxy]})).as_deref(),
            Some("bbb")
        );
        assert_eq!(
            with(json!({"containerStatuses": [app], "initContainerStatuses": [proxy]})).as_deref(),
            Some("bbb")
        );
        // Not created yet, or no proxy at all.
        let waiting = json!({"name": "istio-proxy", "containerID": null});
        assert_eq!(with(json!({"containerStatuses": [app, waiting]})), None);
        assert_eq!(with(json!({"containerStatuses": [app]})), None);
    }

    #[test]
    fn a_relist_replaces_the_kept_pods_only_when_it_ends() {
        use watcher::Event;
        let mut store = PodStore::default();
        store.apply(Event::Init);
        assert!(matches!(
            store.apply(Event::InitApply(watched(Some("a")))),
            Step::Pod(p) if p.uid.as_str() == "a"
        ));
        store.apply(Event::InitApply(watched(Some("b"))));
        assert!(kept(&store).is_empty());
        assert!(matches!(
            store.apply(Event::InitDone),
            Step::All { listed: true }
        ));
        assert_eq!(kept(&store), ["a", "b"]);
        store.apply(Event::Apply(watched(Some("c"))));
        assert!(matches!(
            store.apply(Event::Delete(watched(Some("b")))),
            Step::Gone(uid) if uid.as_str() == "b"
        ));
        assert_eq!(kept(&store), ["a", "c"]);
        // While the watch relists, the last list and its changes answer.
        store.apply(Event::Init);
        store.apply(Event::InitApply(watched(Some("a"))));
        assert_eq!(kept(&store), ["a", "c"]);
        store.apply(Event::InitDone);
        assert_eq!(kept(&store), ["a"]);
        // A pod the API server gave no UID is not kept.
        assert!(matches!(
            store.apply(Event::Apply(watched(None))),
            Step::Nothing
        ));
        assert_eq!(kept(&store), ["a"]);
    }

    fn modes(s: &Snapshot) -> Vec<(String, Mode)> {
        s.pods
            .values()
            .map(|p| (p.uid.to_string(), p.mode))
            .collect()
    }

    #[test]
    fn pods_get_the_mode_istios_rules_give_them_and_their_ips() {
        let pods = [
            app("a", "mesh", json!({}), json!({})),
            app(
                "b",
                "mesh",
                json!({"istio.io/dataplane-mode": "none"}),
                json!({}),
            ),
            app("c", "plain", json!({}), json!({})),
        ];
        let nss = [
            namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"})),
            namespace("plain", json!({})),
        ];
        let s = snapshot(
            &pods,
            &nss,
            None,
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        assert_eq!(
            modes(&s),
            vec![
                ("a".into(), Mode::Ambient),
                ("b".into(), Mode::None),
                ("c".into(), Mode::None)
            ]
        );
        let a = &s.pods[&WorkloadId::kubernetes("a")];
        assert_eq!(a.ips.len(), 2);
        assert_eq!(a.namespace, "mesh");
        assert_eq!(a.cgroup, PodCgroup::Uid);
    }

    #[test]
    fn a_new_redirection_value_alone_keeps_the_spec_the_node_state_shares() {
        let ambient = json!({"istio.io/dataplane-mode": "ambient"});
        let nss = [namespace("mesh", json!({}))];
        let mesh = MeshSettings::default();
        let first = app("a", "mesh", ambient.clone(), json!({}));
        let mut snap = snapshot([&first], &nss, None, &mesh, &Snapshot::default());
        let id = WorkloadId::kubernetes("a");
        let before = snap.pods[&id].clone();
        let annotated = app("a", "mesh", ambient, json!({REDIRECTION: "enabled"}));
        let labels = namespace_labels(&nss);
        let (uid, state) =
            pod_state(&annotated, &labels, None, &mesh, |uid| snap.state(uid)).expect("a UID");
        snap.set(&uid, state);
        assert!(Arc::ptr_eq(&snap.pods[&id], &before));
        assert_eq!(snap.redirection[&id], "enabled");
        // A whole snapshot of the same pods, as after a relist, keeps it too.
        let again = snapshot([&annotated], &nss, None, &mesh, &snap);
        assert!(Arc::ptr_eq(&again.pods[&id], &before));
    }

    #[test]
    fn the_redirection_annotation_follows_enrollment_and_ztunnels_acknowledgement() {
        let pods = [
            app(
                "a",
                "mesh",
                json!({"istio.io/dataplane-mode": "ambient"}),
                json!({}),
            ),
            app(
                "b",
                "mesh",
                json!({"istio.io/dataplane-mode": "ambient"}),
                json!({REDIRECTION: "pending"}),
            ),
            app("c", "mesh", json!({}), json!({REDIRECTION: "enabled"})),
            app("d", "mesh", json!({}), json!({})),
        ];
        let snap = snapshot(
            &pods,
            &[namespace("mesh", json!({}))],
            None,
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        let ready = [WorkloadId::kubernetes("b")].into();
        let patches: Vec<_> = crate::publish::annotator::redirection_patches(&snap, &ready)
            .into_iter()
            .map(|p| (p.uid.to_string(), p.value))
            .collect();
        assert_eq!(
            patches,
            [
                ("a".to_string(), Some("pending")),
                ("b".to_string(), Some("enabled")),
                ("c".to_string(), None),
            ]
        );
    }

    #[test]
    fn relabelling_the_namespace_changes_its_pods() {
        let pods = [app("a", "mesh", json!({}), json!({}))];
        let on = snapshot(
            &pods,
            &[namespace(
                "mesh",
                json!({"istio.io/dataplane-mode": "ambient"}),
            )],
            None,
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        let off = snapshot(
            &pods,
            &[namespace("mesh", json!({}))],
            None,
            &MeshSettings::default(),
            &on,
        );
        assert_eq!(modes(&on), vec![("a".into(), Mode::Ambient)]);
        assert_eq!(modes(&off), vec![("a".into(), Mode::None)]);
    }

    fn ztunnel_like(uid: &str, owner: serde_json::Value) -> KeptPod {
        pod(json!({
            "metadata": {"name": format!("ztunnel-{uid}"), "namespace": "istio-system", "uid": uid,
                         "ownerReferences": [owner]},
            "spec": {"containers": [], "serviceAccountName": "ztunnel"},
            "status": {"phase": "Running"}
        }))
    }

    fn daemonset(ns: &str, name: &str, uid: &str) -> Arc<DaemonSet> {
        Arc::new(
            serde_json::from_value(
                json!({"metadata": {"namespace": ns, "name": name, "uid": uid}}),
            )
            .expect("a DaemonSet"),
        )
    }

    #[test]
    fn a_pod_controlled_by_ztunnels_daemonset_object_is_listed_as_ztunnel_and_no_other() {
        let owner = |uid: &str, controller: bool| {
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ztunnel",
                   "uid": uid, "controller": controller})
        };
        let pods = [
            ztunnel_like("z1", owner("ds", true)),
            ztunnel_like("z2", owner("ds", false)),
            ztunnel_like("z3", owner("forged", true)),
        ];
        let mesh = MeshSettings::default();
        // Only the DaemonSet of ztunnel's name in ztunnel's namespace counts.
        let daemonsets = [
            daemonset("default", "ztunnel", "forged"),
            daemonset("istio-system", "ztunnel", "ds"),
        ];
        let ds = ztunnel_daemonset(&daemonsets, &mesh);
        assert_eq!(ds, Some(DaemonSetUid("ds".into())));
        let s = snapshot(&pods, &[], ds.as_ref(), &mesh, &Snapshot::default());
        assert_eq!(s.ztunnels, vec![PodUid::new("z1")]);
        assert_eq!(
            modes(&s),
            vec![("z2".into(), Mode::None), ("z3".into(), Mode::None)]
        );
        // Without the DaemonSet, none is.
        let s = snapshot(&pods, &[], None, &mesh, &Snapshot::default());
        assert!(s.ztunnels.is_empty());
    }

    #[test]
    fn a_pod_with_a_malformed_annotation_keeps_its_last_good_state() {
        let ambient = json!({"istio.io/dataplane-mode": "ambient"});
        let good = snapshot(
            &[app("a", "ns", ambient.clone(), json!({}))],
            &[],
            None,
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        let bad = [app(
            "a",
            "ns",
            ambient,
            json!({"ambient.istio.io/dns-capture": "maybe"}),
        )];
        let after = snapshot(&bad, &[], None, &MeshSettings::default(), &good);
        // The same pod, saying why it is kept.
        let uid = WorkloadId::kubernetes("a");
        let kept = &after.pods[&uid];
        let because = kept.kept_because.as_deref().expect("a reason");
        assert!(
            because.contains("ambient.istio.io/dns-capture") && because.contains("maybe"),
            "{because}"
        );
        assert_eq!(
            PodSpec {
                kept_because: None,
                ..PodSpec::clone(kept)
            },
            *good.pods[&uid]
        );
        // Once the annotation is good again, the reason goes.
        let fixed = snapshot(
            &[app(
                "a",
                "ns",
                json!({"istio.io/dataplane-mode": "ambient"}),
                json!({}),
            )],
            &[],
            None,
            &MeshSettings::default(),
            &after,
        );
        assert_eq!(fixed, good);
        // With no earlier state, the pod stays out.
        let first = snapshot(
            &bad,
            &[],
            None,
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        assert!(first.pods.is_empty());
    }

    #[test]
    fn a_snapshot_updated_pod_by_pod_equals_one_computed_from_every_pod() {
        let ambient = json!({"istio.io/dataplane-mode": "ambient"});
        let mesh = MeshSettings::default();
        let nss = [namespace("mesh", ambient.clone())];
        let labels = namespace_labels(&nss);
        let mut pods = vec![
            app("a", "mesh", json!({}), json!({})),
            app("b", "mesh", json!({}), json!({REDIRECTION: "pending"})),
        ];
        let mut kept = snapshot(&pods, &nss, None, &mesh, &Snapshot::default());
        for (i, pod) in [
            app("c", "plain", ambient.clone(), json!({})),
            app(
                "a",
                "mesh",
                json!({"istio.io/dataplane-mode": "none"}),
                json!({}),
            ),
            app(
                "b",
                "mesh",
                json!({}),
                json!({"ambient.istio.io/dns-capture": "maybe"}),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let (uid, state) =
                pod_state(&pod, &labels, None, &mesh, |uid| kept.state(uid)).expect("a UID");
            let before = kept.clone();
            kept.set(&uid, state);
            pods.retain(|p| p.uid.as_str() != uid.as_str());
            pods.push(pod);
            assert_eq!(
                kept,
                snapshot(&pods, &nss, None, &mesh, &before),
                "step {i}"
            );
        }
        kept.set(&PodUid::new("c"), None);
        pods.retain(|p| p.uid.as_str() != "c");
        assert_eq!(kept, snapshot(&pods, &nss, None, &mesh, &kept));
    }
}
