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
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use tracing::warn;

use super::{
    cgroup,
    misses::Misses,
    netns::{self, AddressCache, AddressIndex, Claim, CookieCache, NetnsAt, Pass},
};
use crate::{
    node::desired::Resolve,
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
        let found = if self.cache.missing.skip(uid) {
            Err(cgroup::pod_cgroup_missing(
                self.kubepods_parent,
                uid.as_str(),
            ))
        } else {
            self.find_pod_cgroup(uid)
        };
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

    fn netns_cookie(&mut self, at: NetnsAt) -> std::io::Result<Option<NetnsCookie>> {
        Ok(self.cache.cookies.of(at)?.map(NetnsCookie))
    }

    fn netns_addresses(&mut self, at: NetnsAt) -> std::io::Result<Option<Vec<IpAddr>>> {
        self.cache.addresses.of(at)
    }

    fn node_addresses(&mut self) -> Vec<IpAddr> {
        self.node_addresses.to_vec()
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
