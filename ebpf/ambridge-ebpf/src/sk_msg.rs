//! `sk_msg` (Linux 4.17; sockhash 4.18; netns cookie 5.15): move each message of an accelerated
//! socket straight into its peer socket's receive queue
//! (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the TCP/IP stack
//! and loopback for same-node pairs.
//!
//! The program only runs for sockets in the sockhash. If the peer is not
//! there (not yet inserted, already closed, or kept out by the zero-copy
//! fallback) the message is passed to the normal path: never dropped.

use ambridge_common::Counter;
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};

use crate::{
    conn,
    maps::{SOCKS, bump, node},
    net::{ctx_addr, ctx_read},
};

#[sk_msg]
pub fn redirect(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    // SAFETY: `msg` is the live context of this program.
    let (remote, remote_port, local, local_port) = unsafe {
        let family = ctx_read!((*msg).family);
        (
            ctx_addr!(family, (*msg).remote_ip4, (*msg).remote_ip6),
            // As in sockops: remote_port is network order in the upper half.
            u32::from_be(ctx_read!((*msg).remote_port)) as u16,
            ctx_addr!(family, (*msg).local_ip4, (*msg).local_ip6),
            ctx_read!((*msg).local_port) as u16,
        )
    };
    // SAFETY: plain helper call on the program's own context.
    let own = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The peer socket's own view of the connection is this one reversed,
    // in the same namespace.
    let netns = conn::netns(&node(), own, &local, &remote);
    let peer = conn::key(netns, remote, remote_port, local, local_port);
    if SOCKS.redirect_msg(&ctx, peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        bump(Counter::MsgRedirected);
    } else {
        bump(Counter::MsgPassed);
    }
    // With a redirect set this delivers to the peer; without one, normally.
    SK_PASS
}
