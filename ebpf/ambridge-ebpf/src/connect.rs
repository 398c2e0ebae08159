//! `cgroup/connect4` and `cgroup/connect6` (Linux 4.17): send an enrolled
//! pod's outbound TCP to its redirect target and remember where it was going.
//!
//! The programs allow the connect (return 1) and only ever rewrite the
//! destination, except for a pod ztunnel is not ready for yet
//! ([`flags::HELD`]), a pod with no redirect target in the destination's
//! family (its address not known yet), and a connect whose original
//! destination cannot be recorded: those are refused (return 0, `EPERM`),
//! never let past ztunnel. What is left alone: UDP and other non-stream sockets,
//! loopback destinations, the pod's own IPs (istio-cni lets a pod call itself
//! directly), the kubelet probe addresses, the redirect target itself, and
//! every socket of a ztunnel or of a cgroup that is not enrolled.
//!
//! A pod's DNS queries over connected UDP or TCP are captured here too,
//! before the outbound rules: see [`crate::dns`]. A sidecar-captured pod's
//! connects go to its own proxy by its rule set instead: see
//! [`crate::sidecar`].

use ambridge_common::{
    CgroupInfo, ConnRecord, Counter, as_v4, conn_flags, conn_kind, flags, landing4, v4_mapped,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{bpf_bind, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    dns,
    maps::{PENDING, bump, node},
    net::{
        AF_INET, AF_INET6, KUBELET_PROBE_IP4, KUBELET_PROBE_IP6, LOCALHOST4, SOCK_STREAM, ctx_read,
        ctx_write, ctx_write_ip6, is_loopback4, is_loopback6,
    },
    pod, sidecar,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sa` is the live context of this program.
    let (sock_type, port) = unsafe {
        (
            ctx_read!(sa.type_),
            u16::from_be(ctx_read!(sa.user_port) as u16),
        )
    };
    let query = dns::candidate(sock_type, port);
    if sock_type != SOCK_STREAM && !query {
        return ALLOW;
    }
    let Some((cgroup, pod)) = pod::current_entry() else {
        return ALLOW;
    };
    if query {
        let verdict = dns::capture(&ctx, (cgroup, &pod), sock_type, v4_mapped(sa.user_ip4));
        match verdict {
            dns::Verdict::Leave => {}
            dns::Verdict::Redirect => {
                // SAFETY: writable fields of the live context.
                unsafe {
                    ctx_write!(sa.user_ip4, LOCALHOST4);
                    ctx_write!(sa.user_port, u32::from(node().dns_port.to_be()));
                }
                return ALLOW;
            }
            dns::Verdict::Refuse => return verdict.ret(),
        }
    }
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    let (target, to_port) = match target4(&ctx, false, cgroup, &pod, sa.user_ip4, port) {
        Outbound::Leave => return ALLOW,
        Outbound::Refuse => return REFUSE,
        Outbound::Redirect(target, to_port) => (target, to_port),
    };
    if !record(&ctx, &pod, sa.user_ip4, sa, v4_mapped) {
        return REFUSE;
    }
    let target = if target == pod.pod_ip4 {
        land4(&ctx, &pod, sa.user_ip4, sa.user_port)
    } else {
        target
    };
    // SAFETY: writable fields of the live context.
    unsafe {
        ctx_write!(sa.user_ip4, target);
        ctx_write!(sa.user_port, u32::from(to_port.to_be()));
    }
    bump(Counter::ConnectRedirected4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sa` is the live context of this program.
    let (sock_type, port) = unsafe {
        (
            ctx_read!(sa.type_),
            u16::from_be(ctx_read!(sa.user_port) as u16),
        )
    };
    let query = dns::candidate(sock_type, port);
    if sock_type != SOCK_STREAM && !query {
        return ALLOW;
    }
    let Some((cgroup, pod)) = pod::current_entry() else {
        return ALLOW;
    };
    // SAFETY: `sa` is the live context of this program.
    let dst = unsafe {
        [
            ctx_read!(sa.user_ip6[0]),
            ctx_read!(sa.user_ip6[1]),
            ctx_read!(sa.user_ip6[2]),
            ctx_read!(sa.user_ip6[3]),
        ]
    };
    if query {
        let verdict = dns::capture(&ctx, (cgroup, &pod), sock_type, dst);
        match verdict {
            dns::Verdict::Leave => {}
            dns::Verdict::Redirect => {
                // SAFETY: writable fields of the live context.
                unsafe {
                    ctx_write_ip6!(sa.user_ip6, dns::proxy6(&dst));
                    ctx_write!(sa.user_port, u32::from(node().dns_port.to_be()));
                }
                return ALLOW;
            }
            dns::Verdict::Refuse => return verdict.ret(),
        }
    }
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    // A dual-stack socket connecting to ::ffff:a.b.c.d speaks IPv4 on the
    // wire (only this hook runs, not connect4): apply the IPv4 rules and
    // keep the mapped form so the socket stays IPv4 on the wire.
    if let Some(dst4) = as_v4(&dst) {
        let (target, to_port) = match target4(&ctx, true, cgroup, &pod, dst4, port) {
            Outbound::Leave => return ALLOW,
            Outbound::Refuse => return REFUSE,
            Outbound::Redirect(target, to_port) => (target, to_port),
        };
        if !record(&ctx, &pod, dst4, sa, v4_mapped) {
            return REFUSE;
        }
        let target = if target == pod.pod_ip4 {
            land4_mapped(&ctx, &pod, dst4, sa.user_port)
        } else {
            v4_mapped(target)
        };
        // SAFETY: writable fields of the live context.
        unsafe {
            ctx_write_ip6!(sa.user_ip6, target);
            ctx_write!(sa.user_port, u32::from(to_port.to_be()));
        }
        bump(Counter::ConnectRedirected4);
        return ALLOW;
    }
    let (target, to_port) = match target6(&ctx, cgroup, &pod, &dst, port) {
        Outbound::Leave => return ALLOW,
        Outbound::Refuse => return REFUSE,
        Outbound::Redirect(target, to_port) => (target, to_port),
    };
    if !record(&ctx, &pod, dst, sa, |ip6| ip6) {
        return REFUSE;
    }
    // SAFETY: writable fields of the live context.
    unsafe {
        ctx_write_ip6!(sa.user_ip6, target);
        ctx_write!(sa.user_port, u32::from(to_port.to_be()));
    }
    bump(Counter::ConnectRedirected6);
    ALLOW
}

/// What becomes of an enrolled pod's TCP connect.
enum Outbound<A> {
    /// Not captured: loopback, the pod itself, the probe address, the
    /// redirect target, or a pod that is not redirected at all.
    Leave,
    /// To the redirect target, on this port.
    Redirect(A, u16),
    /// Refused (`EPERM`): the pod is enrolled but has no redirect target in
    /// this family, or ztunnel is not ready for it; counted.
    Refuse,
}

/// The held check for a connect about to be redirected.
#[inline(always)]
fn unless_held<A>(pod: &CgroupInfo, target: A) -> Outbound<A> {
    if pod.flags & flags::HELD != 0 {
        bump(Counter::ConnectHeld);
        Outbound::Refuse
    } else {
        Outbound::Redirect(target, pod.redirect_port)
    }
}

/// The verdict for a sidecar-captured pod's connect to `dst:port` from a
/// socket (IPv6 or not, `ip6`) of `ctx`: its own address in the family
/// (`target`, with `has_ip` set) when its rule set captures it.
#[inline(always)]
fn sidecar_target<A>(
    ctx: &SockAddrContext,
    ip6: bool,
    (cgroup, pod): (u64, &CgroupInfo),
    dst: &[u32; 4],
    port: u16,
    (has_ip, target): (u32, A),
) -> Outbound<A> {
    let (source, _) = bound_source(ctx, ip6);
    let to_port = match sidecar::connect(cgroup, pod, &source, dst, port) {
        sidecar::Connect::Leave => return Outbound::Leave,
        sidecar::Connect::Outbound => pod.redirect_port,
        sidecar::Connect::InboundSelf => sidecar::INBOUND_PORT,
    };
    if pod.flags & has_ip == 0 {
        bump(Counter::ConnectNoTarget);
        return Outbound::Refuse;
    }
    bump(Counter::SidecarRedirected);
    Outbound::Redirect(target, to_port)
}

/// The IPv4 verdict for a connect from `pod` (its entry `cgroup`) to
/// `dst:port`, on an IPv6 socket (`ip6`) or not.
#[inline(always)]
fn target4(
    ctx: &SockAddrContext,
    ip6: bool,
    cgroup: u64,
    pod: &CgroupInfo,
    dst: u32,
    port: u16,
) -> Outbound<u32> {
    if sidecar::is_sidecar(pod) {
        let dst = v4_mapped(dst);
        let target = (flags::HAS_IP4, pod.redirect_ip4);
        return sidecar_target(ctx, ip6, (cgroup, pod), &dst, port, target);
    }
    if !pod::redirects(pod) || is_loopback4(dst) || dst == KUBELET_PROBE_IP4 {
        return Outbound::Leave;
    }
    if pod.flags & flags::HAS_IP4 == 0 {
        bump(Counter::ConnectNoTarget);
        return Outbound::Refuse;
    }
    if dst == pod.pod_ip4 || dst == pod.redirect_ip4 {
        return Outbound::Leave;
    }
    unless_held(pod, pod.redirect_ip4)
}

/// The IPv6 verdict for a connect from `pod` (its entry `cgroup`) to
/// `dst:port`.
#[inline(always)]
fn target6(
    ctx: &SockAddrContext,
    cgroup: u64,
    pod: &CgroupInfo,
    dst: &[u32; 4],
    port: u16,
) -> Outbound<[u32; 4]> {
    if sidecar::is_sidecar(pod) {
        let target = (flags::HAS_IP6, pod.redirect_ip6);
        return sidecar_target(ctx, true, (cgroup, pod), dst, port, target);
    }
    if !pod::redirects(pod) || is_loopback6(dst) || *dst == KUBELET_PROBE_IP6 {
        return Outbound::Leave;
    }
    if pod.flags & flags::HAS_IP6 == 0 {
        bump(Counter::ConnectNoTarget);
        return Outbound::Refuse;
    }
    if *dst == pod.pod_ip6 || *dst == pod.redirect_ip6 {
        return Outbound::Leave;
    }
    unless_held(pod, pod.redirect_ip6)
}

/// Records the original destination under the socket's cookie. A connect
/// whose destination cannot be recorded is refused: ztunnel could not route
/// it, and it must not go around ztunnel either.
#[inline(always)]
fn record<A>(
    ctx: &SockAddrContext,
    pod: &CgroupInfo,
    dst: A,
    sa: &bpf_sock_addr,
    to_ip6: impl FnOnce(A) -> [u32; 4],
) -> bool {
    let sidecar = if sidecar::is_sidecar(pod) {
        conn_flags::SIDECAR
    } else {
        0
    };
    let orig = ConnRecord {
        addr: to_ip6(dst),
        port: u16::from_be(sa.user_port as u16),
        kind: conn_kind::ORIG_DST,
        flags: pod::accel_flags(pod) | sidecar,
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(cookie, orig, 0).is_err() {
        bump(Counter::ConnectRecordFailed);
        return false;
    }
    true
}

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

/// The socket's source address as bound so far (all zero when unbound)
/// and its port (0 while none is chosen).
#[inline(always)]
fn bound_source(ctx: &SockAddrContext, ip6: bool) -> ([u32; 4], u32) {
    // SAFETY: `sk` of a sock_addr context is its socket, never null; the
    // fields read are readable for this hook.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let port = ctx_read!((*sk).src_port);
        if ip6 {
            (
                [
                    ctx_read!((*sk).src_ip6[0]),
                    ctx_read!((*sk).src_ip6[1]),
                    ctx_read!((*sk).src_ip6[2]),
                    ctx_read!((*sk).src_ip6[3]),
                ],
                port,
            )
        } else {
            (v4_mapped(ctx_read!((*sk).src_ip4)), port)
        }
    }
}

/// Binds the socket's source address to `pod_ip` (port chosen at connect,
/// as `IP_BIND_ADDRESS_NO_PORT` does) unless it is bound already: whether
/// the socket's source is now `pod_ip`. `bpf_bind` in connect hooks: Linux
/// 4.17.
#[inline(always)]
fn source_is_pod(ctx: &SockAddrContext, pod_ip: [u32; 4], ip6_socket: bool) -> bool {
    let (source, port) = bound_source(ctx, ip6_socket);
    if source == pod_ip {
        return true;
    }
    let unspecified = source == [0; 4] || source == v4_mapped(0);
    if !unspecified || port != 0 {
        return false;
    }
    let ret = if ip6_socket {
        let mut addr = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: 0,
            flowinfo: 0,
            addr: pod_ip,
            scope_id: 0,
        };
        // SAFETY: a live context and a sockaddr_in6 of the size given.
        unsafe {
            bpf_bind(
                ctx.sock_addr,
                (&mut addr as *mut SockaddrIn6).cast::<sockaddr>(),
                size_of::<SockaddrIn6>() as i32,
            )
        }
    } else {
        let mut addr = SockaddrIn {
            family: AF_INET as u16,
            port: 0,
            addr: pod_ip[3],
            zero: [0; 8],
        };
        // SAFETY: a live context and a sockaddr_in of the size given.
        unsafe {
            bpf_bind(
                ctx.sock_addr,
                (&mut addr as *mut SockaddrIn).cast::<sockaddr>(),
                size_of::<SockaddrIn>() as i32,
            )
        }
    };
    ret == 0
}

/// Where an in-pod redirect of an IPv4 socket's connect to `orig_ip4`
/// (port `orig_port`, as the context holds it) lands: its own loopback
/// address ([`landing4`]) with the socket's source the pod's IP, or the
/// pod's IP itself (one 4-tuple space for the pod, counted) where the
/// source cannot be the pod's IP (bound to another address, or to a port
/// of the wildcard address).
#[inline(always)]
fn land4(ctx: &SockAddrContext, pod: &CgroupInfo, orig_ip4: u32, orig_port: u32) -> u32 {
    if source_is_pod(ctx, v4_mapped(pod.pod_ip4), false) {
        return landing4(orig_ip4, u16::from_be(orig_port as u16));
    }
    bump(Counter::ConnectUnspread);
    pod.pod_ip4
}

/// As [`land4`], for a dual-stack IPv6 socket speaking IPv4 (addresses
/// IPv4-mapped).
#[inline(always)]
fn land4_mapped(
    ctx: &SockAddrContext,
    pod: &CgroupInfo,
    orig_ip4: u32,
    orig_port: u32,
) -> [u32; 4] {
    if source_is_pod(ctx, v4_mapped(pod.pod_ip4), true) {
        return v4_mapped(landing4(orig_ip4, u16::from_be(orig_port as u16)));
    }
    bump(Counter::ConnectUnspread);
    v4_mapped(pod.pod_ip4)
}
