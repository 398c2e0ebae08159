//! [`Resolve`] answered from the live system: cgroupfs, and the network
//! namespaces of the pods' sandbox processes.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::{
    cgroup,
    netns::{self, AddressCache, AddressIndex, Claim, CookieCache, NetnsAt},
};
use crate::{
    node::desired::Resolve,
    sources::push::PlacedPod,
    types::{CgroupId, NetnsCookie, PodUid},
};

/// Resolves against the live system: cgroupfs and the pods' processes.
pub struct SystemResolver<'a> {
    kubepods_parent: &'a Path,
    node_addresses: &'a [IpAddr],
    cookies: &'a mut CookieCache,
    addresses: &'a mut AddressCache,
    /// Pod cgroups by the addresses of their netns, listed at the first
    /// lookup of a reconcile.
    by_address: Option<AddressIndex>,
    /// Where the last reconcile placed each pod: a pod found by address
    /// stays there while another cgroup claims its address.
    placed_before: &'a [PlacedPod],
}

impl<'a> SystemResolver<'a> {
    /// A resolver for one reconcile: pods named by UID are looked for
    /// under `kubepods_parent`; `placed_before` is where the last
    /// reconcile placed each pod.
    pub fn new(
        kubepods_parent: &'a Path,
        node_addresses: &'a [IpAddr],
        cookies: &'a mut CookieCache,
        addresses: &'a mut AddressCache,
        placed_before: &'a [PlacedPod],
    ) -> Self {
        Self {
            kubepods_parent,
            node_addresses,
            cookies,
            addresses,
            by_address: None,
            placed_before,
        }
    }

    fn address_index(&mut self) -> std::io::Result<&AddressIndex> {
        if self.by_address.is_none() {
            let mut index = AddressIndex::new();
            for (_, pod_cgroup) in cgroup::list_pod_cgroups(self.kubepods_parent)? {
                // A pod without processes (or just gone) has no netns to
                // look at; it is found at a later reconcile.
                if let Ok(Some(ips)) = self.addresses.of(NetnsAt::SandboxOf(&pod_cgroup)) {
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
        cgroup::find_pod_cgroup(self.kubepods_parent, &uid.0)
    }

    fn pod_cgroup_by_address(&mut self, uid: &PodUid, ips: &[IpAddr]) -> std::io::Result<Claim> {
        let before = self
            .placed_before
            .iter()
            .find(|p| &p.uid == uid)
            .map(|p| p.cgroup.clone());
        netns::claimant(self.address_index()?, ips, before.as_deref())
    }

    fn cgroup_id(&mut self, cgroup: &Path) -> std::io::Result<CgroupId> {
        cgroup::cgroup_id(cgroup)
    }

    fn netns_cookie(&mut self, at: NetnsAt) -> std::io::Result<Option<NetnsCookie>> {
        Ok(self.cookies.of(at)?.map(NetnsCookie))
    }

    fn netns_addresses(&mut self, at: NetnsAt) -> std::io::Result<Option<Vec<IpAddr>>> {
        self.addresses.of(at)
    }

    fn node_addresses(&mut self) -> Vec<IpAddr> {
        self.node_addresses.to_vec()
    }
}
