//! Every map of the object. Pinned by name, so a restarted daemon (and a newer
//! build of the programs) finds the same maps and the state in them.

use ambridge_common::{
    CGROUPS_CAPACITY, CONNS_CAPACITY, COUNTER_SLOTS, CgroupInfo, ConnKey, ConnRecord, Counter,
    DNS_CAPACITY, EXEMPT_CAPACITY, INBOUND_CAPACITY, InboundTarget, IpKey, LISTENERS_CAPACITY,
    ListenerKey, NETNS_CAPACITY, NetnsInfo, NodeConfig, PENDING_CAPACITY,
    SIDECAR_LISTENERS_CAPACITY, SIDECAR_PORTS_CAPACITY, SIDECAR_RANGES_CAPACITY, SOCKS_CAPACITY,
    SidecarPort, SidecarRange,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};

/// Pod and ztunnel cgroups, by cgroup v2 id. Written by the daemon only.
#[map(name = "AMB_CGROUPS_V1")]
pub static CGROUPS: HashMap<u64, CgroupInfo> = HashMap::pinned(CGROUPS_CAPACITY, 0);

/// Local addresses of pod (and shared ztunnel) network namespaces, by netns
/// cookie. Written by the daemon only.
#[map(name = "AMB_NETNS_V1")]
pub static NETNS: HashMap<u64, NetnsInfo> = HashMap::pinned(NETNS_CAPACITY, 0);

/// Records of redirected connects and original-source binds, by socket
/// cookie, until the connection is established (then moved to [`CONNS`]) or
/// closes.
#[map(name = "AMB_PENDING_V1")]
pub static PENDING: LruHashMap<u64, ConnRecord> = LruHashMap::pinned(PENDING_CAPACITY, 0);

/// Records of established connections the datapath changed, by the client's
/// view of the 4-tuple, until the client socket closes.
#[map(name = "AMB_CONNS_V2")]
pub static CONNS: LruHashMap<ConnKey, ConnRecord> = LruHashMap::pinned(CONNS_CAPACITY, 0);

/// Accelerated sockets, by their own view of the 4-tuple. The kernel removes
/// a socket from it when the socket closes.
#[map(name = "AMB_SOCKS_V2")]
pub static SOCKS: SockHash<ConnKey> = SockHash::pinned(SOCKS_CAPACITY, 0);

/// Where inbound connections to each enrolled pod address are captured.
/// Written by the daemon only.
#[map(name = "AMB_INBOUND_V2")]
pub static INBOUND: HashMap<IpKey, InboundTarget> = HashMap::pinned(INBOUND_CAPACITY, 0);

/// ztunnel's inbound plaintext listeners, by the netns cookie of the pod
/// they listen in. No program is attached to this sockhash: it only holds
/// listeners for `sk_lookup` to select. The kernel removes a listener when
/// it closes.
#[map(name = "AMB_LISTENERS_V1")]
pub static LISTENERS: SockHash<u64> = SockHash::pinned(LISTENERS_CAPACITY, 0);

/// Sidecar proxies' inbound listeners, by the netns cookie of the pod they
/// listen in and their address family: apart from ztunnel's, so a pod
/// moving between the two modes is never handed to the other's listener.
#[map(name = "AMB_SIDECAR_LISTENERS_V2")]
pub static SIDECAR_LISTENERS: SockHash<ListenerKey> =
    SockHash::pinned(SIDECAR_LISTENERS_CAPACITY, 0);

/// The server each captured DNS query was sent to, by socket cookie.
#[map(name = "AMB_DNS_V1")]
pub static DNS: LruHashMap<u64, ConnRecord> = LruHashMap::pinned(DNS_CAPACITY, 0);

/// Sources never captured inbound, longest prefix first. Written by the
/// daemon only.
#[map(name = "AMB_EXEMPT_V1")]
pub static EXEMPT: LpmTrie<IpKey, u32> = LpmTrie::pinned(EXEMPT_CAPACITY, 0);

/// The destination prefixes sidecar-captured pods' rule sets include or
/// exclude, longest prefix first. Written by the daemon only.
#[map(name = "AMB_SIDECAR_RANGES_V1")]
pub static SIDECAR_RANGES: LpmTrie<SidecarRange, u32> = LpmTrie::pinned(SIDECAR_RANGES_CAPACITY, 0);

/// The outbound ports sidecar-captured pods' rule sets include or exclude.
/// Written by the daemon only.
#[map(name = "AMB_SIDECAR_PORTS_V1")]
pub static SIDECAR_PORTS: HashMap<SidecarPort, u32> = HashMap::pinned(SIDECAR_PORTS_CAPACITY, 0);

/// Node-wide settings (one entry). Written by the daemon only.
#[map(name = "AMB_NODE_V4")]
static NODE: Array<NodeConfig> = Array::pinned(1, 0);

/// The node's settings; all-zero (nothing matches) until the daemon wrote
/// them.
#[inline(always)]
pub fn node() -> NodeConfig {
    NODE.get(0).copied().unwrap_or_default()
}

#[map(name = "AMB_COUNTERS_V6")]
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
