//! Entries pushed through the local API (`PushCgroup`): checked field by
//! field as they arrive, then against the node (a pushed cgroup must be a
//! pod-level cgroup of its own) before the daemon applies them.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use tokio::sync::oneshot;
use tonic::Status;

use super::invalid;
use crate::{
    api::pb,
    node::spec::{Mode, PodCgroup, PodSpec},
    types::{CgroupId, WorkloadId},
};

/// An entry pushed by an external agent, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pushed {
    Pod(PodSpec),
    RemovePod(WorkloadId),
    Ztunnel { cgroup: PathBuf, zero_copy: bool },
    RemoveZtunnel(PathBuf),
}

/// Checks a push request; errors name the offending field.
pub fn pushed(req: pb::PushCgroupRequest) -> Result<Pushed, Status> {
    let cgroup_path = |field: &str, raw: &str| -> Result<Option<PathBuf>, Status> {
        if raw.is_empty() {
            return Ok(None);
        }
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(invalid(field, format!("{raw:?} is not an absolute path")));
        }
        // `..` would let a path name a cgroup other than the one it spells,
        // out of reach of the checks of [`refuse_containing`].
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(invalid(field, format!("{raw:?} must not contain `..`")));
        }
        Ok(Some(path))
    };
    match req.entry {
        None => Err(invalid("entry", "give a pod or a ztunnel".into())),
        Some(pb::push_cgroup_request::Entry::Pod(p)) => {
            if p.uid.is_empty() {
                return Err(invalid("pod.uid", "must not be empty".into()));
            }
            if !crate::types::PodUid::may_be(&p.uid) {
                return Err(invalid(
                    "pod.uid",
                    format!("{:?} is not a Kubernetes pod UID (it has a `/`)", p.uid),
                ));
            }
            if req.remove {
                return Ok(Pushed::RemovePod(WorkloadId::kubernetes(p.uid)));
            }
            let cgroup = cgroup_path("pod.cgroup", &p.cgroup)?;
            if cgroup.is_none() && !crate::host::cgroup::is_pod_uid(&p.uid) {
                return Err(invalid(
                    "pod.uid",
                    format!("{:?} is not a Kubernetes pod UID; give pod.cgroup", p.uid),
                ));
            }
            let ips = p
                .ips
                .iter()
                .map(|ip| {
                    ip.parse::<IpAddr>()
                        .map_err(|e| invalid("pod.ips", format!("{ip:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mode = match pb::Mode::try_from(p.mode) {
                Ok(pb::Mode::Ambient) => Mode::Ambient,
                Ok(pb::Mode::None) => Mode::None,
                // With Istio's default rules: a push carries no annotations.
                Ok(pb::Mode::Sidecar) => Mode::Sidecar,
                Ok(pb::Mode::Unspecified) => {
                    return Err(invalid(
                        "pod.mode",
                        "not set: expected MODE_AMBIENT, MODE_NONE or MODE_SIDECAR".into(),
                    ));
                }
                Err(_) => {
                    return Err(invalid(
                        "pod.mode",
                        format!(
                            "{} is no Mode: expected MODE_AMBIENT, MODE_NONE or MODE_SIDECAR",
                            p.mode
                        ),
                    ));
                }
            };
            Ok(Pushed::Pod(PodSpec {
                kept_because: None,
                uid: WorkloadId::kubernetes(p.uid),
                name: p.name,
                namespace: p.namespace,
                service_account: crate::node::spec::service_account_or_default(Some(
                    p.service_account,
                )),
                cgroup: cgroup.map_or(PodCgroup::Uid, |c| PodCgroup::Path(c.into())),
                netns: None,
                ips,
                mode,
                accelerate: None,
                capture: Default::default(),
            }))
        }
        Some(pb::push_cgroup_request::Entry::Ztunnel(z)) => {
            let cgroup = cgroup_path("ztunnel.cgroup", &z.cgroup)?
                .ok_or_else(|| invalid("ztunnel.cgroup", "must not be empty".into()))?;
            Ok(if req.remove {
                Pushed::RemoveZtunnel(cgroup)
            } else {
                Pushed::Ztunnel {
                    cgroup,
                    zero_copy: z.zero_copy,
                }
            })
        }
    }
}

/// A pod of the node state on the cgroup the last reconcile found for it:
/// what a pushed cgroup must not contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedPod<'a> {
    pub uid: &'a WorkloadId,
    pub namespace: &'a str,
    pub name: &'a str,
    pub cgroup: &'a Path,
}

/// A directory that holds pods and is never one pod, with what it is: the
/// cgroup the programs attach to, the kubepods parent, the kubelet's
/// `kubepods` and QoS directories.
pub type PodParent = (PathBuf, &'static str);

/// The directories of [`PodParent`] for a daemon attached at `cgroup_root`
/// whose kubelet cgroups live under `kubepods_parent`.
pub fn pod_parents(cgroup_root: &Path, kubepods_parent: &Path) -> Vec<PodParent> {
    let mut dirs = vec![
        (
            cgroup_root.to_path_buf(),
            "the cgroup the programs attach to",
        ),
        (kubepods_parent.to_path_buf(), "the kubepods parent"),
    ];
    dirs.extend(
        crate::host::cgroup::kubelet_pod_dirs(kubepods_parent)
            .into_iter()
            .map(|d| (d, "the kubelet's pod directory")),
    );
    dirs
}

/// Refuses a push whose cgroup is not a pod-level cgroup of its own: one
/// that is, or is an ancestor of, another pod's cgroup in `placed`, or of a
/// directory of `parents`. A ztunnel cgroup there would exempt every pod
/// below it from capture, and a pod's entry would be taken by every pod
/// below it that has none. Cgroups are compared by id (`id_of`, `None` for
/// a path that is not a cgroup), so another mount of cgroup2 does not
/// hide one, and by path, for a cgroup not created yet. A pushed pod may
/// share its cgroup with the pod of the same UID it replaces.
pub fn refuse_containing<'a>(
    entry: &Pushed,
    placed: impl IntoIterator<Item = PlacedPod<'a>>,
    parents: &[PodParent],
    id_of: &mut dyn FnMut(&Path) -> Option<CgroupId>,
) -> Result<(), Status> {
    let (field, pushed, uid) = match entry {
        Pushed::Ztunnel { cgroup, .. } => ("ztunnel.cgroup", cgroup.as_path(), None),
        Pushed::Pod(PodSpec {
            cgroup: PodCgroup::Path(cgroup),
            uid,
            ..
        }) => ("pod.cgroup", &**cgroup, Some(uid)),
        _ => return Ok(()),
    };
    let mut ids: HashMap<PathBuf, Option<CgroupId>> = HashMap::new();
    let mut id = |path: &Path| *ids.entry(path.to_path_buf()).or_insert_with(|| id_of(path));
    let pushed_id = id(pushed);
    let mut is_pushed =
        |path: &Path| path == pushed || (pushed_id.is_some() && id(path) == pushed_id);
    for pod in placed.into_iter().filter(|p| Some(p.uid) != uid) {
        if let Some(depth) = pod.cgroup.ancestors().position(&mut is_pushed) {
            let relation = if depth == 0 { "is" } else { "contains" };
            return Err(invalid(
                field,
                format!(
                    "{} {relation} the cgroup of pod {}/{} ({}, cgroup {}): push a pod-level cgroup that holds no other pod",
                    pushed.display(),
                    pod.namespace,
                    pod.name,
                    pod.uid,
                    pod.cgroup.display()
                ),
            ));
        }
    }
    for (dir, what) in parents {
        if dir.ancestors().any(&mut is_pushed) {
            return Err(invalid(
                field,
                format!(
                    "{} is or contains {what} {}: not a pod-level cgroup",
                    pushed.display(),
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A push checked field by field, and where the daemon answers it once it
/// has checked it against the node and applied it (or refused it).
pub struct PushRequest {
    pub entry: Pushed,
    pub reply: oneshot::Sender<Result<(), Status>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_pod(p: pb::PushedPod, remove: bool) -> Result<Pushed, Status> {
        pushed(pb::PushCgroupRequest {
            entry: Some(pb::push_cgroup_request::Entry::Pod(p)),
            remove,
        })
    }

    #[test]
    fn a_pushed_pod_is_validated_field_by_field() {
        let good = pb::PushedPod {
            uid: "u1".into(),
            namespace: "default".into(),
            name: "sleep".into(),
            cgroup: "/sys/fs/cgroup/x".into(),
            ips: vec!["198.18.0.2".into()],
            mode: pb::Mode::Ambient.into(),
            service_account: String::new(),
        };
        assert!(
            matches!(push_pod(good.clone(), false), Ok(Pushed::Pod(p)) if p.mode == Mode::Ambient)
        );
        for (bad, field) in [
            (
                pb::PushedPod {
                    mode: pb::Mode::Unspecified.into(),
                    ..good.clone()
                },
                "pod.mode",
            ),
            (
                pb::PushedPod {
                    mode: 7,
                    ..good.clone()
                },
                "pod.mode",
            ),
            (
                pb::PushedPod {
                    uid: "Kubernetes//Pod/default/sleep".into(),
                    ..good.clone()
                },
                "pod.uid",
            ),
            (
                pb::PushedPod {
                    ips: vec!["300.1.1.1".into()],
                    ..good.clone()
                },
                "pod.ips",
            ),
            (
                pb::PushedPod {
                    cgroup: "relative".into(),
                    ..good.clone()
                },
                "pod.cgroup",
            ),
            (
                pb::PushedPod {
                    cgroup: String::new(),
                    ..good.clone()
                },
                "pod.uid",
            ),
            (
                pb::PushedPod {
                    uid: String::new(),
                    ..good.clone()
                },
                "pod.uid",
            ),
        ] {
            let err = push_pod(bad, false).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().starts_with(field),
                "{field}: {}",
                err.message()
            );
        }
        assert_eq!(
            push_pod(good, true).unwrap(),
            Pushed::RemovePod(WorkloadId::kubernetes("u1"))
        );
    }

    #[test]
    fn a_pushed_cgroup_with_dotdot_is_refused() {
        let err = pushed(pb::PushCgroupRequest {
            entry: Some(pb::push_cgroup_request::Entry::Ztunnel(pb::PushedZtunnel {
                cgroup: "/sys/fs/cgroup/kubepods/pod1/../..".into(),
                zero_copy: false,
            })),
            remove: false,
        })
        .unwrap_err();
        assert!(
            err.message().starts_with("ztunnel.cgroup"),
            "{}",
            err.message()
        );
        assert!(err.message().contains("`..`"), "{}", err.message());
    }

    fn placed(uid: &str, cgroup: &str) -> PlacedPod<'static> {
        PlacedPod {
            uid: Box::leak(Box::new(WorkloadId::kubernetes(uid))),
            namespace: "default",
            name: Box::leak(format!("pod-{uid}").into_boxed_str()),
            cgroup: Box::leak(PathBuf::from(cgroup).into_boxed_path()),
        }
    }

    /// Cgroup ids by path: `/cg` is the cgroup2 mount, `/alias` another
    /// mount of it; anything else is not a cgroup.
    fn fake_id(path: &Path) -> Option<CgroupId> {
        let inside = path
            .strip_prefix("/cg")
            .or_else(|_| path.strip_prefix("/alias"))
            .ok()?;
        let hash = inside
            .to_str()?
            .bytes()
            .fold(1u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        Some(CgroupId(hash))
    }

    fn ztunnel(path: &str) -> Pushed {
        Pushed::Ztunnel {
            cgroup: path.into(),
            zero_copy: false,
        }
    }

    fn pod_at(uid: &str, path: &str) -> Pushed {
        Pushed::Pod(PodSpec {
            kept_because: None,
            uid: WorkloadId::kubernetes(uid),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: PodCgroup::Path(Path::new(path).into()),
            netns: None,
            ips: vec![],
            mode: Mode::None,
            accelerate: None,
            capture: Default::default(),
        })
    }

    #[test]
    fn a_pushed_cgroup_that_is_or_holds_another_pods_is_refused_naming_both() {
        let pods = [placed("a", "/cg/kubepods/burstable/poda")];
        let parents = pod_parents(Path::new("/cg"), Path::new("/cg"));
        let check =
            |entry: &Pushed| refuse_containing(entry, pods.iter().copied(), &parents, &mut fake_id);
        for (entry, field, relation) in [
            (
                ztunnel("/cg/kubepods/burstable"),
                "ztunnel.cgroup",
                "contains",
            ),
            (
                ztunnel("/cg/kubepods/burstable/poda"),
                "ztunnel.cgroup",
                "is",
            ),
            // Another mount of cgroup2 names the same cgroups.
            (
                ztunnel("/alias/kubepods/burstable"),
                "ztunnel.cgroup",
                "contains",
            ),
            (pod_at("b", "/cg/kubepods"), "pod.cgroup", "contains"),
            (
                pod_at("b", "/cg/kubepods/burstable/poda"),
                "pod.cgroup",
                "is",
            ),
        ] {
            let err = check(&entry).unwrap_err();
            let message = err.message();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(message.starts_with(field), "{message}");
            assert!(
                message.contains(&format!("{relation} the cgroup of pod default/pod-a (a")),
                "{message}"
            );
        }
        // ztunnel's own pod-level cgroup, a ztunnel nested under a pod, and
        // the pod itself pushed again under its UID are fine.
        for entry in [
            ztunnel("/cg/kubepods/burstable/podz"),
            ztunnel("/cg/kubepods/burstable/poda/ztunnel"),
            pod_at("a", "/cg/kubepods/burstable/poda"),
            Pushed::RemoveZtunnel("/cg".into()),
        ] {
            assert!(check(&entry).is_ok(), "{entry:?}");
        }
    }

    #[test]
    fn the_kubelets_pod_directories_are_refused_even_with_no_pod_in_them() {
        let parents = pod_parents(Path::new("/cg/node"), Path::new("/cg"));
        for (path, what) in [
            ("/cg/kubepods.slice", "kubelet's pod directory"),
            ("/cg/kubepods/besteffort", "kubelet's pod directory"),
            ("/cg", "the cgroup the programs attach to"),
            ("/cg/node", "the cgroup the programs attach to"),
        ] {
            let err = refuse_containing(&ztunnel(path), std::iter::empty(), &parents, &mut fake_id)
                .unwrap_err();
            assert!(err.message().contains(what), "{path}: {}", err.message());
        }
    }

    #[test]
    fn a_push_without_an_entry_is_refused() {
        let err = pushed(pb::PushCgroupRequest::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
