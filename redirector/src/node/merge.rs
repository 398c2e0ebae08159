//! The sources' views of the node merged into one [`NodeSpec`]: which
//! source's pod wins when two name the same UID, and what the CNI plugin
//! adds to a pod no feed can know yet.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use super::spec::{CgroupRef, Mode, NodeSpec, PodCgroup, PodSpec, ZtunnelSpec};
use crate::{
    sources::{cni::Sandboxes, kubernetes, xds},
    types::PodUid,
};

/// What each source last delivered (`None`: nothing yet, or not a source).
#[derive(Clone, Copy)]
pub struct Views<'a> {
    /// The workloads file's last good state.
    pub file: Option<&'a NodeSpec>,
    pub kubernetes: Option<&'a kubernetes::Snapshot>,
    /// istiod's workloads, when they decide membership (Kubernetes is not
    /// a source; otherwise they are only a cross-check).
    pub istiod: Option<&'a xds::Snapshot>,
    pub pushed_pods: &'a BTreeMap<PodUid, PodSpec>,
    /// Pushed ztunnel cgroups, with their zero-copy flag.
    pub pushed_ztunnels: &'a BTreeMap<PathBuf, bool>,
    pub sandboxes: &'a Sandboxes,
}

impl Views<'_> {
    /// Whether some source has delivered a node state.
    pub fn any(&self) -> bool {
        self.file.is_some()
            || self.kubernetes.is_some()
            || self.istiod.is_some()
            || !self.pushed_pods.is_empty()
            || !self.pushed_ztunnels.is_empty()
    }
}

/// The node state from every source, later ones replacing pods of the same
/// UID: the file, then Kubernetes (or istiod's workloads), then pushes.
/// `None` until some source has delivered.
pub fn merge(views: &Views) -> Option<NodeSpec> {
    if !views.any() {
        return None;
    }
    let mut spec = views.file.cloned().unwrap_or_default();
    if let Some(kube) = views.kubernetes {
        overlay(&mut spec.pods, kube.pods.values().cloned());
        spec.ztunnels
            .extend(kube.ztunnels.iter().map(|uid| ZtunnelSpec {
                cgroup: CgroupRef::Pod(uid.clone()),
                zero_copy: false,
            }));
    }
    if let Some(xds) = views.istiod {
        overlay(&mut spec.pods, xds.workloads.iter().map(istiod_pod));
    }
    overlay(&mut spec.pods, views.pushed_pods.values().cloned());
    // The plugin knows a new sandbox's namespace before any process runs
    // in it, and its addresses before the API publishes them.
    for pod in &mut spec.pods {
        if let Some(sandbox) = views.sandboxes.get(&pod.uid) {
            pod.netns = Some(sandbox.netns.clone());
            if pod.ips.is_empty() {
                pod.ips = sandbox.ips.clone();
            }
        }
    }
    for (path, zero_copy) in views.pushed_ztunnels {
        let cgroup = CgroupRef::Path(path.clone());
        if !spec.ztunnels.iter().any(|f| f.cgroup == cgroup) {
            spec.ztunnels.push(ZtunnelSpec {
                cgroup,
                zero_copy: *zero_copy,
            });
        }
    }
    Some(spec)
}

/// A pod as istiod describes it: found by its addresses.
fn istiod_pod(w: &xds::Workload) -> PodSpec {
    PodSpec {
        uid: PodUid(w.uid.clone()),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        cgroup: PodCgroup::Address,
        netns: None,
        ips: w.ips.clone(),
        mode: if w.captured {
            Mode::Ambient
        } else {
            Mode::None
        },
        accelerate: None,
        capture: Default::default(),
    }
}

/// Adds `later` to `pods`, each replacing the pod of the same UID.
fn overlay(pods: &mut Vec<PodSpec>, later: impl Iterator<Item = PodSpec>) {
    let later: Vec<PodSpec> = later.collect();
    let uids: BTreeSet<&PodUid> = later.iter().map(|p| &p.uid).collect();
    pods.retain(|p| !uids.contains(&p.uid));
    pods.extend(later);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str) -> PodSpec {
        PodSpec {
            uid: PodUid(uid.into()),
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: PodCgroup::Uid,
            netns: None,
            ips: vec![],
            mode: Mode::Ambient,
            accelerate: None,
            capture: Default::default(),
        }
    }

    #[test]
    fn nothing_is_merged_until_some_source_delivered() {
        let none = BTreeMap::new();
        let ztunnels = BTreeMap::new();
        let sandboxes = Sandboxes::default();
        let views = Views {
            file: None,
            kubernetes: None,
            istiod: None,
            pushed_pods: &none,
            pushed_ztunnels: &ztunnels,
            sandboxes: &sandboxes,
        };
        assert_eq!(merge(&views), None);
    }

    #[test]
    fn a_later_source_replaces_the_pod_of_the_same_uid_and_others_stay() {
        let file = NodeSpec {
            pods: vec![pod("a", "from-file"), pod("b", "from-file")],
            ..NodeSpec::default()
        };
        let kube = kubernetes::Snapshot {
            pods: [(PodUid("a".into()), pod("a", "from-kubernetes"))].into(),
            ..Default::default()
        };
        let pushed: BTreeMap<_, _> = [(PodUid("b".into()), pod("b", "pushed"))].into();
        let ztunnels = BTreeMap::new();
        let sandboxes = Sandboxes::default();
        let views = Views {
            file: Some(&file),
            kubernetes: Some(&kube),
            istiod: None,
            pushed_pods: &pushed,
            pushed_ztunnels: &ztunnels,
            sandboxes: &sandboxes,
        };
        let merged = merge(&views).unwrap();
        let names: BTreeMap<&str, &str> = merged
            .pods
            .iter()
            .map(|p| (p.uid.0.as_str(), p.name.as_str()))
            .collect();
        assert_eq!(names, [("a", "from-kubernetes"), ("b", "pushed")].into());
        // Merging is a function of the views alone.
        assert_eq!(merge(&views), Some(merged));
    }
}
