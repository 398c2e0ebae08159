//! The sources' views of the node merged into one [`NodeSpec`]: which
//! source's pod wins when two name the same UID, and what the CNI plugin
//! adds to a pod no feed can know yet.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use super::spec::{CgroupRef, Mode, NodeSpec, PodCgroup, PodMap, PodSpec, ZtunnelSpec};
use crate::{
    sources::{cni::Sandboxes, file, kubernetes, xds},
    types::WorkloadId,
};

/// istiod's workloads on this node as pods, by UID.
pub fn istiod_pods(snapshot: &xds::Snapshot) -> PodMap {
    snapshot
        .workloads
        .iter()
        .map(|w| {
            (
                WorkloadId::Istio(w.uid.as_str().into()),
                Arc::new(istiod_pod(w)),
            )
        })
        .collect()
}

/// What each source last delivered (`None`: nothing yet, or not a source).
#[derive(Clone, Copy)]
pub struct Views<'a> {
    pub file: Option<&'a file::View>,
    pub kubernetes: Option<&'a kubernetes::Snapshot>,
    /// istiod's workloads as pods, when they decide membership (Kubernetes
    /// is not a source; otherwise they are only a cross-check).
    pub istiod: Option<&'a PodMap>,
    pub pushed_pods: &'a PodMap,
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

    /// Every UID some source names a pod by.
    pub fn uids(&self) -> BTreeSet<&WorkloadId> {
        let mut out: BTreeSet<&WorkloadId> = self.pushed_pods.keys().collect();
        out.extend(self.file.iter().flat_map(|f| f.pods.keys()));
        out.extend(self.kubernetes.iter().flat_map(|k| k.pods.keys()));
        out.extend(self.istiod.iter().flat_map(|i| i.keys()));
        out
    }
}

/// The pod `uid` as the sources say, a later one replacing an earlier: the
/// file, then Kubernetes (or istiod's workloads), then pushes. The file,
/// Kubernetes and pushes name pods by Kubernetes UID, istiod by its own
/// workload name, so a push or a file entry never replaces an istiod
/// workload. `None`: no source names it.
pub fn pod(views: &Views, uid: &WorkloadId) -> Option<Arc<PodSpec>> {
    let mut pod = views
        .pushed_pods
        .get(uid)
        .or_else(|| views.istiod.and_then(|i| i.get(uid)))
        .or_else(|| views.kubernetes.and_then(|k| k.pods.get(uid)))
        .or_else(|| views.file.and_then(|f| f.pods.get(uid)))?
        .clone();
    // The plugin knows a new sandbox's namespace before any process runs
    // in it, and its addresses before the API publishes them.
    if let Some(sandbox) = uid.pod_uid().and_then(|uid| views.sandboxes.get(uid)) {
        let pod = Arc::make_mut(&mut pod);
        pod.netns = Some(sandbox.netns.clone());
        if pod.ips.is_empty() {
            pod.ips = sandbox.ips.clone();
        }
    }
    Some(pod)
}

/// The node-wide part of the merged state: the file's shared redirect, and
/// every source's ztunnels (its pods are merged by [`pod`]).
pub fn node(views: &Views) -> NodeSpec {
    let mut node = views.file.map(|f| f.node.clone()).unwrap_or_default();
    if let Some(kube) = views.kubernetes {
        node.ztunnels
            .extend(kube.ztunnels.iter().map(|uid| ZtunnelSpec {
                cgroup: CgroupRef::Pod(uid.clone()),
                zero_copy: false,
            }));
    }
    for (path, zero_copy) in views.pushed_ztunnels {
        let cgroup = CgroupRef::Path(path.clone());
        if !node.ztunnels.iter().any(|f| f.cgroup == cgroup) {
            node.ztunnels.push(ZtunnelSpec {
                cgroup,
                zero_copy: *zero_copy,
            });
        }
    }
    node
}

/// A pod as istiod describes it: found by its addresses.
fn istiod_pod(w: &xds::Workload) -> PodSpec {
    PodSpec {
        kept_because: None,
        uid: WorkloadId::Istio(w.uid.as_str().into()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::spec::fixtures::pod;
    use crate::types::PodUid;

    /// The whole node state from every source (see [`pod`] and [`node`]);
    /// `None` until some source has delivered.
    fn merge(views: &Views) -> Option<NodeSpec> {
        if !views.any() {
            return None;
        }
        let mut spec = node(views);
        spec.pods = views
            .uids()
            .into_iter()
            .filter_map(|uid| super::pod(views, uid))
            .map(Arc::unwrap_or_clone)
            .collect();
        Some(spec)
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
            pods: [(
                WorkloadId::kubernetes("a"),
                Arc::new(pod("a", "from-kubernetes")),
            )]
            .into(),
            ..Default::default()
        };
        let pushed: PodMap = [(WorkloadId::kubernetes("b"), Arc::new(pod("b", "pushed")))].into();
        let ztunnels = BTreeMap::new();
        let sandboxes = Sandboxes::default();
        let file = file::View::from(file);
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
            .map(|p| (p.uid.as_str(), p.name.as_str()))
            .collect();
        assert_eq!(names, [("a", "from-kubernetes"), ("b", "pushed")].into());
        // Merging is a function of the views alone.
        assert_eq!(merge(&views), Some(merged));
    }

    #[test]
    fn a_cni_sandbox_joins_the_pod_of_its_kubernetes_uid_never_an_istiod_workload_of_that_name() {
        let name = "Kubernetes//Pod/default/a";
        let sandbox = || crate::sources::cni::Sandbox {
            namespace: "default".into(),
            name: "a".into(),
            container_id: "c1".into(),
            netns: "/var/run/netns/a".into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
        };
        let mut sandboxes = Sandboxes::default();
        sandboxes.add(PodUid::new(name), sandbox());
        sandboxes.add(PodUid::new("uid-b"), sandbox());
        let istiod: PodMap = [(WorkloadId::Istio(name.into()), Arc::new(pod(name, "a")))].into();
        let pushed: PodMap =
            [(WorkloadId::kubernetes("uid-b"), Arc::new(pod("uid-b", "b")))].into();
        let ztunnels = BTreeMap::new();
        let views = Views {
            file: None,
            kubernetes: None,
            istiod: Some(&istiod),
            pushed_pods: &pushed,
            pushed_ztunnels: &ztunnels,
            sandboxes: &sandboxes,
        };
        let a = super::pod(&views, &WorkloadId::Istio(name.into())).unwrap();
        assert_eq!((&a.netns, &a.ips), (&None, &vec![]));
        let b = super::pod(&views, &WorkloadId::kubernetes("uid-b")).unwrap();
        assert_eq!(b.netns, Some("/var/run/netns/a".into()));
    }
}
