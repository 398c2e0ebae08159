//! From node state to map operations: compute the cgroup map the kernel
//! should hold, diff it against what it holds, apply only the difference.
//! Both steps are pure, so reconciling twice changes nothing the second time.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use ambridge_common::CgroupInfo;

use crate::{
    enroll,
    state::{NodeSpec, RedirectSettings},
    types::CgroupId,
};

/// A cgroup directory named by the node state that could not be resolved to
/// an id (typically a pod whose sandbox is not created yet). It is retried at
/// the next reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    pub owner: String,
    pub cgroup: PathBuf,
    pub error: String,
}

/// The cgroup map contents that `spec` calls for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub entries: BTreeMap<CgroupId, CgroupInfo>,
    pub unresolved: Vec<Unresolved>,
}

/// Computes the desired cgroup map. A ztunnel's entry wins over a pod's if
/// both resolve to the same cgroup.
pub fn desired(
    spec: &NodeSpec,
    redirect: &RedirectSettings,
    mut resolve: impl FnMut(&Path) -> io::Result<CgroupId>,
) -> Desired {
    let mut out = Desired::default();
    for pod in &spec.pods {
        match resolve(&pod.cgroup) {
            Ok(id) => {
                out.entries.insert(id, enroll::pod_entry(pod, redirect));
            }
            Err(e) => out.unresolved.push(Unresolved {
                owner: format!("pod {}/{} ({})", pod.namespace, pod.name, pod.uid),
                cgroup: pod.cgroup.clone(),
                error: e.to_string(),
            }),
        }
    }
    for z in &spec.ztunnels {
        match resolve(&z.cgroup) {
            Ok(id) => {
                out.entries.insert(id, enroll::ztunnel_entry());
            }
            Err(e) => out.unresolved.push(Unresolved {
                owner: "ztunnel".into(),
                cgroup: z.cgroup.clone(),
                error: e.to_string(),
            }),
        }
    }
    out
}

/// One change to the cgroup map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put(CgroupId, CgroupInfo),
    Delete(CgroupId),
}

/// The operations that turn `current` into `desired`: deletes first (a
/// cgroup id is never reused while its directory exists, so order between
/// different ids does not matter), then puts of new or changed entries.
pub fn diff(
    current: &BTreeMap<CgroupId, CgroupInfo>,
    desired: &BTreeMap<CgroupId, CgroupInfo>,
) -> Vec<Op> {
    let deletes = current
        .keys()
        .filter(|id| !desired.contains_key(id))
        .map(|id| Op::Delete(*id));
    let puts = desired
        .iter()
        .filter(|(id, info)| current.get(id) != Some(info))
        .map(|(id, info)| Op::Put(*id, *info));
    deletes.chain(puts).collect()
}

/// Applies `ops` to an in-memory copy of the map (what the kernel map becomes
/// once the same ops are applied to it).
pub fn apply(map: &mut BTreeMap<CgroupId, CgroupInfo>, ops: &[Op]) {
    for op in ops {
        match *op {
            Op::Put(id, info) => {
                map.insert(id, info);
            }
            Op::Delete(id) => {
                map.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ambridge_common::flags;

    use super::*;
    use crate::{
        state::{Mode, PodSpec, ZtunnelSpec},
        types::PodUid,
    };

    fn pod(uid: &str, cgroup: &str, mode: Mode) -> PodSpec {
        PodSpec {
            uid: PodUid(uid.into()),
            name: uid.into(),
            namespace: "default".into(),
            cgroup: cgroup.into(),
            ips: vec!["198.18.0.2".parse().unwrap()],
            mode,
        }
    }

    /// Resolves `/cg/<n>` to id n; anything else does not exist.
    fn resolve(path: &Path) -> io::Result<CgroupId> {
        path.strip_prefix("/cg")
            .ok()
            .and_then(|p| p.to_str()?.parse().ok())
            .map(CgroupId)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn spec() -> NodeSpec {
        NodeSpec {
            pods: vec![
                pod("a", "/cg/10", Mode::Ambient),
                pod("b", "/cg/11", Mode::None),
            ],
            ztunnels: vec![ZtunnelSpec {
                cgroup: "/cg/20".into(),
            }],
        }
    }

    #[test]
    fn reconciling_twice_changes_nothing_the_second_time() {
        let want = desired(&spec(), &RedirectSettings::default(), resolve).entries;
        let mut kernel = BTreeMap::new();
        let first = diff(&kernel, &want);
        assert_eq!(first.len(), 3);
        apply(&mut kernel, &first);
        assert_eq!(kernel, want);
        assert!(diff(&kernel, &want).is_empty());
    }

    #[test]
    fn entries_not_in_the_state_are_deleted() {
        let want = desired(&spec(), &RedirectSettings::default(), resolve).entries;
        let mut kernel = want.clone();
        kernel.insert(CgroupId(99), CgroupInfo::default());
        assert_eq!(diff(&kernel, &want), vec![Op::Delete(CgroupId(99))]);
    }

    #[test]
    fn a_changed_entry_is_rewritten_in_place() {
        let mut s = spec();
        let before = desired(&s, &RedirectSettings::default(), resolve).entries;
        s.pods[1].mode = Mode::Ambient;
        let after = desired(&s, &RedirectSettings::default(), resolve).entries;
        let ops = diff(&before, &after);
        assert_eq!(ops.len(), 1);
        assert!(matches!(ops[0], Op::Put(CgroupId(11), info) if info.flags & flags::ENROLLED != 0));
    }

    #[test]
    fn an_unresolvable_cgroup_is_reported_not_fatal() {
        let mut s = spec();
        s.pods.push(pod("c", "/elsewhere/pod-c", Mode::Ambient));
        let d = desired(&s, &RedirectSettings::default(), resolve);
        assert_eq!(d.entries.len(), 3);
        assert_eq!(d.unresolved.len(), 1);
        assert!(d.unresolved[0].owner.contains("default/c"));
    }

    #[test]
    fn ztunnel_wins_over_a_pod_on_the_same_cgroup() {
        let mut s = spec();
        s.ztunnels[0].cgroup = "/cg/10".into();
        let d = desired(&s, &RedirectSettings::default(), resolve);
        assert_eq!(d.entries[&CgroupId(10)].flags, flags::ZTUNNEL);
    }
}
