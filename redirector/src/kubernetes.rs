//! The Kubernetes feed: this node's pods and every namespace, watched with
//! kube-rs reflectors, turned into node state with Istio's rules
//! ([`crate::membership`]). Pods are named by UID; the daemon finds their
//! cgroups in the kubelet's layout.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::{
    membership::{self, Decision, MeshSettings, PodFacts},
    state::{CaptureOverrides, Mode, PodCgroup, PodSpec},
    types::PodUid,
};

/// What the feed says about the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub pods: Vec<PodSpec>,
    /// ztunnel pods, by UID (their cgroups are found like any pod's).
    pub ztunnels: Vec<PodUid>,
    /// Pods carrying [`REDIRECTION`], with its value.
    pub redirection: BTreeMap<PodUid, String>,
}

/// The annotation a node agent writes on a pod through `pods/status`:
/// `pending` once it is enrolled, `enabled` once ztunnel acknowledged it.
/// istiod marks the workload HBONE only when it reads `enabled`.
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

/// A change of [`REDIRECTION`] on one pod: `Some(value)` to set, `None` to
/// remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectionPatch {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    pub value: Option<&'static str>,
}

/// The annotation changes that make every pod say where its redirection
/// stands: enrolled pods `enabled` when `ready` (ztunnel acknowledged
/// them) and `pending` before, other pods without it.
pub fn redirection_patches(
    snapshot: &Snapshot,
    ready: &std::collections::BTreeSet<PodUid>,
) -> Vec<RedirectionPatch> {
    snapshot
        .pods
        .iter()
        .filter_map(|pod| {
            let want = match pod.mode {
                Mode::Ambient if ready.contains(&pod.uid) => Some("enabled"),
                Mode::Ambient => Some("pending"),
                Mode::None => None,
            };
            let has = snapshot.redirection.get(&pod.uid).map(String::as_str);
            (has != want).then(|| RedirectionPatch {
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                value: want,
            })
        })
        .collect()
}

/// Writes one [`RedirectionPatch`] through the `pods/status` subresource
/// (a JSON merge patch, as istio-cni does).
pub async fn patch_redirection(client: Client, patch: &RedirectionPatch) -> kube::Result<()> {
    let body = serde_json::json!({"metadata": {"annotations": {REDIRECTION: patch.value}}});
    Api::<Pod>::namespaced(client, &patch.namespace)
        .patch_status(
            &patch.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&body),
        )
        .await
        .map(|_| ())
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
            .map(|o| (o.kind.clone(), o.name.clone()))
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

/// Applies Istio's rules to every pod. `last` is the previous snapshot: a
/// pod whose annotations cannot be read keeps its entry from it (and is
/// left out if it had none), so a bad edit never changes the datapath.
pub fn snapshot(
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    mesh: &MeshSettings,
    last: &Snapshot,
) -> Snapshot {
    let ns_labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .iter()
        .filter_map(|ns| {
            Some((
                ns.metadata.name.clone()?,
                ns.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect();
    let empty = BTreeMap::new();
    let mut out = Snapshot::default();
    for pod in pods {
        let Some(uid) = pod.metadata.uid.clone().map(PodUid) else {
            continue;
        };
        let facts = facts(pod);
        let labels = ns_labels.get(&facts.namespace).unwrap_or(&empty);
        let (mode, capture) = match membership::decide(&facts, labels, mesh) {
            Ok(Decision::Ztunnel) => {
                out.ztunnels.push(uid);
                continue;
            }
            Ok(Decision::Enrolled {
                inbound_capture,
                dns_capture,
            }) => (
                Mode::Ambient,
                CaptureOverrides {
                    inbound: inbound_capture,
                    dns: dns_capture,
                },
            ),
            Ok(Decision::NotEnrolled(_)) => (Mode::None, CaptureOverrides::default()),
            Err(e) => {
                error!(pod = %uid, namespace = %facts.namespace, "keeping the pod's last good state: {e}");
                out.pods
                    .extend(last.pods.iter().find(|p| p.uid == uid).cloned());
                continue;
            }
        };
        if let Some(value) = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REDIRECTION))
        {
            out.redirection.insert(uid.clone(), value.clone());
        }
        out.pods.push(PodSpec {
            uid,
            name: pod.metadata.name.clone().unwrap_or_default(),
            service_account: crate::state::service_account_or_default(
                facts.service_account.clone(),
            ),
            namespace: facts.namespace,
            cgroup: PodCgroup::Uid,
            ips: pod_ips(pod),
            mode,
            accelerate: None,
            capture,
        });
    }
    out
}

/// Watches `node`'s pods and every namespace, publishing a new snapshot on
/// every change. Runs until the receiver is gone; watch errors are retried
/// with backoff by the watchers.
pub async fn run(
    client: Client,
    node: String,
    mesh: MeshSettings,
    out: watch::Sender<Option<Snapshot>>,
) {
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .default_backoff()
    .reflect(pod_writer)
    .map(|e| e.map(|ev| (true, matches!(ev, watcher::Event::InitDone))));
    let namespaces = watcher(Api::<Namespace>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(ns_writer)
        .map(|e| e.map(|ev| (false, matches!(ev, watcher::Event::InitDone))));
    let mut events = std::pin::pin!(futures::stream::select(pods, namespaces));
    let mut last = Snapshot::default();
    let (mut pods_listed, mut namespaces_listed) = (false, false);
    while let Some(event) = events.next().await {
        match event {
            Err(e) => {
                warn!("Kubernetes watch: {e}");
                continue;
            }
            Ok((true, true)) => pods_listed = true,
            Ok((false, true)) => namespaces_listed = true,
            Ok(_) => {}
        }
        // Both stores must have listed before a snapshot means anything.
        if !pods_listed || !namespaces_listed {
            continue;
        }
        let snap = snapshot(&pod_store.state(), &ns_store.state(), &mesh, &last);
        if snap != last {
            last = snap.clone();
            if out.send(Some(snap)).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(value: serde_json::Value) -> Arc<Pod> {
        Arc::new(serde_json::from_value(value).expect("a Pod"))
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
    ) -> Arc<Pod> {
        pod(json!({
            "metadata": {"name": format!("app-{uid}"), "namespace": ns, "uid": uid,
                         "labels": labels, "annotations": annotations},
            "spec": {"containers": [], "serviceAccountName": "default"},
            "status": {"phase": "Running", "podIP": "10.1.0.7",
                       "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]}
        }))
    }

    fn modes(s: &Snapshot) -> Vec<(String, Mode)> {
        s.pods.iter().map(|p| (p.uid.0.clone(), p.mode)).collect()
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
        let s = snapshot(&pods, &nss, &MeshSettings::default(), &Snapshot::default());
        assert_eq!(
            modes(&s),
            vec![
                ("a".into(), Mode::Ambient),
                ("b".into(), Mode::None),
                ("c".into(), Mode::None)
            ]
        );
        assert_eq!(s.pods[0].ips.len(), 2);
        assert_eq!(s.pods[0].namespace, "mesh");
        assert_eq!(s.pods[0].cgroup, PodCgroup::Uid);
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
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        let ready = [PodUid("b".into())].into();
        let patches: Vec<_> = redirection_patches(&snap, &ready)
            .into_iter()
            .map(|p| (p.uid.0, p.value))
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
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        let off = snapshot(
            &pods,
            &[namespace("mesh", json!({}))],
            &MeshSettings::default(),
            &on,
        );
        assert_eq!(modes(&on), vec![("a".into(), Mode::Ambient)]);
        assert_eq!(modes(&off), vec![("a".into(), Mode::None)]);
    }

    #[test]
    fn a_proven_ztunnel_pod_is_listed_as_ztunnel() {
        let z = pod(json!({
            "metadata": {"name": "ztunnel-x", "namespace": "istio-system", "uid": "z1",
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                              "name": "ztunnel", "uid": "ds"}]},
            "spec": {"containers": [], "serviceAccountName": "ztunnel"},
            "status": {"phase": "Running"}
        }));
        let s = snapshot(&[z], &[], &MeshSettings::default(), &Snapshot::default());
        assert_eq!(s.ztunnels, vec![PodUid("z1".into())]);
        assert!(s.pods.is_empty());
    }

    #[test]
    fn a_pod_with_a_malformed_annotation_keeps_its_last_good_state() {
        let ambient = json!({"istio.io/dataplane-mode": "ambient"});
        let good = snapshot(
            &[app("a", "ns", ambient.clone(), json!({}))],
            &[],
            &MeshSettings::default(),
            &Snapshot::default(),
        );
        let bad = [app(
            "a",
            "ns",
            ambient,
            json!({"ambient.istio.io/dns-capture": "maybe"}),
        )];
        let after = snapshot(&bad, &[], &MeshSettings::default(), &good);
        assert_eq!(after, good);
        // With no earlier state, the pod stays out.
        let first = snapshot(&bad, &[], &MeshSettings::default(), &Snapshot::default());
        assert!(first.pods.is_empty());
    }
}
