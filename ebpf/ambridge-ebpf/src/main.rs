//! ambridge's kernel programs: one object, one module per program type.
//!
//! | hook | module | minimum kernel |
//! |---|---|---|
//! | `cgroup/connect4`, `cgroup/connect6` | [`connect`] | 4.17 |
//! | `cgroup/bind4`, `cgroup/bind6` | [`bind`] | 4.17 (netns cookie 5.7) |
//! | `sockops` | [`sock_ops`] | 4.13 (state callbacks 4.16) |
//! | `cgroup/getsockopt` | [`sockopt`] | 5.3 |
//! | `cgroup/getpeername4`, `cgroup/getpeername6` | [`peername`] | 5.8 |
//! | `sk_msg` on the sockhash | [`sk_msg`] | 4.18 |
//! | `sk_lookup`, per pod netns | [`inbound`] | 5.9 (`ingress_ifindex` 5.17) |
//! | `cgroup/sendmsg4/6`, `cgroup/recvmsg4/6` | [`dns`] | 4.18, 5.2 |
//! | `cgroup/sock_release` | [`release`] | 5.9 |
//!
//! Shared helpers live apart: [`maps`] (every map), [`pod`] (which pod a
//! socket belongs to), [`sidecar`] (a sidecar-captured pod's rule set),
//! [`conn`] (connection keys and their namespace), [`net`] (context
//! access, address and port conversions).
#![no_std]
#![no_main]

mod bind;
mod conn;
mod connect;
mod dns;
mod inbound;
mod maps;
mod net;
mod peername;
mod pod;
mod release;
mod sidecar;
mod sk_msg;
mod sock_ops;
mod sockopt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves programs cannot panic; this is never reached.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
