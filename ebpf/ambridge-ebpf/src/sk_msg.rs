//! `sk_msg` (Linux 4.17; sockhash 4.18): move each message of an accelerated
//! socket straight into its peer socket's receive queue
//! (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the TCP/IP stack
//! and loopback for same-node pairs.
//!
//! The program only runs for sockets in the sockhash. If the peer is not
//! there (not yet inserted, already closed, or kept out by the zero-copy
//! fallback) the message is passed to the normal path: never dropped.

use ambridge_common::{ConnKey, Counter};
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};

use crate::{
    maps::{SOCKS, bump},
    net::{ctx_addr, ctx_read},
};

#[sk_msg]
pub fn redirect(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    // The peer socket's own view of the connection is this one reversed.
    // SAFETY: `msg` is the live context of this program.
    let peer = unsafe {
        let family = ctx_read!((*msg).family);
        ConnKey {
            src_ip: ctx_addr!(family, (*msg).remote_ip4, (*msg).remote_ip6),
            dst_ip: ctx_addr!(family, (*msg).local_ip4, (*msg).local_ip6),
            // As in sockops: remote_port is network order in the upper half.
            src_port: u32::from_be(ctx_read!((*msg).remote_port)) as u16,
            dst_port: ctx_read!((*msg).local_port) as u16,
        }
    };
    if SOCKS.redirect_msg(&ctx, peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        bump(Counter::MsgRedirected);
    } else {
        bump(Counter::MsgPassed);
    }
    // With a redirect set this delivers to the peer; without one, normally.
    SK_PASS
}
