//! The sidecar pods' rule sets in the kernel: their destination prefixes
//! (an LPM trie) and outbound ports, keyed by the pod's cgroup and the
//! set's number (see `ambridge-ebpf`'s `sidecar` module).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use ambridge_common::{
    SIDECAR_RANGE_FIXED_BITS, SidecarPort, SidecarRange, map_names, sidecar_family,
};
use aya::maps::lpm_trie::Key;
use ipnet::IpNet;

use super::{Datapath, Error, apply, apply_trie, follow, map_err};
use crate::{
    node::desired::{Op, PortRule, RuleKey},
    node::entries::{ip_from_key, ip_key},
    types::{CgroupId, Port},
};

impl Datapath {
    /// What the kernel's sidecar range trie holds.
    pub fn sidecar_range_entries(&mut self) -> Result<&BTreeMap<RuleKey<IpNet>, u32>, Error> {
        if self.mirror.sidecar_ranges.is_none() {
            let read = self
                .sidecar_ranges
                .iter()
                .map(|r| r.map(|(k, v)| (range_from_key(&k), v)))
                .collect::<Result<_, _>>()
                .map_err(map_err(map_names::SIDECAR_RANGES))?;
            self.mirror.sidecar_ranges = Some(read);
        }
        Ok(self.mirror.sidecar_ranges.as_ref().expect("read above"))
    }

    /// Applies sidecar range operations.
    pub fn apply_sidecar_ranges(&mut self, ops: &[Op<RuleKey<IpNet>, u32>]) -> Result<(), Error> {
        let applied = apply_trie(
            &mut self.sidecar_ranges,
            map_names::SIDECAR_RANGES,
            ops,
            range_key,
        );
        follow(&mut self.mirror.sidecar_ranges, ops, &applied);
        applied
    }

    /// What the kernel's sidecar port map holds.
    pub fn sidecar_port_entries(&mut self) -> Result<&BTreeMap<PortRule, u32>, Error> {
        if self.mirror.sidecar_ports.is_none() {
            let read = self
                .sidecar_ports
                .iter()
                .map(|r| r.map(|(k, v)| (port_from_key(&k), v)))
                .collect::<Result<_, _>>()
                .map_err(map_err(map_names::SIDECAR_PORTS))?;
            self.mirror.sidecar_ports = Some(read);
        }
        Ok(self.mirror.sidecar_ports.as_ref().expect("read above"))
    }

    /// Applies sidecar port operations.
    pub fn apply_sidecar_ports(&mut self, ops: &[Op<PortRule, u32>]) -> Result<(), Error> {
        let applied = apply(
            &mut self.sidecar_ports,
            map_names::SIDECAR_PORTS,
            ops,
            port_key,
        );
        follow(&mut self.mirror.sidecar_ports, ops, &applied);
        applied
    }
}

fn range_key(key: RuleKey<IpNet>) -> Key<SidecarRange> {
    let net = key.what.trunc();
    let len = match net {
        IpNet::V4(v4) => 96 + u32::from(v4.prefix_len()),
        IpNet::V6(v6) => u32::from(v6.prefix_len()),
    };
    let family = match net {
        IpNet::V4(_) => sidecar_family::IPV4,
        IpNet::V6(_) => sidecar_family::IPV6,
    };
    let data = SidecarRange {
        cgroup: key.cgroup.0,
        rules: key.rules,
        family,
        addr: ip_key(net.addr()),
    };
    Key::new(SIDECAR_RANGE_FIXED_BITS + len, data)
}

fn range_from_key(key: &Key<SidecarRange>) -> RuleKey<IpNet> {
    let data = key.data();
    let addr = data.addr;
    let len = key.prefix_len() - SIDECAR_RANGE_FIXED_BITS;
    let ip = match data.family {
        sidecar_family::IPV4 => ip_from_key(&addr),
        // Not canonicalised: `::ffff:0:0/96` is an IPv6 prefix here.
        _ => IpAddr::V6(Ipv6Addr::from_bits(addr_bits(&addr))),
    };
    let len = if ip.is_ipv4() { len - 96 } else { len };
    RuleKey {
        cgroup: CgroupId(data.cgroup),
        rules: data.rules,
        what: IpNet::new(ip, len as u8).expect("a prefix this module wrote"),
    }
}

/// The 128 bits of a key's address words (network order each).
fn addr_bits(addr: &[u32; 4]) -> u128 {
    addr.iter()
        .fold(0, |bits, w| bits << 32 | u128::from(u32::from_be(*w)))
}

fn port_key(key: PortRule) -> SidecarPort {
    let (direction, port) = key.what;
    SidecarPort {
        cgroup: key.cgroup.0,
        rules: key.rules,
        port: port.0,
        direction,
        _pad: 0,
    }
}

fn port_from_key(key: &SidecarPort) -> PortRule {
    RuleKey {
        cgroup: CgroupId(key.cgroup),
        rules: key.rules,
        what: (key.direction, Port(key.port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_key_survives_the_round_trip_through_the_kernels_form() {
        for net in [
            "10.1.0.0/16",
            "0.0.0.0/0",
            "::/0",
            "::/96",
            "::ffff:0:0/96",
            "fd00::/120",
            "198.18.0.9/32",
        ] {
            let key = RuleKey {
                cgroup: CgroupId(77),
                rules: 513,
                what: net.parse::<IpNet>().unwrap(),
            };
            assert_eq!(range_from_key(&range_key(key)), key, "{net}");
        }
        let port = RuleKey {
            cgroup: CgroupId(77),
            rules: 513,
            what: (ambridge_common::sidecar_direction::INBOUND, Port(8080)),
        };
        assert_eq!(port_from_key(&port_key(port)), port);
    }
}
