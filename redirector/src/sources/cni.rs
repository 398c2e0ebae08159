//! The daemon's side of the CNI plugin: the sandboxes it reported (their
//! network namespace files and addresses, facts no feed has before the
//! pod's first process runs) and whether a pod is where an ADD may return.
//!
//! The plugin decides nothing: the pod's sources (the workloads file,
//! Kubernetes, ...) say whether it is enrolled. An ADD only waits until
//! that decision is in the datapath.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use tokio::{sync::oneshot, time::Instant};

use tonic::Status;

use super::invalid;
use crate::{api::pb, types::PodUid};

/// A call of the plugin, for the reconcile loop.
#[derive(Debug)]
pub enum Request {
    /// A new sandbox: answered once the pod is in the datapath, or with the
    /// reason it is not at `deadline`.
    Add {
        uid: PodUid,
        sandbox: Sandbox,
        deadline: Instant,
        reply: oneshot::Sender<Result<pb::CniAddResponse, tonic::Status>>,
    },
    /// A sandbox is going; answered once the datapath no longer uses its
    /// network namespace.
    Del {
        uid: PodUid,
        container_id: String,
        reply: oneshot::Sender<()>,
    },
    /// Where a pod stands now.
    Check {
        uid: PodUid,
        reply: oneshot::Sender<pb::CniAddResponse>,
    },
}

/// An ADD waiting for its pod.
#[derive(Debug)]
pub struct Waiter {
    pub uid: PodUid,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<pb::CniAddResponse, tonic::Status>>,
}

impl Waiter {
    /// Answers if `verdict` is final or the deadline has passed; gives the
    /// waiter back otherwise.
    pub fn answer(self, verdict: Verdict, now: Instant) -> Option<Self> {
        match verdict {
            Verdict::Done(..) => {
                // The plugin may have given up; the pod stands anyway.
                let _ = self.reply.send(Ok(verdict.response()));
                None
            }
            Verdict::Waiting(why) if now >= self.deadline => {
                let _ = self
                    .reply
                    .send(Err(tonic::Status::deadline_exceeded(format!(
                        "pod {} is not in the datapath yet: {why}",
                        self.uid
                    ))));
                None
            }
            Verdict::Waiting(_) if self.reply.is_closed() => None,
            Verdict::Waiting(_) => Some(self),
        }
    }
}

/// One pod sandbox as the plugin reported it at ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// From the previous plugin's result; empty when it had none.
    pub ips: Vec<IpAddr>,
}

/// The sandboxes reported by the plugin, by pod: the newest ADD of each
/// pod, until the DEL of that same sandbox.
#[derive(Debug, Default)]
pub struct Sandboxes(BTreeMap<PodUid, Sandbox>);

impl Sandboxes {
    /// Records an ADD; a new sandbox of the same pod replaces the old one.
    pub fn add(&mut self, uid: PodUid, sandbox: Sandbox) {
        self.0.insert(uid, sandbox);
    }

    /// Forgets the pod's sandbox if it is `container_id`: the kubelet may
    /// garbage-collect an older sandbox (its DEL) after the pod's new one
    /// was added. Returns whether it was forgotten.
    pub fn delete(&mut self, uid: &PodUid, container_id: &str) -> bool {
        if self
            .0
            .get(uid)
            .is_some_and(|s| s.container_id == container_id)
        {
            self.0.remove(uid);
            return true;
        }
        false
    }

    pub fn get(&self, uid: &PodUid) -> Option<&Sandbox> {
        self.0.get(uid)
    }
}

/// Where a pod stands for the plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The sources' decision is in the datapath: the ADD may return.
    Done(pb::CniOutcome, String),
    /// Not yet, and why.
    Waiting(String),
}

impl Verdict {
    /// As the API answers it.
    pub fn response(&self) -> pb::CniAddResponse {
        let (outcome, reason) = match self {
            Verdict::Done(outcome, reason) => (*outcome, reason.clone()),
            Verdict::Waiting(reason) => (pb::CniOutcome::Waiting, reason.clone()),
        };
        pb::CniAddResponse {
            outcome: outcome as i32,
            reason,
        }
    }
}

/// What the daemon knows of one pod after a reconcile.
pub struct Standing<'a> {
    /// The pod in the API's view of the node state, if a source lists it.
    pub pod: Option<&'a pb::Pod>,
    /// The UIDs of ztunnel pods the sources name.
    pub ztunnels: &'a BTreeSet<PodUid>,
    /// With Kubernetes as a source: whether its last snapshot lists the pod
    /// (`false` also before its first snapshot). `None`: not a source.
    pub listed_by_kubernetes: Option<bool>,
}

/// Whether an ADD of `uid` may return. Kubernetes lists every pod of the
/// node, so a pod it has not listed yet is waited for; other sources list
/// only the pods they enroll (or exclude), so a pod none of them lists is
/// not enrolled.
pub fn verdict(uid: &PodUid, standing: &Standing) -> Verdict {
    if standing.ztunnels.contains(uid) {
        return Verdict::Done(pb::CniOutcome::Ztunnel, "a ztunnel pod".into());
    }
    let Some(pod) = standing.pod else {
        return match standing.listed_by_kubernetes {
            Some(false) => Verdict::Waiting("Kubernetes has not listed the pod yet".into()),
            _ => Verdict::Done(pb::CniOutcome::NotEnrolled, "no source lists it".into()),
        };
    };
    let done = match pod.mode() {
        pb::Mode::Ambient => pb::CniOutcome::Enrolled,
        pb::Mode::Sidecar if pod.sidecar_captured => pb::CniOutcome::Sidecar,
        _ => {
            return Verdict::Done(
                pb::CniOutcome::NotEnrolled,
                "its sources leave it out of the mesh".into(),
            );
        }
    };
    if !pod.problem.is_empty() {
        return Verdict::Waiting(pod.problem.clone());
    }
    if !pod.in_datapath {
        return Verdict::Waiting("its cgroup is not in the datapath yet".into());
    }
    if pod.inbound() == pb::InboundCapture::Waiting {
        return Verdict::Waiting("its network namespace is not known yet".into());
    }
    if pod.held {
        return Verdict::Waiting(
            "ztunnel has not acknowledged it yet (its connects are refused until then)".into(),
        );
    }
    Verdict::Done(done, String::new())
}

/// The longest an ADD may ask to wait.
pub const CNI_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Checks an ADD; errors name the offending field. Public for the fuzz
/// target, which feeds it what the plugin builds from a runtime's input.
pub fn cni_sandbox(
    req: pb::CniAddRequest,
) -> Result<(PodUid, Sandbox, std::time::Duration), Status> {
    let sandbox = req
        .sandbox
        .ok_or_else(|| invalid("sandbox", "missing".into()))?;
    for (field, value) in [
        ("sandbox.uid", &sandbox.uid),
        ("sandbox.namespace", &sandbox.namespace),
        ("sandbox.name", &sandbox.name),
        ("sandbox.container_id", &sandbox.container_id),
    ] {
        if value.is_empty() {
            return Err(invalid(field, "must not be empty".into()));
        }
    }
    let netns = PathBuf::from(&req.netns);
    if !netns.is_absolute() {
        return Err(invalid(
            "netns",
            format!("{:?} is not an absolute path", req.netns),
        ));
    }
    let ips = req
        .ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            ip.parse::<IpAddr>()
                .map_err(|e| invalid(&format!("ips[{i}]"), format!("{ip:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = std::time::Duration::from_millis(req.timeout_ms.into());
    if timeout.is_zero() || timeout > CNI_MAX_WAIT {
        return Err(invalid(
            "timeout_ms",
            format!(
                "{} is not between 1 and {}",
                req.timeout_ms,
                CNI_MAX_WAIT.as_millis()
            ),
        ));
    }
    Ok((
        PodUid::new(sandbox.uid),
        Sandbox {
            namespace: sandbox.namespace,
            name: sandbox.name,
            container_id: sandbox.container_id,
            netns,
            ips,
        },
        timeout,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(u: &str) -> PodUid {
        PodUid::new(u)
    }

    fn sandbox(container_id: &str) -> Sandbox {
        Sandbox {
            namespace: "default".into(),
            name: "web".into(),
            container_id: container_id.into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
        }
    }

    fn enrolled() -> pb::Pod {
        pb::Pod {
            uid: "a".into(),
            mode: pb::Mode::Ambient.into(),
            ips: vec!["10.0.0.5".into()],
            in_datapath: true,
            inbound: pb::InboundCapture::Captured.into(),
            ..Default::default()
        }
    }

    fn standing<'a>(pod: Option<&'a pb::Pod>, ztunnels: &'a BTreeSet<PodUid>) -> Standing<'a> {
        Standing {
            pod,
            ztunnels,
            listed_by_kubernetes: None,
        }
    }

    #[test]
    fn a_late_del_of_an_older_sandbox_leaves_the_new_sandbox_in_place() {
        let mut s = Sandboxes::default();
        s.add(uid("a"), sandbox("old"));
        s.add(uid("a"), sandbox("new"));
        assert!(!s.delete(&uid("a"), "old"));
        assert_eq!(s.get(&uid("a")).unwrap().container_id, "new");
        assert!(s.delete(&uid("a"), "new"));
        assert!(s.get(&uid("a")).is_none());
    }

    #[test]
    fn an_enrolled_pod_is_done_only_once_placed_captured_inbound_and_unheld() {
        let none = BTreeSet::new();
        let pod = enrolled();
        assert_eq!(
            verdict(&uid("a"), &standing(Some(&pod), &none)),
            Verdict::Done(pb::CniOutcome::Enrolled, String::new())
        );
        let not_yet: [fn(&mut pb::Pod); 4] = [
            |p| p.in_datapath = false,
            |p| p.problem = "cgroup not found".into(),
            |p| p.inbound = pb::InboundCapture::Waiting.into(),
            |p| p.held = true,
        ];
        for change in not_yet {
            let mut p = enrolled();
            change(&mut p);
            assert!(
                matches!(
                    verdict(&uid("a"), &standing(Some(&p), &none)),
                    Verdict::Waiting(_)
                ),
                "{p:?}"
            );
        }
    }

    #[test]
    fn a_pod_kubernetes_has_not_listed_is_waited_for_but_other_sources_unlisted_pods_are_not_enrolled()
     {
        let none = BTreeSet::new();
        let mut s = standing(None, &none);
        assert!(matches!(
            verdict(&uid("a"), &s),
            Verdict::Done(pb::CniOutcome::NotEnrolled, _)
        ));
        s.listed_by_kubernetes = Some(false);
        assert!(matches!(verdict(&uid("a"), &s), Verdict::Waiting(_)));
    }

    #[test]
    fn a_sidecar_pod_is_done_once_placed_and_captured_inbound_and_only_with_the_fallback_on() {
        let zt = BTreeSet::new();
        let mut pod = pb::Pod {
            mode: pb::Mode::Sidecar.into(),
            sidecar_captured: true,
            in_datapath: false,
            inbound: pb::InboundCapture::Waiting.into(),
            ..enrolled()
        };
        assert!(matches!(
            verdict(&uid("a"), &standing(Some(&pod), &zt)),
            Verdict::Waiting(_)
        ));
        pod.in_datapath = true;
        assert!(matches!(
            verdict(&uid("a"), &standing(Some(&pod), &zt)),
            Verdict::Waiting(_)
        ));
        pod.inbound = pb::InboundCapture::Captured.into();
        assert!(matches!(
            verdict(&uid("a"), &standing(Some(&pod), &zt)),
            Verdict::Done(pb::CniOutcome::Sidecar, _)
        ));
        pod.sidecar_captured = false;
        assert!(matches!(
            verdict(&uid("a"), &standing(Some(&pod), &zt)),
            Verdict::Done(pb::CniOutcome::NotEnrolled, _)
        ));
    }

    #[test]
    fn ztunnel_and_pods_out_of_the_mesh_are_done_at_once() {
        let ztunnels = [uid("z")].into();
        let mut s = standing(None, &ztunnels);
        s.listed_by_kubernetes = Some(false);
        assert!(matches!(
            verdict(&uid("z"), &s),
            Verdict::Done(pb::CniOutcome::Ztunnel, _)
        ));
        let mut out = enrolled();
        out.mode = pb::Mode::None.into();
        out.in_datapath = false;
        assert!(matches!(
            verdict(&uid("a"), &standing(Some(&out), &ztunnels)),
            Verdict::Done(pb::CniOutcome::NotEnrolled, _)
        ));
    }
}
