//! The outbound rules of a sidecar-captured pod ([`flags::SIDECAR`],
//! `--sidecar=on`), in the order `istio-iptables` writes them in the pod's
//! `nat OUTPUT` chain (REDIRECT mode):
//!
//! 1. `excludeOutboundPorts`: left alone;
//! 2. the proxy's own sockets (uid or gid 1337, or its container's cgroup):
//!    left alone;
//! 3. what leaves through `lo` (loopback, the pod's own addresses): left
//!    alone;
//! 4. `includeOutboundPorts`: captured, whatever the address;
//! 5. `excludeOutboundIPRanges`: left alone;
//! 6. `includeOutboundIPRanges` (`*` by default): captured;
//! 7. anything else: left alone.
//!
//! Rules 1 and 4 are [`SIDECAR_PORTS`] (an excluded port wins over an
//! included one: the daemon writes it so); rules 5 to 7 are one longest-prefix
//! lookup in [`SIDECAR_RANGES`], where the daemon gave every included prefix
//! inside an excluded one the excluded verdict, so the longest match is the
//! first rule that would have matched. A pod with no rule set
//! ([`CgroupInfo::rules`] 0) has Istio's defaults: every destination is
//! captured. `bpf_get_current_uid_gid` in `cgroup/connect4/6`: Linux 4.17.

use ambridge_common::{
    CgroupInfo, Counter, SIDECAR_RANGE_FIXED_BITS, SidecarPort, SidecarRange, as_v4, flags,
    sidecar_verdict,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    maps::{SIDECAR_PORTS, SIDECAR_RANGES, bump},
    net::is_loopback,
    pod,
};

/// Whether a sidecar pod's connect to `dst:port` (IPv6 or IPv4-mapped) goes
/// to its proxy. `cgroup` is the id of the pod's entry, the key of its rule
/// set.
#[inline(always)]
pub fn captures(cgroup: u64, pod: &CgroupInfo, dst: &[u32; 4], port: u16) -> bool {
    if pod::is_sidecar_proxy(pod) {
        return false;
    }
    let port_rule = port_verdict(cgroup, pod.rules, port);
    if port_rule == sidecar_verdict::PASS {
        bump(Counter::SidecarPassed);
        return false;
    }
    if is_loopback(dst) || is_own(pod, dst) {
        return false;
    }
    if pod.rules == 0 || port_rule == sidecar_verdict::CAPTURE {
        return true;
    }
    let key = Key::new(
        SIDECAR_RANGE_FIXED_BITS + 128,
        SidecarRange {
            cgroup,
            rules: u32::from(pod.rules),
            addr: *dst,
        },
    );
    if SIDECAR_RANGES
        .get(key)
        .is_some_and(|v| *v == sidecar_verdict::CAPTURE)
    {
        return true;
    }
    bump(Counter::SidecarPassed);
    false
}

/// Whether the pod is captured to its sidecar proxy rather than to
/// ztunnel.
#[inline(always)]
pub fn is_sidecar(pod: &CgroupInfo) -> bool {
    pod.flags & flags::SIDECAR != 0 && pod.flags & flags::ZTUNNEL == 0
}

/// What the pod's rule set says of a destination port (0: nothing).
#[inline(always)]
fn port_verdict(cgroup: u64, rules: u16, port: u16) -> u32 {
    if rules == 0 {
        return 0;
    }
    let key = SidecarPort {
        cgroup,
        rules,
        port,
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
