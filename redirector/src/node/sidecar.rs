//! Istio's sidecar capture annotations, as `istio-iptables` reads them, for
//! the sidecar-mode fallback (`--sidecar=on`): which of a sidecar-injected
//! pod's TCP, outbound and inbound, goes to its own proxy.
//!
//! The values are Istio's: comma-separated CIDR lists (`*` for every
//! address, empty for none) and port lists (`includeInboundPorts` also
//! takes `*`), blanks around items ignored.
//! A value Istio's injector would refuse (a bare address, a prefix longer
//! than its family, a port outside 1-65535) is an [`AnnotationError`]:
//! the pod keeps its last good state.

use std::{collections::BTreeMap, sync::Arc};

use ipnet::IpNet;

use crate::{node::membership::AnnotationError, types::Port};

pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// `REDIRECT` (the default), `TPROXY` or `NONE` (no capture at all).
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// The pod's own `ProxyConfig` (YAML or JSON); its
/// `proxyMetadata.ISTIO_META_DNS_CAPTURE` turns DNS capture on or off.
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// The proxy metadata key that asks istio-agent to proxy DNS.
const DNS_CAPTURE_METADATA: &str = "ISTIO_META_DNS_CAPTURE";

/// Every capture annotation this module reads, for sources that spell
/// them by their last part (the workloads file).
pub const ANNOTATIONS: [&str; 6] = [
    INCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
];

/// A sidecar pod's capture rules. [`SidecarRules::default`] is Istio's
/// default: every destination and every inbound port (but Istio's own)
/// captured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarRules {
    /// `includeOutboundIPRanges`.
    pub include_ranges: Ranges,
    /// `excludeOutboundIPRanges`.
    pub exclude_ranges: Vec<IpNet>,
    /// `includeOutboundPorts`: captured whatever the address.
    pub include_ports: Vec<Port>,
    /// `excludeOutboundPorts`: never captured.
    pub exclude_ports: Vec<Port>,
    /// `includeInboundPorts`.
    pub include_inbound_ports: Ports,
    /// `excludeInboundPorts`: never captured inbound.
    pub exclude_inbound_ports: Vec<Port>,
}

/// A port list that may be `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Ports {
    /// `*`: every port.
    #[default]
    All,
    /// These ports (none for an empty value).
    Only(Vec<Port>),
}

/// A CIDR list that may be `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Ranges {
    /// `*`: every address of both families.
    #[default]
    All,
    /// These prefixes (none for an empty value).
    Only(Vec<IpNet>),
}

impl SidecarRules {
    /// Whether these are Istio's defaults (no rule set in the kernel).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// How a sidecar-injected pod wants its traffic intercepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interception {
    /// `REDIRECT` or `TPROXY`: captured, with these rules (`None`: Istio's
    /// defaults, shared by most pods), and its DNS to istio-agent's proxy
    /// if its proxy config says so (`None`: the node's default).
    Captured {
        rules: Option<Arc<SidecarRules>>,
        dns: Option<bool>,
    },
    /// `NONE`: nothing is captured.
    None,
}

/// The part of a pod's `proxy.istio.io/config` this module reads.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfig {
    #[serde(default)]
    proxy_metadata: BTreeMap<String, String>,
}

/// Whether the pod's proxy config turns DNS capture on or off (`get`
/// gives a value by annotation name).
pub fn dns_capture<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<bool>, AnnotationError> {
    let Some(text) = get(PROXY_CONFIG) else {
        return Ok(None);
    };
    let invalid = |expected| AnnotationError {
        annotation: PROXY_CONFIG,
        value: text.to_string(),
        expected,
    };
    let config: ProxyConfig =
        serde_saphyr::from_str(text).map_err(|_| invalid("a ProxyConfig in YAML or JSON"))?;
    match config
        .proxy_metadata
        .get(DNS_CAPTURE_METADATA)
        .map(String::as_str)
    {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(invalid(
            "proxyMetadata.ISTIO_META_DNS_CAPTURE \"true\" or \"false\"",
        )),
    }
}

/// Reads a sidecar-injected pod's annotations (`get` gives a value by
/// annotation name).
pub fn interception<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<Interception, AnnotationError> {
    match get(INTERCEPTION_MODE) {
        None | Some("REDIRECT" | "TPROXY") => Ok(Interception::Captured {
            rules: rules(&get)?,
            dns: dns_capture(&get)?,
        }),
        Some("NONE") => Ok(Interception::None),
        Some(other) => Err(AnnotationError {
            annotation: INTERCEPTION_MODE,
            value: other.to_string(),
            expected: "REDIRECT, TPROXY or NONE",
        }),
    }
}

/// The rules the [`ANNOTATIONS`] give (`get` gives a value by annotation
/// name); `None` for Istio's defaults.
pub fn rules<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<Arc<SidecarRules>>, AnnotationError> {
    let rules = SidecarRules {
        include_ranges: match get(INCLUDE_OUTBOUND_IP_RANGES) {
            None => Ranges::All,
            Some(value) if value.trim() == "*" => Ranges::All,
            Some(value) => Ranges::Only(cidrs(INCLUDE_OUTBOUND_IP_RANGES, value)?),
        },
        exclude_ranges: get(EXCLUDE_OUTBOUND_IP_RANGES)
            .map(|v| cidrs(EXCLUDE_OUTBOUND_IP_RANGES, v))
            .transpose()?
            .unwrap_or_default(),
        include_ports: get(INCLUDE_OUTBOUND_PORTS)
            .map(|v| ports(INCLUDE_OUTBOUND_PORTS, v))
            .transpose()?
            .unwrap_or_default(),
        exclude_ports: get(EXCLUDE_OUTBOUND_PORTS)
            .map(|v| ports(EXCLUDE_OUTBOUND_PORTS, v))
            .transpose()?
            .unwrap_or_default(),
        include_inbound_ports: match get(INCLUDE_INBOUND_PORTS) {
            None => Ports::All,
            Some(value) if value.trim() == "*" => Ports::All,
            Some(value) => Ports::Only(ports(INCLUDE_INBOUND_PORTS, value)?),
        },
        exclude_inbound_ports: get(EXCLUDE_INBOUND_PORTS)
            .map(|v| ports(EXCLUDE_INBOUND_PORTS, v))
            .transpose()?
            .unwrap_or_default(),
    };
    Ok((!rules.is_default()).then(|| Arc::new(rules)))
}

/// [`interception`] over an annotation map.
pub fn from_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<Interception, AnnotationError> {
    interception(|name| annotations.get(name).map(String::as_str))
}

/// The non-blank items of a comma-separated value.
fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|i| !i.is_empty())
}

/// A CIDR list; host bits are dropped, as iptables drops them.
fn cidrs(annotation: &'static str, value: &str) -> Result<Vec<IpNet>, AnnotationError> {
    items(value)
        .map(|item| {
            item.parse::<IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| AnnotationError {
                    annotation,
                    value: value.to_string(),
                    expected: "comma-separated CIDRs (address/length), or *",
                })
        })
        .collect()
}

/// A port list.
fn ports(annotation: &'static str, value: &str) -> Result<Vec<Port>, AnnotationError> {
    items(value)
        .map(|item| match item.parse::<u16>() {
            Ok(port) if port != 0 => Ok(Port(port)),
            _ => Err(AnnotationError {
                annotation,
                value: value.to_string(),
                expected: "comma-separated ports, 1-65535",
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<Interception, AnnotationError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_annotations(&map)
    }

    fn rules(pairs: &[(&str, &str)]) -> SidecarRules {
        match read(pairs).expect("valid") {
            Interception::Captured { rules, .. } => rules.map(|r| (*r).clone()).unwrap_or_default(),
            Interception::None => panic!("not captured"),
        }
    }

    #[test]
    fn a_pod_without_annotations_has_istios_defaults_and_no_rule_set() {
        let defaults = Ok(Interception::Captured {
            rules: None,
            dns: None,
        });
        assert_eq!(read(&[]), defaults);
        assert_eq!(
            read(&[
                (INCLUDE_OUTBOUND_IP_RANGES, " * "),
                (INTERCEPTION_MODE, "TPROXY")
            ]),
            defaults
        );
    }

    #[test]
    fn the_proxy_config_annotation_turns_dns_capture_on_or_off() {
        let dns = |config: &str| match read(&[(PROXY_CONFIG, config)]) {
            Ok(Interception::Captured { dns, .. }) => Ok(dns),
            Ok(Interception::None) => panic!("not captured"),
            Err(e) => Err(e.annotation),
        };
        assert_eq!(
            dns("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"),
            Ok(Some(true))
        );
        assert_eq!(
            dns(r#"{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}}"#),
            Ok(Some(false))
        );
        assert_eq!(dns("holdApplicationUntilProxyStarts: true\n"), Ok(None));
        assert_eq!(
            dns("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: maybe\n"),
            Err(PROXY_CONFIG)
        );
        assert_eq!(dns("proxyMetadata: [\n"), Err(PROXY_CONFIG));
    }

    #[test]
    fn interception_mode_none_captures_nothing() {
        assert_eq!(read(&[(INTERCEPTION_MODE, "NONE")]), Ok(Interception::None));
    }

    #[test]
    fn lists_are_read_as_istio_writes_them() {
        let r = rules(&[
            (INCLUDE_OUTBOUND_IP_RANGES, "10.1.2.3/16, fd00::/64,"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.1.9.0/24"),
            (INCLUDE_OUTBOUND_PORTS, "8080"),
            (EXCLUDE_OUTBOUND_PORTS, "22, 443"),
            (INCLUDE_INBOUND_PORTS, "9080,9090"),
            (EXCLUDE_INBOUND_PORTS, "9091"),
        ]);
        assert_eq!(
            r.include_ranges,
            Ranges::Only(vec![
                "10.1.0.0/16".parse().unwrap(),
                "fd00::/64".parse().unwrap()
            ])
        );
        assert_eq!(r.exclude_ranges, vec!["10.1.9.0/24".parse().unwrap()]);
        assert_eq!(r.include_ports, vec![Port(8080)]);
        assert_eq!(r.exclude_ports, vec![Port(22), Port(443)]);
        assert_eq!(
            r.include_inbound_ports,
            Ports::Only(vec![Port(9080), Port(9090)])
        );
        assert_eq!(r.exclude_inbound_ports, vec![Port(9091)]);
        assert_eq!(
            rules(&[(INCLUDE_INBOUND_PORTS, "")]).include_inbound_ports,
            Ports::Only(vec![])
        );
        assert_eq!(
            rules(&[(INCLUDE_INBOUND_PORTS, "*")]).include_inbound_ports,
            Ports::All
        );
        assert_eq!(
            rules(&[(INCLUDE_OUTBOUND_IP_RANGES, "")]).include_ranges,
            Ranges::Only(vec![])
        );
    }

    #[test]
    fn a_malformed_value_names_its_annotation_and_value() {
        for (annotation, value) in [
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.1"),
            (INCLUDE_OUTBOUND_PORTS, "70000"),
            (EXCLUDE_OUTBOUND_PORTS, "0"),
            (EXCLUDE_OUTBOUND_PORTS, "22,http"),
            (INCLUDE_INBOUND_PORTS, "*,80"),
            (EXCLUDE_INBOUND_PORTS, "-1"),
            (INTERCEPTION_MODE, "redirect"),
        ] {
            let err = read(&[(annotation, value)]).expect_err(value);
            assert_eq!((err.annotation, err.value.as_str()), (annotation, value));
            assert!(err.to_string().contains(annotation), "{err}");
        }
    }
}
