//! `cgroup/bind4` and `cgroup/bind6` (Linux 4.17; netns cookie 5.7): undo a
//! ztunnel's original-source binds where no TPROXY return routing exists.
//!
//! ztunnel's inbound legs set `IP_TRANSPARENT` and bind the *client's* IP
//! (port 0) before connecting to the application. Without istio-cni's
//! policy routing the application's replies to that foreign address leave
//! the pod and the connection hangs. A bind is an original-source bind when
//! it comes from a ztunnel cgroup, is TCP, has port 0, and its address is
//! neither the wildcard, nor loopback, nor the address the daemon knows as
//! local to the bind's network namespace. Under `--original-src=undo` it is
//! rewritten to that local address; under `preserve` it is left alone.
//! Either way the client address is recorded, so the application's
//! `getpeername()`/`accept()` can still show it (see `peername`) and the
//! leg can be accelerated.
//!
//! Binds in a netns the daemon does not know are left alone and counted.
//!
//! A ztunnel's TCP bind of the inbound plaintext port (15006) is recorded
//! as a listener placeholder: `sock_ops` registers the socket for inbound
//! capture when it listens ([`crate::inbound`]).

use ambridge_common::{
    CgroupInfo, ConnRecord, Counter, NetnsInfo, as_v4, conn_kind, flags, v4_mapped,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    maps::{NETNS, PENDING, bump, node},
    net::{SOCK_STREAM, ctx_read, ctx_write, ctx_write_ip6, is_loopback4, is_loopback6},
    pod,
};

const ALLOW: i32 = 1;

/// The ztunnel entry for a bind from `ctx`, if it comes from a ztunnel, is
/// TCP and asks for an ephemeral port. A ztunnel's bind of the inbound
/// port is recorded as a listener on the way.
#[inline(always)]
fn ztunnel_ephemeral_bind(ctx: &SockAddrContext) -> Option<CgroupInfo> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context.
    let (sock_type, port) = unsafe {
        (
            ctx_read!((*sa).type_),
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    if sock_type != SOCK_STREAM || (port != 0 && port != node().inbound_port) {
        return None;
    }
    let ztunnel = pod::current().filter(|info| info.flags & flags::ZTUNNEL != 0)?;
    if port != 0 {
        record(ctx, &ztunnel, conn_kind::LISTENER, [0; 4]);
        return None;
    }
    Some(ztunnel)
}

/// The local identity of the bind's network namespace.
#[inline(always)]
fn netns(ctx: &SockAddrContext) -> Option<NetnsInfo> {
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { NETNS.get(cookie) }.copied()
}

/// Records `addr` (the client of an original-source bind) and `kind`
/// under the socket cookie.
#[inline(always)]
fn record(ctx: &SockAddrContext, ztunnel: &CgroupInfo, kind: u8, addr: [u32; 4]) {
    let record = ConnRecord {
        addr,
        port: 0,
        kind,
        flags: pod::accel_flags(ztunnel),
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = PENDING.insert(cookie, record, 0);
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    let Some(ztunnel) = ztunnel_ephemeral_bind(&ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context.
    let addr = unsafe { ctx_read!((*sa).user_ip4) };
    if addr == 0 || is_loopback4(addr) {
        return ALLOW;
    }
    let Some(local) = netns(&ctx)
        .filter(|n| n.flags & flags::HAS_IP4 != 0)
        .map(|n| n.ip4)
    else {
        bump(Counter::BindUnknownNetns);
        return ALLOW;
    };
    if addr == local {
        return ALLOW;
    }
    record(&ctx, &ztunnel, conn_kind::ORIG_SRC, v4_mapped(addr));
    if ztunnel.flags & flags::UNDO_ORIG_SRC != 0 {
        // SAFETY: user_ip4 is writable for this hook.
        unsafe { ctx_write!((*sa).user_ip4, local) };
        bump(Counter::BindRewritten);
    }
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    let Some(ztunnel) = ztunnel_ephemeral_bind(&ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context.
    let addr = unsafe {
        [
            ctx_read!((*sa).user_ip6[0]),
            ctx_read!((*sa).user_ip6[1]),
            ctx_read!((*sa).user_ip6[2]),
            ctx_read!((*sa).user_ip6[3]),
        ]
    };
    if addr == [0; 4] || is_loopback6(&addr) {
        return ALLOW;
    }
    // A dual-stack socket binding ::ffff:a.b.c.d is judged, and rewritten,
    // as IPv4.
    let v4 = as_v4(&addr);
    if v4.is_some_and(|a| a == 0 || is_loopback4(a)) {
        return ALLOW;
    }
    let Some(netns) = netns(&ctx) else {
        bump(Counter::BindUnknownNetns);
        return ALLOW;
    };
    let local = if v4.is_some() {
        (netns.flags & flags::HAS_IP4 != 0).then(|| v4_mapped(netns.ip4))
    } else {
        (netns.flags & flags::HAS_IP6 != 0).then_some(netns.ip6)
    };
    let Some(local) = local else {
        bump(Counter::BindUnknownNetns);
        return ALLOW;
    };
    if addr == local {
        return ALLOW;
    }
    record(&ctx, &ztunnel, conn_kind::ORIG_SRC, addr);
    if ztunnel.flags & flags::UNDO_ORIG_SRC != 0 {
        // SAFETY: user_ip6 is writable for this hook.
        unsafe { ctx_write_ip6!((*sa).user_ip6, local) };
        bump(Counter::BindRewritten);
    }
    ALLOW
}
