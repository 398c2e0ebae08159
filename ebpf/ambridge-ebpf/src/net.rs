//! Address and port conversions between the kernel's context layouts and the
//! shared map types.

use ambridge_common::v4_mapped;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const SOCK_STREAM: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// 169.254.7.127, where kubelet probes are SNATed from; istio-cni never
/// redirects traffic to it, and neither do we.
pub const KUBELET_PROBE_IP4: u32 = u32::from_be(0xa9fe_077f);

/// 127.0.0.0/8, network order.
#[inline(always)]
pub fn is_loopback4(ip4: u32) -> bool {
    u32::from_be(ip4) >> 24 == 127
}

/// `::1`, network order words.
#[inline(always)]
pub fn is_loopback6(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_be(1)
}

/// A socket's address as the shared maps store it: IPv4 as IPv4-mapped.
#[inline(always)]
pub fn normalize(family: u32, ip4: u32, ip6: [u32; 4]) -> [u32; 4] {
    if family == AF_INET { v4_mapped(ip4) } else { ip6 }
}
