//! `sk_lookup` (Linux 5.9), attached to each
//! enrolled pod's network namespace: inbound TCP to the pod goes to
//! ztunnel's inbound plaintext listener (15006) in that namespace, with the
//! original `ip:port` as the accepted socket's local address. ztunnel falls
//! back to the local address when `SO_ORIGINAL_DST` has no answer, and
//! nothing answers it for these sockets (no record, no conntrack entry).
//!
//! Left to the regular lookup, as istio-cni's rules leave them: loopback
//! destinations; connections from the netns's own address to itself (a pod
//! calling its own IP, the outbound connect redirected to `pod_ip:15001`,
//! ztunnel's legs to the application once their original-source bind is
//! undone); ztunnel's legs that keep the client's address (preserved
//! original-source binds, recorded by `bind` and `sock_ops` before their
//! SYN); ztunnel's HBONE port (15008); and sources in the exempt map (the
//! node's addresses: kubelet probes; istio-cni's probe SNAT address). A
//! socket another `sk_lookup` program already selected is kept.
//!
//! Local traffic cannot be told by its interface: a packet to the pod's
//! own eth0 address travels through `lo` but reports eth0's index (the
//! kernel keeps the route's device for `SO_BINDTODEVICE` listeners).
//!
//! Fail closed (replacement mode, [`flags::INBOUND_FAIL_CLOSED`]): a
//! connection to an address of the pod that has no capture entry, or while
//! ztunnel has no listener registered there (restarting, not yet given the
//! pod), is refused: the kernel answers the SYN with a reset. It never
//! reaches the application past ztunnel. In companion mode istio-cni's
//! rules have redirected the connection before the lookup, so it is left
//! to the regular lookup instead.
//!
//! The listeners are registered by `sock_ops` ([`crate::sock_ops`]) when a
//! ztunnel socket bound to the inbound port ([`crate::bind`]) listens, by
//! the netns cookie of the pod (`sk_lookup` cannot read its own netns
//! cookie, so the pod's address leads to it through [`INBOUND`]).
//!
//! A sidecar-captured pod's address ([`flags::SIDECAR`] on its target) goes
//! to its own proxy's listener ([`SIDECAR_LISTENERS`]) by its rule set
//! ([`crate::sidecar::captures_inbound`]), as istio-iptables'
//! `PREROUTING` rules send it: no source is exempt there, loopback sources
//! pass (the proxy's inbound passthrough connects from 127.0.0.6), and a
//! connection the proxy cannot take is refused in either mode, as it is
//! when nothing listens on the redirect port.

use ambridge_common::{Counter, InboundTarget, IpKey, ListenerKey, NodeConfig, conn_kind, flags};
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    maps::lpm_trie::Key,
    programs::SkLookupContext,
};

use crate::{
    conn,
    maps::{CONNS, EXEMPT, INBOUND, LISTENERS, SIDECAR_LISTENERS, bump, node},
    net::{AF_INET, AF_INET6, IPPROTO_TCP, ctx_addr, ctx_read, is_loopback},
    sidecar,
};

#[sk_lookup]
pub fn inbound(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `l` is the live context; every field is read at its fixed
    // offset.
    let (protocol, selected, local_port, remote_port) = unsafe {
        (
            ctx_read!((*l).protocol),
            ctx_read!((*l).__bindgen_anon_1.cookie),
            ctx_read!((*l).local_port) as u16,
            u16::from_be(ctx_read!((*l).remote_port)),
        )
    };
    if protocol != IPPROTO_TCP || selected != 0 {
        return SK_PASS;
    }
    let node = node();
    if node.inbound_port == 0 {
        return SK_PASS;
    }
    // SAFETY: as above.
    let (local, remote): (IpKey, IpKey) = unsafe {
        let family = ctx_read!((*l).family);
        (
            ctx_addr!(family, (*l).local_ip4, (*l).local_ip6),
            ctx_addr!(family, (*l).remote_ip4, (*l).remote_ip6),
        )
    };
    if remote == local || is_loopback(&local) {
        return SK_PASS;
    }
    // SAFETY: copied out at once.
    // Not an `Option`: LLVM would spill its uninitialised payload, which
    // the verifier rejects.
    let mut target = InboundTarget::default();
    let mut known = false;
    if let Some(t) = unsafe { INBOUND.get(local) } {
        target = *t;
        known = true;
    }
    if known && target.flags & flags::SIDECAR != 0 {
        return to_sidecar(&ctx, &target, &remote, local_port);
    }
    if local_port == node.hbone_port {
        return SK_PASS;
    }
    if EXEMPT.get(Key::new(128, remote)).is_some() {
        bump(Counter::InboundExempt);
        return SK_PASS;
    }
    if !known {
        return uncaptured(&node);
    }
    // ztunnel's preserved-source leg, recorded in the pod's namespace.
    let leg = conn::key(target.netns_cookie, remote, remote_port, local, local_port);
    // SAFETY: only tested for its kind.
    if unsafe { CONNS.get(leg) }.is_some_and(|r| r.kind == conn_kind::ORIG_SRC) {
        return SK_PASS;
    }
    match LISTENERS.redirect_sk_lookup(&ctx, target.netns_cookie, 0) {
        Ok(()) => {
            bump(Counter::InboundCaptured);
            SK_PASS
        }
        Err(_) => uncaptured(&node),
    }
}

/// A connection to a sidecar pod from `remote` to `port`: to its proxy's
/// listener by the pod's rule set, refused when the proxy has none.
#[inline(always)]
fn to_sidecar(ctx: &SkLookupContext, target: &InboundTarget, remote: &IpKey, port: u16) -> u32 {
    if sidecar::is_passthrough_source(remote) || !sidecar::captures_inbound(target, port) {
        return SK_PASS;
    }
    // SAFETY: the live context, read at its fixed offset.
    let family = unsafe { ctx_read!((*ctx.lookup).family) };
    let mut key = ListenerKey {
        netns_cookie: target.netns_cookie,
        family,
        _pad: 0,
    };
    let mut assigned = SIDECAR_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok();
    // An IPv4 connection may go to a dual-stack IPv6 listener where the
    // proxy has no IPv4 one (the kernel refuses an IPv6-only one).
    if !assigned && family == AF_INET {
        key.family = AF_INET6;
        assigned = SIDECAR_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok();
    }
    if assigned {
        bump(Counter::InboundCaptured);
        SK_PASS
    } else {
        bump(Counter::InboundRefused);
        SK_DROP
    }
}

/// A connection ztunnel cannot take: refused when ambridge is the only
/// capture, left to the regular lookup otherwise.
#[inline(always)]
fn uncaptured(node: &NodeConfig) -> u32 {
    if node.flags & flags::INBOUND_FAIL_CLOSED != 0 {
        bump(Counter::InboundRefused);
        SK_DROP
    } else {
        SK_PASS
    }
}
