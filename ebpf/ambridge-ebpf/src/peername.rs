//! `cgroup/getpeername4` and `cgroup/getpeername6` (Linux 5.8): answer
//! `getpeername()` (and `accept()`, which asks the same hook) with the peer
//! the application would have seen without the datapath's rewrites.
//!
//! - A redirected client socket asked for the original destination: with
//!   iptables REDIRECT (NAT) its `getpeername()` shows it, so it does here
//!   too, not `pod_ip:15001`. Found by the socket's own 4-tuple, recorded
//!   with kind `ORIG_DST`.
//! - An application accepting a proxy's inbound leg whose original-source
//!   bind was undone sees the real client IP (port as chosen by the kernel,
//!   as with a transparent bind). Found by the reversed 4-tuple, recorded
//!   with kind `ORIG_SRC`.
//!
//! - A socket whose DNS queries were captured ([`crate::dns`]) and whose peer
//!   is ztunnel's DNS proxy sees the server it asked.
//!
//! Every other socket gets the kernel's answer untouched.

use ambridge_common::{Counter, as_v4, conn_kind, v4_mapped};
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};

use crate::{
    conn, dns,
    maps::{CONNS, bump, node},
    net::{ctx_addr, ctx_read, ctx_write, ctx_write_ip6},
};

const PROCEED: i32 = 1;

/// The address to answer instead, if any: `(addr, Some(port))` for a
/// redirected client or a captured DNS query, `(addr, None)` (keep the
/// port) for an undone source; with the counter it counts as.
///
/// Every `accept()` and `getpeername()` under the cgroup runs this, so the
/// node settings rule sockets out before any hash lookup: a redirected
/// client's peer port is a redirect port, and an undone inbound leg's peer
/// is the netns's own address (in-pod) or the shared ztunnel's.
#[inline(always)]
fn replacement(
    ctx: &SockAddrContext,
    local: [u32; 4],
    local_port: u16,
    peer: [u32; 4],
    peer_port: u16,
) -> Option<([u32; 4], Option<u16>, Counter)> {
    if let Some(server) = dns::asked(ctx.as_ptr(), &peer, peer_port) {
        return Some((server.addr, Some(server.port), Counter::DnsRestored));
    }
    let node = node();
    let redirected_client = node.is_redirect_port(peer_port);
    if !redirected_client && peer != local && !node.is_shared_ztunnel(&peer) {
        return None;
    }
    // SAFETY: plain helper call on the program's own context.
    let own = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let netns = conn::netns(&node, own, &local, &peer);
    if redirected_client {
        let as_client = conn::key(netns, local, local_port, peer, peer_port);
        // SAFETY: copied out at once.
        if let Some(r) = unsafe { CONNS.get(as_client) }.copied()
            && r.kind == conn_kind::ORIG_DST
        {
            return Some((r.addr, Some(r.port), Counter::PeernameRewritten));
        }
    }
    if peer != local && !node.is_shared_ztunnel(&peer) {
        return None;
    }
    let as_server = conn::key(netns, peer, peer_port, local, local_port);
    // SAFETY: copied out at once.
    match unsafe { CONNS.get(as_server) }.copied() {
        Some(r) if r.kind == conn_kind::ORIG_SRC && r.addr != peer => {
            Some((r.addr, None, Counter::PeernameRewritten))
        }
        _ => None,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context; `sk` is its socket, never null for
    // this hook.
    let (local, local_port, peer, peer_port) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        (
            v4_mapped(ctx_read!((*sk).src_ip4)),
            ctx_read!((*sk).src_port) as u16,
            v4_mapped(ctx_read!((*sa).user_ip4)),
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    if let Some((addr, port, counter)) = replacement(&ctx, local, local_port, peer, peer_port)
        && let Some(ip4) = as_v4(&addr)
    {
        // SAFETY: user_ip4 and user_port are writable for this hook.
        unsafe {
            ctx_write!((*sa).user_ip4, ip4);
            if let Some(port) = port {
                ctx_write!((*sa).user_port, u32::from(port.to_be()));
            }
        }
        bump(counter);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in getpeername4. An AF_INET6 socket's addresses are
    // IPv4-mapped on an IPv4 connection, matching how records are keyed.
    let (local, local_port, peer, peer_port) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        let family = ctx_read!((*sk).family);
        (
            ctx_addr!(family, (*sk).src_ip4, (*sk).src_ip6),
            ctx_read!((*sk).src_port) as u16,
            [
                ctx_read!((*sa).user_ip6[0]),
                ctx_read!((*sa).user_ip6[1]),
                ctx_read!((*sa).user_ip6[2]),
                ctx_read!((*sa).user_ip6[3]),
            ],
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    if let Some((addr, port, counter)) = replacement(&ctx, local, local_port, peer, peer_port) {
        // SAFETY: user_ip6 and user_port are writable for this hook.
        unsafe {
            ctx_write_ip6!((*sa).user_ip6, addr);
            if let Some(port) = port {
                ctx_write!((*sa).user_port, u32::from(port.to_be()));
            }
        }
        bump(counter);
    }
    PROCEED
}
