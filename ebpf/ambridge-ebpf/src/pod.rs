//! Which pod a socket belongs to.
//!
//! Containers of a pod live in cgroups below a pod-level cgroup; the daemon
//! stores pod-level (and ztunnel) cgroup ids. The calling task's ancestors are
//! matched level by level (`bpf_get_current_ancestor_cgroup_id`, Linux 5.7 for
//! cgroup sock_addr programs), so every container of a pod is covered without
//! per-container entries.

use ambridge_common::{CgroupInfo, MAX_CGROUP_DEPTH, conn_flags, flags};
use aya_ebpf::helpers::bpf_get_current_ancestor_cgroup_id;

use crate::maps::CGROUPS;

/// The deepest matching entry among the current task's cgroup ancestors, with
/// [`flags::ZTUNNEL`] added if *any* ancestor is a ztunnel: ztunnel's sockets
/// are never redirected, even when its cgroup nests under a pod-like path.
#[inline(always)]
pub fn current() -> Option<CgroupInfo> {
    // Not an `Option` in the loop: LLVM would copy its uninitialised
    // payload around, which the verifier rejects as a read of an unset
    // register.
    let mut found = CgroupInfo::default();
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
            matched = true;
        }
    }
    if !matched {
        return None;
    }
    if ztunnel {
        found.flags |= flags::ZTUNNEL;
    }
    Some(found)
}

/// Whether connects from this cgroup are redirected at all.
#[inline(always)]
pub fn redirects(info: &CgroupInfo) -> bool {
    info.flags & flags::ENROLLED != 0 && info.flags & flags::ZTUNNEL == 0
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
