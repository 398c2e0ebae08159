//! What the datapath holds for a pod, a ztunnel or a network namespace: pure
//! functions from node state and settings to map values.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ambridge_common::{
    CgroupInfo, IpKey, NetnsInfo, NodeConfig, REDIRECT_PORTS, flags, sidecar_direction,
    sidecar_verdict, v4_mapped,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    node::desired::RuleKey,
    node::sidecar::{Ports, Ranges, SidecarRules},
    node::spec::{Mode, NodeSpec, OriginalSrc, PodSpec, Readiness, Settings, ZtunnelSpec},
    types::{CgroupId, Port},
};

/// A network-order IPv4 address as the kernel programs compare it.
pub fn ip4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// A network-order IPv6 address as the kernel programs compare it.
pub fn ip6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// An address as the shared maps key it: IPv6, or IPv4-mapped.
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => v4_mapped(ip4_word(v4)),
        IpAddr::V6(v6) => ip6_words(v6),
    }
}

/// The address a map key stands for (IPv4-mapped keys are IPv4).
pub fn ip_from_key(key: &IpKey) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in key.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(octets).to_canonical()
}

/// Acceleration flags for connections served by a proxy: allowed when
/// wanted (`accelerate`), unless the proxy relays with `splice(2)`.
fn accel(accelerate: bool, zero_copy: bool) -> u32 {
    match (accelerate, zero_copy) {
        (false, _) => 0,
        (true, false) => flags::ACCEL,
        (true, true) => flags::ZEROCOPY,
    }
}

/// The cgroup entry of a pod. In the in-pod model ztunnel's listeners live in
/// the pod's own network namespace, so the redirect target is the pod's own
/// IP (which also keeps the pod IP as the connection's source); in the
/// shared model it is ztunnel's IP. A family is redirected only when both
/// the pod and the target have an address in it. A sidecar-captured pod's
/// proxy is in its own network namespace whatever the model.
pub fn pod_entry(
    pod: &PodSpec,
    node: &NodeSpec,
    readiness: &Readiness,
    settings: &Settings,
) -> CgroupInfo {
    let sidecar = pod.mode == Mode::Sidecar && settings.sidecar.is_some();
    let shared = node.redirect.filter(|_| !sidecar);
    let mut info = CgroupInfo {
        redirect_port: shared.and_then(|s| s.port).unwrap_or(settings.port).0,
        ..CgroupInfo::default()
    };
    // Its rule set's number is the caller's to set: it computes the set.
    if let Some(proxy) = settings.sidecar.filter(|_| sidecar) {
        info.flags |= flags::SIDECAR;
        if pod.capture.dns.unwrap_or(proxy.dns_capture) {
            info.flags |= flags::DNS_CAPTURE;
        }
        info.redirect_port = Port::SIDECAR_OUTBOUND.0;
    }
    if pod.mode == Mode::Ambient {
        let accelerate = pod.accelerate.unwrap_or(settings.sockmap);
        info.flags |= flags::ENROLLED | accel(accelerate, node.zero_copy());
        if pod.capture.dns.unwrap_or(settings.dns_capture) {
            info.flags |= flags::DNS_CAPTURE;
        }
        if readiness.holds(&pod.uid) {
            info.flags |= flags::HELD;
        }
    }
    let target4 = match shared {
        Some(s) => s.ip4,
        None => pod.ip4(),
    };
    if let (Some(own), Some(target)) = (pod.ip4(), target4) {
        info.flags |= flags::HAS_IP4;
        info.pod_ip4 = ip4_word(own);
        info.redirect_ip4 = ip4_word(target);
    }
    let target6 = match shared {
        Some(s) => s.ip6,
        None => pod.ip6(),
    };
    if let (Some(own), Some(target)) = (pod.ip6(), target6) {
        info.flags |= flags::HAS_IP6;
        info.pod_ip6 = ip6_words(own);
        info.redirect_ip6 = ip6_words(target);
    }
    info
}

/// The cgroup entry of a sidecar pod's proxy container, below the pod's
/// `entry`: the pod's, marked as the proxy's (its rule set stays keyed by
/// the pod's cgroup, which the programs find above it).
pub fn proxy_entry(entry: &CgroupInfo) -> CgroupInfo {
    CgroupInfo {
        flags: entry.flags | flags::SIDECAR_PROXY,
        ..*entry
    }
}

/// The cgroup entry of a ztunnel: nothing of its own is ever redirected;
/// its original-source binds are undone or preserved as the node is set up.
pub fn ztunnel_entry(ztunnel: &ZtunnelSpec, settings: &Settings) -> CgroupInfo {
    let mut info = CgroupInfo {
        flags: flags::ZTUNNEL | accel(settings.sockmap, ztunnel.zero_copy),
        ..CgroupInfo::default()
    };
    if settings.original_src == OriginalSrc::Undo {
        info.flags |= flags::UNDO_ORIG_SRC;
    }
    info
}

/// The node-wide settings the programs filter on: every port connects are
/// redirected to, and the shared ztunnel's addresses (if any). `spec` is
/// `None` before any feed has delivered a node state.
pub fn node_config(spec: Option<&NodeSpec>, settings: &Settings) -> NodeConfig {
    let mut cfg = NodeConfig {
        inbound_port: Port::ZTUNNEL_INBOUND_PLAINTEXT.0,
        hbone_port: Port::ZTUNNEL_HBONE.0,
        dns_port: Port::ZTUNNEL_DNS.0,
        ..NodeConfig::default()
    };
    if settings.inbound_fail_closed {
        cfg.flags |= flags::INBOUND_FAIL_CLOSED;
    }
    // Written off too: entries of a run with it on, kept until the
    // sources have delivered, must not take uid 0 for the proxy's.
    let proxy = settings.sidecar.unwrap_or_default();
    cfg.sidecar_uid = proxy.uid;
    cfg.sidecar_gid = proxy.gid;
    let shared = spec.and_then(|s| s.redirect);
    let ports = [
        Some(settings.port.0),
        shared.and_then(|s| s.port).map(|p| p.0),
        settings.sidecar.map(|_| Port::SIDECAR_OUTBOUND.0),
    ];
    let mut n = 0;
    for port in ports.into_iter().flatten() {
        if n < REDIRECT_PORTS && !cfg.redirect_ports[..n].contains(&port) {
            cfg.redirect_ports[n] = port;
            n += 1;
        }
    }
    if let Some(shared) = shared {
        if let Some(ip4) = shared.ip4 {
            cfg.flags |= flags::HAS_IP4;
            cfg.shared_ip4 = v4_mapped(ip4_word(ip4));
        }
        if let Some(ip6) = shared.ip6 {
            cfg.flags |= flags::HAS_IP6;
            cfg.shared_ip6 = ip6_words(ip6);
        }
    }
    cfg
}

/// A sidecar pod's outbound rules as the kernel programs read them (see
/// `ambridge-ebpf`'s `sidecar` module), before they are keyed by the pod's
/// cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarRuleSet {
    /// [`CgroupInfo::rules`]: a digest of the entries, never 0, so a
    /// changed set is written under new keys before the pod points at it,
    /// and the same set always gets the same number (a restarted daemon
    /// finds its entries in place).
    pub number: u16,
    /// Destination prefixes, each with the verdict of the first
    /// `istio-iptables` rule that matches its addresses: an included
    /// prefix inside an excluded one is excluded.
    pub ranges: Vec<(IpNet, u32)>,
    /// Ports by [`sidecar_direction`]: an excluded port wins over an
    /// included one; inbound, port 0 holds the verdict for the ports not
    /// listed.
    pub ports: Vec<((u16, Port), u32)>,
}

impl SidecarRuleSet {
    /// `entries` (its ranges or ports) keyed for the pod on `cgroup`.
    pub fn keyed<T: Copy>(&self, cgroup: CgroupId, entries: &[(T, u32)]) -> Vec<(RuleKey<T>, u32)> {
        entries
            .iter()
            .map(|(what, verdict)| {
                let key = RuleKey {
                    cgroup,
                    rules: self.number,
                    what: *what,
                };
                (key, *verdict)
            })
            .collect()
    }
}

/// The kernel's form of `rules` (see [`SidecarRuleSet`]).
pub fn sidecar_rule_set(rules: &SidecarRules) -> SidecarRuleSet {
    let mut ranges: BTreeMap<IpNet, u32> = BTreeMap::new();
    let included: Vec<IpNet> = match &rules.include_ranges {
        Ranges::All => vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())],
        Ranges::Only(nets) => nets.clone(),
    };
    for net in included {
        let excluded = rules.exclude_ranges.iter().any(|x| x.contains(&net));
        let verdict = if excluded {
            sidecar_verdict::PASS
        } else {
            sidecar_verdict::CAPTURE
        };
        ranges.insert(net, verdict);
    }
    for net in &rules.exclude_ranges {
        ranges.insert(*net, sidecar_verdict::PASS);
    }
    let out = |port: &Port| (sidecar_direction::OUTBOUND, *port);
    let inbound = |port: &Port| (sidecar_direction::INBOUND, *port);
    let mut ports: BTreeMap<(u16, Port), u32> = rules
        .include_ports
        .iter()
        .map(|p| (out(p), sidecar_verdict::CAPTURE))
        .collect();
    for port in &rules.exclude_ports {
        ports.insert(out(port), sidecar_verdict::PASS);
    }
    // As istio-iptables: exclusions apply to `*` only; a list is taken as
    // it is.
    let unlisted = match &rules.include_inbound_ports {
        Ports::All => {
            for port in &rules.exclude_inbound_ports {
                ports.insert(inbound(port), sidecar_verdict::PASS);
            }
            sidecar_verdict::CAPTURE
        }
        Ports::Only(listed) => {
            for port in listed {
                ports.insert(inbound(port), sidecar_verdict::CAPTURE);
            }
            sidecar_verdict::PASS
        }
    };
    ports.insert(inbound(&Port(0)), unlisted);
    let ranges: Vec<(IpNet, u32)> = ranges.into_iter().collect();
    let ports: Vec<((u16, Port), u32)> = ports.into_iter().collect();
    SidecarRuleSet {
        number: rule_set_number(&ranges, &ports),
        ranges,
        ports,
    }
}

/// FNV-1a over the entries, folded to 16 bits; never 0 (no rule set).
fn rule_set_number(ranges: &[(IpNet, u32)], ports: &[((u16, Port), u32)]) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash = (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
    };
    for (net, verdict) in ranges {
        eat(&ip_key_bytes(net.addr()));
        eat(&[net.prefix_len(), *verdict as u8]);
    }
    eat(&[0xff]);
    for ((direction, port), verdict) in ports {
        eat(&direction.to_be_bytes());
        eat(&port.0.to_be_bytes());
        eat(&[*verdict as u8]);
    }
    let folded = (hash >> 16) as u16 ^ hash as u16;
    folded.max(1)
}

/// An address as 16 bytes, IPv4 mapped.
fn ip_key_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The local identity of a network namespace holding `ip4`/`ip6`.
pub fn netns_entry(ip4: Option<Ipv4Addr>, ip6: Option<Ipv6Addr>) -> NetnsInfo {
    let mut info = NetnsInfo::default();
    if let Some(v4) = ip4 {
        info.flags |= flags::HAS_IP4;
        info.ip4 = ip4_word(v4);
    }
    if let Some(v6) = ip6 {
        info.flags |= flags::HAS_IP6;
        info.ip6 = ip6_words(v6);
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        node::spec::SharedRedirect,
        types::{Port, WorkloadId},
    };

    fn pod(mode: Mode, ips: &[&str]) -> PodSpec {
        PodSpec {
            kept_because: None,
            uid: WorkloadId::kubernetes("u1"),
            name: "p".into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: crate::node::spec::PodCgroup::Path(
                std::path::Path::new("/sys/fs/cgroup/p").into(),
            ),
            netns: None,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            mode,
            accelerate: None,
            capture: Default::default(),
        }
    }

    fn ztunnel(zero_copy: bool) -> ZtunnelSpec {
        ZtunnelSpec {
            cgroup: crate::node::spec::CgroupRef::Path("/sys/fs/cgroup/z".into()),
            zero_copy,
        }
    }

    fn node_with(ztunnels: Vec<ZtunnelSpec>, redirect: Option<SharedRedirect>) -> NodeSpec {
        NodeSpec {
            pods: vec![],
            ztunnels,
            redirect,
        }
    }

    /// A pod's entry with nothing gating it.
    fn entry(pod: &PodSpec, node: &NodeSpec, settings: &Settings) -> CgroupInfo {
        pod_entry(pod, node, &Readiness::Ungated, settings)
    }

    fn sockmap_on() -> Settings {
        Settings {
            sockmap: true,
            ..Settings::default()
        }
    }

    #[test]
    fn an_ambient_pod_is_enrolled_and_redirects_to_its_own_ips() {
        let info = entry(
            &pod(Mode::Ambient, &["198.18.0.2", "fd00:18::2"]),
            &NodeSpec::default(),
            &Settings::default(),
        );
        assert_eq!(
            info.flags,
            flags::ENROLLED | flags::DNS_CAPTURE | flags::HAS_IP4 | flags::HAS_IP6
        );
        assert_eq!(info.redirect_port, 15001);
        assert_eq!(info.pod_ip4.to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(info.redirect_ip4, info.pod_ip4);
        assert_eq!(info.pod_ip6, ip6_words("fd00:18::2".parse().unwrap()));
        assert_eq!(info.redirect_ip6, info.pod_ip6);
    }

    #[test]
    fn with_zds_an_enrolled_pod_is_held_until_ztunnel_acknowledged_it() {
        let p = pod(Mode::Ambient, &["198.18.0.2"]);
        let node = NodeSpec::default();
        let settings = Settings::default();
        let none_yet = Readiness::Acknowledged(Default::default());
        let held = pod_entry(&p, &node, &none_yet, &settings);
        assert_ne!(held.flags & flags::HELD, 0);
        assert_ne!(held.flags & flags::ENROLLED, 0);
        let acked = Readiness::Acknowledged([p.uid.clone()].into());
        assert_eq!(
            pod_entry(&p, &node, &acked, &settings).flags & flags::HELD,
            0
        );
        // Without ZDS (istio-cni talks to ztunnel), nothing is held.
        assert_eq!(
            pod_entry(&p, &node, &Readiness::Ungated, &settings).flags & flags::HELD,
            0
        );
        // A pod out of the mesh is never held.
        let out = pod_entry(
            &pod(Mode::None, &["198.18.0.2"]),
            &node,
            &none_yet,
            &settings,
        );
        assert_eq!(out.flags & flags::HELD, 0);
    }

    #[test]
    fn dns_is_captured_as_the_node_says_unless_the_pod_says_otherwise() {
        let mut p = pod(Mode::Ambient, &["198.18.0.2"]);
        let off = Settings {
            dns_capture: false,
            ..Settings::default()
        };
        let dns = |p: &PodSpec, s: &Settings| {
            entry(p, &NodeSpec::default(), s).flags & flags::DNS_CAPTURE != 0
        };
        assert!(dns(&p, &Settings::default()));
        assert!(!dns(&p, &off));
        p.capture.dns = Some(true);
        assert!(dns(&p, &off));
        p.capture.dns = Some(false);
        assert!(!dns(&p, &Settings::default()));
        // Only enrolled pods' DNS is captured.
        let mut out = pod(Mode::None, &["198.18.0.2"]);
        out.capture.dns = Some(true);
        assert!(!dns(&out, &Settings::default()));
    }

    #[test]
    fn a_pod_with_mode_none_is_neither_enrolled_nor_accelerated() {
        let info = entry(
            &pod(Mode::None, &["198.18.0.2"]),
            &NodeSpec::default(),
            &Settings::default(),
        );
        assert_eq!(info.flags & (flags::ENROLLED | flags::ACCEL), 0);
    }

    #[test]
    fn a_single_stack_pod_has_only_that_family() {
        let info = entry(
            &pod(Mode::Ambient, &["fd00:18::2"]),
            &NodeSpec::default(),
            &Settings::default(),
        );
        assert_eq!(info.flags & flags::HAS_IP4, 0);
        assert_ne!(info.flags & flags::HAS_IP6, 0);
    }

    #[test]
    fn the_redirect_port_is_configurable() {
        let settings = Settings {
            port: Port(16001),
            ..Settings::default()
        };
        let info = entry(
            &pod(Mode::Ambient, &["198.18.0.2"]),
            &NodeSpec::default(),
            &settings,
        );
        assert_eq!(info.redirect_port, 16001);
    }

    #[test]
    fn the_shared_model_redirects_to_ztunnels_ip_and_port() {
        let shared = SharedRedirect {
            ip4: Some("198.18.0.50".parse().unwrap()),
            ip6: None,
            port: Some(Port(15011)),
        };
        let info = entry(
            &pod(Mode::Ambient, &["198.18.0.2", "fd00:18::2"]),
            &node_with(vec![], Some(shared)),
            &Settings::default(),
        );
        assert_eq!(info.redirect_ip4.to_ne_bytes(), [198, 18, 0, 50]);
        assert_eq!(info.pod_ip4.to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(info.redirect_port, 15011);
        // No IPv6 ztunnel address: IPv6 is not redirected.
        assert_eq!(info.flags & flags::HAS_IP6, 0);
    }

    #[test]
    fn with_sockmap_on_an_ambient_pod_is_accelerated() {
        let info = entry(
            &pod(Mode::Ambient, &["198.18.0.2"]),
            &NodeSpec::default(),
            &sockmap_on(),
        );
        assert_ne!(info.flags & flags::ACCEL, 0);
        assert_eq!(info.flags & flags::ZEROCOPY, 0);
    }

    #[test]
    fn a_pod_can_opt_in_or_out_of_the_nodes_acceleration_setting() {
        let mut p = pod(Mode::Ambient, &["198.18.0.2"]);
        p.accelerate = Some(true);
        let info = entry(&p, &NodeSpec::default(), &Settings::default());
        assert_ne!(info.flags & flags::ACCEL, 0);
        p.accelerate = Some(false);
        let info = entry(&p, &NodeSpec::default(), &sockmap_on());
        assert_eq!(info.flags & flags::ACCEL, 0);
    }

    #[test]
    fn a_zero_copy_ztunnel_keeps_its_pods_out_of_acceleration() {
        let info = entry(
            &pod(Mode::Ambient, &["198.18.0.2"]),
            &node_with(vec![ztunnel(false), ztunnel(true)], None),
            &sockmap_on(),
        );
        assert_eq!(info.flags & flags::ACCEL, 0);
        assert_ne!(info.flags & flags::ZEROCOPY, 0);
    }

    #[test]
    fn sockmap_off_accelerates_nothing_and_flags_no_fallback() {
        let settings = Settings::default();
        let info = entry(
            &pod(Mode::Ambient, &["198.18.0.2"]),
            &node_with(vec![ztunnel(true)], None),
            &settings,
        );
        assert_eq!(info.flags & (flags::ACCEL | flags::ZEROCOPY), 0);
        let z = ztunnel_entry(&ztunnel(true), &settings);
        assert_eq!(z.flags & (flags::ACCEL | flags::ZEROCOPY), 0);
    }

    #[test]
    fn ztunnel_is_flagged_never_enrolled_and_undoes_by_default() {
        let info = ztunnel_entry(&ztunnel(false), &Settings::default());
        assert_eq!(info.flags, flags::ZTUNNEL | flags::UNDO_ORIG_SRC);
        let accelerated = ztunnel_entry(&ztunnel(false), &sockmap_on());
        assert_ne!(accelerated.flags & flags::ACCEL, 0);
    }

    #[test]
    fn preserve_leaves_ztunnel_binds_alone() {
        let settings = Settings {
            original_src: OriginalSrc::Preserve,
            ..Settings::default()
        };
        let info = ztunnel_entry(&ztunnel(false), &settings);
        assert_eq!(info.flags & flags::UNDO_ORIG_SRC, 0);
    }

    #[test]
    fn the_node_config_holds_every_redirect_port_once_and_the_shared_ztunnel() {
        let cfg = node_config(None, &Settings::default());
        assert_eq!(cfg.redirect_ports, [15001, 0, 0, 0]);
        assert_eq!(cfg.flags, 0);
        assert_eq!(
            (cfg.inbound_port, cfg.hbone_port, cfg.dns_port),
            (15006, 15008, 15053)
        );
        let shared = SharedRedirect {
            ip4: Some("198.18.0.50".parse().unwrap()),
            ip6: None,
            port: Some(Port(15011)),
        };
        let cfg = node_config(Some(&node_with(vec![], Some(shared))), &Settings::default());
        assert_eq!(cfg.redirect_ports, [15001, 15011, 0, 0]);
        assert_eq!(cfg.flags, flags::HAS_IP4);
        assert!(cfg.is_shared_ztunnel(&v4_mapped(ip4_word("198.18.0.50".parse().unwrap()))));
        let same_port = SharedRedirect {
            port: Some(Port(15001)),
            ..shared
        };
        let cfg = node_config(
            Some(&node_with(vec![], Some(same_port))),
            &Settings::default(),
        );
        assert_eq!(cfg.redirect_ports, [15001, 0, 0, 0]);
    }

    #[test]
    fn a_netns_entry_holds_each_family_it_has() {
        let info = netns_entry(Some("198.18.0.2".parse().unwrap()), None);
        assert_eq!(info.flags, flags::HAS_IP4);
        assert_eq!(info.ip4.to_ne_bytes(), [198, 18, 0, 2]);
    }

    #[test]
    fn map_keys_round_trip_both_families() {
        for ip in ["198.18.0.2", "fd00:18::2", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_key(&ip_key(ip)), ip);
        }
        assert_eq!(
            ip_key("198.18.0.2".parse().unwrap()),
            v4_mapped(ip4_word("198.18.0.2".parse().unwrap()))
        );
    }

    #[test]
    fn ip6_words_are_network_order_in_memory() {
        let w = ip6_words("fd00:18::2".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x18]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 2]);
    }

    #[test]
    fn an_inbound_port_list_is_taken_as_it_is_and_exclusions_apply_to_every_port_only() {
        use crate::node::sidecar::{Ports, SidecarRules};
        use ambridge_common::{sidecar_direction::INBOUND, sidecar_verdict::*};
        let inbound = |rules: SidecarRules| -> Vec<(u16, u32)> {
            sidecar_rule_set(&rules)
                .ports
                .into_iter()
                .filter(|((d, _), _)| *d == INBOUND)
                .map(|((_, p), v)| (p.0, v))
                .collect()
        };
        let listed = SidecarRules {
            include_inbound_ports: Ports::Only(vec![Port(9080)]),
            exclude_inbound_ports: vec![Port(9080), Port(9091)],
            ..SidecarRules::default()
        };
        assert_eq!(inbound(listed), [(0, PASS), (9080, CAPTURE)]);
        let every = SidecarRules {
            exclude_inbound_ports: vec![Port(9091)],
            ..SidecarRules::default()
        };
        assert_eq!(inbound(every), [(0, CAPTURE), (9091, PASS)]);
    }
}
