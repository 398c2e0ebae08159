//! Types shared by ambridge's kernel programs and its daemon.
//!
//! Every type here crosses the user/kernel boundary as raw bytes in a BPF map,
//! so each is `#[repr(C)]`, has no implicit padding, and carries compile-time
//! size and offset assertions: a layout change must be made on purpose, on
//! both sides at once.
//!
//! Conventions: IP addresses are stored as four `u32` words in network byte
//! order, exactly as the kernel hands them to BPF programs (`user_ip6`,
//! `src_ip6`, ...). IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`)
//! wherever both families share a field, so a dual-stack socket and an IPv4
//! socket of the same connection produce the same key. Ports are host order
//! unless a field name says otherwise.
#![no_std]

use core::mem::{offset_of, size_of};

/// Names of the maps as they appear in the object file and under the bpffs
/// pin directory. Each ends in its layout version (`_V<n>`): a build whose
/// map differs in key, value or capacity uses a new name, so it installs a
/// new map beside the pinned one instead of misreading it, and maps whose
/// layout did not change stay shared (with their contents) across the
/// upgrade.
pub mod map_names {
    /// [`super::CgroupInfo`] by cgroup v2 id.
    pub const CGROUPS: &str = "AMB_CGROUPS_V1";
    /// [`super::NetnsInfo`] by network namespace cookie.
    pub const NETNS: &str = "AMB_NETNS_V1";
    /// [`super::ConnRecord`] by socket cookie, between `connect()` (or an
    /// original-source `bind()`) and establishment.
    pub const PENDING: &str = "AMB_PENDING_V1";
    /// [`super::ConnRecord`] by [`super::ConnKey`], for established
    /// connections.
    pub const CONNS: &str = "AMB_CONNS_V2";
    /// Sockhash of accelerated sockets, by their own [`super::ConnKey`]
    /// (`src` = local end).
    pub const SOCKS: &str = "AMB_SOCKS_V2";
    /// Per-CPU `u64` counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "AMB_COUNTERS_V6";
    /// One [`super::NodeConfig`], at index 0.
    pub const NODE: &str = "AMB_NODE_V4";
    /// [`super::InboundTarget`] by enrolled pod IP ([`super::IpKey`]): where
    /// inbound connections to that address are captured.
    pub const INBOUND: &str = "AMB_INBOUND_V2";
    /// Sockhash of ztunnel's inbound plaintext (15006) listeners, by the
    /// netns cookie of the pod they listen in.
    pub const LISTENERS: &str = "AMB_LISTENERS_V1";
    /// Sockhash of sidecar proxies' inbound (15006) listeners, by
    /// [`super::ListenerKey`]: the pod's netns cookie and the listener's
    /// address family.
    pub const SIDECAR_LISTENERS: &str = "AMB_SIDECAR_LISTENERS_V2";
    /// [`super::ConnRecord`] by socket cookie: the DNS server a captured
    /// query was sent to, until the socket is released.
    pub const DNS: &str = "AMB_DNS_V1";
    /// LPM trie of [`super::SourcePrefix`] -> [`super::exempt`] reason:
    /// sources whose connections to enrolled pods are never captured
    /// (the node's own addresses, kubelet probes).
    pub const EXEMPT: &str = "AMB_EXEMPT_V1";
    /// LPM trie of [`super::SidecarRange`] -> [`super::sidecar_verdict`]:
    /// the destinations a sidecar-captured pod's annotations include or
    /// exclude, under the pod's rule set.
    pub const SIDECAR_RANGES: &str = "AMB_SIDECAR_RANGES_V1";
    /// [`super::SidecarPort`] -> [`super::sidecar_verdict`]: the ports a
    /// sidecar-captured pod's annotations include or exclude, outbound and
    /// inbound.
    pub const SIDECAR_PORTS: &str = "AMB_SIDECAR_PORTS_V1";
    /// Every map of the object.
    pub const ALL: [&str; 14] = [
        CGROUPS,
        NETNS,
        PENDING,
        CONNS,
        SOCKS,
        COUNTERS,
        NODE,
        INBOUND,
        LISTENERS,
        SIDECAR_LISTENERS,
        DNS,
        EXEMPT,
        SIDECAR_RANGES,
        SIDECAR_PORTS,
    ];
}

/// Capacity of [`map_names::CGROUPS`]: pods (and ztunnels) on one node.
pub const CGROUPS_CAPACITY: u32 = 16_384;
/// Capacity of [`map_names::NETNS`]: one per pod netns (and the shared
/// ztunnel's).
pub const NETNS_CAPACITY: u32 = 16_384;
/// Capacity of [`map_names::PENDING`] (an LRU: a connect that never
/// completes and never closes is evicted rather than leaked).
pub const PENDING_CAPACITY: u32 = 65_536;
/// Capacity of [`map_names::CONNS`] (an LRU). An entry is read when the proxy
/// accepts the connection; eviction only ever hits long-lived connections
/// whose record was read long ago.
pub const CONNS_CAPACITY: u32 = 65_536;
/// Capacity of [`map_names::SOCKS`]: two sockets per accelerated connection.
pub const SOCKS_CAPACITY: u32 = 65_536;
/// Capacity of [`map_names::INBOUND`]: two addresses (one per family) per
/// pod.
pub const INBOUND_CAPACITY: u32 = 32_768;
/// Capacity of [`map_names::LISTENERS`]: one per pod netns.
pub const LISTENERS_CAPACITY: u32 = 16_384;
/// Capacity of [`map_names::SIDECAR_LISTENERS`]: one per address family
/// and pod netns.
pub const SIDECAR_LISTENERS_CAPACITY: u32 = 32_768;
/// Capacity of [`map_names::DNS`] (an LRU; entries are deleted when their
/// socket is released, eviction is only a safety net).
pub const DNS_CAPACITY: u32 = 65_536;
/// Capacity of [`map_names::EXEMPT`].
pub const EXEMPT_CAPACITY: u32 = 1_024;
/// Capacity of [`map_names::SIDECAR_RANGES`]: only pods with range
/// annotations have entries (an LPM trie allocates entries as they come).
pub const SIDECAR_RANGES_CAPACITY: u32 = 65_536;
/// Capacity of [`map_names::SIDECAR_PORTS`]: only pods with port
/// annotations have entries.
pub const SIDECAR_PORTS_CAPACITY: u32 = 65_536;

/// Deepest cgroup level the kernel programs look at when matching a socket's
/// cgroup against [`map_names::CGROUPS`].
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Flag bits of [`CgroupInfo::flags`].
pub mod flags {
    /// The cgroup is an enrolled pod: its outbound TCP is redirected.
    pub const ENROLLED: u32 = 1 << 0;
    /// The cgroup is a ztunnel: its sockets are never redirected, whatever
    /// other entry matches a deeper or shallower level.
    pub const ZTUNNEL: u32 = 1 << 1;
    /// [`super::CgroupInfo::pod_ip4`] and `redirect_ip4` are set.
    pub const HAS_IP4: u32 = 1 << 2;
    /// [`super::CgroupInfo::pod_ip6`] and `redirect_ip6` are set.
    pub const HAS_IP6: u32 = 1 << 3;
    /// Same-node acceleration (sockmap + `msg_redirect`) may be used for
    /// this cgroup's connections.
    pub const ACCEL: u32 = 1 << 4;
    /// The proxy relays with `splice(2)` (on a ztunnel), or the pod's proxy
    /// does (on a pod): never put its sockets in the sockhash.
    pub const ZEROCOPY: u32 = 1 << 5;
    /// On a ztunnel: rewrite its original-source binds to a local address
    /// (`--original-src=undo`).
    pub const UNDO_ORIG_SRC: u32 = 1 << 6;
    /// On an enrolled pod: ztunnel has not acknowledged it over ZDS yet
    /// (or refused it), so connects that would be redirected are refused
    /// (`EPERM`) rather than sent where nothing listens or let past
    /// ztunnel.
    pub const HELD: u32 = 1 << 7;
    /// On an enrolled pod: its DNS queries (UDP and TCP to port 53) go to
    /// ztunnel's DNS proxy in its netns.
    pub const DNS_CAPTURE: u32 = 1 << 8;
    /// On the node config: ambridge is the only capture (replacement
    /// mode), so an inbound connection ztunnel cannot take is refused. In
    /// companion mode it is left to istio-cni's rules instead.
    pub const INBOUND_FAIL_CLOSED: u32 = 1 << 9;
    /// On a pod: sidecar-injected and captured to its own proxy
    /// (`--sidecar=on`): its outbound TCP goes to the proxy's outbound
    /// port on the pod's own address, as `istio-iptables` sends it, shaped
    /// by the pod's rule set ([`super::CgroupInfo::rules`]). The proxy's
    /// own sockets (its container's cgroup, [`SIDECAR_PROXY`], or the
    /// proxy's uid or gid, [`super::NodeConfig::sidecar_uid`]) are never
    /// captured.
    pub const SIDECAR: u32 = 1 << 10;
    /// On a container cgroup: a sidecar-captured pod's proxy container.
    /// Its sockets are the proxy's whatever their uid.
    pub const SIDECAR_PROXY: u32 = 1 << 11;
    /// On a [`SIDECAR`] pod: its proxy's container has an entry of its own
    /// ([`SIDECAR_PROXY`]), so the proxy's uid and gid identify nothing
    /// else in the pod: another container running as 1337 is captured.
    pub const SIDECAR_PROXY_KNOWN: u32 = 1 << 12;
}

/// What the datapath knows about one pod-level (or ztunnel) cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupInfo {
    /// Bits from [`flags`].
    pub flags: u32,
    /// Port connects are redirected to (host order), e.g. 15001.
    pub redirect_port: u16,
    /// On a [`flags::SIDECAR`] pod: its rule set in
    /// [`map_names::SIDECAR_RANGES`] and [`map_names::SIDECAR_PORTS`]
    /// (0: none, Istio's defaults: every destination captured). The
    /// daemon writes a changed set under a new number before it points the
    /// pod at it, so a connect never sees half of an update.
    pub rules: u16,
    /// The pod's IPv4 address (network order); connects to it are not
    /// redirected, as istio-cni does not redirect a pod calling itself.
    pub pod_ip4: u32,
    /// Where IPv4 connects go (network order): the pod's own IP in the
    /// in-pod model, ztunnel's IP in the shared model.
    pub redirect_ip4: u32,
    /// The pod's IPv6 address.
    pub pod_ip6: [u32; 4],
    /// Where IPv6 connects go.
    pub redirect_ip6: [u32; 4],
}

/// The local identity of one network namespace: the addresses a bind in it
/// may use as its own. Foreign-address binds are judged against it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetnsInfo {
    /// [`flags::HAS_IP4`] / [`flags::HAS_IP6`].
    pub flags: u32,
    /// Network order.
    pub ip4: u32,
    pub ip6: [u32; 4],
}

/// How many distinct redirect ports [`NodeConfig`] holds.
pub const REDIRECT_PORTS: usize = 4;

/// Node-wide facts the programs use to rule sockets out cheaply before any
/// hash lookup: a redirected client's peer port is a redirect port, and an
/// undone inbound leg's peer is the netns's own IP (in-pod) or ztunnel's
/// (shared model).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// Host order; unused slots are 0.
    pub redirect_ports: [u16; REDIRECT_PORTS],
    /// [`flags::HAS_IP4`] / [`flags::HAS_IP6`]: the shared ztunnel's
    /// addresses are set; [`flags::INBOUND_FAIL_CLOSED`].
    pub flags: u32,
    /// The shared ztunnel's IPv4 (network order), IPv4-mapped.
    pub shared_ip4: [u32; 4],
    pub shared_ip6: [u32; 4],
    /// ztunnel's inbound plaintext port (15006), host order: the port of
    /// the listeners inbound connections are captured to.
    pub inbound_port: u16,
    /// ztunnel's HBONE port (15008), host order: never captured inbound.
    pub hbone_port: u16,
    /// ztunnel's DNS proxy port (15053), host order.
    pub dns_port: u16,
    pub _pad: u16,
    pub _pad2: u32,
    /// The shared ztunnel's netns cookie (shared model, else 0): the
    /// namespace of every connection to or from the shared ztunnel's
    /// addresses (see [`ConnKey::netns`]).
    pub shared_netns: u64,
    /// The uid sidecar proxies run as (Istio's `ISTIO_PROXY_UID`, 1337):
    /// in a [`flags::SIDECAR`] pod, sockets of tasks with this uid, or
    /// with [`NodeConfig::sidecar_gid`], are the proxy's.
    pub sidecar_uid: u32,
    /// The gid sidecar proxies run as (`ISTIO_PROXY_GID`, 1337).
    pub sidecar_gid: u32,
}

impl NodeConfig {
    #[inline(always)]
    pub fn is_redirect_port(&self, port: u16) -> bool {
        port != 0 && self.redirect_ports.contains(&port)
    }

    /// Whether `ip` (IPv6 or IPv4-mapped) is the shared ztunnel's.
    #[inline(always)]
    pub fn is_shared_ztunnel(&self, ip: &[u32; 4]) -> bool {
        (self.flags & flags::HAS_IP4 != 0 && *ip == self.shared_ip4)
            || (self.flags & flags::HAS_IP6 != 0 && *ip == self.shared_ip6)
    }

    /// The [`ConnKey::netns`] of a connection seen from a socket in netns
    /// `own`: the shared ztunnel's namespace when the socket's *peer* is the
    /// shared ztunnel (a client, or an application accepting ztunnel's
    /// leg), else its own. The ztunnel end of such a connection names its
    /// own namespace, which is the shared ztunnel's only for the real one: a
    /// socket elsewhere holding ztunnel's address never finds its records.
    #[inline(always)]
    pub fn conn_netns(&self, own: u64, peer: &[u32; 4]) -> u64 {
        if self.shared_netns != 0 && self.is_shared_ztunnel(peer) {
            self.shared_netns
        } else {
            own
        }
    }
}

/// A pod's address as [`map_names::INBOUND`] and [`map_names::EXEMPT`]
/// hold it: IPv6, or IPv4-mapped (network order words).
pub type IpKey = [u32; 4];

/// Where inbound connections to one captured pod address go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundTarget {
    /// The pod's netns cookie: the key of ztunnel's listener there in
    /// [`map_names::LISTENERS`] (or of its sidecar proxy's in
    /// [`map_names::SIDECAR_LISTENERS`]).
    pub netns_cookie: u64,
    /// A sidecar pod's cgroup id: the key of its rule set.
    pub cgroup: u64,
    /// [`flags::SIDECAR`]: captured to the pod's own proxy, by its rule set.
    pub flags: u32,
    /// A sidecar pod's rule set number ([`CgroupInfo::rules`]).
    pub rules: u16,
    pub _pad: u16,
}

/// An LPM trie key of [`map_names::EXEMPT`]: `prefix_len` leading bits of
/// `addr` (an [`IpKey`]: an IPv4 /n is stored as /(96+n)).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourcePrefix {
    pub prefix_len: u32,
    pub addr: IpKey,
}

/// The data of an LPM trie key of [`map_names::SIDECAR_RANGES`] (after
/// the key's prefix length): a destination prefix of one pod's rule set.
/// The pod's cgroup id and rule set number always match whole, so the
/// prefix length is [`SIDECAR_RANGE_FIXED_BITS`] plus the address
/// prefix's length (an IPv4 /n counted as /(96+n), as [`SourcePrefix`]
/// does).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SidecarRange {
    /// The pod-level cgroup id.
    pub cgroup: u64,
    /// [`CgroupInfo::rules`].
    pub rules: u16,
    /// A [`sidecar_family`] value: an IPv6 prefix never covers the
    /// IPv4-mapped keys of IPv4 destinations.
    pub family: u16,
    pub addr: IpKey,
}

/// [`SidecarRange::family`] values.
pub mod sidecar_family {
    pub const IPV4: u16 = 4;
    pub const IPV6: u16 = 6;
}

/// A key of [`map_names::SIDECAR_LISTENERS`]: a sidecar proxy's inbound
/// listener of one address family in one pod netns. A dual-stack Envoy
/// listens twice, on `0.0.0.0:15006` and on an IPv6-only `[::]:15006`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// The listening socket's `AF_INET` or `AF_INET6`.
    pub family: u32,
    pub _pad: u32,
}

/// The bits of a [`SidecarRange`] before its address.
pub const SIDECAR_RANGE_FIXED_BITS: u32 = 96;

/// A key of [`map_names::SIDECAR_PORTS`]: one port of one pod's rule set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SidecarPort {
    /// The pod-level cgroup id.
    pub cgroup: u64,
    /// [`CgroupInfo::rules`].
    pub rules: u16,
    /// Host order. Inbound, port 0 holds the verdict for every port the
    /// set does not list (`includeInboundPorts` `*` or a list).
    pub port: u16,
    /// A [`sidecar_direction`] value.
    pub direction: u16,
    pub _pad: u16,
}

/// [`SidecarPort::direction`] values.
pub mod sidecar_direction {
    /// A destination port of the pod's connects.
    pub const OUTBOUND: u16 = 1;
    /// A port of the pod that connections come in to.
    pub const INBOUND: u16 = 2;
}

/// What a sidecar rule says of a destination (the values of
/// [`map_names::SIDECAR_RANGES`] and [`map_names::SIDECAR_PORTS`]).
pub mod sidecar_verdict {
    /// Captured: sent to the pod's proxy.
    pub const CAPTURE: u32 = 1;
    /// Excluded: goes where it was going.
    pub const PASS: u32 = 2;
}

/// Why a source is in [`map_names::EXEMPT`] (the value).
pub mod exempt {
    /// An address of the node's own network namespace (kubelet probes,
    /// host-network pods).
    pub const NODE: u32 = 1;
    /// istio-cni's host-side probe SNAT address (169.254.7.127 and its
    /// IPv6 form), for nodes where istio-cni still rewrites probes.
    pub const PROBE_SNAT: u32 = 2;
    /// A prefix the operator gave (`--probe-source`).
    pub const CONFIGURED: u32 = 3;
}

/// [`ConnRecord::kind`] values.
pub mod conn_kind {
    /// `addr:port` is where a redirected connect was going.
    pub const ORIG_DST: u8 = 1;
    /// `addr` is the client whose address a proxy's original-source bind
    /// asked for, before it was undone.
    pub const ORIG_SRC: u8 = 2;
    /// Between a ztunnel's `bind()` of its inbound plaintext port and its
    /// `listen()`: the socket to register in [`super::map_names::LISTENERS`].
    pub const LISTENER: u8 = 3;
    /// As [`LISTENER`], for a sidecar proxy's inbound port: registered in
    /// [`super::map_names::SIDECAR_LISTENERS`].
    pub const SIDECAR_LISTENER: u8 = 4;
}

/// What the datapath remembers about one connection it changed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnRecord {
    /// IPv6, or IPv4-mapped for IPv4 (network order words).
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    /// A [`conn_kind`] value.
    pub kind: u8,
    /// [`conn_flags`] bits.
    pub flags: u8,
}

/// [`ConnRecord::flags`] bits.
pub mod conn_flags {
    /// Both ends may go into the sockhash.
    pub const ACCEL: u8 = 1 << 0;
    /// Not accelerated because the proxy relays with `splice(2)`.
    pub const ZEROCOPY: u8 = 1 << 1;
    /// The accepting end is followed too: the record goes when both ends
    /// have closed, not with the connecting end.
    pub const ACCEPT_TRACKED: u8 = 1 << 2;
    /// One of two followed ends has closed.
    pub const ONE_END_CLOSED: u8 = 1 << 3;
    /// Sent to a sidecar proxy: its `SO_ORIGINAL_DST` is the proxy's to
    /// read even once its pod has left sidecar mode.
    pub const SIDECAR: u8 = 1 << 4;
}

/// One direction of a TCP connection, as seen by its client: `src` is the
/// client's address, `dst` the (redirected) server's, in the network
/// namespace the connection lives in. A 4-tuple is unique only within one
/// namespace: without the cookie, a process that can hold a pod's address
/// in a namespace of its own could read or take over that pod's records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The netns cookie of the connection: the namespace of both its ends,
    /// or, for a connection to or from the shared ztunnel's addresses
    /// (shared model), the shared ztunnel's namespace
    /// ([`NodeConfig::shared_netns`]), which both ends then name.
    pub netns: u64,
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// Host order.
    pub src_port: u16,
    /// Host order.
    pub dst_port: u16,
    pub _pad: u32,
}

/// Indexes into [`map_names::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IPv4 (or IPv4-mapped) connects rewritten to a redirect target.
    ConnectRedirected4 = 0,
    /// IPv6 connects rewritten to a redirect target.
    ConnectRedirected6 = 1,
    /// Connects (and captured DNS queries) from an enrolled pod refused
    /// (`EPERM`) because the original destination could not be recorded
    /// (map update failed): without it ztunnel could not route the
    /// connection, nor the reply be given its server's source, and neither
    /// may go around ztunnel.
    ConnectRecordFailed = 2,
    /// `SO_ORIGINAL_DST` answered from [`map_names::CONNS`].
    OrigDstAnswered = 3,
    /// Original-source binds of a ztunnel rewritten to a local address.
    BindRewritten = 4,
    /// Original-source binds left alone because the netns they happen in is
    /// not known to the daemon yet.
    BindUnknownNetns = 5,
    /// `getpeername()`/`accept()` answers rewritten to the original peer.
    PeernameRewritten = 6,
    /// Sockets inserted into the sockhash.
    SockhashInserted = 7,
    /// Messages moved straight into the peer socket by `msg_redirect`.
    MsgRedirected = 8,
    /// Messages of an accelerated socket passed to the normal path because
    /// the peer socket was not in the sockhash.
    MsgPassed = 9,
    /// Connections kept out of the sockhash because their proxy relays with
    /// `splice(2)` (the zero-copy fallback).
    ZerocopyFallback = 10,
    /// Connects refused because their pod is [`flags::HELD`].
    ConnectHeld = 11,
    /// Inbound connections to an enrolled pod handed to ztunnel's inbound
    /// plaintext listener in its netns.
    InboundCaptured = 12,
    /// Inbound connections to an enrolled pod refused (reset) because
    /// ztunnel has no inbound listener there, or the address is not the
    /// pod's (replacement mode only).
    InboundRefused = 13,
    /// Inbound connections to an enrolled pod let through to the
    /// application because their source is exempt (the node, probes).
    InboundExempt = 14,
    /// ztunnel inbound listeners registered for capture.
    ListenerRegistered = 15,
    /// DNS queries (UDP sends and connects, TCP connects) sent to
    /// ztunnel's DNS proxy.
    DnsRedirected = 16,
    /// Replies from ztunnel's DNS proxy whose source was given back as the
    /// server the application asked (`recvmsg`, `getpeername`).
    DnsRestored = 17,
    /// Sockets kept out of the sockhash because their key was already
    /// taken: an entry is never replaced.
    SockhashRefused = 18,
    /// `SO_ORIGINAL_DST` not answered from a record because the asking
    /// task is not a ztunnel's.
    OrigDstRefused = 19,
    /// ztunnel binds refused because their record could not be written.
    BindRecordFailed = 20,
    /// Connects from an enrolled pod refused (`EPERM`) because the pod has
    /// no redirect target in the destination's family (no address of that
    /// family known yet, or a shared ztunnel without one).
    ConnectNoTarget = 21,
    /// In-pod redirects sent to the pod's own IP rather than a loopback
    /// address of their own ([`landing4`]), because the socket was bound to
    /// another address or to a port of the wildcard address: these share
    /// one 4-tuple space per pod.
    ConnectUnspread = 22,
    /// `SO_ORIGINAL_DST` asked by a ztunnel for a connection to a redirect
    /// port whose record is gone: evicted from a full map (a connect storm
    /// filling the least-recently-used maps), so ztunnel cannot route it and
    /// refuses it.
    OrigDstMissing = 23,
    /// Connects of a sidecar-captured pod sent to its own proxy.
    SidecarRedirected = 24,
    /// Connects of a sidecar-captured pod left alone by its rule set (an
    /// excluded port or range, or a destination not included).
    SidecarPassed = 25,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 26] = [
        Counter::ConnectRedirected4,
        Counter::ConnectRedirected6,
        Counter::ConnectRecordFailed,
        Counter::OrigDstAnswered,
        Counter::BindRewritten,
        Counter::BindUnknownNetns,
        Counter::PeernameRewritten,
        Counter::SockhashInserted,
        Counter::MsgRedirected,
        Counter::MsgPassed,
        Counter::ZerocopyFallback,
        Counter::ConnectHeld,
        Counter::InboundCaptured,
        Counter::InboundRefused,
        Counter::InboundExempt,
        Counter::ListenerRegistered,
        Counter::DnsRedirected,
        Counter::DnsRestored,
        Counter::SockhashRefused,
        Counter::OrigDstRefused,
        Counter::BindRecordFailed,
        Counter::ConnectNoTarget,
        Counter::ConnectUnspread,
        Counter::OrigDstMissing,
        Counter::SidecarRedirected,
        Counter::SidecarPassed,
    ];

    /// Stable name, as printed by `ambridge stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectRedirected4 => "connect_redirected_ipv4",
            Counter::ConnectRedirected6 => "connect_redirected_ipv6",
            Counter::ConnectRecordFailed => "connect_record_failed",
            Counter::OrigDstAnswered => "orig_dst_answered",
            Counter::BindRewritten => "bind_rewritten",
            Counter::BindUnknownNetns => "bind_unknown_netns",
            Counter::PeernameRewritten => "peername_rewritten",
            Counter::SockhashInserted => "sockhash_inserted",
            Counter::MsgRedirected => "msg_redirected",
            Counter::MsgPassed => "msg_passed",
            Counter::ZerocopyFallback => "zerocopy_fallback",
            Counter::ConnectHeld => "connect_held",
            Counter::InboundCaptured => "inbound_captured",
            Counter::InboundRefused => "inbound_refused",
            Counter::InboundExempt => "inbound_exempt",
            Counter::ListenerRegistered => "listener_registered",
            Counter::DnsRedirected => "dns_redirected",
            Counter::DnsRestored => "dns_restored",
            Counter::SockhashRefused => "sockhash_refused",
            Counter::OrigDstRefused => "orig_dst_refused",
            Counter::BindRecordFailed => "bind_record_failed",
            Counter::ConnectNoTarget => "connect_no_target",
            Counter::ConnectUnspread => "connect_unspread",
            Counter::OrigDstMissing => "orig_dst_missing",
            Counter::SidecarRedirected => "sidecar_redirected",
            Counter::SidecarPassed => "sidecar_passed",
        }
    }
}

/// 127.127.0.0/16 (host order): where the in-pod model lands an IPv4
/// connect, one address per original destination. ztunnel's 15001 listener
/// in the pod's netns is bound to the wildcard address, so it accepts them
/// all, and with the socket bound to the pod's IP ztunnel still sees the
/// pod as the peer. Redirecting every connect to `pod_ip:15001` would put
/// all of a pod's connections, to every destination, in one 4-tuple space
/// (one ephemeral port range, one TIME_WAIT per port); iptables' REDIRECT
/// keeps the real destination in the client's tuple, and so does this.
pub const LANDING4_PREFIX: u32 = 0x7f7f_0000;

/// The address (network order) in [`LANDING4_PREFIX`] that a connect to
/// `orig_ip4` (network order) port `orig_port` (host order) lands on: a
/// multiplicative hash of the destination, so distinct destinations get
/// distinct addresses but for chance collisions (64 destinations: about 3%
/// that two share one).
#[inline(always)]
pub fn landing4(orig_ip4: u32, orig_port: u16) -> u32 {
    let port = u32::from(orig_port);
    let mixed = (u32::from_be(orig_ip4) ^ (port << 16 | port)).wrapping_mul(0x9e37_79b1);
    (LANDING4_PREFIX | mixed >> 16).to_be()
}

/// Number of entries of [`map_names::COUNTERS`].
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`: the same optname at `SOL_IP`
/// and `SOL_IPV6`.
pub const SO_ORIGINAL_DST: i32 = 80;

/// Word 2 of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), network order.
pub const V4_MAPPED_WORD2: u32 = u32::from_be(0x0000_ffff);

/// The IPv4-mapped form of a network-order IPv4 address.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD2, ip4]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address, if it is one.
#[inline(always)]
pub const fn as_v4(ip6: &[u32; 4]) -> Option<u32> {
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD2 {
        Some(ip6[3])
    } else {
        None
    }
}

// Layout is ABI: these fail the build of both sides if it drifts.
const _: () = {
    assert!(size_of::<CgroupInfo>() == 48);
    assert!(offset_of!(CgroupInfo, flags) == 0);
    assert!(offset_of!(CgroupInfo, redirect_port) == 4);
    assert!(offset_of!(CgroupInfo, rules) == 6);
    assert!(offset_of!(CgroupInfo, pod_ip4) == 8);
    assert!(offset_of!(CgroupInfo, redirect_ip4) == 12);
    assert!(offset_of!(CgroupInfo, pod_ip6) == 16);
    assert!(offset_of!(CgroupInfo, redirect_ip6) == 32);

    assert!(size_of::<NetnsInfo>() == 24);
    assert!(offset_of!(NetnsInfo, flags) == 0);
    assert!(offset_of!(NetnsInfo, ip4) == 4);
    assert!(offset_of!(NetnsInfo, ip6) == 8);

    assert!(size_of::<NodeConfig>() == 72);
    assert!(offset_of!(NodeConfig, redirect_ports) == 0);
    assert!(offset_of!(NodeConfig, flags) == 8);
    assert!(offset_of!(NodeConfig, shared_ip4) == 12);
    assert!(offset_of!(NodeConfig, shared_ip6) == 28);
    assert!(offset_of!(NodeConfig, inbound_port) == 44);
    assert!(offset_of!(NodeConfig, hbone_port) == 46);
    assert!(offset_of!(NodeConfig, dns_port) == 48);
    assert!(offset_of!(NodeConfig, shared_netns) == 56);
    assert!(offset_of!(NodeConfig, sidecar_uid) == 64);
    assert!(offset_of!(NodeConfig, sidecar_gid) == 68);

    assert!(size_of::<SidecarRange>() == 28);
    assert!(offset_of!(SidecarRange, rules) == 8);
    assert!(offset_of!(SidecarRange, family) == 10);
    assert!(offset_of!(SidecarRange, addr) == 12);
    assert!(SIDECAR_RANGE_FIXED_BITS as usize == 8 * (size_of::<u64>() + size_of::<u32>()));

    assert!(size_of::<ListenerKey>() == 16);
    assert!(offset_of!(ListenerKey, family) == 8);

    assert!(size_of::<SidecarPort>() == 16);
    assert!(offset_of!(SidecarPort, rules) == 8);
    assert!(offset_of!(SidecarPort, port) == 10);
    assert!(offset_of!(SidecarPort, direction) == 12);

    assert!(size_of::<InboundTarget>() == 24);
    assert!(offset_of!(InboundTarget, cgroup) == 8);
    assert!(offset_of!(InboundTarget, flags) == 16);
    assert!(offset_of!(InboundTarget, rules) == 20);
    assert!(size_of::<SourcePrefix>() == 20);
    assert!(offset_of!(SourcePrefix, addr) == 4);

    assert!(size_of::<ConnRecord>() == 20);
    assert!(offset_of!(ConnRecord, addr) == 0);
    assert!(offset_of!(ConnRecord, port) == 16);
    assert!(offset_of!(ConnRecord, kind) == 18);
    assert!(offset_of!(ConnRecord, flags) == 19);

    assert!(size_of::<ConnKey>() == 48);
    assert!(offset_of!(ConnKey, netns) == 0);
    assert!(offset_of!(ConnKey, src_ip) == 8);
    assert!(offset_of!(ConnKey, dst_ip) == 24);
    assert!(offset_of!(ConnKey, src_port) == 40);
    assert!(offset_of!(ConnKey, dst_port) == 42);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, made only of integers, and has no
    // padding (asserted above), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::CgroupInfo {}
    unsafe impl aya::Pod for super::NetnsInfo {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::InboundTarget {}
    unsafe impl aya::Pod for super::SourcePrefix {}
    unsafe impl aya::Pod for super::SidecarRange {}
    unsafe impl aya::Pod for super::SidecarPort {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_destination_lands_on_its_own_loopback_address_of_127_127_0_0_16() {
        let mut landed = [0u32; 64];
        for n in 0..64u32 {
            // 64 destinations as a client sees them: 8 hosts, 8 ports each.
            let ip = (0xc612_0000 | (n / 8 + 20)).to_be();
            let at = landing4(ip, 8080 + (n % 8) as u16);
            assert_eq!(u32::from_be(at) >> 16, 0x7f7f, "{:x}", u32::from_be(at));
            landed[n as usize] = at;
        }
        landed.sort_unstable();
        let distinct = 1 + landed.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct >= 62, "{distinct} distinct of 64");
        assert_eq!(
            landing4(0x0a00_0001u32.to_be(), 80),
            landing4(0x0a00_0001u32.to_be(), 80)
        );
    }

    #[test]
    fn v4_mapped_round_trips() {
        let ip = u32::from_ne_bytes([198, 18, 0, 2]);
        let mapped = v4_mapped(ip);
        assert_eq!(as_v4(&mapped), Some(ip));
        // The mapped form is ::ffff:198.18.0.2 byte for byte.
        let mut bytes = [0u8; 16];
        for (i, w) in mapped.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            core::net::Ipv6Addr::from(bytes),
            core::net::Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped()
        );
    }

    #[test]
    fn native_ipv6_is_not_v4() {
        let ip6 = [u32::from_be(0xfd00_0018), 0, 0, u32::from_be(2)];
        assert_eq!(as_v4(&ip6), None);
    }

    #[test]
    fn node_config_matches_only_what_it_holds() {
        let mut cfg = NodeConfig {
            redirect_ports: [15001, 0, 0, 0],
            ..NodeConfig::default()
        };
        assert!(cfg.is_redirect_port(15001));
        assert!(!cfg.is_redirect_port(0));
        assert!(!cfg.is_redirect_port(8080));
        let zt = v4_mapped(u32::from_ne_bytes([198, 18, 0, 50]));
        assert!(!cfg.is_shared_ztunnel(&zt));
        cfg.flags = flags::HAS_IP4;
        cfg.shared_ip4 = zt;
        assert!(cfg.is_shared_ztunnel(&zt));
        assert!(!cfg.is_shared_ztunnel(&[0; 4]));
    }

    #[test]
    fn a_connection_to_the_shared_ztunnel_is_keyed_by_its_netns_from_both_ends() {
        let zt = v4_mapped(u32::from_ne_bytes([198, 18, 0, 50]));
        let pod = v4_mapped(u32::from_ne_bytes([198, 18, 0, 11]));
        let mut cfg = NodeConfig::default();
        // In-pod model: every socket names its own namespace.
        assert_eq!(cfg.conn_netns(7, &zt), 7);
        cfg.flags = flags::HAS_IP4;
        cfg.shared_ip4 = zt;
        cfg.shared_netns = 99;
        // The client (peer: ztunnel) and ztunnel itself (peer: the client,
        // own netns 99) agree; ztunnel's address held in another namespace
        // (own netns 5) names that namespace.
        assert_eq!(cfg.conn_netns(7, &zt), 99);
        assert_eq!(cfg.conn_netns(99, &pod), 99);
        assert_eq!(cfg.conn_netns(5, &pod), 5);
    }

    #[test]
    fn each_map_layout_is_the_one_its_versioned_name_stands_for() {
        // (name, key size, value size, capacity). A change here must come
        // with a new `_V<n>` in the name (and in ambridge-ebpf's maps.rs).
        let layouts = [
            (
                map_names::CGROUPS,
                8,
                size_of::<CgroupInfo>(),
                CGROUPS_CAPACITY,
            ),
            (map_names::NETNS, 8, size_of::<NetnsInfo>(), NETNS_CAPACITY),
            (
                map_names::PENDING,
                8,
                size_of::<ConnRecord>(),
                PENDING_CAPACITY,
            ),
            (
                map_names::CONNS,
                size_of::<ConnKey>(),
                size_of::<ConnRecord>(),
                CONNS_CAPACITY,
            ),
            (map_names::SOCKS, size_of::<ConnKey>(), 4, SOCKS_CAPACITY),
            (map_names::COUNTERS, 4, 8, COUNTER_SLOTS),
            (map_names::NODE, 4, size_of::<NodeConfig>(), 1),
            (
                map_names::INBOUND,
                size_of::<IpKey>(),
                size_of::<InboundTarget>(),
                INBOUND_CAPACITY,
            ),
            (map_names::LISTENERS, 8, 4, LISTENERS_CAPACITY),
            (
                map_names::SIDECAR_LISTENERS,
                size_of::<ListenerKey>(),
                4,
                SIDECAR_LISTENERS_CAPACITY,
            ),
            (map_names::DNS, 8, size_of::<ConnRecord>(), DNS_CAPACITY),
            (
                map_names::EXEMPT,
                size_of::<SourcePrefix>(),
                4,
                EXEMPT_CAPACITY,
            ),
            (
                map_names::SIDECAR_RANGES,
                4 + size_of::<SidecarRange>(),
                4,
                SIDECAR_RANGES_CAPACITY,
            ),
            (
                map_names::SIDECAR_PORTS,
                size_of::<SidecarPort>(),
                4,
                SIDECAR_PORTS_CAPACITY,
            ),
        ];
        assert_eq!(
            layouts,
            [
                ("AMB_CGROUPS_V1", 8, 48, 16_384),
                ("AMB_NETNS_V1", 8, 24, 16_384),
                ("AMB_PENDING_V1", 8, 20, 65_536),
                ("AMB_CONNS_V2", 48, 20, 65_536),
                ("AMB_SOCKS_V2", 48, 4, 65_536),
                ("AMB_COUNTERS_V6", 4, 8, 26),
                ("AMB_NODE_V4", 4, 72, 1),
                ("AMB_INBOUND_V2", 16, 24, 32_768),
                ("AMB_LISTENERS_V1", 8, 4, 16_384),
                ("AMB_SIDECAR_LISTENERS_V2", 16, 4, 32_768),
                ("AMB_DNS_V1", 8, 20, 65_536),
                ("AMB_EXEMPT_V1", 20, 4, 1_024),
                ("AMB_SIDECAR_RANGES_V1", 32, 4, 65_536),
                ("AMB_SIDECAR_PORTS_V1", 16, 4, 65_536),
            ]
        );
    }

    #[test]
    fn counter_indexes_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
        }
    }
}
