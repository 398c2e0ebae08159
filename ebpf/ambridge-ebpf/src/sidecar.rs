//! The rules of a sidecar-captured pod ([`flags::SIDECAR`], `--sidecar=on`).
//!
//! Outbound, in the order `istio-iptables` writes them in the pod's
//! `nat OUTPUT` chain (REDIRECT mode):
//!
//! 1. `excludeOutboundPorts`: left alone;
//! 2. sockets bound to the proxy's passthrough source (127.0.0.6, `::6`):
//!    left alone;
//! 3. the proxy's own sockets (uid or gid 1337, or its container's cgroup):
//!    left alone, but for the proxy calling its own pod's address or a
//!    loopback address other than 127.0.0.1 and `::1` (not on 15008, nor
//!    on 53 when the pod's DNS is captured), which goes to its inbound
//!    port;
//! 4. what leaves through `lo` (loopback, the pod's own addresses): left
//!    alone;
//! 5. `excludeOutboundIPRanges`: left alone;
//! 6. `includeOutboundPorts`: captured, whatever the address;
//! 7. `includeOutboundIPRanges` (`*` by default): captured;
//! 8. anything else: left alone.
//!
//! Rules 1 and 6 are [`SIDECAR_PORTS`] (an excluded port wins over an
//! included one: the daemon writes it so); rules 5 and 7 are one
//! longest-prefix lookup in [`SIDECAR_RANGES`], per family (as
//! istio-iptables and ip6tables each have their own), where the daemon gave
//! every included prefix inside an excluded one the excluded verdict, so
//! the longest match says whether an exclusion matched. A pod with no rule set
//! ([`CgroupInfo::rules`] 0) has Istio's defaults: every destination is
//! captured. `bpf_get_current_uid_gid` in `cgroup/connect4/6`: Linux 4.17.
//!
//! Inbound (its `nat PREROUTING` chain), for [`crate::inbound`]: Istio's
//! own ports ([`ISTIO_PORTS`]) and the proxy's inbound port itself (where
//! istio-init's rules, when present, have sent the connection already)
//! pass; then `excludeInboundPorts` pass; then `includeInboundPorts` (`*`
//! by default) are captured; the rest pass.

use ambridge_common::{
    CgroupInfo, Counter, InboundTarget, SIDECAR_RANGE_FIXED_BITS, SidecarPort, SidecarRange, as_v4,
    flags, sidecar_direction, sidecar_family, sidecar_verdict, v4_mapped,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    maps::{SIDECAR_PORTS, SIDECAR_RANGES, bump},
    net::{DNS_PORT, LOCALHOST4, LOCALHOST6, is_loopback},
    pod,
};

/// Where a sidecar pod's connect goes.
pub enum Connect {
    /// Where it was going.
    Leave,
    /// To the proxy's outbound port.
    Outbound,
    /// To the proxy's inbound port: the proxy calling its own pod's
    /// address (a service of the pod itself) goes through its inbound
    /// side, as istio-iptables sends it.
    InboundSelf,
}

/// 127.0.0.6, IPv4-mapped: where the proxy's inbound passthrough connects
/// to the application from.
const PASSTHROUGH4: [u32; 4] = [0, 0, u32::from_be(0x0000_ffff), u32::from_be(0x7f00_0006)];
/// `::6`, the IPv6 passthrough source.
const PASSTHROUGH6: [u32; 4] = [0, 0, 0, u32::from_be(6)];

/// Whether `source` (IPv6 or IPv4-mapped) is a passthrough source of the
/// proxy, or loopback: inbound connections from it reach the application.
#[inline(always)]
pub fn is_passthrough_source(source: &[u32; 4]) -> bool {
    *source == PASSTHROUGH6 || is_loopback(source)
}

/// Where a sidecar pod's connect to `dst:port` (IPv6 or IPv4-mapped) from
/// a socket bound to `source` (all zero when unbound) goes. `cgroup` is the
/// id of the pod's entry, the key of its rule set.
#[inline(always)]
pub fn connect(
    cgroup: u64,
    pod: &CgroupInfo,
    source: &[u32; 4],
    dst: &[u32; 4],
    port: u16,
) -> Connect {
    let port_rule = port_verdict(cgroup, pod.rules, port, sidecar_direction::OUTBOUND);
    if port_rule == sidecar_verdict::PASS {
        bump(Counter::SidecarPassed);
        return Connect::Leave;
    }
    if *source == PASSTHROUGH4 || *source == PASSTHROUGH6 {
        return Connect::Leave;
    }
    if pod::is_sidecar_proxy(pod) {
        let local = is_own(pod, dst) || (is_loopback(dst) && !is_localhost(dst));
        let dns = pod.flags & flags::DNS_CAPTURE != 0 && port == DNS_PORT;
        return if local && port != ISTIO_PORTS[0] && !dns {
            Connect::InboundSelf
        } else {
            Connect::Leave
        };
    }
    if is_loopback(dst) || is_own(pod, dst) {
        return Connect::Leave;
    }
    if pod.rules == 0 {
        return Connect::Outbound;
    }
    let range_rule = range_verdict(cgroup, pod, dst);
    if range_rule != sidecar_verdict::PASS
        && (port_rule == sidecar_verdict::CAPTURE || range_rule == sidecar_verdict::CAPTURE)
    {
        return Connect::Outbound;
    }
    bump(Counter::SidecarPassed);
    Connect::Leave
}

/// What the pod's rule set says of `dst` by its ranges (0: nothing).
#[inline(always)]
fn range_verdict(cgroup: u64, pod: &CgroupInfo, dst: &[u32; 4]) -> u32 {
    let family = if as_v4(dst).is_some() {
        sidecar_family::IPV4
    } else {
        sidecar_family::IPV6
    };
    let key = Key::new(
        SIDECAR_RANGE_FIXED_BITS + 128,
        SidecarRange {
            cgroup,
            rules: pod.rules,
            family,
            addr: *dst,
        },
    );
    SIDECAR_RANGES.get(key).copied().unwrap_or(0)
}

/// Whether the pod is captured to its sidecar proxy rather than to
/// ztunnel.
#[inline(always)]
pub fn is_sidecar(pod: &CgroupInfo) -> bool {
    pod.flags & flags::SIDECAR != 0 && pod.flags & flags::ZTUNNEL == 0
}

/// The sidecar proxy's inbound port (`istio-iptables -b`).
pub const INBOUND_PORT: u16 = 15006;

/// Istio's own ports in a sidecar pod, never captured inbound: HBONE
/// (15008), the agent's status and merged metrics (15020), readiness
/// (15021) and Envoy's metrics (15090).
pub const ISTIO_PORTS: [u16; 4] = [15008, 15020, 15021, 15090];

/// Whether a connection to `port` of a sidecar pod goes to its proxy.
#[inline(always)]
pub fn captures_inbound(target: &InboundTarget, port: u16) -> bool {
    if port == INBOUND_PORT || ISTIO_PORTS.contains(&port) {
        return false;
    }
    if target.rules == 0 {
        return true;
    }
    let inbound = sidecar_direction::INBOUND;
    let verdict = match port_verdict(target.cgroup, target.rules, port, inbound) {
        0 => port_verdict(target.cgroup, target.rules, 0, inbound),
        listed => listed,
    };
    // Port 0 is always written with a set: a set found without it is
    // going or coming, and the connection goes to the proxy.
    if verdict != sidecar_verdict::PASS {
        return true;
    }
    bump(Counter::SidecarPassed);
    false
}

/// What the pod's rule set says of a port (0: nothing).
#[inline(always)]
fn port_verdict(cgroup: u64, rules: u16, port: u16, direction: u16) -> u32 {
    if rules == 0 {
        return 0;
    }
    let key = SidecarPort {
        cgroup,
        rules,
        port,
        direction,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    unsafe { SIDECAR_PORTS.get(key) }.copied().unwrap_or(0)
}

/// Whether `dst` is 127.0.0.1 or `::1`, which even the proxy reaches
/// directly.
#[inline(always)]
fn is_localhost(dst: &[u32; 4]) -> bool {
    *dst == v4_mapped(LOCALHOST4) || *dst == LOCALHOST6
}

/// Whether the pod's DNS queries are captured and this is one, so the
/// pod's rule set decides first whether port 53 is excluded (as
/// istio-iptables' `excludeOutboundPorts` rules come before its DNS ones,
/// for UDP too).
#[inline(always)]
pub fn excludes_dns(cgroup: u64, pod: &CgroupInfo) -> bool {
    port_verdict(cgroup, pod.rules, DNS_PORT, sidecar_direction::OUTBOUND) == sidecar_verdict::PASS
}

/// Whether `dst` is one of the pod's own addresses (what `istio-iptables`
/// matches as leaving through `lo`).
#[inline(always)]
fn is_own(pod: &CgroupInfo, dst: &[u32; 4]) -> bool {
    match as_v4(dst) {
        Some(v4) => pod.flags & flags::HAS_IP4 != 0 && v4 == pod.pod_ip4,
        None => pod.flags & flags::HAS_IP6 != 0 && *dst == pod.pod_ip6,
    }
}
