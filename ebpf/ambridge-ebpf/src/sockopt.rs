//! `cgroup/getsockopt` (Linux 5.3; netns cookie 5.15): answer
//! `SO_ORIGINAL_DST` for connections that were redirected at connect time,
//! where no conntrack entry exists, to ztunnel (or a sidecar-captured pod's
//! proxy) only, in the connection's own network namespace.
//!
//! The program runs after the kernel's own getsockopt and sees its result.
//! Anything but `SO_ORIGINAL_DST` at `SOL_IP`/`SOL_IPV6` on a TCP socket
//! with a recorded tuple returns at once without touching `optlen`, `optval`
//! or `retval`, so every other option reads exactly as without the program.
//! As the kernel does, `SOL_IP` answers IPv4 connections with a
//! `sockaddr_in` and `SOL_IPV6` answers IPv6 ones with a `sockaddr_in6`.

use ambridge_common::{ConnRecord, Counter, SO_ORIGINAL_DST, as_v4, conn_flags, conn_kind, flags};
use aya_ebpf::{
    EbpfContext, bindings::bpf_sockopt, helpers::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};

use crate::{
    conn,
    maps::{CONNS, bump, node},
    net::{AF_INET, AF_INET6, IPPROTO_TCP, SOL_IP, SOL_IPV6, ctx_addr, ctx_read},
    pod,
};

const PROCEED: i32 = 1;

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[cgroup_sockopt(getsockopt)]
pub fn getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.optname != SO_ORIGINAL_DST || (opt.level != SOL_IP && opt.level != SOL_IPV6) {
        return PROCEED;
    }
    if let Some(orig) = lookup(&ctx, opt) {
        answer(opt, &orig);
    }
    PROCEED
}

/// The original destination of the accepted socket's connection: its peer is
/// the client's source, its local address the redirect target, and the
/// connection lives in the socket's namespace (or the shared ztunnel's).
/// Only a ztunnel's task, or a sidecar proxy's (whose pod's connections
/// are the only ones in its namespace), is answered: nobody else may read
/// where another pod's connection was going.
#[inline(always)]
fn lookup(ctx: &SockoptContext, opt: &bpf_sockopt) -> Option<ConnRecord> {
    // SAFETY: `sk` is the union's only pointer member for this hook.
    let sk = unsafe { opt.__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null `sk` is live for the program's lifetime.
    let (peer, peer_port, local, local_port) = unsafe {
        let family = ctx_read!((*sk).family);
        if ctx_read!((*sk).protocol) != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
            return None;
        }
        (
            ctx_addr!(family, (*sk).dst_ip4, (*sk).dst_ip6),
            u16::from_be(ctx_read!((*sk).dst_port)),
            ctx_addr!(family, (*sk).src_ip4, (*sk).src_ip6),
            ctx_read!((*sk).src_port) as u16,
        )
    };
    // SAFETY: plain helper call on the program's own context.
    let own = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let node = node();
    let key = conn::key(
        conn::netns(&node, own, &local, &peer),
        peer,
        peer_port,
        local,
        local_port,
    );
    let is_ztunnel = || pod::current().is_some_and(|p| p.flags & flags::ZTUNNEL != 0);
    // A connection sent to a sidecar proxy stays the proxy's to ask about
    // when its pod has just left sidecar mode (the proxy is still there).
    let is_its_proxy = |record: &ConnRecord| {
        record.flags & conn_flags::SIDECAR != 0
            && pod::current()
                .is_some_and(|p| pod::is_sidecar_proxy(&p) || pod::runs_as_sidecar_proxy())
    };
    // SAFETY: copied out at once.
    match unsafe { CONNS.get(key) }
        .copied()
        .filter(|r| r.kind == conn_kind::ORIG_DST)
    {
        Some(record) if is_its_proxy(&record) || is_ztunnel() => Some(record),
        Some(_) => {
            bump(Counter::OrigDstRefused);
            None
        }
        // Once per connection: ztunnel asks at SOL_IP first, then SOL_IPV6.
        // The cheap checks first: most asks without a record are for
        // inbound-captured sockets, whose local port is the application's.
        None => {
            if opt.level == SOL_IP && node.is_redirect_port(local_port) && is_ztunnel() {
                bump(Counter::OrigDstMissing);
            }
            None
        }
    }
}

#[inline(always)]
fn answer(opt: &mut bpf_sockopt, orig: &ConnRecord) {
    // SAFETY: reading the union members the kernel filled in.
    let (start, end) = unsafe {
        (
            opt.__bindgen_anon_2.optval as *mut u8,
            opt.__bindgen_anon_3.optval_end as *mut u8,
        )
    };
    let len = match (opt.level, as_v4(&orig.addr)) {
        (SOL_IP, Some(addr)) => {
            let value = SockaddrIn {
                family: AF_INET as u16,
                port_be: orig.port.to_be(),
                addr,
                zero: [0; 8],
            };
            // A caller's buffer shorter than a sockaddr_in gets the kernel's
            // answer untouched.
            if !write(start, end, value) {
                return;
            }
            size_of::<SockaddrIn>()
        }
        (SOL_IPV6, None) => {
            let value = SockaddrIn6 {
                family: AF_INET6 as u16,
                port_be: orig.port.to_be(),
                flowinfo: 0,
                addr: orig.addr,
                scope_id: 0,
            };
            if !write(start, end, value) {
                return;
            }
            size_of::<SockaddrIn6>()
        }
        _ => return,
    };
    opt.optlen = len as i32;
    opt.retval = 0;
    bump(Counter::OrigDstAnswered);
}

/// Writes `value` at `start` if it fits before `end` (the verifier needs the
/// bound checked against `optval_end`).
#[inline(always)]
fn write<T>(start: *mut u8, end: *mut u8, value: T) -> bool {
    // SAFETY: only dereferenced after the bound check below.
    let past = unsafe { start.add(size_of::<T>()) };
    if past > end {
        return false;
    }
    // SAFETY: [start, start + size_of::<T>()) lies within the kernel's
    // optval buffer, checked above; the buffer may be unaligned for T.
    unsafe { core::ptr::write_unaligned(start as *mut T, value) };
    true
}
