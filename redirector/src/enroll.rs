//! What the datapath holds for a pod or a ztunnel: pure functions from node
//! state to map values.

use std::net::IpAddr;

use ambridge_common::{CgroupInfo, flags};

use crate::state::{Mode, PodSpec, RedirectSettings};

/// A network-order IPv4 address as the kernel programs compare it.
pub fn ip4_word(ip: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// A network-order IPv6 address as the kernel programs compare it.
pub fn ip6_words(ip: std::net::Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The cgroup entry of a pod. In the in-pod model ztunnel's listeners live in
/// the pod's own network namespace, so the redirect target is the pod's own
/// IP (which also keeps the pod IP as the connection's source).
pub fn pod_entry(pod: &PodSpec, redirect: &RedirectSettings) -> CgroupInfo {
    let mut info = CgroupInfo {
        redirect_port: redirect.port.0,
        ..CgroupInfo::default()
    };
    if pod.mode == Mode::Ambient {
        info.flags |= flags::ENROLLED;
    }
    for ip in &pod.ips {
        match ip {
            IpAddr::V4(v4) if info.flags & flags::HAS_IP4 == 0 => {
                info.flags |= flags::HAS_IP4;
                info.pod_ip4 = ip4_word(*v4);
                info.redirect_ip4 = info.pod_ip4;
            }
            IpAddr::V6(v6) if info.flags & flags::HAS_IP6 == 0 => {
                info.flags |= flags::HAS_IP6;
                info.pod_ip6 = ip6_words(*v6);
                info.redirect_ip6 = info.pod_ip6;
            }
            _ => {}
        }
    }
    info
}

/// The cgroup entry of a ztunnel: nothing of its own is ever redirected.
pub fn ztunnel_entry() -> CgroupInfo {
    CgroupInfo {
        flags: flags::ZTUNNEL,
        ..CgroupInfo::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PodUid, Port};

    fn pod(mode: Mode, ips: &[&str]) -> PodSpec {
        PodSpec {
            uid: PodUid("u1".into()),
            name: "p".into(),
            namespace: "default".into(),
            cgroup: "/sys/fs/cgroup/p".into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            mode,
        }
    }

    #[test]
    fn an_ambient_pod_is_enrolled_and_redirects_to_its_own_ips() {
        let info = pod_entry(
            &pod(Mode::Ambient, &["198.18.0.2", "fd00:18::2"]),
            &RedirectSettings::default(),
        );
        assert_eq!(
            info.flags,
            flags::ENROLLED | flags::HAS_IP4 | flags::HAS_IP6
        );
        assert_eq!(info.redirect_port, 15001);
        assert_eq!(info.pod_ip4.to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(info.redirect_ip4, info.pod_ip4);
        assert_eq!(info.pod_ip6, ip6_words("fd00:18::2".parse().unwrap()));
        assert_eq!(info.redirect_ip6, info.pod_ip6);
    }

    #[test]
    fn a_pod_with_mode_none_is_not_enrolled() {
        let info = pod_entry(
            &pod(Mode::None, &["198.18.0.2"]),
            &RedirectSettings::default(),
        );
        assert_eq!(info.flags & flags::ENROLLED, 0);
    }

    #[test]
    fn a_single_stack_pod_has_only_that_family() {
        let info = pod_entry(
            &pod(Mode::Ambient, &["fd00:18::2"]),
            &RedirectSettings::default(),
        );
        assert_eq!(info.flags & flags::HAS_IP4, 0);
        assert_ne!(info.flags & flags::HAS_IP6, 0);
    }

    #[test]
    fn the_redirect_port_is_configurable() {
        let info = pod_entry(
            &pod(Mode::Ambient, &["198.18.0.2"]),
            &RedirectSettings { port: Port(16001) },
        );
        assert_eq!(info.redirect_port, 16001);
    }

    #[test]
    fn ztunnel_is_flagged_and_never_enrolled() {
        let info = ztunnel_entry();
        assert_eq!(info.flags, flags::ZTUNNEL);
    }

    #[test]
    fn ip6_words_are_network_order_in_memory() {
        let w = ip6_words("fd00:18::2".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x18]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 2]);
    }
}
