//! `sockops` (Linux 4.13; state callbacks 4.16, sockhash 4.18): follow the
//! connections the datapath changed from `connect()` to close, and put both
//! ends of accelerated ones into the sockhash.
//!
//! - `TCP_CONNECT_CB`: a recorded socket (redirected connect, or proxy leg
//!   with an original-source bind) asks for state callbacks, so it is
//!   cleaned up even if the connect fails. A proxy leg's record is also
//!   keyed by its 4-tuple at once: the SYN's lookup in the pod
//!   ([`crate::inbound`]) must see it is ztunnel's own.
//! - `ACTIVE_ESTABLISHED_CB`: the 4-tuple is now known; the record moves from
//!   the cookie map to the tuple map, where the proxy's `SO_ORIGINAL_DST`
//!   and the server's `getpeername()` find it. On one host this runs before
//!   the final ACK is sent, so before the other end can accept.
//! - `PASSIVE_ESTABLISHED_CB`: the accepting end of a recorded connection
//!   asks for state callbacks, and joins the sockhash if the connection is
//!   accelerated.
//!
//! Every record and sockhash key names the connection's network namespace
//! (netns cookie in `sock_ops`: 5.15), so a socket in another namespace
//! with the same 4-tuple finds none of them; a sockhash entry is never
//! replaced.
//! - `TCP_LISTEN_CB` (listening sockets in a sockhash: 5.10; netns cookie
//!   in sock_ops: 5.15): a ztunnel socket bound to the inbound port
//!   ([`crate::bind`]) starts listening; it is registered under its netns
//!   cookie for [`crate::inbound`] to select (a sidecar proxy's, in the
//!   sidecar proxies' own sockhash).
//! - `STATE_CB` to `TCP_CLOSE`: the connecting end's cookie record goes;
//!   the 4-tuple record goes once both ends have closed, so a client that
//!   writes and closes before ztunnel accepts loses nothing. The kernel
//!   drops closed sockets from the sockhash by itself.

use ambridge_common::{
    ConnKey, ConnRecord, Counter, ListenerKey, NodeConfig, conn_flags, conn_kind,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::{
    conn,
    maps::{CONNS, LISTENERS, PENDING, SIDECAR_LISTENERS, SOCKS, bump, node},
    net::{ctx_addr, ctx_read},
};

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// This socket's own view of its connection: `src` is the local end; the
/// namespace is the connection's ([`conn::netns`]).
#[inline(always)]
fn own_key(ctx: &SockOpsContext, node: &NodeConfig) -> ConnKey {
    let ops = ctx.ops;
    // SAFETY: `ops` is the live context of this program.
    let (src_ip, dst_ip, src_port, dst_port) = unsafe {
        let family = ctx_read!((*ops).family);
        (
            ctx_addr!(family, (*ops).local_ip4, (*ops).local_ip6),
            ctx_addr!(family, (*ops).remote_ip4, (*ops).remote_ip6),
            // local_port is host order; remote_port is the network-order
            // port in the upper half of the word.
            ctx_read!((*ops).local_port) as u16,
            u32::from_be(ctx_read!((*ops).remote_port)) as u16,
        )
    };
    // SAFETY: plain helper call on the program's own context.
    let own = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let netns = conn::netns(node, own, &src_ip, &dst_ip);
    conn::key(netns, src_ip, src_port, dst_ip, dst_port)
}

#[inline(always)]
fn reversed(key: &ConnKey) -> ConnKey {
    conn::key(
        key.netns,
        key.dst_ip,
        key.dst_port,
        key.src_ip,
        key.src_port,
    )
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: copied out at once.
    let Some(record) = (unsafe { PENDING.get(cookie(ctx)) }).copied() else {
        return;
    };
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if record.kind == conn_kind::ORIG_SRC {
        let _ = CONNS.insert(own_key(ctx, &node()), record, 0);
    }
}

#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    // SAFETY: copied out at once.
    let Some(record) = (unsafe { PENDING.get(cookie) }).copied() else {
        return;
    };
    let key = own_key(ctx, &node());
    let _ = CONNS.insert(key, record, 0);
    let _ = PENDING.remove(cookie);
    accelerate(ctx, key, &record);
}

/// The accepting end of a recorded connection is a proxy's socket on a
/// redirect port, or an application's socket whose peer is an undone
/// source (the netns's own address, or the shared ztunnel's). Everything
/// else is ruled out without a hash lookup.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let node = node();
    let key = own_key(ctx, &node);
    if !node.is_redirect_port(key.src_port)
        && key.dst_ip != key.src_ip
        && !node.is_shared_ztunnel(&key.dst_ip)
    {
        return;
    }
    let Some(record) = CONNS.get_ptr_mut(reversed(&key)) else {
        return;
    };
    // The record now lives until this end has closed too (`on_close`).
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    // SAFETY: a live entry of this map; only this connection's two ends
    // touch it.
    let record = unsafe {
        (*record).flags |= conn_flags::ACCEPT_TRACKED;
        *record
    };
    accelerate(ctx, key, &record);
}

/// Puts this end of a recorded connection into the sockhash if the
/// connection may be accelerated. An entry is never replaced: a key that
/// is taken keeps its socket, and this one stays on the normal path.
#[inline(always)]
fn accelerate(ctx: &SockOpsContext, key: ConnKey, record: &ConnRecord) {
    if record.flags & conn_flags::ACCEL != 0 {
        // SAFETY: `ops` is the live context; the helper takes a full
        // socket, which the established callbacks always have.
        if SOCKS
            .update(key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
            .is_ok()
        {
            bump(Counter::SockhashInserted);
        } else {
            bump(Counter::SockhashRefused);
        }
    } else if record.flags & conn_flags::ZEROCOPY != 0 {
        bump(Counter::ZerocopyFallback);
    }
}

/// An inbound listener (placeholder recorded at its bind) joins its
/// sockhash under its netns cookie, replacing an earlier one there (a
/// restarted or upgraded proxy): ztunnel's under the cookie alone (its one
/// listener is dual-stack), a sidecar proxy's under the cookie and its
/// address family.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    // SAFETY: copied out at once.
    let Some(record) = (unsafe { PENDING.get(cookie) }).copied() else {
        return;
    };
    if record.kind != conn_kind::LISTENER && record.kind != conn_kind::SIDECAR_LISTENER {
        return;
    }
    let _ = PENDING.remove(cookie);
    // SAFETY: plain helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: `ops` is the live context; a listening socket is a full
    // socket.
    let listener = unsafe { &mut *ctx.ops };
    let registered = if record.kind == conn_kind::LISTENER {
        LISTENERS.update(netns, listener, BPF_ANY as u64)
    } else {
        let key = ListenerKey {
            netns_cookie: netns,
            family: ctx.family(),
            _pad: 0,
        };
        SIDECAR_LISTENERS.update(key, listener, BPF_ANY as u64)
    };
    if registered.is_ok() {
        bump(Counter::ListenerRegistered);
    }
}

/// A record keyed by its 4-tuple goes when both followed ends have closed:
/// ztunnel (or the application behind an undone source) may accept long
/// after the connecting end wrote, closed and reached `TCP_CLOSE`, and must
/// still find the original destination (or source) then. A record whose
/// accepting end is not followed (it is outside the attach cgroup, or not
/// a capture leg) goes with the connecting end.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let _ = PENDING.remove(cookie(ctx));
    let key = own_key(ctx, &node());
    // The connecting end's record is under its own view, the accepting
    // end's under the reverse.
    // SAFETY: only tested for presence.
    let key = if unsafe { CONNS.get(key) }.is_some() {
        key
    } else {
        reversed(&key)
    };
    let Some(record) = CONNS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live entry of this map; only this connection's two ends
    // touch it (two closes racing at worst leave it to LRU eviction).
    let flags = unsafe { (*record).flags };
    let tracked = conn_flags::ACCEPT_TRACKED | conn_flags::ONE_END_CLOSED;
    if flags & tracked == conn_flags::ACCEPT_TRACKED {
        // SAFETY: as above.
        unsafe { (*record).flags |= conn_flags::ONE_END_CLOSED };
    } else {
        let _ = CONNS.remove(key);
    }
}
