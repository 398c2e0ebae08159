//! Every map of the object. Pinned by name, so a restarted daemon (and a newer
//! build of the programs) finds the same maps and the state in them.

use ambridge_common::{
    CGROUPS_CAPACITY, COUNTER_SLOTS, CgroupInfo, ConnKey, Counter, ORIG_DST_CAPACITY, OrigDst,
    PENDING_CAPACITY,
};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};

/// Pod and ztunnel cgroups, by cgroup v2 id. Written by the daemon only.
#[map(name = "AMB_CGROUPS")]
pub static CGROUPS: HashMap<u64, CgroupInfo> = HashMap::pinned(CGROUPS_CAPACITY, 0);

/// Original destinations of redirected connects, by socket cookie, until the
/// connection is established (then moved to [`ORIG_DST`]) or closes.
#[map(name = "AMB_PENDING")]
pub static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(PENDING_CAPACITY, 0);

/// Original destinations of established redirected connections, by the
/// client's view of the 4-tuple, until the client socket closes.
#[map(name = "AMB_ORIG_DST")]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(ORIG_DST_CAPACITY, 0);

#[map(name = "AMB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// Adds one to a per-CPU counter (no atomics needed: per-CPU, and BPF
/// programs do not migrate CPUs while running).
#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is to this CPU's slot of a live map entry.
        unsafe { *slot += 1 };
    }
}
