//! [`Resolve`] answered from the live system: cgroupfs, and the network
//! namespaces of the pods' sandbox processes, with what was found kept in
//! a [`HostCache`] between reconciles.
//!
//! A change to one pod should cost work for that pod, not for the node. A
//! pass of the kind [`Pass::Cached`] (every reconcile a source's change
//! starts) takes what was found, or found missing, as it was, except for
//! the pods whose cgroup, namespace or addresses changed
//! ([`HostCache::forget`]; a new mode or name looks nothing up); a
//! [`Pass::Retry`]
//! (each resync) looks again for what was not found yet (a pod cgroup not
//! created yet, a sandbox with no process yet), each the less often the
//! longer it stays missing ([`super::misses::Misses`]); a [`Pass::Full`] (the
//! periodic full resync) looks everything up again: a cgroup or a sandbox
//! may have been recreated since.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use tracing::warn;

use super::{
    cgroup,
    misses::Misses,
    netns::{self, AddressCache, AddressIndex, Claim, CookieCache, NetnsAt, Pass},
    survey::{self, Ask},
};
use crate::{
    node::desired::{Ahead, AheadCgroup, Resolve},
    types::{CgroupId, FastHash, NetnsCookie, PodUid, WorkloadId},
};

/// What the passes found, kept between reconciles.
#[derive(Default)]
pub struct HostCache {
    pub cookies: CookieCache,
    pub addresses: AddressCache,
    /// Pod cgroups found by UID.
    pod_cgroups: HashMap<PodUid, PathBuf, FastHash>,
    /// Pods whose cgroup was not found, and when to look again.
    missing: Misses<PodUid>,
    /// Cgroup ids by directory.
    ids: HashMap<PathBuf, CgroupId, FastHash>,
    /// Where the cgroups whose ids are looked up are opened.
    dirs: cgroup::Dirs,
}

impl HostCache {
    /// Starts a pass over the pods (see the module docs).
    pub fn begin_pass(&mut self, pass: Pass) {
        match pass {
            Pass::Full => {
                self.pod_cgroups.clear();
                self.ids.clear();
                self.dirs.clear();
            }
            Pass::Retry | Pass::Cached => {}
        }
        self.missing.begin_pass(pass);
        self.cookies.begin_pass(pass);
        self.addresses.begin_pass(pass);
    }

    /// Forgets what was found about the pod `uid` (on `cgroup`, where it
    /// was placed or named): its state changed, so the next pass looks
    /// again.
    pub fn forget(&mut self, uid: &WorkloadId, cgroup: Option<&Path>) {
        if let Some(uid) = uid.pod_uid() {
            self.missing.forget(uid);
            if let Some(found) = self.pod_cgroups.remove(uid) {
                self.forget_cgroup(&found);
            }
        }
        if let Some(cgroup) = cgroup {
            self.forget_cgroup(cgroup);
        }
    }

    fn forget_cgroup(&mut self, cgroup: &Path) {
        self.ids.remove(cgroup);
        self.cookies.forget(cgroup);
        self.addresses.forget(cgroup);
    }

    /// Ends a pass. One that looked at every pod lets go of the namespaces
    /// it did not ask for: they belong to pods that are gone or have a new
    /// sandbox. One that looked at a few pods keeps the others' as they
    /// were.
    pub fn end_pass(&mut self, every_pod: bool) {
        if every_pod {
            self.cookies.retain_seen();
            self.addresses.retain_seen();
        }
    }
}

/// Resolves against the live system: cgroupfs and the pods' processes.
pub struct SystemResolver<'a> {
    kubepods_parent: &'a Path,
    node_addresses: &'a [IpAddr],
    cache: &'a mut HostCache,
    /// Pod cgroups by the addresses of their netns, listed at the first
    /// lookup of a reconcile.
    by_address: Option<AddressIndex>,
    /// Pod cgroups by UID, listed once this reconcile has looked for
    /// [`LIST_AFTER`] of them one by one; `Err` if the listing failed (the
    /// rest are then looked for one by one).
    by_uid: Option<Result<HashMap<String, PathBuf, FastHash>, ()>>,
    /// Pod cgroups looked for one by one in this reconcile.
    looked_for: usize,
}

/// A reconcile that looks for this many pod cgroups by UID lists the
/// kubelet's directories once for the rest: each lookup of one tries up
/// to six layouts, a path walk each, while a listing reads the few
/// directories that exist (a node filled from empty: 10,000 lookups).
const LIST_AFTER: usize = 64;

impl<'a> SystemResolver<'a> {
    /// A resolver for one reconcile: pods named by UID are looked for
    /// under `kubepods_parent`.
    pub fn new(
        kubepods_parent: &'a Path,
        node_addresses: &'a [IpAddr],
        cache: &'a mut HostCache,
    ) -> Self {
        Self {
            kubepods_parent,
            node_addresses,
            cache,
            by_address: None,
            by_uid: None,
            looked_for: 0,
        }
    }

    /// The cgroup of the pod `uid` under the kubelet's directories.
    fn find_pod_cgroup(&mut self, uid: &PodUid) -> std::io::Result<PathBuf> {
        let uid = uid.as_str();
        if self.looked_for < LIST_AFTER || !cgroup::is_pod_uid(uid) {
            self.looked_for += 1;
            return cgroup::find_pod_cgroup(self.kubepods_parent, uid);
        }
        let parent = self.kubepods_parent;
        let listed = self.by_uid.get_or_insert_with(|| {
            let mut by_uid = HashMap::default();
            // In the order a lookup of one tries the layouts.
            for (uid, path) in cgroup::list_pod_cgroups(parent).map_err(|e| {
                warn!("listing the kubelet's pod cgroups, looking for each pod alone: {e}");
            })? {
                by_uid.entry(uid).or_insert(path);
            }
            Ok(by_uid)
        });
        let Ok(by_uid) = listed else {
            return cgroup::find_pod_cgroup(parent, uid);
        };
        by_uid
            .get(uid)
            .cloned()
            .ok_or_else(|| cgroup::pod_cgroup_missing(self.kubepods_parent, uid))
    }

    /// The cgroup of the pod `uid` if it is known or can be found now,
    /// without recording a miss: the lookup of its part does that.
    fn pod_cgroup_if_found(&mut self, uid: &PodUid) -> Option<PathBuf> {
        if let Some(path) = self.cache.pod_cgroups.get(uid) {
            return Some(path.clone());
        }
        if self.cache.missing.skip(uid) {
            return None;
        }
        let path = self.find_pod_cgroup(uid).ok()?;
        self.cache.missing.forget(uid);
        self.cache.pod_cgroups.insert(uid.clone(), path.clone());
        Some(path)
    }

    fn address_index(&mut self) -> std::io::Result<&AddressIndex> {
        if self.by_address.is_none() {
            let mut index = AddressIndex::new();
            for (_, pod_cgroup) in cgroup::list_pod_cgroups(self.kubepods_parent)? {
                // A pod without processes (or just gone) has no netns to
                // look at; it is found at a later reconcile.
                if let Ok(Some(ips)) = self.cache.addresses.of(NetnsAt::SandboxOf(&pod_cgroup)) {
                    for ip in ips {
                        index.entry(ip).or_default().insert(pod_cgroup.clone());
                    }
                }
            }
            self.by_address = Some(index);
        }
        Ok(self.by_address.as_ref().expect("filled above"))
    }
}

impl Resolve for SystemResolver<'_> {
    fn pod_cgroup(&mut self, uid: &PodUid) -> std::io::Result<PathBuf> {
        if let Some(path) = self.cache.pod_cgroups.get(uid) {
            return Ok(path.clone());
        }
        // Taken as still missing without a look, it counts as no new miss:
        // the wait before the next look stays as the last miss set it.
        if self.cache.missing.skip(uid) {
            return Err(cgroup::pod_cgroup_missing(
                self.kubepods_parent,
                uid.as_str(),
            ));
        }
        let found = self.find_pod_cgroup(uid);
        match &found {
            Ok(path) => {
                self.cache.missing.forget(uid);
                self.cache.pod_cgroups.insert(uid.clone(), path.clone());
            }
            Err(_) => self.cache.missing.missed(uid.clone()),
        }
        found
    }

    fn pod_cgroup_by_address(
        &mut self,
        ips: &[IpAddr],
        placed_before: Option<&Path>,
    ) -> std::io::Result<Claim> {
        netns::claimant(self.address_index()?, ips, placed_before)
    }

    fn cgroup_id(&mut self, cgroup: &Path) -> std::io::Result<CgroupId> {
        if let Some(id) = self.cache.ids.get(cgroup) {
            return Ok(*id);
        }
        let id = self.cache.dirs.cgroup_id(cgroup)?;
        self.cache.ids.insert(cgroup.to_path_buf(), id);
        Ok(id)
    }

    fn container_cgroup(
        &mut self,
        pod: &Path,
        container: &str,
    ) -> std::io::Result<Option<CgroupId>> {
        // Not cached, and by path: a container's cgroup comes and goes
        // with it, only sidecar pods whose proxy's container is named ask,
        // and their pod directories must not push the kubelet's out of the
        // kept parents.
        let Some(path) = cgroup::container_cgroup(pod, container)? else {
            return Ok(None);
        };
        cgroup::cgroup_id(&path).map(Some)
    }

    fn netns_cookie(&mut self, at: NetnsAt) -> std::io::Result<Option<NetnsCookie>> {
        Ok(self.cache.cookies.of(at)?.map(NetnsCookie))
    }

    fn netns_addresses(&mut self, at: NetnsAt) -> std::io::Result<Option<Vec<IpAddr>>> {
        self.cache.addresses.of(at)
    }

    fn node_addresses(&mut self) -> Vec<IpAddr> {
        self.node_addresses.to_vec()
    }

    /// Surveys on several threads the cgroups this pass would look at one
    /// by one ([`survey`]); what it could not find is left to those
    /// lookups, which say why. What it found stands until the next call
    /// (`look_ahead(&[])` lets it go) or pass.
    fn look_ahead(&mut self, pods: &[Ahead]) {
        self.cache.cookies.end_survey();
        let mut cgroups: Vec<(Cow<Path>, bool)> = Vec::with_capacity(pods.len());
        for pod in pods {
            let cgroup = match pod.cgroup {
                AheadCgroup::Path(path) => Cow::Borrowed(path),
                AheadCgroup::Uid(uid) => match self.pod_cgroup_if_found(uid) {
                    Some(path) => Cow::Owned(path),
                    None => continue,
                },
            };
            let sandbox = pod.sandbox && self.cache.cookies.would_look(&cgroup);
            if sandbox || !self.cache.ids.contains_key(cgroup.as_ref()) {
                cgroups.push((cgroup, sandbox));
            }
        }
        if cgroups.len() < survey::PARALLEL_AFTER {
            return;
        }
        let asks: Vec<Ask> = cgroups
            .iter()
            .map(|(cgroup, sandbox)| Ask {
                cgroup,
                sandbox: *sandbox,
            })
            .collect();
        let found = survey::survey(&asks);
        for ((cgroup, _), found) in cgroups.into_iter().zip(found) {
            let cgroup = cgroup.into_owned();
            if let Some(Ok(sandbox)) = found.sandbox {
                self.cache.cookies.surveyed(cgroup.clone(), sandbox);
            }
            // An id found before stands until a full pass, as without the
            // survey.
            if let Ok(id) = found.id {
                self.cache.ids.entry(cgroup).or_insert(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(i: usize) -> PodUid {
        PodUid::new(format!("00000000-0000-4000-8000-{i:012x}"))
    }

    #[test]
    fn a_reconcile_of_many_pods_finds_each_cgroup_where_a_lookup_of_one_does() {
        let root = tempfile::tempdir().unwrap();
        let pods = LIST_AFTER * 3;
        for i in 0..pods {
            // Every third pod is missing; every fifth is in two layouts.
            let layouts: &[&str] = match (i % 3, i % 5) {
                (0, _) => &[],
                (_, 0) => &["kubepods/burstable", "kubepods/besteffort"],
                _ => &["kubepods/besteffort"],
            };
            for layout in layouts {
                let dir = root
                    .path()
                    .join(layout)
                    .join(format!("pod{}", uid(i).as_str()));
                std::fs::create_dir_all(dir).unwrap();
            }
        }
        let mut cache = HostCache::default();
        let mut resolver = SystemResolver::new(root.path(), &[], &mut cache);
        for i in 0..pods {
            let one = cgroup::find_pod_cgroup(root.path(), uid(i).as_str()).ok();
            assert_eq!(resolver.pod_cgroup(&uid(i)).ok(), one, "pod {i}");
        }
        assert!(
            matches!(resolver.by_uid, Some(Ok(_))),
            "the later pods came from a listing"
        );
    }

    /// Pods by UID under a kubelet layout, every third with a process (this
    /// one), every seventh missing.
    fn kubelet_pods(root: &Path, pods: usize) -> Vec<PodUid> {
        let me = std::process::id();
        (0..pods)
            .map(|i| {
                let dir = root
                    .join("kubepods/besteffort")
                    .join(format!("pod{}", uid(i).as_str()));
                if i % 7 != 0 {
                    std::fs::create_dir_all(&dir).unwrap();
                    let populated = i % 3 == 0;
                    let events = format!("populated {}\nfrozen 0\n", u8::from(populated));
                    std::fs::write(dir.join("cgroup.events"), events).unwrap();
                    let procs = if populated {
                        format!("{me}\n")
                    } else {
                        String::new()
                    };
                    std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
                }
                uid(i)
            })
            .collect()
    }

    /// The pods `uids` as a look-ahead names them, each asking for its
    /// sandbox.
    fn ahead_of(uids: &[PodUid]) -> Vec<Ahead<'_>> {
        uids.iter()
            .map(|uid| Ahead {
                cgroup: AheadCgroup::Uid(uid),
                sandbox: true,
            })
            .collect()
    }

    /// Every answer a pod's part asks for, in the order it asks.
    fn answers(resolver: &mut SystemResolver, uid: &PodUid) -> String {
        let Ok(cgroup) = resolver.pod_cgroup(uid) else {
            return "no cgroup".into();
        };
        let id = resolver.cgroup_id(&cgroup).map_err(|e| e.kind());
        let cookie = resolver
            .netns_cookie(NetnsAt::SandboxOf(&cgroup))
            .map_err(|e| e.kind());
        format!("{id:?} {cookie:?}")
    }

    #[test]
    fn a_look_ahead_changes_no_answer_in_any_pass() {
        let root = tempfile::tempdir().unwrap();
        let uids = kubelet_pods(root.path(), survey::PARALLEL_AFTER * 2 + 3);
        let ahead = ahead_of(&uids);
        let (mut one_by_one, mut looking_ahead) = (HostCache::default(), HostCache::default());
        for pass in [Pass::Full, Pass::Cached, Pass::Retry, Pass::Full] {
            one_by_one.begin_pass(pass);
            looking_ahead.begin_pass(pass);
            let mut plain = SystemResolver::new(root.path(), &[], &mut one_by_one);
            let expected: Vec<String> = uids.iter().map(|u| answers(&mut plain, u)).collect();
            let mut ahead_first = SystemResolver::new(root.path(), &[], &mut looking_ahead);
            ahead_first.look_ahead(&ahead);
            let got: Vec<String> = uids.iter().map(|u| answers(&mut ahead_first, u)).collect();
            assert_eq!(got, expected, "{pass:?} pass");
            assert!(
                expected.iter().any(|a| a.contains("Ok(Some(")),
                "some pods had a namespace"
            );
        }
    }

    #[test]
    fn what_a_look_ahead_found_is_let_go_once_the_parts_are_computed() {
        let root = tempfile::tempdir().unwrap();
        // Enough for a survey with every seventh pod missing.
        let uids = kubelet_pods(root.path(), survey::PARALLEL_AFTER * 2);
        let ahead = ahead_of(&uids);
        let mut cache = HostCache::default();
        cache.begin_pass(Pass::Full);
        let mut resolver = SystemResolver::new(root.path(), &[], &mut cache);
        resolver.look_ahead(&ahead);
        resolver.look_ahead(&[]);
        // Pod 1 had no process when surveyed; its sandbox starts now.
        let cgroup = resolver.pod_cgroup(&uids[1]).unwrap();
        let me = std::process::id();
        std::fs::write(cgroup.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), format!("{me}\n")).unwrap();
        assert!(
            matches!(
                resolver.netns_cookie(NetnsAt::SandboxOf(&cgroup)),
                Ok(Some(_))
            ),
            "the live sandbox is found, not the survey's empty cgroup"
        );
    }

    #[test]
    fn a_pod_cgroup_made_after_two_misses_is_found_at_the_retry_pass_its_backoff_names() {
        let root = tempfile::tempdir().unwrap();
        let pod = uid(1);
        let mut cache = HostCache::default();
        let mut found_at = None;
        // Missed at the full pass and at retry pass 1, the pod is looked
        // for again at retry pass 3 (two passes after its second miss).
        for pass in 0..8 {
            cache.begin_pass(if pass == 0 { Pass::Full } else { Pass::Retry });
            let mut resolver = SystemResolver::new(root.path(), &[], &mut cache);
            if resolver.pod_cgroup(&pod).is_ok() {
                found_at = Some(pass);
                break;
            }
            if pass == 1 {
                let dir = root
                    .path()
                    .join("kubepods")
                    .join(format!("pod{}", pod.as_str()));
                std::fs::create_dir_all(dir).unwrap();
            }
        }
        assert_eq!(found_at, Some(3));
    }

    #[test]
    fn a_listing_that_fails_leaves_each_pod_looked_for_alone() {
        let root = tempfile::tempdir().unwrap();
        // A layout's directory that is a file: listing it fails.
        std::fs::create_dir_all(root.path().join("kubepods")).unwrap();
        std::fs::write(root.path().join("kubepods/burstable"), "").unwrap();
        let found = uid(LIST_AFTER + 1);
        let dir = root
            .path()
            .join("kubepods")
            .join(format!("pod{}", found.as_str()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cache = HostCache::default();
        let mut resolver = SystemResolver::new(root.path(), &[], &mut cache);
        for i in 0..LIST_AFTER {
            assert!(resolver.pod_cgroup(&uid(i)).is_err());
        }
        assert_eq!(resolver.pod_cgroup(&found).unwrap(), dir);
        assert!(matches!(resolver.by_uid, Some(Err(()))));
    }
}
