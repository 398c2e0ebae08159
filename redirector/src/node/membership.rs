//! Istio's enrollment rules as one pure function: given what Kubernetes
//! says about a pod and its namespace, is the pod in the ambient mesh, with
//! which per-pod overrides, or is it a ztunnel?
//!
//! The rules (Istio 1.28):
//! - enrolled if the pod has `istio.io/dataplane-mode=ambient`, or its
//!   namespace does and the pod's own label is not `none`;
//! - never: host-network pods, sidecar-injected pods (annotation
//!   `sidecar.istio.io/status`), ztunnel pods, pods in excluded namespaces
//!   (default `kube-system`), terminated pods;
//! - overrides: `ambient.istio.io/bypass-inbound-capture: "true"` (outbound
//!   capture only) and `ambient.istio.io/dns-capture: "true"|"false"`;
//! - ztunnel is recognised by proven identity (namespace, service account
//!   and controlling DaemonSet: the DaemonSet object itself, by UID), never
//!   by a label.
//!
//! With the sidecar-mode fallback on (`--sidecar=on`), a sidecar-injected
//! pod (not host-network, not in an excluded namespace, not terminated) is
//! captured to its own proxy instead, unless its
//! `sidecar.istio.io/interceptionMode` is `NONE`: see [`super::sidecar`].

use std::{collections::BTreeMap, sync::Arc};

use crate::node::sidecar::{self, Interception, SidecarRules};

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
pub const BYPASS_INBOUND_ANNOTATION: &str = "ambient.istio.io/bypass-inbound-capture";
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

/// What the rules need to know about a pod.
#[derive(Clone, Debug, Default)]
pub struct PodFacts {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
    /// `status.phase`: `Succeeded` and `Failed` are terminal.
    pub phase: Option<String>,
    pub service_account: Option<String>,
    /// Its owner references.
    pub owners: Vec<Owner>,
}

/// One owner reference of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub kind: String,
    pub name: String,
    /// The owning object's UID.
    pub uid: String,
    /// `controller: true`: the owner that manages the pod (a pod has at
    /// most one). Any other owner reference can be added by whoever may
    /// edit the pod.
    pub controller: bool,
}

/// The UID of ztunnel's DaemonSet object, as the API server reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSetUid(pub String);

/// Node-wide mesh settings the rules depend on.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    pub excluded_namespaces: Vec<String>,
    pub ztunnel_namespace: String,
    pub ztunnel_service_account: String,
    /// Name of ztunnel's DaemonSet.
    pub ztunnel_daemonset: String,
    /// Sidecar-injected pods are captured to their own proxy
    /// (`--sidecar=on`).
    pub sidecar: bool,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            excluded_namespaces: vec!["kube-system".into()],
            ztunnel_namespace: "istio-system".into(),
            ztunnel_service_account: "ztunnel".into(),
            ztunnel_daemonset: "ztunnel".into(),
            sidecar: false,
        }
    }
}

/// Why a pod is not in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Excluded {
    HostNetwork,
    SidecarInjected,
    ExcludedNamespace,
    Terminated,
    /// Its own label is `none`.
    OptedOut,
    /// Neither it nor its namespace asked for ambient.
    NotLabelled,
}

/// The rules' verdict on a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Enrolled {
        /// False under `bypass-inbound-capture: "true"`.
        inbound_capture: bool,
        /// `dns-capture` if the pod sets it; the node default otherwise.
        dns_capture: Option<bool>,
    },
    NotEnrolled(Excluded),
    /// The pod is ztunnel itself (identity proven).
    Ztunnel,
    /// Sidecar-injected, captured to its own proxy with these rules
    /// (`None`: Istio's defaults) and DNS capture (`None`: the node's
    /// default), under `--sidecar=on`.
    Sidecar {
        rules: Option<Arc<SidecarRules>>,
        dns_capture: Option<bool>,
    },
}

/// An annotation whose value the rules cannot use. The caller keeps the
/// pod's last good decision.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("pod annotation {annotation}={value:?} is not valid: expected {expected}")]
pub struct AnnotationError {
    pub annotation: &'static str,
    pub value: String,
    pub expected: &'static str,
}

fn bool_annotation(
    pod: &PodFacts,
    annotation: &'static str,
) -> Result<Option<bool>, AnnotationError> {
    match pod.annotations.get(annotation).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(AnnotationError {
            annotation,
            value: other.to_string(),
            expected: "\"true\" or \"false\"",
        }),
    }
}

/// Whether `pod` is proven to be ztunnel: in ztunnel's namespace, with its
/// service account, and controlled by the DaemonSet of ztunnel's name whose
/// UID is `daemonset` (`None`: no such DaemonSet is known, so no pod is
/// ztunnel). A name alone proves nothing: anyone who may create pods in the
/// namespace can write an owner reference naming it.
pub fn is_ztunnel(
    pod: &PodFacts,
    settings: &MeshSettings,
    daemonset: Option<&DaemonSetUid>,
) -> bool {
    let Some(daemonset) = daemonset else {
        return false;
    };
    pod.namespace == settings.ztunnel_namespace
        && pod.service_account.as_deref() == Some(settings.ztunnel_service_account.as_str())
        && pod.owners.iter().any(|o| {
            o.controller
                && o.kind == "DaemonSet"
                && o.name == settings.ztunnel_daemonset
                && o.uid == daemonset.0
        })
}

/// Applies Istio's enrollment rules to a pod in a namespace labelled
/// `namespace_labels`, with `ztunnel_daemonset` the UID of ztunnel's
/// DaemonSet (if it exists).
pub fn decide(
    pod: &PodFacts,
    namespace_labels: &BTreeMap<String, String>,
    settings: &MeshSettings,
    ztunnel_daemonset: Option<&DaemonSetUid>,
) -> Result<Decision, AnnotationError> {
    if is_ztunnel(pod, settings, ztunnel_daemonset) {
        return Ok(Decision::Ztunnel);
    }
    let injected = pod.annotations.contains_key(SIDECAR_STATUS_ANNOTATION);
    let excluded = if pod.host_network {
        Some(Excluded::HostNetwork)
    } else if injected && !settings.sidecar {
        Some(Excluded::SidecarInjected)
    } else if settings.excluded_namespaces.contains(&pod.namespace) {
        Some(Excluded::ExcludedNamespace)
    } else if matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")) {
        Some(Excluded::Terminated)
    } else if injected {
        return match sidecar::from_annotations(&pod.annotations)? {
            Interception::Captured { rules, dns } => Ok(Decision::Sidecar {
                rules,
                dns_capture: dns,
            }),
            Interception::None => Ok(Decision::NotEnrolled(Excluded::SidecarInjected)),
        };
    } else {
        match (
            pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str),
            namespace_labels
                .get(DATAPLANE_MODE_LABEL)
                .map(String::as_str),
        ) {
            (Some("ambient"), _) => None,
            (Some("none"), _) => Some(Excluded::OptedOut),
            (_, Some("ambient")) => None,
            _ => Some(Excluded::NotLabelled),
        }
    };
    if let Some(why) = excluded {
        return Ok(Decision::NotEnrolled(why));
    }
    let bypass_inbound = bool_annotation(pod, BYPASS_INBOUND_ANNOTATION)?.unwrap_or(false);
    let dns_capture = bool_annotation(pod, DNS_CAPTURE_ANNOTATION)?;
    Ok(Decision::Enrolled {
        inbound_capture: !bypass_inbound,
        dns_capture,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(ns: &str, pod_labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            labels: labels(pod_labels),
            annotations: labels(annotations),
            phase: Some("Running".into()),
            service_account: Some("default".into()),
            ..PodFacts::default()
        }
    }

    const ENROLLED: Decision = Decision::Enrolled {
        inbound_capture: true,
        dns_capture: None,
    };
    const AMBIENT: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, "ambient")];
    const NONE: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, "none")];

    const DAEMONSET_UID: &str = "5d3c1e2a-0000-4000-8000-000000000001";

    fn daemonset() -> DaemonSetUid {
        DaemonSetUid(DAEMONSET_UID.into())
    }

    fn decide_default(p: &PodFacts, ns: &[(&str, &str)]) -> Decision {
        decide(p, &labels(ns), &MeshSettings::default(), Some(&daemonset())).unwrap()
    }

    #[test]
    fn a_pod_labelled_ambient_is_enrolled_whatever_its_namespace_says() {
        assert_eq!(decide_default(&pod("default", AMBIENT, &[]), &[]), ENROLLED);
        assert_eq!(
            decide_default(&pod("default", AMBIENT, &[]), NONE),
            ENROLLED
        );
    }

    #[test]
    fn a_pod_in_an_ambient_namespace_is_enrolled_unless_it_opts_out() {
        assert_eq!(decide_default(&pod("default", &[], &[]), AMBIENT), ENROLLED);
        assert_eq!(
            decide_default(&pod("default", NONE, &[]), AMBIENT),
            Decision::NotEnrolled(Excluded::OptedOut)
        );
    }

    #[test]
    fn a_pod_with_no_label_anywhere_is_not_enrolled() {
        assert_eq!(
            decide_default(&pod("default", &[], &[]), &[]),
            Decision::NotEnrolled(Excluded::NotLabelled)
        );
        let other = [(DATAPLANE_MODE_LABEL, "sidecar")];
        assert_eq!(
            decide_default(&pod("default", &other, &[]), &[]),
            Decision::NotEnrolled(Excluded::NotLabelled)
        );
    }

    #[test]
    fn host_network_pods_are_never_enrolled() {
        let mut p = pod("default", AMBIENT, &[]);
        p.host_network = true;
        assert_eq!(
            decide_default(&p, AMBIENT),
            Decision::NotEnrolled(Excluded::HostNetwork)
        );
    }

    #[test]
    fn sidecar_injected_pods_are_never_enrolled() {
        let p = pod("default", AMBIENT, &[(SIDECAR_STATUS_ANNOTATION, "{}")]);
        assert_eq!(
            decide_default(&p, AMBIENT),
            Decision::NotEnrolled(Excluded::SidecarInjected)
        );
    }

    #[test]
    fn with_the_sidecar_fallback_on_an_injected_pod_is_captured_to_its_proxy_by_its_annotations() {
        let on = MeshSettings {
            sidecar: true,
            ..MeshSettings::default()
        };
        let decide_on = |p: &PodFacts| decide(p, &labels(AMBIENT), &on, Some(&daemonset()));
        let injected = pod("default", AMBIENT, &[(SIDECAR_STATUS_ANNOTATION, "{}")]);
        assert_eq!(
            decide_on(&injected),
            Ok(Decision::Sidecar {
                rules: None,
                dns_capture: None
            })
        );
        let excluding = pod(
            "default",
            &[],
            &[
                (SIDECAR_STATUS_ANNOTATION, "{}"),
                (sidecar::EXCLUDE_OUTBOUND_PORTS, "22"),
            ],
        );
        assert!(matches!(
            decide_on(&excluding),
            Ok(Decision::Sidecar { rules: Some(r), .. }) if r.exclude_ports == [crate::types::Port(22)]
        ));
        let none = pod(
            "default",
            &[],
            &[
                (SIDECAR_STATUS_ANNOTATION, "{}"),
                (sidecar::INTERCEPTION_MODE, "NONE"),
            ],
        );
        assert_eq!(
            decide_on(&none),
            Ok(Decision::NotEnrolled(Excluded::SidecarInjected))
        );
        let bad = pod(
            "default",
            &[],
            &[
                (SIDECAR_STATUS_ANNOTATION, "{}"),
                (sidecar::INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/40"),
            ],
        );
        assert_eq!(
            decide_on(&bad).map_err(|e| e.annotation),
            Err(sidecar::INCLUDE_OUTBOUND_IP_RANGES)
        );
        let mut host = injected.clone();
        host.host_network = true;
        assert_eq!(
            decide_on(&host),
            Ok(Decision::NotEnrolled(Excluded::HostNetwork))
        );
        let system = pod("kube-system", &[], &[(SIDECAR_STATUS_ANNOTATION, "{}")]);
        assert_eq!(
            decide_on(&system),
            Ok(Decision::NotEnrolled(Excluded::ExcludedNamespace))
        );
    }

    #[test]
    fn pods_in_excluded_namespaces_are_never_enrolled() {
        let p = pod("kube-system", AMBIENT, &[]);
        assert_eq!(
            decide_default(&p, AMBIENT),
            Decision::NotEnrolled(Excluded::ExcludedNamespace)
        );
        let settings = MeshSettings {
            excluded_namespaces: vec!["legacy".into()],
            ..MeshSettings::default()
        };
        let p = pod("legacy", AMBIENT, &[]);
        assert_eq!(
            decide(&p, &BTreeMap::new(), &settings, None).unwrap(),
            Decision::NotEnrolled(Excluded::ExcludedNamespace)
        );
    }

    #[test]
    fn terminated_pods_are_never_enrolled() {
        for phase in ["Succeeded", "Failed"] {
            let mut p = pod("default", AMBIENT, &[]);
            p.phase = Some(phase.into());
            assert_eq!(
                decide_default(&p, AMBIENT),
                Decision::NotEnrolled(Excluded::Terminated)
            );
        }
        let mut pending = pod("default", AMBIENT, &[]);
        pending.phase = Some("Pending".into());
        assert_eq!(decide_default(&pending, &[]), ENROLLED);
    }

    fn owner(kind: &str, name: &str, uid: &str, controller: bool) -> Owner {
        Owner {
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller,
        }
    }

    fn ztunnel_pod() -> PodFacts {
        PodFacts {
            namespace: "istio-system".into(),
            service_account: Some("ztunnel".into()),
            owners: vec![owner("DaemonSet", "ztunnel", DAEMONSET_UID, true)],
            phase: Some("Running".into()),
            ..PodFacts::default()
        }
    }

    #[test]
    fn ztunnel_is_recognised_by_namespace_service_account_and_daemonset() {
        assert_eq!(decide_default(&ztunnel_pod(), AMBIENT), Decision::Ztunnel);
    }

    #[test]
    fn only_the_controlling_reference_to_the_real_daemonset_proves_ztunnel() {
        // Named like ztunnel's DaemonSet, but not its controller.
        let mut not_controller = ztunnel_pod();
        not_controller.owners = vec![owner("DaemonSet", "ztunnel", DAEMONSET_UID, false)];
        // The controller, but another object of the same name (a DaemonSet
        // deleted and recreated, or a forged reference).
        let mut other_uid = ztunnel_pod();
        other_uid.owners = vec![owner("DaemonSet", "ztunnel", "another-uid", true)];
        // The right UID under another kind.
        let mut other_kind = ztunnel_pod();
        other_kind.owners = vec![owner("ReplicaSet", "ztunnel", DAEMONSET_UID, true)];
        for p in [not_controller, other_uid, other_kind] {
            assert_ne!(decide_default(&p, &[]), Decision::Ztunnel, "{p:?}");
        }
        // A stray reference beside the controlling one changes nothing.
        let mut extra = ztunnel_pod();
        extra
            .owners
            .insert(0, owner("DaemonSet", "ztunnel", "another-uid", false));
        assert_eq!(decide_default(&extra, &[]), Decision::Ztunnel);
    }

    #[test]
    fn without_a_known_daemonset_no_pod_is_ztunnel() {
        let d = decide(
            &ztunnel_pod(),
            &BTreeMap::new(),
            &MeshSettings::default(),
            None,
        );
        assert_eq!(d.unwrap(), Decision::NotEnrolled(Excluded::NotLabelled));
    }

    #[test]
    fn a_pod_that_only_looks_like_ztunnel_is_not_trusted_as_one() {
        // A label proves nothing.
        let mut labelled = pod("default", &[("app", "ztunnel")], &[]);
        labelled.service_account = Some("ztunnel".into());
        assert_ne!(decide_default(&labelled, &[]), Decision::Ztunnel);
        // Each part of the identity is required.
        let mut wrong_ns = ztunnel_pod();
        wrong_ns.namespace = "default".into();
        let mut wrong_sa = ztunnel_pod();
        wrong_sa.service_account = Some("default".into());
        let mut deployment = ztunnel_pod();
        deployment.owners = vec![owner("ReplicaSet", "ztunnel-abc", "rs-uid", true)];
        for p in [wrong_ns, wrong_sa, deployment] {
            assert_ne!(decide_default(&p, &[]), Decision::Ztunnel, "{p:?}");
        }
    }

    #[test]
    fn bypass_inbound_capture_keeps_outbound_only() {
        let p = pod("default", AMBIENT, &[(BYPASS_INBOUND_ANNOTATION, "true")]);
        assert_eq!(
            decide_default(&p, &[]),
            Decision::Enrolled {
                inbound_capture: false,
                dns_capture: None
            }
        );
    }

    #[test]
    fn dns_capture_can_be_set_per_pod() {
        for (value, want) in [("true", Some(true)), ("false", Some(false))] {
            let p = pod("default", AMBIENT, &[(DNS_CAPTURE_ANNOTATION, value)]);
            assert_eq!(
                decide_default(&p, &[]),
                Decision::Enrolled {
                    inbound_capture: true,
                    dns_capture: want
                }
            );
        }
    }

    #[test]
    fn a_malformed_override_is_an_error_naming_the_annotation() {
        let p = pod("default", AMBIENT, &[(DNS_CAPTURE_ANNOTATION, "yes")]);
        let err = decide(&p, &BTreeMap::new(), &MeshSettings::default(), None).unwrap_err();
        assert_eq!(err.annotation, DNS_CAPTURE_ANNOTATION);
        assert!(
            err.to_string()
                .contains("ambient.istio.io/dns-capture=\"yes\""),
            "{err}"
        );
    }

    #[test]
    fn overrides_of_a_pod_that_is_not_enrolled_are_not_judged() {
        let p = pod("default", NONE, &[(DNS_CAPTURE_ANNOTATION, "yes")]);
        assert_eq!(
            decide_default(&p, AMBIENT),
            Decision::NotEnrolled(Excluded::OptedOut)
        );
    }
}
