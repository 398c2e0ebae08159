//! From node state to map operations: compute what the kernel maps should
//! hold, diff it against what they hold, apply only the difference. Both
//! steps are pure (resolving paths to ids is injected), so reconciling twice
//! changes nothing the second time.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ambridge_common::{CgroupInfo, InboundTarget, NetnsInfo, NodeConfig, exempt};
use ipnet::IpNet;

use crate::{
    host::netns::{Claim, NetnsAt},
    node::entries,
    node::spec::{CgroupRef, Mode, NodeSpec, PodCgroup, PodSpec, Readiness, Settings},
    types::{CgroupId, NetnsCookie, PodUid},
};

/// Turns the paths named by the node state into kernel ids.
pub trait Resolve {
    /// The pod-level cgroup of a pod the node state names only by UID.
    fn pod_cgroup(&mut self, uid: &PodUid) -> io::Result<std::path::PathBuf>;
    /// The pod-level cgroup whose network namespace holds one of `ips`, for
    /// the pod `uid` (which stays where it was if the address is disputed).
    fn pod_cgroup_by_address(&mut self, uid: &PodUid, ips: &[IpAddr]) -> io::Result<Claim>;
    /// The id of a cgroup directory.
    fn cgroup_id(&mut self, cgroup: &Path) -> io::Result<CgroupId>;
    /// The cookie of a network namespace; `None` while the cgroup it is
    /// found through has no process.
    fn netns_cookie(&mut self, at: NetnsAt) -> io::Result<Option<NetnsCookie>>;
    /// The addresses of a network namespace; `None` while the cgroup it is
    /// found through has no process.
    fn netns_addresses(&mut self, at: NetnsAt) -> io::Result<Option<Vec<IpAddr>>>;
    /// The addresses of the node's own network namespace: connections from
    /// them (kubelet probes, host-network pods) reach pods uncaptured.
    fn node_addresses(&mut self) -> Vec<IpAddr>;
}

/// istio-cni's host-side SNAT address for kubelet probes.
pub const PROBE_SNAT4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// istio-cni's IPv6 host-side SNAT address for kubelet probes.
pub const PROBE_SNAT6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// A cgroup directory named by the node state that could not be resolved
/// (typically a pod whose sandbox is not created yet). It is retried at the
/// next reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The pod's UID (`None` for a ztunnel).
    pub uid: Option<PodUid>,
    pub owner: String,
    pub cgroup: std::path::PathBuf,
    pub error: String,
}

/// The map contents that a node state calls for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub cgroups: BTreeMap<CgroupId, CgroupInfo>,
    pub netns: BTreeMap<NetnsCookie, NetnsInfo>,
    pub node: NodeConfig,
    /// Where each pod with a resolved cgroup sits.
    pub placed: BTreeMap<PodUid, (std::path::PathBuf, CgroupId)>,
    /// The netns of each pod whose processes were found.
    pub pod_netns: BTreeMap<PodUid, NetnsCookie>,
    /// Where inbound connections to each enrolled pod address are
    /// captured: the pod's netns, where ztunnel's listener is found.
    pub inbound: BTreeMap<IpAddr, InboundTarget>,
    /// The network namespaces whose inbound TCP goes through the
    /// `sk_lookup` program.
    pub inbound_netns: BTreeSet<NetnsCookie>,
    /// Sources never captured inbound, with an [`exempt`] reason.
    pub exempt: BTreeMap<IpNet, u32>,
    /// The cgroups of every ztunnel found: only processes in them (or
    /// below) may speak ZDS.
    pub ztunnel_cgroups: BTreeSet<CgroupId>,
    pub unresolved: Vec<Unresolved>,
}

/// A pod as unresolved entries name it, spelled only when one is.
struct PodOwner<'a>(&'a PodSpec);

impl std::fmt::Display for PodOwner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pod = self.0;
        write!(f, "pod {}/{} ({})", pod.namespace, pod.name, pod.uid)
    }
}

impl Desired {
    fn unresolved(
        &mut self,
        uid: Option<&PodUid>,
        owner: &dyn std::fmt::Display,
        cgroup: &Path,
        error: String,
    ) {
        self.unresolved.push(Unresolved {
            uid: uid.cloned(),
            owner: owner.to_string(),
            cgroup: cgroup.to_path_buf(),
            error,
        });
    }

    /// Adds the netns entry of the namespace `at` (of `cgroup`'s pod).
    fn netns_of(
        &mut self,
        uid: Option<&PodUid>,
        owner: &dyn std::fmt::Display,
        (cgroup, at): (&Path, NetnsAt),
        info: NetnsInfo,
        resolve: &mut impl Resolve,
    ) -> Option<NetnsCookie> {
        match resolve.netns_cookie(at) {
            Ok(Some(cookie)) => {
                self.netns.insert(cookie, info);
                if let Some(uid) = uid {
                    self.pod_netns.insert(uid.clone(), cookie);
                }
                return Some(cookie);
            }
            Ok(None) => self.unresolved(
                uid,
                owner,
                cgroup,
                "no process in the cgroup yet, so its network namespace is unknown".into(),
            ),
            Err(e) => self.unresolved(uid, owner, cgroup, format!("network namespace: {e}")),
        }
        None
    }
}

/// Computes the desired maps. A ztunnel's cgroup entry wins over a pod's if
/// both resolve to the same cgroup.
pub fn desired(
    spec: &NodeSpec,
    readiness: &Readiness,
    settings: &Settings,
    resolve: &mut impl Resolve,
) -> Desired {
    let mut out = Desired {
        node: entries::node_config(Some(spec), settings),
        exempt: exempt_sources(settings, resolve.node_addresses()),
        ..Desired::default()
    };
    for pod in &spec.pods {
        let owner = PodOwner(pod);
        let located = match &pod.cgroup {
            PodCgroup::Path(path) => Ok(path.clone()),
            PodCgroup::Uid => resolve.pod_cgroup(&pod.uid),
            PodCgroup::Address => resolve
                .pod_cgroup_by_address(&pod.uid, &pod.ips)
                .map(|claim| match claim {
                    Claim::Sole(path) => path,
                    Claim::Disputed { kept, report } => {
                        out.unresolved(Some(&pod.uid), &owner, &kept, report);
                        kept
                    }
                }),
        };
        let cgroup = match located {
            Ok(path) => path,
            Err(e) => {
                out.unresolved(Some(&pod.uid), &owner, Path::new(""), e.to_string());
                continue;
            }
        };
        // A pod the feed gives no address yet (the API has not published
        // it, `ips: []`) is addressed by its netns's own: enrolled means
        // redirected or refused, never let through for want of a target.
        let netns = match &pod.netns {
            Some(file) => NetnsAt::File(file),
            None => NetnsAt::SandboxOf(&cgroup),
        };
        let learned;
        let pod = if pod.ips.is_empty() {
            learned = PodSpec {
                ips: learned_addresses(resolve, netns),
                ..pod.clone()
            };
            &learned
        } else {
            pod
        };
        match resolve.cgroup_id(&cgroup) {
            Ok(id) => {
                out.cgroups
                    .insert(id, entries::pod_entry(pod, spec, readiness, settings));
                out.placed.insert(pod.uid.clone(), (cgroup.clone(), id));
            }
            Err(e) => {
                out.unresolved(Some(&pod.uid), &owner, &cgroup, e.to_string());
                continue;
            }
        }
        if !pod.ips.is_empty() {
            let info = entries::netns_entry(pod.ip4(), pod.ip6());
            let _ = out.netns_of(Some(&pod.uid), &owner, (&cgroup, netns), info, resolve);
        }
        // Inbound capture needs ztunnel's listeners in the pod's own netns:
        // the in-pod model only.
        if pod.mode == Mode::Ambient
            && pod.capture.inbound
            && spec.redirect.is_none()
            && let Some(&cookie) = out.pod_netns.get(&pod.uid)
        {
            for ip in &pod.ips {
                out.inbound.insert(
                    *ip,
                    InboundTarget {
                        netns_cookie: cookie.0,
                    },
                );
            }
            out.inbound_netns.insert(cookie);
        }
    }
    for z in &spec.ztunnels {
        let (located, owner) = match &z.cgroup {
            CgroupRef::Path(path) => (Ok(path.clone()), "ztunnel".to_string()),
            CgroupRef::Pod(uid) => (resolve.pod_cgroup(uid), format!("ztunnel pod {uid}")),
        };
        let cgroup = match located.and_then(|path| Ok((resolve.cgroup_id(&path)?, path))) {
            Ok((id, path)) => {
                out.cgroups.insert(id, entries::ztunnel_entry(z, settings));
                out.ztunnel_cgroups.insert(id);
                path
            }
            Err(e) => {
                out.unresolved(None, &owner, Path::new(""), e.to_string());
                continue;
            }
        };
        // In the shared model ztunnel binds in its own netns, whose local
        // addresses are the redirect target's.
        // Connections to and from it are keyed by that namespace.
        if let Some(shared) = spec.redirect {
            let info = entries::netns_entry(shared.ip4, shared.ip6);
            let at = (cgroup.as_path(), NetnsAt::SandboxOf(&cgroup));
            if let Some(cookie) = out.netns_of(None, &owner, at, info, resolve)
                && out.node.shared_netns == 0
            {
                out.node.shared_netns = cookie.0;
            }
        }
    }
    out
}

/// One address per family of the pod's netns (the first of each, as a pod
/// has one per family), none while it is unknown.
fn learned_addresses(resolve: &mut impl Resolve, netns: NetnsAt) -> Vec<IpAddr> {
    let found = resolve
        .netns_addresses(netns)
        .ok()
        .flatten()
        .unwrap_or_default();
    let v4 = found.iter().find(|ip| ip.is_ipv4());
    let v6 = found.iter().find(|ip| ip.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

/// Every source exempt from inbound capture: istio-cni's probe SNAT
/// addresses (a node where istio-cni still rewrites probes), the node's own
/// addresses, and the operator's prefixes.
fn exempt_sources(settings: &Settings, node: Vec<IpAddr>) -> BTreeMap<IpNet, u32> {
    let mut out = BTreeMap::new();
    for ip in [IpAddr::V4(PROBE_SNAT4), IpAddr::V6(PROBE_SNAT6)] {
        out.insert(IpNet::from(ip), exempt::PROBE_SNAT);
    }
    for ip in node {
        out.insert(IpNet::from(ip), exempt::NODE);
    }
    for net in &settings.probe_sources {
        out.insert(net.trunc(), exempt::CONFIGURED);
    }
    out
}

/// The pods an earlier daemon had seen acknowledged by ztunnel: placed on
/// a cgroup whose `pinned` entry is enrolled and not held.
pub fn acknowledged_before(
    desired: &Desired,
    pinned: &BTreeMap<CgroupId, CgroupInfo>,
) -> std::collections::BTreeSet<PodUid> {
    desired
        .placed
        .iter()
        .filter(|(_, (_, id))| {
            pinned.get(id).is_some_and(|e| {
                e.flags & ambridge_common::flags::ENROLLED != 0
                    && e.flags & ambridge_common::flags::HELD == 0
            })
        })
        .map(|(uid, _)| uid.clone())
        .collect()
}

/// One change to a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<K, V> {
    Put(K, V),
    Delete(K),
}

/// What the kernel holds now, as [`retain_current`] keeps it.
pub struct Current {
    pub cgroups: BTreeMap<CgroupId, CgroupInfo>,
    pub netns: BTreeMap<NetnsCookie, NetnsInfo>,
    pub inbound: BTreeMap<IpAddr, InboundTarget>,
    pub inbound_netns: BTreeSet<NetnsCookie>,
}

/// Keeps every entry the kernel holds that `desired` would delete: while a
/// source has not delivered since the daemon started, its pods are not
/// in the node state yet, and the pinned state carries them. Entries both
/// hold are `desired`'s (updates and additions go ahead).
pub fn retain_current(desired: &mut Desired, current: Current) {
    for (k, v) in current.cgroups {
        // A kept ztunnel entry keeps its ZDS peers admitted too.
        if v.flags & ambridge_common::flags::ZTUNNEL != 0 && !desired.cgroups.contains_key(&k) {
            desired.ztunnel_cgroups.insert(k);
        }
        desired.cgroups.entry(k).or_insert(v);
    }
    for (k, v) in current.netns {
        desired.netns.entry(k).or_insert(v);
    }
    for (k, v) in current.inbound {
        desired.inbound.entry(k).or_insert(v);
    }
    desired.inbound_netns.extend(current.inbound_netns);
}

/// The operations that turn `current` into `desired`: deletes of keys no
/// longer wanted, then puts of new or changed entries.
pub fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Vec<Op<K, V>> {
    let deletes = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .map(|k| Op::Delete(*k));
    let puts = desired
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| Op::Put(*k, *v));
    deletes.chain(puts).collect()
}

#[cfg(test)]
mod tests {
    use ambridge_common::flags;

    use super::*;
    use crate::{
        node::spec::{Mode, PodSpec, SharedRedirect, ZtunnelSpec},
        types::PodUid,
    };

    fn pod(uid: &str, cgroup: &str, mode: Mode) -> PodSpec {
        PodSpec {
            uid: PodUid(uid.into()),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: PodCgroup::Path(cgroup.into()),
            netns: None,
            ips: vec!["198.18.0.2".parse().unwrap()],
            mode,
            accelerate: None,
            capture: Default::default(),
        }
    }

    /// Applies `ops` to an in-memory map (what the kernel map becomes once the
    /// same ops are applied to it).
    pub fn apply<K: Ord + Copy, V: Copy>(map: &mut BTreeMap<K, V>, ops: &[Op<K, V>]) {
        for op in ops {
            match *op {
                Op::Put(k, v) => {
                    map.insert(k, v);
                }
                Op::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
    }

    /// Resolves `/cg/<n>` to cgroup id n and netns cookie 1000+n, unless n
    /// is 13 (a pod without processes yet); anything else does not exist.
    struct Fake;

    /// `<n>` of `/ns/<n>`.
    fn ns_file_number(file: &Path) -> io::Result<u64> {
        file.strip_prefix("/ns")
            .ok()
            .and_then(|p| p.to_str()?.parse().ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    impl Resolve for Fake {
        /// UID `by-uid-<n>` lives in `/cg/<n>`.
        fn pod_cgroup(&mut self, uid: &PodUid) -> io::Result<std::path::PathBuf> {
            uid.0
                .strip_prefix("by-uid-")
                .map(|n| std::path::PathBuf::from(format!("/cg/{n}")))
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }

        /// Address `198.18.9.<n>` is in the netns of `/cg/<n>`.
        fn pod_cgroup_by_address(&mut self, _: &PodUid, ips: &[IpAddr]) -> io::Result<Claim> {
            ips.iter()
                .find_map(|ip| match ip {
                    IpAddr::V4(v4) if v4.octets()[..3] == [198, 18, 9] => Some(v4.octets()[3]),
                    _ => None,
                })
                .map(|n| Claim::Sole(std::path::PathBuf::from(format!("/cg/{n}"))))
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }

        fn cgroup_id(&mut self, path: &Path) -> io::Result<CgroupId> {
            path.strip_prefix("/cg")
                .ok()
                .and_then(|p| p.to_str()?.parse().ok())
                .map(CgroupId)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }

        /// `/cg/13` has no process; the file `/ns/<n>` is netns `2000 + n`.
        fn netns_cookie(&mut self, at: NetnsAt) -> io::Result<Option<NetnsCookie>> {
            match at {
                NetnsAt::SandboxOf(cgroup) => {
                    let id = self.cgroup_id(cgroup)?.0;
                    Ok((id != 13).then_some(NetnsCookie(1000 + id)))
                }
                NetnsAt::File(file) => Ok(Some(NetnsCookie(2000 + ns_file_number(file)?))),
            }
        }

        fn node_addresses(&mut self) -> Vec<IpAddr> {
            vec!["198.18.0.1".parse().unwrap()]
        }

        /// `/cg/<n>`'s netns holds `198.18.9.<n>` and `fd00:18:9::<n>`,
        /// the file `/ns/<n>` `198.18.8.<n>`.
        fn netns_addresses(&mut self, at: NetnsAt) -> io::Result<Option<Vec<IpAddr>>> {
            let cgroup = match at {
                NetnsAt::SandboxOf(cgroup) => cgroup,
                NetnsAt::File(file) => {
                    let n = ns_file_number(file)?;
                    return Ok(Some(vec![format!("198.18.8.{n}").parse().unwrap()]));
                }
            };
            let n = self.cgroup_id(cgroup)?.0;
            if n == 13 {
                return Ok(None);
            }
            Ok(Some(vec![
                format!("198.18.9.{n}").parse().unwrap(),
                format!("fd00:18:9::{n:x}").parse().unwrap(),
            ]))
        }
    }

    fn spec() -> NodeSpec {
        NodeSpec {
            pods: vec![
                pod("a", "/cg/10", Mode::Ambient),
                pod("b", "/cg/11", Mode::None),
            ],
            ztunnels: vec![ZtunnelSpec {
                cgroup: CgroupRef::Path("/cg/20".into()),
                zero_copy: false,
            }],
            redirect: None,
        }
    }

    #[test]
    fn reconciling_twice_changes_nothing_the_second_time() {
        let want = desired(
            &spec(),
            &Readiness::Ungated,
            &Settings::default(),
            &mut Fake,
        );
        let mut kernel = BTreeMap::new();
        let first = diff(&kernel, &want.cgroups);
        assert_eq!(first.len(), 3);
        apply(&mut kernel, &first);
        assert_eq!(kernel, want.cgroups);
        assert!(diff(&kernel, &want.cgroups).is_empty());
    }

    #[test]
    fn entries_not_in_the_state_are_deleted() {
        let want = desired(
            &spec(),
            &Readiness::Ungated,
            &Settings::default(),
            &mut Fake,
        )
        .cgroups;
        let mut kernel = want.clone();
        kernel.insert(CgroupId(99), CgroupInfo::default());
        assert_eq!(diff(&kernel, &want), vec![Op::Delete(CgroupId(99))]);
    }

    #[test]
    fn a_changed_entry_is_rewritten_in_place() {
        let mut s = spec();
        let before = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake).cgroups;
        s.pods[1].mode = Mode::Ambient;
        let after = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake).cgroups;
        let ops = diff(&before, &after);
        assert_eq!(ops.len(), 1);
        assert!(matches!(ops[0], Op::Put(CgroupId(11), info) if info.flags & flags::ENROLLED != 0));
    }

    #[test]
    fn an_unresolvable_cgroup_is_reported_not_fatal() {
        let mut s = spec();
        s.pods.push(pod("c", "/elsewhere/pod-c", Mode::Ambient));
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(d.cgroups.len(), 3);
        assert_eq!(d.unresolved.len(), 1);
        assert!(d.unresolved[0].owner.contains("default/c"));
    }

    #[test]
    fn a_pod_whose_netns_file_is_known_is_placed_and_captured_before_any_process_runs_in_it() {
        // `/cg/13` has no process yet, as at the CNI ADD of its sandbox.
        let mut s = spec();
        let mut starting = pod("c", "/cg/13", Mode::Ambient);
        starting.ips.clear();
        let without_file = desired(
            &NodeSpec {
                pods: vec![starting.clone()],
                ..s.clone()
            },
            &Readiness::Ungated,
            &Settings::default(),
            &mut Fake,
        );
        assert!(without_file.pod_netns.is_empty());
        assert_eq!(
            without_file.cgroups[&CgroupId(13)].flags & flags::HAS_IP4,
            0
        );
        starting.netns = Some("/ns/13".into());
        s.pods.push(starting);
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        let uid = PodUid("c".into());
        assert_eq!(d.pod_netns[&uid], NetnsCookie(2013));
        let entry = d.cgroups[&CgroupId(13)];
        assert_eq!(entry.redirect_ip4.to_ne_bytes(), [198, 18, 8, 13]);
        let ip: IpAddr = "198.18.8.13".parse().unwrap();
        assert_eq!(d.inbound[&ip].netns_cookie, 2013);
        assert!(
            d.unresolved.iter().all(|u| u.uid.as_ref() != Some(&uid)),
            "{:?}",
            d.unresolved
        );
    }

    #[test]
    fn a_pod_named_only_by_uid_is_found_from_its_uid() {
        let mut s = spec();
        let mut by_uid = pod("by-uid-12", "/unused", Mode::Ambient);
        by_uid.cgroup = PodCgroup::Uid;
        s.pods.push(by_uid);
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert!(d.cgroups.contains_key(&CgroupId(12)));
        assert!(d.netns.contains_key(&NetnsCookie(1012)));
        let mut lost = pod("unknown", "/unused", Mode::Ambient);
        lost.cgroup = PodCgroup::Uid;
        s.pods.push(lost);
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(d.unresolved.len(), 1);
        assert!(d.unresolved[0].owner.contains("default/unknown"));
    }

    #[test]
    fn a_pod_known_by_address_is_found_in_the_cgroup_whose_netns_holds_it() {
        let mut s = spec();
        let mut by_ip = pod("Kubernetes//Pod/default/web", "/unused", Mode::Ambient);
        by_ip.cgroup = PodCgroup::Address;
        by_ip.ips = vec!["fd00::9".parse().unwrap(), "198.18.9.14".parse().unwrap()];
        s.pods.push(by_ip.clone());
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_ne!(d.cgroups[&CgroupId(14)].flags & flags::ENROLLED, 0);
        assert_eq!(d.placed[&by_ip.uid].0, std::path::Path::new("/cg/14"));
        by_ip.ips = vec!["198.18.7.1".parse().unwrap()];
        s.pods.pop();
        s.pods.push(by_ip);
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(d.unresolved.len(), 1);
        assert!(
            d.unresolved[0]
                .owner
                .contains("default/Kubernetes//Pod/default/web")
        );
    }

    #[test]
    fn a_ztunnel_named_by_pod_uid_is_found_like_a_pod_and_reported_when_missing() {
        let mut s = spec();
        s.ztunnels = vec![
            ZtunnelSpec {
                cgroup: CgroupRef::Pod(PodUid("by-uid-21".into())),
                zero_copy: false,
            },
            ZtunnelSpec {
                cgroup: CgroupRef::Pod(PodUid("gone".into())),
                zero_copy: false,
            },
        ];
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_ne!(d.cgroups[&CgroupId(21)].flags & flags::ZTUNNEL, 0);
        assert_eq!(d.unresolved.len(), 1);
        assert_eq!(d.unresolved[0].owner, "ztunnel pod gone");
    }

    #[test]
    fn only_pinned_enrolled_unheld_pods_count_as_acknowledged_before() {
        let d = desired(
            &spec(),
            &Readiness::Ungated,
            &Settings::default(),
            &mut Fake,
        );
        let info = |flags| CgroupInfo {
            flags,
            ..CgroupInfo::default()
        };
        let mut pinned = BTreeMap::new();
        pinned.insert(CgroupId(10), info(flags::ENROLLED));
        pinned.insert(CgroupId(11), info(flags::ENROLLED | flags::HELD));
        let acked = acknowledged_before(&d, &pinned);
        assert_eq!(acked, [PodUid("a".into())].into());
        pinned.insert(CgroupId(10), info(0));
        assert!(acknowledged_before(&d, &pinned).is_empty());
    }

    #[test]
    fn ztunnel_wins_over_a_pod_on_the_same_cgroup() {
        let mut s = spec();
        s.ztunnels[0].cgroup = CgroupRef::Path("/cg/10".into());
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_ne!(d.cgroups[&CgroupId(10)].flags & flags::ZTUNNEL, 0);
        assert_eq!(d.cgroups[&CgroupId(10)].flags & flags::ENROLLED, 0);
    }

    #[test]
    fn every_pod_netns_knows_its_pods_addresses() {
        let d = desired(
            &spec(),
            &Readiness::Ungated,
            &Settings::default(),
            &mut Fake,
        );
        assert_eq!(d.netns.len(), 2);
        let a = d.netns[&NetnsCookie(1010)];
        assert_eq!(a.ip4.to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(d.pod_netns[&PodUid("a".into())], NetnsCookie(1010));
        // In the in-pod model ztunnel's own netns needs no entry.
        assert!(!d.netns.contains_key(&NetnsCookie(1020)));
    }

    #[test]
    fn a_pod_without_processes_has_its_cgroup_entry_and_waits_for_its_netns() {
        let mut s = spec();
        s.pods.push(pod("c", "/cg/13", Mode::Ambient));
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert!(d.cgroups.contains_key(&CgroupId(13)));
        assert_eq!(d.unresolved.len(), 1);
        assert!(
            d.unresolved[0].error.contains("no process"),
            "{:?}",
            d.unresolved
        );
    }

    #[test]
    fn an_enrolled_pods_addresses_are_captured_inbound_in_its_netns() {
        let d = desired(
            &spec(),
            &Readiness::Ungated,
            &Settings::default(),
            &mut Fake,
        );
        let ip: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!(d.inbound[&ip].netns_cookie, 1010);
        assert_eq!(d.inbound.len(), 1, "pod b is not enrolled: {:?}", d.inbound);
        assert_eq!(d.inbound_netns, [NetnsCookie(1010)].into());
    }

    #[test]
    fn bypass_inbound_capture_and_the_shared_model_capture_nothing_inbound() {
        let mut s = spec();
        s.pods[0].capture.inbound = false;
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert!(d.inbound.is_empty() && d.inbound_netns.is_empty());
        // Outbound still is.
        assert_ne!(d.cgroups[&CgroupId(10)].flags & flags::ENROLLED, 0);
        let mut s = spec();
        s.redirect = Some(SharedRedirect {
            ip4: Some("198.18.0.50".parse().unwrap()),
            ip6: None,
            port: None,
        });
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert!(d.inbound.is_empty() && d.inbound_netns.is_empty());
    }

    #[test]
    fn a_pod_whose_netns_is_unknown_has_no_inbound_entry_yet() {
        let mut s = spec();
        s.pods.push(pod("c", "/cg/13", Mode::Ambient));
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(d.inbound_netns, [NetnsCookie(1010)].into());
    }

    #[test]
    fn the_node_probe_snat_and_configured_sources_are_exempt() {
        let settings = Settings {
            probe_sources: vec!["10.0.0.7/24".parse().unwrap()],
            ..Settings::default()
        };
        let d = desired(&spec(), &Readiness::Ungated, &settings, &mut Fake);
        let reasons: Vec<(String, u32)> =
            d.exempt.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        assert_eq!(
            reasons,
            [
                ("10.0.0.0/24".to_string(), exempt::CONFIGURED),
                ("169.254.7.127/32".to_string(), exempt::PROBE_SNAT),
                ("198.18.0.1/32".to_string(), exempt::NODE),
                (
                    "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128".to_string(),
                    exempt::PROBE_SNAT
                ),
            ]
        );
    }

    #[test]
    fn an_enrolled_pod_without_addresses_in_the_feed_is_redirected_to_its_netns_addresses() {
        let mut s = spec();
        s.pods[0].ips.clear();
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        let entry = d.cgroups[&CgroupId(10)];
        assert_ne!(entry.flags & flags::HAS_IP4, 0);
        assert_ne!(entry.flags & flags::HAS_IP6, 0);
        assert_eq!(entry.redirect_ip4.to_ne_bytes(), [198, 18, 9, 10]);
        assert_eq!(
            d.netns[&NetnsCookie(1010)].ip4.to_ne_bytes(),
            [198, 18, 9, 10]
        );
    }

    #[test]
    fn while_a_source_is_unsynced_nothing_the_kernel_holds_is_deleted_but_changes_go_ahead() {
        let d0 = desired(
            &spec(),
            &Readiness::Ungated,
            &Settings::default(),
            &mut Fake,
        );
        // The next state lacks pod `a` (its source has not delivered yet)
        // and changes pod `b`.
        let mut s = spec();
        s.pods.remove(0);
        s.pods[0].mode = Mode::Ambient;
        let mut d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        let changed_b = d.cgroups[&CgroupId(11)];
        retain_current(
            &mut d,
            Current {
                cgroups: d0.cgroups.clone(),
                netns: d0.netns.clone(),
                inbound: d0.inbound.clone(),
                inbound_netns: d0.inbound_netns.clone(),
            },
        );
        assert_eq!(d.cgroups[&CgroupId(10)], d0.cgroups[&CgroupId(10)]);
        assert_eq!(d.cgroups[&CgroupId(11)], changed_b);
        assert!(d0.inbound.keys().all(|ip| d.inbound.contains_key(ip)));
        assert!(d.inbound_netns.is_superset(&d0.inbound_netns));
        assert!(
            diff(&d0.cgroups, &d.cgroups)
                .iter()
                .all(|op| matches!(op, Op::Put(..)))
        );
    }

    #[test]
    fn the_shared_ztunnels_netns_holds_the_redirect_addresses() {
        let mut s = spec();
        s.redirect = Some(SharedRedirect {
            ip4: Some("198.18.0.50".parse().unwrap()),
            ip6: None,
            port: None,
        });
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(
            d.netns[&NetnsCookie(1020)].ip4.to_ne_bytes(),
            [198, 18, 0, 50]
        );
        // Its connections are keyed by that namespace.
        assert_eq!(d.node.shared_netns, 1020);
    }
}
