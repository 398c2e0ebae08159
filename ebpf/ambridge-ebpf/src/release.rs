//! `cgroup/sock_release` (Linux 5.9): the records kept under a socket's
//! cookie go with the socket.
//!
//! - A redirected connect's record ([`crate::connect`]) normally moves to
//!   the 4-tuple map when the connection is established; a connect that
//!   fails before its SYN (no port left, no route) never gets there, and
//!   its record would otherwise stay until LRU eviction, which under a
//!   retry storm would evict the records of live connections.
//! - A DNS record ([`crate::dns`]) of a UDP socket, or of a TCP socket
//!   connected to the proxy.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};

use crate::{
    maps::{DNS, PENDING, node},
    net::{IPPROTO_TCP, IPPROTO_UDP, ctx_read},
};

const ALLOW: i32 = 1;

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: `sk` is the live context.
    let (protocol, dst_port) = unsafe {
        (
            ctx_read!((*sk).protocol),
            u16::from_be(ctx_read!((*sk).dst_port)),
        )
    };
    if protocol != IPPROTO_UDP && protocol != IPPROTO_TCP {
        return ALLOW;
    }
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let node = node();
    // A connect that failed before its SYN has its destination port reset
    // to 0; a redirected one that got further has a redirect port. Every
    // other TCP socket (most, on a busy node) has no cookie record, and the
    // delete is skipped.
    if protocol == IPPROTO_TCP && (dst_port == 0 || node.is_redirect_port(dst_port)) {
        let _ = PENDING.remove(cookie);
    }
    if protocol == IPPROTO_UDP || dst_port == node.dns_port {
        let _ = DNS.remove(cookie);
    }
    ALLOW
}
