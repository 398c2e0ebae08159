//! From node state to map operations: compute what the kernel maps should
//! hold, diff it against what they hold, apply only the difference. Both
//! steps are pure (resolving paths to ids is injected), so reconciling twice
//! changes nothing the second time.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::Arc,
};

use ambridge_common::{CgroupInfo, InboundTarget, NetnsInfo, NodeConfig, exempt};
use ipnet::IpNet;

use crate::{
    host::netns::{Claim, NetnsAt},
    node::claims::{Claims, Counted, Owner},
    node::entries,
    node::spec::{
        CgroupRef, Mode, NodeSpec, PodCgroup, PodMap, PodSpec, Readiness, Settings, SharedRedirect,
    },
    types::{CgroupId, NetnsCookie, PodUid, Port, WorkloadId},
};

/// Turns the paths named by the node state into kernel ids.
pub trait Resolve {
    /// The pod-level cgroup of a pod the node state names only by UID.
    fn pod_cgroup(&mut self, uid: &PodUid) -> io::Result<std::path::PathBuf>;
    /// The pod-level cgroup whose network namespace holds one of `ips`; a
    /// pod `placed_before` on one of several claimants stays there.
    fn pod_cgroup_by_address(
        &mut self,
        ips: &[IpAddr],
        placed_before: Option<&Path>,
    ) -> io::Result<Claim>;
    /// The id of a cgroup directory.
    fn cgroup_id(&mut self, cgroup: &Path) -> io::Result<CgroupId>;
    /// The id of the cgroup of container `container` (the runtime's ID
    /// for it) below the pod-level cgroup `pod`: `<id>` (the kubelet's
    /// cgroupfs driver) or `<runtime>-<id>.scope` (systemd); `None` while
    /// it does not exist.
    fn container_cgroup(&mut self, pod: &Path, container: &str) -> io::Result<Option<CgroupId>>;
    /// The cookie of a network namespace; `None` while the cgroup it is
    /// found through has no process.
    fn netns_cookie(&mut self, at: NetnsAt) -> io::Result<Option<NetnsCookie>>;
    /// The addresses of a network namespace; `None` while the cgroup it is
    /// found through has no process.
    fn netns_addresses(&mut self, at: NetnsAt) -> io::Result<Option<Vec<IpAddr>>>;
    /// The addresses of the node's own network namespace: connections from
    /// them (kubelet probes, host-network pods) reach pods uncaptured.
    fn node_addresses(&mut self) -> Vec<IpAddr>;
    /// Told before many pods' parts are computed what they will ask (their
    /// cgroups' ids, and their sandboxes' namespaces), so it can look all
    /// up at once; told `&[]` once they are. The answers after it must be
    /// those without it.
    fn look_ahead(&mut self, _pods: &[Ahead]) {}
}

/// A pod whose part is about to be computed (see [`Resolve::look_ahead`]).
pub struct Ahead<'a> {
    pub cgroup: AheadCgroup<'a>,
    /// Whether its part asks for its namespace's cookie through its
    /// sandbox (it has addresses and no namespace file).
    pub sandbox: bool,
}

/// How an [`Ahead`] pod's cgroup is named.
pub enum AheadCgroup<'a> {
    Path(&'a Path),
    Uid(&'a PodUid),
}

/// At least this many pods' parts computed in one go are announced with
/// [`Resolve::look_ahead`] first.
const LOOK_AHEAD_AFTER: usize = 256;

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
    pub owner: Whose,
    pub cgroup: Arc<Path>,
    /// Why, borrowed where the reason is always the same words (a pod not
    /// started yet, thousands of them on a node filling up).
    pub error: Cow<'static, str>,
}

/// The map contents that a node state calls for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub cgroups: BTreeMap<CgroupId, CgroupInfo>,
    pub netns: BTreeMap<NetnsCookie, NetnsInfo>,
    pub node: NodeConfig,
    /// Where each pod with a resolved cgroup sits.
    pub placed: BTreeMap<WorkloadId, (Arc<Path>, CgroupId)>,
    /// The netns of each pod whose processes were found.
    pub pod_netns: BTreeMap<WorkloadId, NetnsCookie>,
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
    /// The sidecar-mode fallback is on: [`Mode::Sidecar`] pods are captured.
    pub sidecar: bool,
    /// Sidecar pods' destination prefixes, with a
    /// [`ambridge_common::sidecar_verdict`].
    pub sidecar_ranges: BTreeMap<RuleKey<IpNet>, u32>,
    /// Sidecar pods' ports by direction, with a verdict.
    pub sidecar_ports: BTreeMap<PortRule, u32>,
    pub unresolved: UnresolvedEntries,
}

/// A port entry of a sidecar pod's rule set: the port with its
/// [`ambridge_common::sidecar_direction`].
pub type PortRule = RuleKey<(u16, Port)>;

/// One entry of a sidecar pod's rule set: its pod-level cgroup, the set's
/// number ([`CgroupInfo::rules`]) and what it says something of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey<T> {
    pub cgroup: CgroupId,
    pub rules: u16,
    pub what: T,
}

/// What is not (fully) in the datapath yet, by whose it is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnresolvedEntries {
    pods: BTreeMap<WorkloadId, Vec<Unresolved>>,
    ztunnels: Vec<Unresolved>,
    count: usize,
}

impl UnresolvedEntries {
    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every entry: the pods' by UID, then the ztunnels'.
    pub fn iter(&self) -> impl Iterator<Item = &Unresolved> {
        self.pods.values().flatten().chain(&self.ztunnels)
    }

    /// The pod `uid`'s entries.
    pub fn of_pod(&self, uid: &WorkloadId) -> &[Unresolved] {
        self.pods.get(uid).map_or(&[], Vec::as_slice)
    }

    fn set_pod(&mut self, uid: &WorkloadId, entries: Vec<Unresolved>) {
        let old = if entries.is_empty() {
            self.pods.remove(uid)
        } else {
            self.count += entries.len();
            self.pods.insert(uid.clone(), entries)
        };
        self.count -= old.map_or(0, |o| o.len());
    }

    fn set_ztunnels(&mut self, entries: Vec<Unresolved>) {
        self.count += entries.len();
        self.count -= std::mem::replace(&mut self.ztunnels, entries).len();
    }
}

/// Whether two lists of entries say the same of the same workload: the
/// same cgroups and reasons, whatever else its spec says.
fn same_reasons(a: &[Unresolved], b: &[Unresolved]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.cgroup == b.cgroup && a.error == b.error && a.owner.uid() == b.owner.uid()
        })
}

/// Whose an [`Unresolved`] entry is. A pod is named by its spec, shared
/// and spelled only when the entry is shown: a node filling up has an
/// entry for each pod that has not started yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whose {
    Pod(Arc<PodSpec>),
    /// A ztunnel, as its cgroup was named.
    Ztunnel(String),
}

impl Whose {
    /// The pod's UID (`None` for a ztunnel).
    pub fn uid(&self) -> Option<&WorkloadId> {
        match self {
            Whose::Pod(pod) => Some(&pod.uid),
            Whose::Ztunnel(_) => None,
        }
    }
}

impl std::fmt::Display for Whose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Whose::Pod(pod) => write!(f, "pod {}/{} ({})", pod.namespace, pod.name, pod.uid),
            Whose::Ztunnel(name) => f.write_str(name),
        }
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
    let pods: PodMap = spec
        .pods
        .iter()
        .map(|p| (p.uid.clone(), Arc::new(p.clone())))
        .collect();
    let mut maps = DesiredMaps::default();
    maps.update(spec, &pods, Touched::All, readiness, settings, resolve);
    maps.desired
}

/// Which pods a reconcile looks at again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Touched {
    /// Every pod: something every pod depends on changed, or a full pass.
    All,
    /// These pods (new, changed or gone). A retry pass and a change of
    /// readiness look at more, republished only if their part changed.
    Pods(BTreeSet<WorkloadId>),
}

impl Touched {
    pub fn none() -> Self {
        Touched::Pods(BTreeSet::new())
    }

    /// Adds `uid` to the pods looked at again.
    pub fn add(&mut self, uid: &WorkloadId) {
        if let Touched::Pods(pods) = self {
            pods.insert(uid.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Touched::Pods(pods) if pods.is_empty())
    }
}

/// What one pod asks of the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PodPart {
    /// Its claim on the cgroup map, with where the cgroup is.
    cgroup: Option<(Arc<Path>, CgroupId, CgroupInfo)>,
    /// A sidecar pod's claim for its proxy's container cgroup.
    proxy_cgroup: Option<(CgroupId, CgroupInfo)>,
    netns: Option<(NetnsCookie, NetnsInfo)>,
    /// Its addresses captured inbound, into `netns`, to `inbound_target`.
    inbound: Vec<IpAddr>,
    inbound_netns: Option<NetnsCookie>,
    inbound_target: InboundTarget,
    /// A sidecar pod's rule set (none under Istio's defaults).
    sidecar_ranges: Vec<(RuleKey<IpNet>, u32)>,
    sidecar_ports: Vec<(PortRule, u32)>,
    /// What is not found yet; moved to `Desired::unresolved` when the part
    /// is kept.
    unresolved: Vec<Unresolved>,
    /// Something was not found yet (a retry pass looks again).
    incomplete: bool,
}

/// Which keys of the desired maps an update changed: what the datapath
/// must look at, and the pods whose published state may differ.
#[derive(Debug, Default)]
pub struct Changed {
    /// Everything may have: compare whole maps.
    pub all: bool,
    pub cgroups: BTreeSet<CgroupId>,
    pub netns: BTreeSet<NetnsCookie>,
    pub inbound: BTreeSet<IpAddr>,
    pub inbound_netns: BTreeSet<NetnsCookie>,
    pub sidecar_ranges: BTreeSet<RuleKey<IpNet>>,
    pub sidecar_ports: BTreeSet<PortRule>,
    pub pods: BTreeSet<WorkloadId>,
    /// What is newly not (fully) in the datapath, or not for a new reason.
    pub unresolved: Vec<Unresolved>,
}

impl Changed {
    /// Adds what a second update changed.
    pub fn merge(&mut self, more: Changed) {
        self.all |= more.all;
        self.cgroups.extend(more.cgroups);
        self.netns.extend(more.netns);
        self.inbound.extend(more.inbound);
        self.inbound_netns.extend(more.inbound_netns);
        self.sidecar_ranges.extend(more.sidecar_ranges);
        self.sidecar_ports.extend(more.sidecar_ports);
        self.pods.extend(more.pods);
        self.unresolved.extend(more.unresolved);
    }
}

/// The desired maps, kept between reconciles and brought up to date pod by
/// pod: a change to one pod costs work for that pod, not for the node.
/// Where two claim one key (see [`claims`]) the outcome does not depend on
/// the order they were looked at in.
#[derive(Default)]
pub struct DesiredMaps {
    pub desired: Desired,
    /// Boxed: a table sized for the next thousands of pods holds a word,
    /// not a whole part, in each free slot.
    parts: std::collections::HashMap<WorkloadId, (u32, Box<PodPart>), crate::types::FastHash>,
    next_slot: u32,
    ztunnel_parts: Vec<ZtunnelPart>,
    cgroup_claims: Claims<CgroupId, CgroupInfo>,
    netns_claims: Claims<NetnsCookie, NetnsInfo>,
    inbound_claims: Claims<IpAddr, InboundTarget>,
    inbound_netns: Counted<NetnsCookie>,
    sidecar_range_claims: Claims<RuleKey<IpNet>, u32>,
    sidecar_port_claims: Claims<PortRule, u32>,
    /// The node-wide inputs of the last update: when they change, every
    /// pod is looked at again.
    last_node: Option<(Vec<crate::node::spec::ZtunnelSpec>, Option<SharedRedirect>)>,
    last_readiness: Readiness,
}

/// What one ztunnel asks of the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ZtunnelPart {
    cgroup: Option<(CgroupId, CgroupInfo)>,
    netns: Option<(NetnsCookie, NetnsInfo)>,
    unresolved: Vec<Unresolved>,
}

impl DesiredMaps {
    /// Brings the maps to `pods` on `node` (whose ztunnels and shared
    /// redirect count; its pod list is `pods`), looking again at the
    /// `touched` pods, at the pods whose hold changed, and, on a
    /// [`Pass::Retry`](crate::host::netns::Pass), at those not fully
    /// found yet (`retry`).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        node: &NodeSpec,
        pods: &PodMap,
        mut touched: Touched,
        readiness: &Readiness,
        settings: &Settings,
        resolve: &mut impl Resolve,
    ) -> Changed {
        self.update_retrying(node, pods, &mut touched, &[], readiness, settings, resolve)
    }

    /// As [`Self::update`], looking at the pods `retry` again too (some of
    /// [`Self::retry_candidates`]).
    #[allow(clippy::too_many_arguments)]
    pub fn update_retrying(
        &mut self,
        node: &NodeSpec,
        pods: &PodMap,
        touched: &mut Touched,
        retry: &[WorkloadId],
        readiness: &Readiness,
        settings: &Settings,
        resolve: &mut impl Resolve,
    ) -> Changed {
        let node_wide = (node.ztunnels.clone(), node.redirect);
        if self.last_node.as_ref() != Some(&node_wide) {
            *touched = Touched::All;
            self.last_node = Some(node_wide);
        }
        let mut changed = Changed::default();
        // Besides the touched pods, those whose lookups are retried or whose
        // hold changed are looked at; they are republished only if their
        // part changes (`changed.pods`).
        let looked_at: Vec<WorkloadId> = match &*touched {
            Touched::All => {
                changed.all = true;
                let gone: Vec<WorkloadId> = self
                    .parts
                    .keys()
                    .filter(|uid| !pods.contains_key(*uid))
                    .cloned()
                    .collect();
                gone.into_iter().chain(pods.keys().cloned()).collect()
            }
            Touched::Pods(uids) => {
                let mut uids = uids.clone();
                uids.extend(retry.iter().cloned());
                if self.last_readiness != *readiness {
                    for uid in self.parts.keys() {
                        if self.last_readiness.holds(uid) != readiness.holds(uid) {
                            uids.insert(uid.clone());
                        }
                    }
                }
                uids.into_iter().collect()
            }
        };
        self.last_readiness = readiness.clone();
        let d = &mut self.desired;
        d.node = entries::node_config(Some(node), settings);
        d.sidecar = settings.sidecar.is_some();
        d.exempt = exempt_sources(settings, resolve.node_addresses());
        let look_ahead = looked_at.len() >= LOOK_AHEAD_AFTER;
        if look_ahead {
            let ahead: Vec<Ahead> = looked_at
                .iter()
                .filter_map(|uid| ahead(pods.get(uid)?))
                .collect();
            resolve.look_ahead(&ahead);
        }
        for uid in looked_at {
            let placed_before = self.desired.placed.get(&uid).map(|(path, _)| &**path);
            let part = pods
                .get(&uid)
                .map(|pod| pod_part(pod, placed_before, node, readiness, settings, resolve));
            self.replace_part(&uid, part, &mut changed);
        }
        if look_ahead {
            resolve.look_ahead(&[]);
        }
        self.update_ztunnels(node, settings, resolve, &mut changed);
        // The shared ztunnel's namespace keys its connections.
        self.desired.node.shared_netns = self
            .ztunnel_parts
            .iter()
            .find_map(|z| z.netns)
            .map_or(0, |(cookie, _)| cookie.0);
        changed
    }

    /// The pods a retry pass looks at again: those not fully found yet, and
    /// those found by address, which depend on every other pod's netns.
    pub fn retry_candidates(&self, pods: &PodMap) -> Vec<WorkloadId> {
        let incomplete = |uid: &WorkloadId| self.parts.get(uid).is_some_and(|(_, p)| p.incomplete);
        // In no order: a pass looks at all of them, a slice at a time (and
        // sorting 10,000 would keep the first slice's event waiting).
        self.parts
            .iter()
            .filter(|(_, (_, part))| part.incomplete)
            .map(|(uid, _)| uid.clone())
            .chain(
                pods.values()
                    .filter(|p| p.cgroup == PodCgroup::Address && !incomplete(&p.uid))
                    .map(|p| p.uid.clone()),
            )
            .collect()
    }

    /// Replaces what the pod `uid` asks of the maps with `part` (`None`:
    /// the pod is gone).
    fn replace_part(&mut self, uid: &WorkloadId, part: Option<PodPart>, changed: &mut Changed) {
        // A kept part's unresolved entries live in `desired.unresolved`
        // only, not twice (one per pod still starting, at 10,000 pods).
        let (part, unresolved) = match part {
            Some(mut part) => {
                let mut unresolved = std::mem::take(&mut part.unresolved);
                // Kept until the pod resolves: without the spare room of a
                // vector grown by pushes (four entries' worth for one).
                unresolved.shrink_to_fit();
                (Some(part), unresolved)
            }
            None => (None, Vec::new()),
        };
        let old = match (self.parts.get(uid), &part) {
            (Some((_, old)), Some(new))
                if **old == *new
                    && same_reasons(self.desired.unresolved.of_pod(uid), &unresolved) =>
            {
                // Only the spec the entries name may be newer (a service
                // account, say): they follow it, and nothing has changed.
                if self.desired.unresolved.of_pod(uid) != unresolved.as_slice() {
                    self.desired.unresolved.set_pod(uid, unresolved);
                }
                return;
            }
            (None, None) => return,
            _ => self.parts.remove(uid),
        };
        changed.pods.insert(uid.clone());
        let slot = match &old {
            Some((slot, _)) => *slot,
            None => {
                self.next_slot += 1;
                self.next_slot
            }
        };
        let owner = Owner::Pod(slot);
        let d = &mut self.desired;
        if old.is_some() {
            d.unresolved.set_pod(uid, Vec::new());
        }
        if let Some((_, old)) = old {
            if let Some((_, id, _)) = old.cgroup {
                d.placed.remove(uid);
                if self.cgroup_claims.release(&mut d.cgroups, id, owner) {
                    changed.cgroups.insert(id);
                }
            }
            if let Some((id, _)) = old.proxy_cgroup
                && self.cgroup_claims.release(&mut d.cgroups, id, owner)
            {
                changed.cgroups.insert(id);
            }
            if let Some((cookie, _)) = old.netns {
                d.pod_netns.remove(uid);
                if self.netns_claims.release(&mut d.netns, cookie, owner) {
                    changed.netns.insert(cookie);
                }
            }
            for ip in old.inbound {
                if self.inbound_claims.release(&mut d.inbound, ip, owner) {
                    changed.inbound.insert(ip);
                }
            }
            if let Some(cookie) = old.inbound_netns
                && self.inbound_netns.release(&mut d.inbound_netns, cookie)
            {
                changed.inbound_netns.insert(cookie);
            }
            for (key, _) in old.sidecar_ranges {
                if self
                    .sidecar_range_claims
                    .release(&mut d.sidecar_ranges, key, owner)
                {
                    changed.sidecar_ranges.insert(key);
                }
            }
            for (key, _) in old.sidecar_ports {
                if self
                    .sidecar_port_claims
                    .release(&mut d.sidecar_ports, key, owner)
                {
                    changed.sidecar_ports.insert(key);
                }
            }
        }
        let Some(part) = part else {
            return;
        };
        if !unresolved.is_empty() {
            changed.unresolved.extend(unresolved.iter().cloned());
            d.unresolved.set_pod(uid, unresolved);
        }
        if let Some((path, id, info)) = &part.cgroup {
            d.placed.insert(uid.clone(), (path.clone(), *id));
            if self.cgroup_claims.claim(&mut d.cgroups, *id, owner, *info) {
                changed.cgroups.insert(*id);
            }
        }
        if let Some((id, info)) = part.proxy_cgroup
            && self.cgroup_claims.claim(&mut d.cgroups, id, owner, info)
        {
            changed.cgroups.insert(id);
        }
        if let Some((cookie, info)) = part.netns {
            d.pod_netns.insert(uid.clone(), cookie);
            if self.netns_claims.claim(&mut d.netns, cookie, owner, info) {
                changed.netns.insert(cookie);
            }
        }
        if let Some(cookie) = part.inbound_netns {
            let target = part.inbound_target;
            for ip in &part.inbound {
                if self
                    .inbound_claims
                    .claim(&mut d.inbound, *ip, owner, target)
                {
                    changed.inbound.insert(*ip);
                }
            }
            if self.inbound_netns.hold(&mut d.inbound_netns, cookie) {
                changed.inbound_netns.insert(cookie);
            }
        }
        for (key, verdict) in &part.sidecar_ranges {
            if self
                .sidecar_range_claims
                .claim(&mut d.sidecar_ranges, *key, owner, *verdict)
            {
                changed.sidecar_ranges.insert(*key);
            }
        }
        for (key, verdict) in &part.sidecar_ports {
            if self
                .sidecar_port_claims
                .claim(&mut d.sidecar_ports, *key, owner, *verdict)
            {
                changed.sidecar_ports.insert(*key);
            }
        }
        self.parts.insert(uid.clone(), (slot, Box::new(part)));
    }

    /// Looks at every ztunnel again (a node has one, two in an upgrade).
    fn update_ztunnels(
        &mut self,
        node: &NodeSpec,
        settings: &Settings,
        resolve: &mut impl Resolve,
        changed: &mut Changed,
    ) {
        let parts: Vec<ZtunnelPart> = node
            .ztunnels
            .iter()
            .map(|z| ztunnel_part(z, node, settings, resolve))
            .collect();
        if parts == self.ztunnel_parts {
            return;
        }
        let d = &mut self.desired;
        for (i, old) in std::mem::take(&mut self.ztunnel_parts)
            .into_iter()
            .enumerate()
        {
            let owner = Owner::Ztunnel(i as u32);
            if let Some((id, _)) = old.cgroup
                && self.cgroup_claims.release(&mut d.cgroups, id, owner)
            {
                changed.cgroups.insert(id);
            }
            if let Some((cookie, _)) = old.netns
                && self.netns_claims.release(&mut d.netns, cookie, owner)
            {
                changed.netns.insert(cookie);
            }
        }
        d.ztunnel_cgroups.clear();
        for (i, part) in parts.iter().enumerate() {
            let owner = Owner::Ztunnel(i as u32);
            if let Some((id, info)) = part.cgroup {
                d.ztunnel_cgroups.insert(id);
                if self.cgroup_claims.claim(&mut d.cgroups, id, owner, info) {
                    changed.cgroups.insert(id);
                }
            }
            if let Some((cookie, info)) = part.netns
                && self.netns_claims.claim(&mut d.netns, cookie, owner, info)
            {
                changed.netns.insert(cookie);
            }
        }
        let unresolved: Vec<Unresolved> = parts
            .iter()
            .flat_map(|z| z.unresolved.iter().cloned())
            .collect();
        changed.unresolved.extend(unresolved.iter().cloned());
        d.unresolved.set_ztunnels(unresolved);
        self.ztunnel_parts = parts;
    }
}

/// What [`pod_part`] will ask `resolve` about `pod`, where that is known
/// before (not for a pod found by address).
fn ahead(pod: &PodSpec) -> Option<Ahead<'_>> {
    let cgroup = match &pod.cgroup {
        PodCgroup::Path(path) => AheadCgroup::Path(path),
        PodCgroup::Uid => AheadCgroup::Uid(pod.uid.pod_uid()?),
        PodCgroup::Address => return None,
    };
    Some(Ahead {
        cgroup,
        // A pod with no addresses looks for them first, and then for its
        // cookie: rare enough to be left to the lookups one by one.
        sandbox: pod.netns.is_none() && !pod.ips.is_empty(),
    })
}

/// What `pod` asks of the maps; a pod found by address was last placed on
/// `placed_before`.
fn pod_part(
    pod: &Arc<PodSpec>,
    placed_before: Option<&Path>,
    node: &NodeSpec,
    readiness: &Readiness,
    settings: &Settings,
    resolve: &mut impl Resolve,
) -> PodPart {
    let mut out = PodPart::default();
    let unresolved = |out: &mut PodPart, cgroup: &Arc<Path>, error: Cow<'static, str>| {
        out.incomplete = true;
        out.unresolved.push(Unresolved {
            owner: Whose::Pod(pod.clone()),
            cgroup: cgroup.clone(),
            error,
        });
    };
    let located: io::Result<Arc<Path>> = match &pod.cgroup {
        PodCgroup::Path(path) => Ok(path.clone()),
        PodCgroup::Uid => match pod.uid.pod_uid() {
            Some(uid) => resolve.pod_cgroup(uid).map(Arc::from),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "named by istiod, it has no Kubernetes UID to find its cgroup by",
            )),
        },
        PodCgroup::Address => resolve
            .pod_cgroup_by_address(&pod.ips, placed_before)
            .map(|claim| match claim {
                Claim::Sole(path) => path.into(),
                Claim::Disputed { kept, report } => {
                    let kept = Arc::from(kept);
                    unresolved(&mut out, &kept, report.into());
                    kept
                }
            }),
    };
    let cgroup = match located {
        Ok(path) => path,
        Err(e) => {
            unresolved(&mut out, &Arc::from(Path::new("")), e.to_string().into());
            return out;
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
    let pod: &PodSpec = if pod.ips.is_empty() {
        learned = PodSpec {
            ips: learned_addresses(resolve, netns),
            ..PodSpec::clone(pod)
        };
        // Until its addresses are found, it is looked at again.
        out.incomplete |= learned.ips.is_empty();
        &learned
    } else {
        pod
    };
    match resolve.cgroup_id(&cgroup) {
        Ok(id) => {
            let mut entry = entries::pod_entry(pod, node, readiness, settings);
            if entry.flags & ambridge_common::flags::SIDECAR != 0
                && let Some(rules) = &pod.capture.sidecar
            {
                let set = entries::sidecar_rule_set(rules);
                entry.rules = set.number;
                out.sidecar_ranges = set.keyed(id, &set.ranges);
                out.sidecar_ports = set.keyed(id, &set.ports);
            }
            if entry.flags & ambridge_common::flags::SIDECAR != 0
                && let Some(container) = &pod.capture.sidecar_proxy
            {
                // Until the proxy's container is found, its uid tells its
                // sockets apart.
                match resolve.container_cgroup(&cgroup, container) {
                    Ok(Some(proxy)) => {
                        out.proxy_cgroup = Some((proxy, entries::proxy_entry(&entry)));
                        entry.flags |= ambridge_common::flags::SIDECAR_PROXY_KNOWN;
                    }
                    Ok(None) => out.incomplete = true,
                    Err(e) => unresolved(&mut out, &cgroup, format!("proxy container: {e}").into()),
                }
            }
            out.cgroup = Some((cgroup.clone(), id, entry));
        }
        Err(e) => {
            unresolved(&mut out, &cgroup, e.to_string().into());
            return out;
        }
    }
    if !pod.ips.is_empty() {
        let info = entries::netns_entry(pod.ip4(), pod.ip6());
        match netns_cookie(resolve, netns) {
            Ok(cookie) => out.netns = Some((cookie, info)),
            Err(e) => unresolved(&mut out, &cgroup, e),
        }
    }
    // Inbound capture needs ztunnel's listeners in the pod's own netns:
    // the in-pod model only. A sidecar pod's proxy is always in its own.
    let sidecar = out
        .cgroup
        .as_ref()
        .filter(|(_, _, entry)| entry.flags & ambridge_common::flags::SIDECAR != 0);
    let ambient = pod.mode == Mode::Ambient && pod.capture.inbound && node.redirect.is_none();
    if (ambient || sidecar.is_some())
        && let Some((cookie, _)) = out.netns
    {
        out.inbound = pod.ips.clone();
        out.inbound_netns = Some(cookie);
        out.inbound_target = InboundTarget {
            netns_cookie: cookie.0,
            ..InboundTarget::default()
        };
        if let Some((_, id, entry)) = sidecar {
            out.inbound_target.cgroup = id.0;
            out.inbound_target.flags = ambridge_common::flags::SIDECAR;
            out.inbound_target.rules = entry.rules;
        }
    }
    out
}

/// The cookie of the network namespace `at`, or why it is not known yet.
fn netns_cookie(resolve: &mut impl Resolve, at: NetnsAt) -> Result<NetnsCookie, Cow<'static, str>> {
    match resolve.netns_cookie(at) {
        Ok(Some(cookie)) => Ok(cookie),
        Ok(None) => Err("no process in the cgroup yet, so its network namespace is unknown".into()),
        Err(e) => Err(format!("network namespace: {e}").into()),
    }
}

/// What the ztunnel `z` asks of the maps.
fn ztunnel_part(
    z: &crate::node::spec::ZtunnelSpec,
    node: &NodeSpec,
    settings: &Settings,
    resolve: &mut impl Resolve,
) -> ZtunnelPart {
    let mut out = ZtunnelPart::default();
    let (located, owner) = match &z.cgroup {
        CgroupRef::Path(path) => (Ok(path.clone()), "ztunnel".to_string()),
        CgroupRef::Pod(uid) => (resolve.pod_cgroup(uid), format!("ztunnel pod {uid}")),
    };
    let unresolved = |out: &mut ZtunnelPart, cgroup: &Path, error: Cow<'static, str>| {
        out.unresolved.push(Unresolved {
            owner: Whose::Ztunnel(owner.clone()),
            cgroup: cgroup.into(),
            error,
        })
    };
    let cgroup = match located.and_then(|path| Ok((resolve.cgroup_id(&path)?, path))) {
        Ok((id, path)) => {
            out.cgroup = Some((id, entries::ztunnel_entry(z, settings)));
            path
        }
        Err(e) => {
            unresolved(&mut out, Path::new(""), e.to_string().into());
            return out;
        }
    };
    // In the shared model ztunnel binds in its own netns, whose local
    // addresses are the redirect target's.
    // Connections to and from it are keyed by that namespace.
    if let Some(shared) = node.redirect {
        let info = entries::netns_entry(shared.ip4, shared.ip6);
        match netns_cookie(resolve, NetnsAt::SandboxOf(&cgroup)) {
            Ok(cookie) => out.netns = Some((cookie, info)),
            Err(e) => unresolved(&mut out, &cgroup, e),
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
) -> std::collections::BTreeSet<WorkloadId> {
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
    pub sidecar_ranges: BTreeMap<RuleKey<IpNet>, u32>,
    pub sidecar_ports: BTreeMap<PortRule, u32>,
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
    for (k, v) in current.sidecar_ranges {
        desired.sidecar_ranges.entry(k).or_insert(v);
    }
    for (k, v) in current.sidecar_ports {
        desired.sidecar_ports.entry(k).or_insert(v);
    }
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

/// Orders cgroup map operations so that a sidecar proxy's container entry
/// is in place whenever a pod entry relies on it
/// ([`flags::SIDECAR_PROXY_KNOWN`](ambridge_common::flags::SIDECAR_PROXY_KNOWN)):
/// its puts first, its deletes last (by what `current` holds), everything
/// else in between, in its order. Otherwise the proxy's own connects could
/// be sent back to itself for a moment.
pub fn proxies_around(
    mut ops: Vec<Op<CgroupId, CgroupInfo>>,
    current: &BTreeMap<CgroupId, CgroupInfo>,
) -> Vec<Op<CgroupId, CgroupInfo>> {
    let proxy = |info: &CgroupInfo| info.flags & ambridge_common::flags::SIDECAR_PROXY != 0;
    ops.sort_by_key(|op| match op {
        Op::Put(_, info) if proxy(info) => 0,
        Op::Delete(id) if current.get(id).is_some_and(proxy) => 2,
        _ => 1,
    });
    ops
}

/// As [`diff`], looking only at `keys` (those an update changed), or at
/// every key with `all`.
pub fn diff_changed<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    keys: &BTreeSet<K>,
    all: bool,
) -> Vec<Op<K, V>> {
    if all {
        return diff(current, desired);
    }
    let deletes = keys
        .iter()
        .filter(|k| current.contains_key(k) && !desired.contains_key(k))
        .map(|k| Op::Delete(*k));
    let puts = keys.iter().filter_map(|k| {
        let want = desired.get(k)?;
        (current.get(k) != Some(want)).then_some(Op::Put(*k, *want))
    });
    deletes.chain(puts).collect()
}

#[cfg(test)]
mod tests {
    use ambridge_common::flags;

    use super::*;
    use crate::{
        node::spec::{Mode, PodSpec, SharedRedirect, ZtunnelSpec},
        types::WorkloadId,
    };

    fn pod(uid: &str, cgroup: &str, mode: Mode) -> PodSpec {
        PodSpec {
            kept_because: None,
            uid: WorkloadId::kubernetes(uid),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: PodCgroup::Path(Path::new(cgroup).into()),
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
        fn pod_cgroup_by_address(&mut self, ips: &[IpAddr], _: Option<&Path>) -> io::Result<Claim> {
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

        /// Container `proxy-<n>` of `/cg/<m>` is cgroup `100 * m + n`; no
        /// other container exists.
        fn container_cgroup(
            &mut self,
            pod: &Path,
            container: &str,
        ) -> io::Result<Option<CgroupId>> {
            let pod = self.cgroup_id(pod)?.0;
            Ok(container
                .strip_prefix("proxy-")
                .and_then(|n| n.parse::<u64>().ok())
                .map(|n| CgroupId(100 * pod + n)))
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
    fn a_spec_change_that_leaves_a_pod_unresolved_for_the_same_reason_is_not_reported_again() {
        let node = spec();
        let mut c = pod("c", "/elsewhere/pod-c", Mode::Ambient);
        let uid = c.uid.clone();
        let mut pods: PodMap = [(uid.clone(), Arc::new(c.clone()))].into();
        let (ungated, settings) = (Readiness::Ungated, Settings::default());
        let mut maps = DesiredMaps::default();
        let first = maps.update(&node, &pods, Touched::All, &ungated, &settings, &mut Fake);
        assert_eq!(first.unresolved.len(), 1);
        c.service_account = "other".into();
        pods.insert(uid.clone(), Arc::new(c));
        let touched = Touched::Pods([uid.clone()].into());
        let again = maps.update(&node, &pods, touched, &ungated, &settings, &mut Fake);
        assert!(again.unresolved.is_empty() && again.pods.is_empty());
        // The entry names the pod as it is now, not the spec before.
        let entry = &maps.desired.unresolved.of_pod(&uid)[0];
        assert!(matches!(&entry.owner, Whose::Pod(p) if Arc::ptr_eq(p, &pods[&uid])));
    }

    #[test]
    fn an_unresolvable_cgroup_is_reported_not_fatal() {
        let mut s = spec();
        s.pods.push(pod("c", "/elsewhere/pod-c", Mode::Ambient));
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(d.cgroups.len(), 3);
        assert_eq!(d.unresolved.len(), 1);
        assert!(
            d.unresolved
                .iter()
                .next()
                .unwrap()
                .owner
                .to_string()
                .contains("default/c")
        );
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
        let uid = WorkloadId::kubernetes("c");
        assert_eq!(d.pod_netns[&uid], NetnsCookie(2013));
        let entry = d.cgroups[&CgroupId(13)];
        assert_eq!(entry.redirect_ip4.to_ne_bytes(), [198, 18, 8, 13]);
        let ip: IpAddr = "198.18.8.13".parse().unwrap();
        assert_eq!(d.inbound[&ip].netns_cookie, 2013);
        assert!(
            d.unresolved.iter().all(|u| u.owner.uid() != Some(&uid)),
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
        assert!(
            d.unresolved
                .iter()
                .next()
                .unwrap()
                .owner
                .to_string()
                .contains("default/unknown")
        );
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
        assert_eq!(&*d.placed[&by_ip.uid].0, std::path::Path::new("/cg/14"));
        by_ip.ips = vec!["198.18.7.1".parse().unwrap()];
        s.pods.pop();
        s.pods.push(by_ip);
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(d.unresolved.len(), 1);
        assert!(
            d.unresolved
                .iter()
                .next()
                .unwrap()
                .owner
                .to_string()
                .contains("default/Kubernetes//Pod/default/web")
        );
    }

    #[test]
    fn a_ztunnel_named_by_pod_uid_is_found_like_a_pod_and_reported_when_missing() {
        let mut s = spec();
        s.ztunnels = vec![
            ZtunnelSpec {
                cgroup: CgroupRef::Pod(PodUid::new("by-uid-21")),
                zero_copy: false,
            },
            ZtunnelSpec {
                cgroup: CgroupRef::Pod(PodUid::new("gone")),
                zero_copy: false,
            },
        ];
        let d = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_ne!(d.cgroups[&CgroupId(21)].flags & flags::ZTUNNEL, 0);
        assert_eq!(d.unresolved.len(), 1);
        assert_eq!(
            d.unresolved.iter().next().unwrap().owner.to_string(),
            "ztunnel pod gone"
        );
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
        assert_eq!(acked, [WorkloadId::kubernetes("a")].into());
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
        assert_eq!(d.pod_netns[&WorkloadId::kubernetes("a")], NetnsCookie(1010));
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
            d.unresolved
                .iter()
                .next()
                .unwrap()
                .error
                .contains("no process"),
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
                sidecar_ranges: d0.sidecar_ranges.clone(),
                sidecar_ports: d0.sidecar_ports.clone(),
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

    /// Writes to `kernel` what [`diff_changed`] says of `keys`.
    fn write_changed<K: Ord + Copy, V: PartialEq + Copy>(
        kernel: &mut BTreeMap<K, V>,
        desired: &BTreeMap<K, V>,
        keys: &BTreeSet<K>,
        all: bool,
    ) {
        let ops = diff_changed(kernel, desired, keys, all);
        apply(kernel, &ops);
    }

    fn sidecar_settings() -> Settings {
        Settings {
            sidecar: Some(crate::node::spec::SidecarSettings::default()),
            ..Settings::default()
        }
    }

    #[test]
    fn a_sidecar_pod_is_sent_to_its_own_proxy_only_with_the_fallback_on() {
        let mut s = spec();
        s.pods[0].mode = Mode::Sidecar;
        s.redirect = Some(SharedRedirect {
            ip4: Some("198.18.0.50".parse().unwrap()),
            ..SharedRedirect::default()
        });
        let on = desired(&s, &Readiness::Ungated, &sidecar_settings(), &mut Fake);
        let entry = on.cgroups[&CgroupId(10)];
        assert_eq!(
            entry.flags & (flags::SIDECAR | flags::ENROLLED),
            flags::SIDECAR
        );
        assert_eq!(entry.redirect_port, 15001);
        // Its own address, not the shared ztunnel's: its proxy is in the pod.
        assert_eq!(entry.redirect_ip4, entry.pod_ip4);
        assert_eq!(entry.rules, 0, "Istio's defaults need no rule set");
        assert!(on.sidecar_ranges.is_empty() && on.sidecar_ports.is_empty());
        // Inbound goes to its own proxy too, with no rule set to look up.
        let target = on.inbound[&"198.18.0.2".parse::<IpAddr>().unwrap()];
        assert_eq!(
            (target.flags, target.cgroup, target.rules),
            (flags::SIDECAR, 10, 0)
        );
        assert_eq!((on.node.sidecar_uid, on.node.sidecar_gid), (1337, 1337));
        let off = desired(&s, &Readiness::Ungated, &Settings::default(), &mut Fake);
        assert_eq!(off.cgroups[&CgroupId(10)].flags & flags::SIDECAR, 0);
        assert_eq!(off.cgroups[&CgroupId(10)].flags & flags::ENROLLED, 0);
    }

    #[test]
    fn a_sidecar_proxys_known_container_stands_for_its_uid() {
        let mut s = spec();
        s.pods[0].mode = Mode::Sidecar;
        s.pods[0].capture.sidecar_proxy = Some("proxy-5".into());
        let d = desired(&s, &Readiness::Ungated, &sidecar_settings(), &mut Fake);
        let pod = d.cgroups[&CgroupId(10)];
        let proxy = d.cgroups[&CgroupId(1005)];
        assert_ne!(pod.flags & flags::SIDECAR_PROXY_KNOWN, 0);
        assert_eq!(pod.flags & flags::SIDECAR_PROXY, 0);
        assert_eq!(
            proxy.flags & (flags::SIDECAR | flags::SIDECAR_PROXY),
            flags::SIDECAR | flags::SIDECAR_PROXY
        );
        assert_eq!((proxy.pod_ip4, proxy.rules), (pod.pod_ip4, 0));
        // A container not made yet: the uid tells the proxy apart meanwhile.
        s.pods[0].capture.sidecar_proxy = Some("not-yet".into());
        let d = desired(&s, &Readiness::Ungated, &sidecar_settings(), &mut Fake);
        assert_eq!(
            d.cgroups[&CgroupId(10)].flags & flags::SIDECAR_PROXY_KNOWN,
            0
        );
        assert_eq!(d.cgroups.len(), 3, "the two pods and the ztunnel");
    }

    #[test]
    fn a_proxys_container_entry_is_written_before_and_removed_after_the_rest() {
        let entry = |f| CgroupInfo {
            flags: f,
            ..CgroupInfo::default()
        };
        let proxy = entry(flags::SIDECAR | flags::SIDECAR_PROXY);
        let pod = entry(flags::SIDECAR | flags::SIDECAR_PROXY_KNOWN);
        let current: BTreeMap<CgroupId, CgroupInfo> =
            [(CgroupId(1), pod), (CgroupId(9), proxy)].into();
        let ops = vec![
            Op::Delete(CgroupId(9)),
            Op::Put(CgroupId(1), entry(flags::SIDECAR)),
            Op::Delete(CgroupId(2)),
            Op::Put(CgroupId(8), proxy),
        ];
        assert_eq!(
            proxies_around(ops, &current),
            [
                Op::Put(CgroupId(8), proxy),
                Op::Put(CgroupId(1), entry(flags::SIDECAR)),
                Op::Delete(CgroupId(2)),
                Op::Delete(CgroupId(9)),
            ]
        );
    }

    #[test]
    fn a_changed_rule_set_is_written_under_new_keys_and_the_old_ones_go() {
        use crate::node::sidecar::{self, SidecarRules};
        let rules = |excluded: &str| -> Option<Arc<SidecarRules>> {
            sidecar::rules(&|a| {
                (a == sidecar::EXCLUDE_OUTBOUND_IP_RANGES)
                    .then_some(excluded)
                    .or((a == sidecar::EXCLUDE_OUTBOUND_PORTS).then_some("22"))
            })
            .unwrap()
        };
        let mut s = spec();
        s.pods[0].mode = Mode::Sidecar;
        s.pods[0].capture.sidecar = rules("10.0.0.0/8");
        let settings = sidecar_settings();
        let pods: PodMap = s
            .pods
            .iter()
            .map(|p| (p.uid.clone(), Arc::new(p.clone())))
            .collect();
        let mut maps = DesiredMaps::default();
        maps.update(
            &s,
            &pods,
            Touched::All,
            &Readiness::Ungated,
            &settings,
            &mut Fake,
        );
        let first = maps.desired.cgroups[&CgroupId(10)].rules;
        assert_ne!(first, 0);
        let nets: Vec<(String, u32)> = maps
            .desired
            .sidecar_ranges
            .iter()
            .map(|(k, v)| (k.what.to_string(), *v))
            .collect();
        assert_eq!(
            nets,
            [
                // `*`: every address of each family, but the excluded.
                (
                    "0.0.0.0/0".to_string(),
                    ambridge_common::sidecar_verdict::CAPTURE
                ),
                (
                    "10.0.0.0/8".to_string(),
                    ambridge_common::sidecar_verdict::PASS
                ),
                (
                    "::/0".to_string(),
                    ambridge_common::sidecar_verdict::CAPTURE
                ),
            ]
        );
        assert!(
            maps.desired
                .sidecar_ranges
                .keys()
                .all(|k| k.rules == first && k.cgroup == CgroupId(10))
        );
        let ports: Vec<_> = maps
            .desired
            .sidecar_ports
            .iter()
            .map(|(k, v)| (k.what, *v))
            .collect();
        assert_eq!(
            ports,
            [
                (
                    (ambridge_common::sidecar_direction::OUTBOUND, Port(22)),
                    ambridge_common::sidecar_verdict::PASS
                ),
                // Every inbound port (`includeInboundPorts` `*`).
                (
                    (ambridge_common::sidecar_direction::INBOUND, Port(0)),
                    ambridge_common::sidecar_verdict::CAPTURE
                ),
            ]
        );

        let mut changed_pod = s.pods[0].clone();
        changed_pod.capture.sidecar = rules("10.1.0.0/16");
        let mut pods2 = pods.clone();
        pods2.insert(changed_pod.uid.clone(), Arc::new(changed_pod.clone()));
        let touched = Touched::Pods([changed_pod.uid.clone()].into());
        let changed = maps.update(
            &s,
            &pods2,
            touched,
            &Readiness::Ungated,
            &settings,
            &mut Fake,
        );
        let second = maps.desired.cgroups[&CgroupId(10)].rules;
        assert_ne!(second, first);
        assert!(
            maps.desired
                .sidecar_ranges
                .keys()
                .all(|k| k.rules == second)
        );
        assert!(maps.desired.sidecar_ports.keys().all(|k| k.rules == second));
        // Both sets' keys are named changed: the new ones to put, the old
        // ones to delete.
        assert!(changed.sidecar_ranges.iter().any(|k| k.rules == first));
        assert!(changed.sidecar_ranges.iter().any(|k| k.rules == second));
    }

    #[test]
    fn updating_pod_by_pod_ends_where_computing_the_whole_node_does() {
        // A fixed pseudo-random walk of adds, changes and removals, some on
        // a shared cgroup or address (claims in contention).
        let mut seed = 0x9e37_79b9_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut pods: PodMap = BTreeMap::new();
        let node = spec();
        let mut maps = DesiredMaps::default();
        let settings = Settings::default();
        let (mut kernel, mut inbound) = (BTreeMap::new(), BTreeMap::new());
        for step in 0..400 {
            let uid = WorkloadId::kubernetes(format!("p{}", next(12)));
            let mut touched = Touched::none();
            touched.add(&uid);
            if next(4) == 0 {
                pods.remove(&uid);
            } else {
                let mut p = pod(
                    uid.as_str(),
                    &format!("/cg/{}", 10 + next(6)),
                    Mode::Ambient,
                );
                if next(2) == 0 {
                    p.mode = Mode::None;
                }
                p.ips = vec![format!("198.18.0.{}", next(5)).parse().unwrap()];
                pods.insert(uid.clone(), Arc::new(p));
            }
            let readiness = if step % 50 < 25 {
                Readiness::Ungated
            } else {
                Readiness::Acknowledged(pods.keys().filter(|_| next(2) == 0).cloned().collect())
            };
            let changed = maps.update(&node, &pods, touched, &readiness, &settings, &mut Fake);
            // The kernel, written only where the update said keys changed,
            // holds what is desired.
            write_changed(
                &mut kernel,
                &maps.desired.cgroups,
                &changed.cgroups,
                changed.all,
            );
            assert_eq!(kernel, maps.desired.cgroups, "step {step}");
            write_changed(
                &mut inbound,
                &maps.desired.inbound,
                &changed.inbound,
                changed.all,
            );
            assert_eq!(inbound, maps.desired.inbound, "step {step}");
            let whole = NodeSpec {
                pods: pods.values().map(|p| PodSpec::clone(p)).collect(),
                ..node.clone()
            };
            let want = desired(&whole, &readiness, &settings, &mut Fake);
            let got = &maps.desired;
            assert_eq!(got.placed, want.placed, "step {step}");
            assert_eq!(got.pod_netns, want.pod_netns, "step {step}");
            assert_eq!(got.inbound_netns, want.inbound_netns, "step {step}");
            assert_eq!(got.ztunnel_cgroups, want.ztunnel_cgroups, "step {step}");
            // Where claims contend the winner may differ by history, but
            // every key is claimed by one of the pods that want it.
            assert_eq!(
                got.cgroups.keys().collect::<Vec<_>>(),
                want.cgroups.keys().collect::<Vec<_>>(),
                "step {step}"
            );
            assert_eq!(
                got.inbound.keys().collect::<Vec<_>>(),
                want.inbound.keys().collect::<Vec<_>>(),
                "step {step}"
            );
            for (id, info) in &got.cgroups {
                let wanted: Vec<CgroupInfo> = whole
                    .pods
                    .iter()
                    .filter(|p| got.placed.get(&p.uid).map(|(_, i)| i) == Some(id))
                    .map(|p| entries::pod_entry(p, &node, &readiness, &settings))
                    .chain(
                        (*id == CgroupId(20))
                            .then(|| entries::ztunnel_entry(&node.ztunnels[0], &settings)),
                    )
                    .collect();
                assert!(wanted.contains(info), "step {step}: {id:?} {info:?}");
            }
        }
    }
}
