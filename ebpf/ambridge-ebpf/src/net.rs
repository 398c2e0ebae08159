//! Address and port conversions between the kernel's context layouts and the
//! shared map types.

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
/// The DNS port, host order.
pub const DNS_PORT: u16 = 53;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// 169.254.7.127, where kubelet probes are SNATed from; istio-cni never
/// redirects traffic to it, and neither do we.
pub const KUBELET_PROBE_IP4: u32 = u32::from_be(0xa9fe_077f);

/// `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`, istio-cni's IPv6 probe SNAT
/// address, network order words.
pub const KUBELET_PROBE_IP6: [u32; 4] = [
    u32::from_be(0xfd16_9254),
    u32::from_be(0x7127_1337),
    u32::from_be(0xffff_ffff),
    u32::from_be(0xffff_ffff),
];

/// 127.0.0.1, network order.
pub const LOCALHOST4: u32 = u32::from_be(0x7f00_0001);

/// `::1`, network order words.
pub const LOCALHOST6: [u32; 4] = [0, 0, 0, u32::from_be(1)];

/// 127.0.0.0/8, network order.
#[inline(always)]
pub fn is_loopback4(ip4: u32) -> bool {
    u32::from_be(ip4) >> 24 == 127
}

/// `::1`, network order words.
#[inline(always)]
pub fn is_loopback6(ip6: &[u32; 4]) -> bool {
    *ip6 == LOCALHOST6
}

/// Loopback in either family, for an address as the shared maps store it
/// (IPv6, or IPv4-mapped).
#[inline(always)]
pub fn is_loopback(ip: &[u32; 4]) -> bool {
    match ambridge_common::as_v4(ip) {
        Some(v4) => is_loopback4(v4),
        None => is_loopback6(ip),
    }
}

/// Reads one field of a kernel context with a fixed-offset load. Use inside
/// an `unsafe` block, on a field of a context the kernel keeps valid for the
/// program's lifetime.
///
/// The verifier only accepts context accesses at constant offsets from the
/// context pointer; without a volatile read LLVM may merge the reads of two
/// branches into one load through a computed pointer, which the verifier
/// rejects ("dereference of modified ctx ptr").
macro_rules! ctx_read {
    ($place:expr) => {
        core::ptr::read_volatile(core::ptr::addr_of!($place))
    };
}
pub(crate) use ctx_read;

/// Writes one field of a kernel context with a fixed-offset store (see
/// [`ctx_read`]); an array is written element by element, since a whole
/// array assignment may become a byte-wise copy through a moving pointer.
/// Use inside an `unsafe` block.
macro_rules! ctx_write {
    ($place:expr, [$a:expr, $b:expr, $c:expr, $d:expr]) => {{
        let v: [u32; 4] = [$a, $b, $c, $d];
        core::ptr::write_volatile(core::ptr::addr_of_mut!($place[0]), v[0]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!($place[1]), v[1]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!($place[2]), v[2]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!($place[3]), v[3]);
    }};
    ($place:expr, $value:expr) => {
        core::ptr::write_volatile(core::ptr::addr_of_mut!($place), $value)
    };
}
pub(crate) use ctx_write;

/// Writes an IPv6 address (four network-order words) into a context field.
macro_rules! ctx_write_ip6 {
    ($place:expr, $ip6:expr) => {{
        let ip6: [u32; 4] = $ip6;
        $crate::net::ctx_write!($place, [ip6[0], ip6[1], ip6[2], ip6[3]])
    }};
}
pub(crate) use ctx_write_ip6;

/// A socket address from a context, as the shared maps store it (IPv4 as
/// IPv4-mapped): `$ip4` and `$ip6` are the context's two fields for the same
/// address. Both are read whatever the family (the kernel allows it) and the
/// right one is selected as a value: branching on which field to load lets
/// LLVM merge the loads into one at a computed offset. Use inside `unsafe`.
macro_rules! ctx_addr {
    ($family:expr, $ip4:expr, $ip6:expr) => {{
        let ip4 = $crate::net::ctx_read!($ip4);
        let ip6 = [
            $crate::net::ctx_read!($ip6[0]),
            $crate::net::ctx_read!($ip6[1]),
            $crate::net::ctx_read!($ip6[2]),
            $crate::net::ctx_read!($ip6[3]),
        ];
        if $family == $crate::net::AF_INET {
            ambridge_common::v4_mapped(ip4)
        } else {
            ip6
        }
    }};
}
pub(crate) use ctx_addr;
