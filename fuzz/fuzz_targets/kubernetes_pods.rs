//! Kubernetes objects to membership decisions: any JSON list of pods and
//! namespaces, as the API server could send them, yields a snapshot that
//! follows Istio's rules, never a panic. A pod whose override annotation
//! is malformed keeps exactly its last good entry, and the redirection
//! annotation patches the snapshot asks for leave nothing more to patch.

#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ambridge::{
    node::membership::{
        BYPASS_INBOUND_ANNOTATION, DATAPLANE_MODE_LABEL, DNS_CAPTURE_ANNOTATION, DaemonSetUid,
        MeshSettings, SIDECAR_STATUS_ANNOTATION,
    },
    node::spec::{Mode, PodSpec},
    sources::kubernetes::{self, KeptPod, REDIRECTION, Snapshot, pod::Pod},
    types::WorkloadId,
};
use k8s_openapi::api::core::v1::Namespace;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

/// What the watches see: pods, namespaces, and the UID of ztunnel's
/// DaemonSet object (none: no DaemonSet found).
#[derive(Deserialize)]
struct Objects {
    #[serde(default)]
    pods: Vec<Pod>,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    #[serde(default)]
    ztunnel_daemonset_uid: Option<String>,
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(String::as_str)
}

/// Whether Istio's rules allow `pod` in the mesh at all (ztunnel aside).
fn may_enroll(pod: &Pod, namespaces: &[Arc<Namespace>], mesh: &MeshSettings) -> bool {
    let meta = &pod.metadata;
    let ns = meta.namespace.clone().unwrap_or_default();
    // The namespace store keeps the last object of a name.
    let ns_labels = namespaces
        .iter()
        .rfind(|n| n.metadata.name.as_deref() == Some(ns.as_str()))
        .and_then(|n| n.metadata.labels.as_ref());
    let own = label(meta.labels.as_ref(), DATAPLANE_MODE_LABEL);
    let asked = own == Some("ambient")
        || (own != Some("none") && label(ns_labels, DATAPLANE_MODE_LABEL) == Some("ambient"));
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let sidecar = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    asked
        && !host_network
        && !sidecar
        && !mesh.excluded_namespaces.contains(&ns)
        && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether `pod` carries ztunnel's proven identity: controlled by the
/// DaemonSet object `daemonset` itself.
fn is_ztunnel(pod: &Pod, mesh: &MeshSettings, daemonset: Option<&DaemonSetUid>) -> bool {
    pod.metadata.namespace.as_deref() == Some(mesh.ztunnel_namespace.as_str())
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            == Some(mesh.ztunnel_service_account.as_str())
        && pod.metadata.owner_references.iter().flatten().any(|o| {
            o.kind == "DaemonSet"
                && o.name == mesh.ztunnel_daemonset
                && o.controller == Some(true)
                && daemonset.is_some_and(|d| d.0 == o.uid)
        })
}

/// The snapshot's entry of each UID that names exactly one input pod.
fn by_uid<'a>(
    snapshot: &'a Snapshot,
    unique: &BTreeSet<WorkloadId>,
) -> BTreeMap<WorkloadId, &'a PodSpec> {
    snapshot
        .pods
        .iter()
        .filter(|(uid, _)| unique.contains(uid))
        .map(|(uid, p)| (uid.clone(), &**p))
        .collect()
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(objects) = serde_json::from_slice::<Objects>(bytes) else {
        return;
    };
    let mesh = MeshSettings::default();
    let pods: Vec<Arc<Pod>> = objects.pods.into_iter().map(Arc::new).collect();
    let namespaces: Vec<Arc<Namespace>> = objects.namespaces.into_iter().map(Arc::new).collect();
    let daemonset = objects.ztunnel_daemonset_uid.map(DaemonSetUid);
    let ds = daemonset.as_ref();
    // What the feed keeps of each (a pod without a UID is not kept).
    let kept: Vec<KeptPod> = pods.iter().filter_map(|p| KeptPod::of(p)).collect();
    let fresh = kubernetes::snapshot(&kept, &namespaces, ds, &mesh, &Snapshot::default());

    let mut count: BTreeMap<WorkloadId, usize> = BTreeMap::new();
    for uid in pods.iter().filter_map(|p| p.metadata.uid.clone()) {
        *count.entry(WorkloadId::kubernetes(uid)).or_default() += 1;
    }
    let of_uid = |uid: &str| -> Vec<&Arc<Pod>> {
        pods.iter()
            .filter(|p| p.metadata.uid.as_deref() == Some(uid))
            .collect()
    };
    for pod in fresh.pods.values() {
        assert!(
            count.contains_key(&pod.uid),
            "pod {} is in no input",
            pod.uid
        );
        if pod.mode == Mode::Ambient {
            assert!(
                of_uid(pod.uid.as_str())
                    .into_iter()
                    .any(|p| may_enroll(p, &namespaces, &mesh) && !is_ztunnel(p, &mesh, ds)),
                "pod {} enrolled against Istio's rules",
                pod.uid
            );
        }
    }
    for uid in &fresh.ztunnels {
        assert!(
            of_uid(uid.as_str())
                .into_iter()
                .any(|p| is_ztunnel(p, &mesh, ds)),
            "{uid} taken for ztunnel without its identity"
        );
    }

    // The same pods without the two override annotations: the last good
    // state of a pod whose override is malformed.
    let stripped: Vec<Arc<Pod>> = pods
        .iter()
        .map(|p| {
            let mut p = Pod::clone(p);
            if let Some(a) = p.metadata.annotations.as_mut() {
                a.remove(BYPASS_INBOUND_ANNOTATION);
                a.remove(DNS_CAPTURE_ANNOTATION);
            }
            Arc::new(p)
        })
        .collect();
    let stripped: Vec<KeptPod> = stripped.iter().filter_map(|p| KeptPod::of(p)).collect();
    let last = kubernetes::snapshot(&stripped, &namespaces, ds, &mesh, &Snapshot::default());
    let unique: BTreeSet<WorkloadId> = count
        .iter()
        .filter(|(_, n)| **n == 1)
        .map(|(uid, _)| uid.clone())
        .collect();
    let last_by = by_uid(&last, &unique);
    for uid in &unique {
        let decided = !uid.pod_uid().is_some_and(|u| last.ztunnels.contains(u));
        assert_eq!(
            last_by.contains_key(uid),
            decided,
            "pod {uid} undecidable without override annotations"
        );
    }
    let current = kubernetes::snapshot(&kept, &namespaces, ds, &mesh, &last);
    let (fresh_by, current_by) = (by_uid(&fresh, &unique), by_uid(&current, &unique));
    // A kept entry says why it is kept; the rest of it is the last good one.
    let without_reason = |p: Option<&&PodSpec>| {
        p.map(|p| PodSpec {
            kept_because: None,
            ..PodSpec::clone(p)
        })
    };
    for uid in &unique {
        let now = current_by.get(uid);
        assert_eq!(
            without_reason(now),
            without_reason(fresh_by.get(uid).or(last_by.get(uid))),
            "pod {uid}: neither its decision nor its last good entry"
        );
        let kept = !fresh_by.contains_key(uid) && last_by.contains_key(uid);
        assert_eq!(
            now.is_some_and(|p| p.kept_because.is_some()),
            kept,
            "pod {uid}: a reason where no last good entry is kept, or none where one is"
        );
    }

    // Kubernetes never gives two pods one UID; with duplicates, which of
    // them a snapshot keeps is not defined.
    if unique.len() != count.len() {
        return;
    }
    assert_eq!(
        kubernetes::snapshot(&kept, &namespaces, ds, &mesh, &fresh),
        fresh,
        "a snapshot given itself as the last one is not the same"
    );
    // Every other enrolled pod acknowledged by ztunnel.
    let ready: BTreeSet<WorkloadId> = fresh
        .pods
        .values()
        .filter(|p| p.mode == Mode::Ambient)
        .step_by(2)
        .map(|p| p.uid.clone())
        .collect();
    let patches = ambridge::publish::annotator::redirection_patches(&fresh, &ready);
    let mut patched = fresh.clone();
    for patch in &patches {
        assert!(
            fresh.pods.contains_key(&patch.uid),
            "a patch for {} outside the snapshot",
            patch.uid
        );
        match patch.value {
            Some(value) => patched.redirection.insert(patch.uid.clone(), value.into()),
            None => patched.redirection.remove(&patch.uid),
        };
    }
    assert!(
        ambridge::publish::annotator::redirection_patches(&patched, &ready).is_empty(),
        "{REDIRECTION} still to patch after its patches"
    );
});
