//! Which pod a socket belongs to.
//!
//! Containers of a pod live in cgroups below a pod-level cgroup; the daemon
//! stores pod-level (and ztunnel) cgroup ids. The calling task's ancestors are
//! matched level by level (`bpf_get_current_ancestor_cgroup_id`, Linux 5.7 for
//! cgroup sock_addr programs), so every container of a pod is covered without
//! per-container entries. A sidecar pod's proxy container may have an entry
//! of its own, deeper than its pod's.

use ambridge_common::{CgroupInfo, MAX_CGROUP_DEPTH, conn_flags, flags};
use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid};

use crate::maps::CGROUPS;

/// The deepest matching entry among the current task's cgroup ancestors, with
/// [`flags::ZTUNNEL`] added if *any* ancestor is a ztunnel: ztunnel's sockets
/// are never redirected, even when its cgroup nests under a pod-like path.
#[inline(always)]
pub fn current() -> Option<CgroupInfo> {
    current_entry().map(|(_, info)| info)
}

/// As [`current`], with the id of the deepest matching cgroup that is not
/// a sidecar proxy's container: the pod's, the key of its rule set.
#[inline(always)]
pub fn current_entry() -> Option<(u64, CgroupInfo)> {
    // Not an `Option` in the loop: LLVM would copy its uninitialised
    // payload around, which the verifier rejects as a read of an unset
    // register.
    let mut found = CgroupInfo::default();
    let mut found_id = 0;
    let mut matched = false;
    let mut ztunnel = false;
    // Level 0 is the root cgroup, which is never a pod.
    for level in 1..MAX_CGROUP_DEPTH {
        // SAFETY: a plain helper call; it returns 0 past the task's depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: the value is copied out at once; the daemon replaces
        // entries whole, so a torn read only ever sees old or new flags.
        if let Some(info) = unsafe { CGROUPS.get(id) } {
            ztunnel |= info.flags & flags::ZTUNNEL != 0;
            found = *info;
            if info.flags & flags::SIDECAR_PROXY == 0 {
                found_id = id;
            }
            matched = true;
        }
    }
    if !matched {
        return None;
    }
    if ztunnel {
        found.flags |= flags::ZTUNNEL;
    }
    Some((found_id, found))
}

/// Whether connects from this cgroup are redirected to ztunnel at all.
#[inline(always)]
pub fn redirects(info: &CgroupInfo) -> bool {
    info.flags & flags::ENROLLED != 0 && info.flags & flags::ZTUNNEL == 0
}

/// Whether the current task is a sidecar proxy's: its container's cgroup
/// says so, or, where the proxy's container is not known, it runs in a
/// sidecar-captured pod as the proxy's uid or gid.
#[inline(always)]
pub fn is_sidecar_proxy(info: &CgroupInfo) -> bool {
    if info.flags & flags::SIDECAR_PROXY != 0 {
        return true;
    }
    if info.flags & flags::SIDECAR == 0 || info.flags & flags::SIDECAR_PROXY_KNOWN != 0 {
        return false;
    }
    runs_as_sidecar_proxy()
}

/// Whether the current task runs as the sidecar proxies' uid or gid.
#[inline(always)]
pub fn runs_as_sidecar_proxy() -> bool {
    let node = crate::maps::node();
    // Sockets are made in a task's context, so its ids are the maker's.
    let ids = bpf_get_current_uid_gid();
    ids as u32 == node.sidecar_uid || (ids >> 32) as u32 == node.sidecar_gid
}

/// The acceleration flags of a connection opened (or bound) by this cgroup:
/// accelerated if allowed, and marked when kept out because its proxy
/// relays with `splice(2)`.
#[inline(always)]
pub fn accel_flags(info: &CgroupInfo) -> u8 {
    if info.flags & flags::ZEROCOPY != 0 {
        conn_flags::ZEROCOPY
    } else if info.flags & flags::ACCEL != 0 {
        conn_flags::ACCEL
    } else {
        0
    }
}
