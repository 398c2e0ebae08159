//! DNS capture: an enrolled pod's queries (UDP and TCP to port 53 of any
//! non-local address) go to ztunnel's DNS proxy in the pod's own netns
//! (`127.0.0.1`, or `::1`, port 15053), and the application sees every
//! reply come from the server it asked.
//!
//! | hook | what | minimum kernel |
//! |---|---|---|
//! | `cgroup/connect4/6` ([`crate::connect`]) | connected UDP and TCP queries | 4.17 |
//! | `cgroup/sendmsg4/6` | unconnected UDP queries | 4.18 |
//! | `cgroup/recvmsg4/6` | a reply's source given back | 5.2 |
//! | `cgroup/getpeername4/6` ([`crate::peername`]) | a connected socket's peer | 5.8 |
//! | `cgroup/sock_release` ([`crate::release`]) | the record goes with its socket | 5.9 |
//!
//! The server asked is recorded under the socket cookie ([`DNS`]); one
//! socket asking several servers is given back the last one it asked. As
//! istio-cni does, UDP to a local address (loopback, the pod's own IP:
//! what leaves through `lo`) and TCP to loopback are left alone, and so is
//! every socket of ztunnel (its own upstream queries).
//!
//! A sidecar-captured pod's queries ([`flags::SIDECAR`] with
//! [`flags::DNS_CAPTURE`]) go to its istio-agent's DNS proxy at the same
//! address and port, and its proxy's own sockets (uid or gid 1337) are
//! left alone, as istio-iptables leaves them.

use ambridge_common::{CgroupInfo, ConnRecord, Counter, as_v4, conn_kind, flags, v4_mapped};
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    maps::{DNS, bump, node},
    net::{
        DNS_PORT, LOCALHOST4, LOCALHOST6, SOCK_DGRAM, SOCK_STREAM, ctx_read, ctx_write,
        ctx_write_ip6, is_loopback,
    },
    pod, sidecar,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// What happens to a query.
pub enum Verdict {
    /// Not a captured query: the call goes on untouched.
    Leave,
    /// The pod is held (ztunnel has not acknowledged it), or the query
    /// could not be recorded: refused.
    Refuse,
    /// Recorded; the caller rewrites the destination to ztunnel's proxy.
    Redirect,
}

impl Verdict {
    /// The hook's return value, once the caller rewrote the destination
    /// for [`Verdict::Redirect`].
    #[inline(always)]
    pub fn ret(&self) -> i32 {
        match self {
            Verdict::Refuse => REFUSE,
            _ => ALLOW,
        }
    }
}

/// Whether a socket of type `sock_type` sending to `dst:port` (IPv6 or
/// IPv4-mapped) may be a query to capture, before finding its pod: the
/// cheap test every UDP send and connect takes.
#[inline(always)]
pub fn candidate(sock_type: u32, port: u16) -> bool {
    port == DNS_PORT && (sock_type == SOCK_DGRAM || sock_type == SOCK_STREAM)
}

/// Decides on a query from `pod` to `dst` over `sock_type` and, if it is
/// captured, records `dst` under the socket's cookie.
#[inline(always)]
pub fn capture(
    ctx: &SockAddrContext,
    (cgroup, pod): (u64, &CgroupInfo),
    sock_type: u32,
    dst: [u32; 4],
) -> Verdict {
    let captured = pod.flags & (flags::ENROLLED | flags::SIDECAR) != 0;
    if !captured
        || pod.flags & flags::DNS_CAPTURE == 0
        || pod.flags & flags::ZTUNNEL != 0
        || is_loopback(&dst)
    {
        return Verdict::Leave;
    }
    // The sidecar proxy's own queries (the agent's upstream ones) go out,
    // and so do a sidecar pod's when its rules exclude port 53.
    if pod.flags & flags::SIDECAR != 0
        && (pod::is_sidecar_proxy(pod) || sidecar::excludes_dns(cgroup, pod))
    {
        return Verdict::Leave;
    }
    // UDP to the pod's own address leaves through `lo`: istio-cni does not
    // capture it.
    if sock_type == SOCK_DGRAM && is_own(pod, &dst) {
        return Verdict::Leave;
    }
    if node().dns_port == 0 {
        return Verdict::Leave;
    }
    if pod.flags & flags::HELD != 0 {
        bump(Counter::ConnectHeld);
        return Verdict::Refuse;
    }
    let record = ConnRecord {
        addr: dst,
        port: DNS_PORT,
        kind: conn_kind::ORIG_DST,
        flags: 0,
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Without its record the reply could not be given the asked server's
    // source; and the query must not go around ztunnel's proxy either.
    if DNS.insert(cookie, record, 0).is_err() {
        bump(Counter::ConnectRecordFailed);
        return Verdict::Refuse;
    }
    bump(Counter::DnsRedirected);
    Verdict::Redirect
}

#[inline(always)]
fn is_own(pod: &CgroupInfo, dst: &[u32; 4]) -> bool {
    match as_v4(dst) {
        Some(v4) => pod.flags & flags::HAS_IP4 != 0 && v4 == pod.pod_ip4,
        None => pod.flags & flags::HAS_IP6 != 0 && *dst == pod.pod_ip6,
    }
}

/// ztunnel's DNS proxy for a query to `dst`: `::1` for IPv6, the
/// IPv4-mapped `127.0.0.1` for IPv4 on a dual-stack socket.
#[inline(always)]
pub fn proxy6(dst: &[u32; 4]) -> [u32; 4] {
    if as_v4(dst).is_some() {
        v4_mapped(LOCALHOST4)
    } else {
        LOCALHOST6
    }
}

/// The server a socket's captured queries went to, if `peer:port` (IPv6
/// or IPv4-mapped) is ztunnel's DNS proxy.
#[inline(always)]
pub fn asked(ctx_ptr: *mut core::ffi::c_void, peer: &[u32; 4], port: u16) -> Option<ConnRecord> {
    let dns_port = node().dns_port;
    if dns_port == 0 || port != dns_port || !is_loopback(peer) {
        return None;
    }
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx_ptr) };
    // SAFETY: copied out at once.
    unsafe { DNS.get(cookie) }.copied()
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context.
    let (sock_type, dst, port) = unsafe {
        (
            ctx_read!((*sa).type_),
            ctx_read!((*sa).user_ip4),
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    if !candidate(sock_type, port) {
        return ALLOW;
    }
    let Some((cgroup, pod)) = pod::current_entry() else {
        return ALLOW;
    };
    let verdict = capture(&ctx, (cgroup, &pod), sock_type, v4_mapped(dst));
    if let Verdict::Redirect = verdict {
        // SAFETY: writable fields of the live context.
        unsafe {
            ctx_write!((*sa).user_ip4, LOCALHOST4);
            ctx_write!((*sa).user_port, u32::from(node().dns_port.to_be()));
        }
    }
    verdict.ret()
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context.
    let (sock_type, dst, port) = unsafe {
        (
            ctx_read!((*sa).type_),
            [
                ctx_read!((*sa).user_ip6[0]),
                ctx_read!((*sa).user_ip6[1]),
                ctx_read!((*sa).user_ip6[2]),
                ctx_read!((*sa).user_ip6[3]),
            ],
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    if !candidate(sock_type, port) {
        return ALLOW;
    }
    let Some((cgroup, pod)) = pod::current_entry() else {
        return ALLOW;
    };
    let verdict = capture(&ctx, (cgroup, &pod), sock_type, dst);
    if let Verdict::Redirect = verdict {
        // SAFETY: writable fields of the live context.
        unsafe {
            ctx_write_ip6!((*sa).user_ip6, proxy6(&dst));
            ctx_write!((*sa).user_port, u32::from(node().dns_port.to_be()));
        }
    }
    verdict.ret()
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the live context; on recvmsg its user fields hold the
    // datagram's source.
    let (src, port) = unsafe {
        (
            ctx_read!((*sa).user_ip4),
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    if let Some(server) = asked(ctx.as_ptr(), &v4_mapped(src), port)
        && let Some(ip4) = as_v4(&server.addr)
    {
        // SAFETY: writable fields of the live context.
        unsafe {
            ctx_write!((*sa).user_ip4, ip4);
            ctx_write!((*sa).user_port, u32::from(server.port.to_be()));
        }
        bump(Counter::DnsRestored);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in recvmsg4.
    let (src, port) = unsafe {
        (
            [
                ctx_read!((*sa).user_ip6[0]),
                ctx_read!((*sa).user_ip6[1]),
                ctx_read!((*sa).user_ip6[2]),
                ctx_read!((*sa).user_ip6[3]),
            ],
            u16::from_be(ctx_read!((*sa).user_port) as u16),
        )
    };
    if let Some(server) = asked(ctx.as_ptr(), &src, port) {
        // SAFETY: writable fields of the live context.
        unsafe {
            ctx_write_ip6!((*sa).user_ip6, server.addr);
            ctx_write!((*sa).user_port, u32::from(server.port.to_be()));
        }
        bump(Counter::DnsRestored);
    }
    ALLOW
}
