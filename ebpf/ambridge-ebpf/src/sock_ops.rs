//! `sockops` (Linux 4.13; state callbacks 4.16): follow redirected
//! connections from `connect()` to close.
//!
//! - `TCP_CONNECT_CB`: a redirected socket asks for state callbacks, so it is
//!   cleaned up even if the connect fails.
//! - `ACTIVE_ESTABLISHED_CB`: the 4-tuple is now known; the original
//!   destination moves from the cookie map to the tuple map, where the
//!   proxy's `getsockopt(SO_ORIGINAL_DST)` finds it. On one host this runs
//!   before the final ACK is sent, so before the proxy can accept.
//! - `STATE_CB` to `TCP_CLOSE`: both entries go.

use ambridge_common::ConnKey;
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::{
    maps::{ORIG_DST, PENDING},
    net::{ctx_addr, ctx_read},
};

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
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

/// The connection as its client sees it (this socket is the client).
#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> ConnKey {
    let ops = ctx.ops;
    // SAFETY: `ops` is the live context of this program.
    unsafe {
        let family = ctx_read!((*ops).family);
        ConnKey {
            src_ip: ctx_addr!(family, (*ops).local_ip4, (*ops).local_ip6),
            dst_ip: ctx_addr!(family, (*ops).remote_ip4, (*ops).remote_ip6),
            // local_port is host order; remote_port is the network-order
            // port in the upper half of the word.
            src_port: ctx_read!((*ops).local_port) as u16,
            dst_port: u32::from_be(ctx_read!((*ops).remote_port)) as u16,
        }
    }
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: the value is only tested for presence.
    if unsafe { PENDING.get(cookie(ctx)) }.is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { PENDING.get(cookie) }).copied() else {
        return;
    };
    let _ = ORIG_DST.insert(client_key(ctx), orig, 0);
    let _ = PENDING.remove(cookie);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let _ = PENDING.remove(cookie(ctx));
    let _ = ORIG_DST.remove(client_key(ctx));
}
