//! Connection keys: the network namespace a connection's records live in
//! (netns cookie: sock_addr 5.7; sock_ops, sk_msg, sockopt 5.15).

use ambridge_common::{ConnKey, NodeConfig, flags};

use crate::maps::NETNS;

/// The [`ConnKey::netns`] for a socket in netns `own` with addresses
/// `local` and `peer`. Connections to or from the shared ztunnel are keyed
/// by its namespace ([`NodeConfig::conn_netns`]), but only from a pod
/// namespace the daemon knows holding `local`: elsewhere, a socket whose
/// peer merely claims ztunnel's address keeps its own namespace and finds
/// no record.
#[inline(always)]
pub fn netns(node: &NodeConfig, own: u64, local: &[u32; 4], peer: &[u32; 4]) -> u64 {
    let netns = node.conn_netns(own, peer);
    if netns == own {
        return own;
    }
    // SAFETY: copied out at once.
    match unsafe { NETNS.get(own) }.copied() {
        Some(n) if holds(&n, local) => netns,
        _ => own,
    }
}

/// Whether a known namespace's own address is `ip` (IPv6 or IPv4-mapped).
#[inline(always)]
fn holds(n: &ambridge_common::NetnsInfo, ip: &[u32; 4]) -> bool {
    match ambridge_common::as_v4(ip) {
        Some(v4) => n.flags & flags::HAS_IP4 != 0 && n.ip4 == v4,
        None => n.flags & flags::HAS_IP6 != 0 && n.ip6 == *ip,
    }
}

/// The key of the connection from `src` to `dst` in `netns`.
#[inline(always)]
pub fn key(netns: u64, src: [u32; 4], src_port: u16, dst: [u32; 4], dst_port: u16) -> ConnKey {
    ConnKey {
        netns,
        src_ip: src,
        dst_ip: dst,
        src_port,
        dst_port,
        _pad: 0,
    }
}
