//! The rules of a sidecar-captured pod ([`flags::SIDECAR`], `--sidecar=on`).
//!
//! Outbound, in the order `istio-iptables` writes them in the pod's
//! `nat OUTPUT` chain (REDIRECT mode):
//!
//! 1. `excludeOutboundPorts`: left alone;
//! 2. the proxy's own sockets (uid or gid 1337, or its container's cgroup):
//!    left alone, but for the proxy calling its own pod's address (not on
//!    15008), which goes to its inbound port;
//! 3. what leaves through `lo` (loopback, the pod's own addresses): left
//!    alone;
//! 4. `excludeOutboundIPRanges`: left alone;
//! 5. `includeOutboundPorts`: captured, whatever the address;
//! 6. `includeOutboundIPRanges` (`*` by default): captured;
//! 7. anything else: left alone.
//!
//! Rules 1 and 5 are [`SIDECAR_PORTS`] (an excluded port wins over an
//! included one: the daemon writes it so); rules 4 and 6 are one
//! longest-prefix lookup in [`SIDECAR_RANGES`], where the daemon gave every
//! included prefix inside an excluded one the excluded verdict, so the
//! longest match says whether an exclusion matched. A pod with no rule set
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
    flags, sidecar_direction, sidecar_verdict,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    maps::{SIDECAR_PORTS, SIDECAR_RANGES, bump},
    net::is_loopback,
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

/// Where a sidecar pod's connect to `dst:port` (IPv6 or IPv4-mapped) goes.
/// `cgroup` is the id of the pod's entry, the key of its rule set.
#[inline(always)]
pub fn connect(cgroup: u64, pod: &CgroupInfo, dst: &[u32; 4], port: u16) -> Connect {
    let port_rule = port_verdict(cgroup, pod.rules, port, sidecar_direction::OUTBOUND);
    if port_rule == sidecar_verdict::PASS {
        bump(Counter::SidecarPassed);
        return Connect::Leave;
    }
    if pod::is_sidecar_proxy(pod) {
        return if is_own(pod, dst) && port != ISTIO_PORTS[0] {
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
    let key = Key::new(
        SIDECAR_RANGE_FIXED_BITS + 128,
        SidecarRange {
            cgroup,
            rules: u32::from(pod.rules),
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
    if verdict == sidecar_verdict::CAPTURE {
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

/// Whether `dst` is one of the pod's own addresses (what `istio-iptables`
/// matches as leaving through `lo`).
#[inline(always)]
fn is_own(pod: &CgroupInfo, dst: &[u32; 4]) -> bool {
    match as_v4(dst) {
        Some(v4) => pod.flags & flags::HAS_IP4 != 0 && v4 == pod.pod_ip4,
        None => pod.flags & flags::HAS_IP6 != 0 && *dst == pod.pod_ip6,
    }
}
