//! `cgroup/getpeername4` and `cgroup/getpeername6` (Linux 5.8): give a
//! redirected client socket back the peer address it asked for.
//!
//! With iptables REDIRECT the application's `getpeername()` shows the
//! original destination (NAT is invisible to it). A connect-time rewrite
//! really connects to the redirect target, so without this hook the
//! application would see `pod_ip:15001`. The connection's entry in
//! [`crate::maps::ORIG_DST`] is keyed by the client's own view of the
//! 4-tuple, so only the redirected client socket matches: the proxy's
//! accepted end (reversed tuple) and every other socket keep their answer.

use ambridge_common::{ConnKey, as_v4, v4_mapped};
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    maps::ORIG_DST,
    net::{ctx_addr, ctx_read, ctx_write, ctx_write_ip6},
};

const PROCEED: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context; `sk` is its socket, never null for
    // this hook.
    let key = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        ConnKey {
            src_ip: v4_mapped(ctx_read!((*sk).src_ip4)),
            dst_ip: v4_mapped(ctx_read!((*sa).user_ip4)),
            src_port: ctx_read!((*sk).src_port) as u16,
            dst_port: u16::from_be(ctx_read!((*sa).user_port) as u16),
        }
    };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { ORIG_DST.get(key) }.copied()
        && let Some(ip4) = as_v4(&orig.ip)
    {
        // SAFETY: as above; user_ip4 and user_port are writable here.
        unsafe {
            ctx_write!((*sa).user_ip4, ip4);
            ctx_write!((*sa).user_port, u32::from(orig.port.to_be()));
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in getpeername4. An AF_INET6 socket's addresses are
    // IPv4-mapped on an IPv4 connection, matching how the keys are stored.
    let key = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        let family = ctx_read!((*sk).family);
        ConnKey {
            src_ip: ctx_addr!(family, (*sk).src_ip4, (*sk).src_ip6),
            dst_ip: [
                ctx_read!((*sa).user_ip6[0]),
                ctx_read!((*sa).user_ip6[1]),
                ctx_read!((*sa).user_ip6[2]),
                ctx_read!((*sa).user_ip6[3]),
            ],
            src_port: ctx_read!((*sk).src_port) as u16,
            dst_port: u16::from_be(ctx_read!((*sa).user_port) as u16),
        }
    };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { ORIG_DST.get(key) }.copied() {
        // SAFETY: user_ip6 and user_port are writable for this hook.
        unsafe {
            ctx_write_ip6!((*sa).user_ip6, orig.ip);
            ctx_write!((*sa).user_port, u32::from(orig.port.to_be()));
        }
    }
    PROCEED
}
