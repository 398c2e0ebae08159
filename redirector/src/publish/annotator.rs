//! `ambient.istio.io/redirection` on each pod, written through the
//! `pods/status` subresource as istio-cni writes it: `pending` once a pod is
//! enrolled, `enabled` once ztunnel acknowledged it. istiod marks a
//! workload HBONE only when it reads `enabled`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tracing::{info, warn};

use super::{Publish, Reconciled};
use crate::{
    node::{desired::Touched, spec::Mode, spec::PodSpec},
    sources::kubernetes::{REDIRECTION, Snapshot},
    types::WorkloadId,
};

/// Writes `ambient.istio.io/redirection` on pods, as istio-cni does.
pub struct Annotator {
    client: Client,
    /// The last value asked for, by pod, and when, until the pod shows it:
    /// asked again only when it changes, or when the pod still does not
    /// show it 10 s later (a failed patch).
    requested: BTreeMap<WorkloadId, (Option<&'static str>, std::time::Instant)>,
}

impl Annotator {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            requested: BTreeMap::new(),
        }
    }

    const RETRY: Duration = Duration::from_secs(10);

    /// Asks for the patches that make the pods `uids` of `kube` (and those
    /// whose patch is not shown yet) show where their redirection stands,
    /// given the pods ztunnel has (`ready`).
    pub fn update<'a>(
        &mut self,
        kube: &Snapshot,
        uids: impl IntoIterator<Item = &'a WorkloadId>,
        ready: &BTreeSet<WorkloadId>,
    ) {
        let mut looked_at: BTreeSet<WorkloadId> = self.requested.keys().cloned().collect();
        looked_at.extend(uids.into_iter().cloned());
        for uid in &looked_at {
            let Some(pod) = kube.pods.get(uid) else {
                self.requested.remove(uid);
                continue;
            };
            let Some(patch) = redirection_patch(kube, pod, ready) else {
                // It shows what is wanted.
                self.requested.remove(uid);
                continue;
            };
            if self
                .requested
                .get(&patch.uid)
                .is_some_and(|(value, at)| *value == patch.value && at.elapsed() < Self::RETRY)
            {
                continue;
            }
            self.requested
                .insert(patch.uid.clone(), (patch.value, std::time::Instant::now()));
            let client = self.client.clone();
            tokio::spawn(async move {
                match patch_redirection(client, &patch).await {
                    Ok(()) => {
                        info!(pod = %patch.uid, namespace = %patch.namespace, name = %patch.name, value = ?patch.value, "redirection annotation written")
                    }
                    Err(e) => {
                        warn!(pod = %patch.uid, namespace = %patch.namespace, name = %patch.name, "writing the redirection annotation failed, retrying: {e}")
                    }
                }
            });
        }
    }
}

/// A change of [`REDIRECTION`] on one pod: `Some(value)` to set, `None` to
/// remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectionPatch {
    pub uid: WorkloadId,
    pub namespace: String,
    pub name: String,
    pub value: Option<&'static str>,
}

/// The annotation changes that make every pod say where its redirection
/// stands: enrolled pods `enabled` when `ready` (ztunnel acknowledged
/// them) and `pending` before, other pods without it.
pub fn redirection_patches(
    snapshot: &Snapshot,
    ready: &BTreeSet<WorkloadId>,
) -> Vec<RedirectionPatch> {
    snapshot
        .pods
        .values()
        .filter_map(|pod| redirection_patch(snapshot, pod, ready))
        .collect()
}

/// The annotation change `pod` needs, if any (see [`redirection_patches`]).
fn redirection_patch(
    snapshot: &Snapshot,
    pod: &PodSpec,
    ready: &BTreeSet<WorkloadId>,
) -> Option<RedirectionPatch> {
    let want = match pod.mode {
        Mode::Ambient if ready.contains(&pod.uid) => Some("enabled"),
        Mode::Ambient => Some("pending"),
        Mode::None | Mode::Sidecar => None,
    };
    let has = snapshot.redirection.get(&pod.uid).map(String::as_str);
    (has != want).then(|| RedirectionPatch {
        uid: pod.uid.clone(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        value: want,
    })
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

impl Publish for Annotator {
    fn reconciled(&mut self, r: &Reconciled) {
        if let (Some(kube), Some(ready)) = (r.kubernetes, r.acknowledged) {
            let before: Vec<WorkloadId> = match r.republish {
                Touched::All => kube.pods.keys().cloned().collect(),
                Touched::Pods(_) => Vec::new(),
            };
            self.update(kube, r.uids(before.iter()), ready);
        }
    }
}
