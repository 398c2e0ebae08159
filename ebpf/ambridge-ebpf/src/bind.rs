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
//! Binds in a netns the daemon does not know are left alone and counted. A
//! bind whose record cannot be written is refused (`EPERM`) and counted:
//! without it the leg's application would see the wrong peer, or the
//! inbound listener would never be registered.
//!
//! A ztunnel's TCP bind of the inbound plaintext port (15006) is recorded
//! as a listener placeholder: `sock_ops` registers the socket for inbound
//! capture when it listens ([`crate::inbound`]). So is a sidecar proxy's
//! bind of its inbound port (15006) in its pod.

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
    pod, sidecar,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// What a bind is to this program.
enum Bind {
    /// Not a ztunnel's TCP bind of an ephemeral port: left alone.
    Other,
    /// A ztunnel's TCP bind of an ephemeral port (a candidate
    /// original-source bind).
    Ephemeral(CgroupInfo),
    /// A ztunnel's (or sidecar proxy's) bind of the inbound port whose
    /// listener placeholder could not be recorded: refused, or its listener
    /// would never be registered.
    Unrecorded,
}

/// Sorts a bind from `ctx`. A ztunnel's bind of the inbound port is
/// recorded as a listener on the way.
#[inline(always)]
fn classify(ctx: &SockAddrContext) -> Bind {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context.
    let (sock_type, port) = unsafe {
        (
            ctx_read!((*sa).type_),
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    let inbound_port = node().inbound_port;
    if sock_type != SOCK_STREAM
        || (port != 0 && port != inbound_port && port != sidecar::INBOUND_PORT)
    {
        return Bind::Other;
    }
    let Some(info) = pod::current() else {
        return Bind::Other;
    };
    if info.flags & flags::ZTUNNEL == 0 {
        return sidecar_listener(ctx, &info, port);
    }
    let ztunnel = info;
    if port != 0 && port != inbound_port {
        return Bind::Other;
    }
    if port == 0 {
        Bind::Ephemeral(ztunnel)
    } else if record(ctx, &ztunnel, conn_kind::LISTENER, [0; 4]) {
        Bind::Other
    } else {
        Bind::Unrecorded
    }
}

/// A sidecar proxy's bind of its inbound port, recorded as a listener
/// placeholder; any other bind of a pod is left alone. The proxy's uid
/// counts even where its container is known: a proxy container just
/// restarted is not known by its new cgroup yet, and nothing else in the
/// pod can hold 15006 beside it.
#[inline(always)]
fn sidecar_listener(ctx: &SockAddrContext, info: &CgroupInfo, port: u16) -> Bind {
    if port != sidecar::INBOUND_PORT
        || !sidecar::is_sidecar(info)
        || !(pod::is_sidecar_proxy(info) || pod::runs_as_sidecar_proxy())
    {
        return Bind::Other;
    }
    if record(ctx, info, conn_kind::SIDECAR_LISTENER, [0; 4]) {
        Bind::Other
    } else {
        Bind::Unrecorded
    }
}

/// The ztunnel entry for an original-source bind candidate, or the verdict
/// for any other bind.
#[inline(always)]
fn ztunnel_ephemeral_bind(ctx: &SockAddrContext) -> Result<CgroupInfo, i32> {
    match classify(ctx) {
        Bind::Other => Err(ALLOW),
        Bind::Ephemeral(ztunnel) => Ok(ztunnel),
        Bind::Unrecorded => Err(REFUSE),
    }
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
/// under the socket cookie; whether it could (counted when not).
#[inline(always)]
fn record(ctx: &SockAddrContext, ztunnel: &CgroupInfo, kind: u8, addr: [u32; 4]) -> bool {
    let record = ConnRecord {
        addr,
        port: 0,
        kind,
        flags: pod::accel_flags(ztunnel),
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let recorded = PENDING.insert(cookie, record, 0).is_ok();
    if !recorded {
        bump(Counter::BindRecordFailed);
    }
    recorded
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    let ztunnel = match ztunnel_ephemeral_bind(&ctx) {
        Ok(ztunnel) => ztunnel,
        Err(verdict) => return verdict,
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
    if !record(&ctx, &ztunnel, conn_kind::ORIG_SRC, v4_mapped(addr)) {
        return REFUSE;
    }
    if ztunnel.flags & flags::UNDO_ORIG_SRC != 0 {
        // SAFETY: user_ip4 is writable for this hook.
        unsafe { ctx_write!((*sa).user_ip4, local) };
        bump(Counter::BindRewritten);
    }
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    let ztunnel = match ztunnel_ephemeral_bind(&ctx) {
        Ok(ztunnel) => ztunnel,
        Err(verdict) => return verdict,
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
    if !record(&ctx, &ztunnel, conn_kind::ORIG_SRC, addr) {
        return REFUSE;
    }
    if ztunnel.flags & flags::UNDO_ORIG_SRC != 0 {
        // SAFETY: user_ip6 is writable for this hook.
        unsafe { ctx_write_ip6!((*sa).user_ip6, local) };
        bump(Counter::BindRewritten);
    }
    ALLOW
}
