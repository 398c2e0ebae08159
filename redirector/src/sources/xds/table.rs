//! The workload table a delta xDS stream builds: every resource's version
//! (what to hand back as `initial_resource_versions` on reconnect) and the
//! workloads on this node. Applying a response is all or nothing, so a
//! malformed resource is NACKed and the last good table stays.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use prost::Message as _;

use crate::pb::{
    envoy::service::discovery::v3::DeltaDiscoveryResponse,
    istio::workload::{Address, NetworkMode, TunnelProtocol, address},
};

/// The resource type of istiod's workload discovery.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";

/// Why a response was NACKed; the message goes back to istiod as the
/// NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response of type {0:?}; only {ADDRESS_TYPE} was subscribed")]
    TypeUrl(String),
    #[error("resource {name:?}: {message}")]
    Resource { name: String, message: String },
}

/// A workload on this node, as istiod describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Istio's id (`<cluster>//Pod/<namespace>/<name>`).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// `default` when istiod elides it.
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// Captured by ztunnel: `tunnel_protocol = HBONE` (istiod's view of
    /// the pod's `ambient.istio.io/redirection: enabled`).
    pub captured: bool,
}

/// One resource of a response, decoded and checked.
enum Change {
    /// A workload of this node (`Some`) or anything else (`None`: another
    /// node's workload, a service, a host-network pod).
    Upsert {
        name: String,
        version: String,
        local: Option<Workload>,
    },
    Remove(String),
}

/// What the stream has delivered so far.
#[derive(Debug, Default)]
pub struct Table {
    /// Every resource known, by name, with its version.
    versions: BTreeMap<String, String>,
    /// This node's workloads, by resource name.
    local: BTreeMap<String, Workload>,
}

impl Table {
    /// The versions to send as `initial_resource_versions` when the stream
    /// is re-established, so istiod sends only what changed meanwhile.
    pub fn versions(&self) -> &BTreeMap<String, String> {
        &self.versions
    }

    /// This node's workloads, in resource name order.
    pub fn workloads(&self) -> Vec<Workload> {
        self.local.values().cloned().collect()
    }

    /// Applies one response for `node`; returns whether this node's
    /// workloads changed. On error nothing is applied.
    pub fn apply(
        &mut self,
        node: &str,
        response: &DeltaDiscoveryResponse,
    ) -> Result<bool, ResponseError> {
        if response.type_url != ADDRESS_TYPE {
            return Err(ResponseError::TypeUrl(response.type_url.clone()));
        }
        let mut changes = Vec::with_capacity(response.resources.len());
        for resource in &response.resources {
            let invalid = |message: String| ResponseError::Resource {
                name: resource.name.clone(),
                message,
            };
            let body = resource
                .resource
                .as_ref()
                .ok_or_else(|| invalid("no resource body".into()))?;
            if body.type_url != ADDRESS_TYPE {
                return Err(invalid(format!(
                    "body of type {:?}, not {ADDRESS_TYPE}",
                    body.type_url
                )));
            }
            let decoded = Address::decode(body.value.as_slice())
                .map_err(|e| invalid(format!("not an istio.workload.Address: {e}")))?;
            let local = match decoded.r#type {
                Some(address::Type::Workload(w)) => local_workload(node, w).map_err(invalid)?,
                Some(address::Type::Service(_)) => None,
                None => {
                    return Err(invalid(
                        "an Address with neither workload nor service".into(),
                    ));
                }
            };
            changes.push(Change::Upsert {
                name: resource.name.clone(),
                version: resource.version.clone(),
                local,
            });
        }
        changes.extend(
            response
                .removed_resources
                .iter()
                .cloned()
                .map(Change::Remove),
        );
        let mut changed = false;
        for change in changes {
            match change {
                Change::Upsert {
                    name,
                    version,
                    local,
                } => {
                    changed |= match local {
                        Some(w) => self.local.insert(name.clone(), w.clone()) != Some(w),
                        None => self.local.remove(&name).is_some(),
                    };
                    self.versions.insert(name, version);
                }
                Change::Remove(name) => {
                    changed |= self.local.remove(&name).is_some();
                    self.versions.remove(&name);
                }
            }
        }
        Ok(changed)
    }
}

/// The workload if it runs on `node` in its own network namespace.
fn local_workload(
    node: &str,
    w: crate::pb::istio::workload::Workload,
) -> Result<Option<Workload>, String> {
    let ips = w
        .addresses
        .iter()
        .map(|raw| match raw.len() {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(raw.as_slice()).expect("length checked"),
            ))),
            16 => Ok(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(raw.as_slice()).expect("length checked"),
            ))),
            n => Err(format!("an address of {n} bytes (expected 4 or 16)")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if w.uid.is_empty() {
        return Err("a workload without uid".into());
    }
    // A host-network pod shares the node's netns: nothing to capture.
    if w.node != node || w.network_mode() == NetworkMode::HostNetwork {
        return Ok(None);
    }
    Ok(Some(Workload {
        captured: w.tunnel_protocol() == TunnelProtocol::Hbone,
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: crate::node::spec::service_account_or_default(Some(w.service_account)),
        ips,
    }))
}

#[cfg(test)]
mod tests {
    use prost_types::Any;

    use super::*;
    use crate::pb::{
        envoy::service::discovery::v3::Resource,
        istio::workload::{self as wl, Service},
    };

    fn workload(name: &str, node: &str, ip: [u8; 4], protocol: TunnelProtocol) -> wl::Workload {
        wl::Workload {
            uid: format!("Kubernetes//Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: protocol as i32,
            node: node.into(),
            ..Default::default()
        }
    }

    fn resource(name: &str, version: &str, address: address::Type) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: ADDRESS_TYPE.into(),
                value: Address {
                    r#type: Some(address),
                }
                .encode_to_vec(),
            }),
            aliases: Vec::new(),
        }
    }

    fn response(resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: "n".into(),
            ..Default::default()
        }
    }

    fn wl_resource(name: &str, node: &str, ip: u8, protocol: TunnelProtocol) -> Resource {
        resource(
            &format!("Kubernetes//Pod/default/{name}"),
            "1",
            address::Type::Workload(workload(name, node, [198, 18, 0, ip], protocol)),
        )
    }

    #[test]
    fn only_this_nodes_workloads_are_kept_and_hbone_means_captured() {
        let mut t = Table::default();
        let changed = t
            .apply(
                "node-a",
                &response(
                    vec![
                        wl_resource("web", "node-a", 2, TunnelProtocol::Hbone),
                        wl_resource("db", "node-a", 3, TunnelProtocol::None),
                        wl_resource("far", "node-b", 4, TunnelProtocol::Hbone),
                        resource(
                            "default/web.default.svc.cluster.local",
                            "7",
                            address::Type::Service(Service::default()),
                        ),
                    ],
                    &[],
                ),
            )
            .unwrap();
        assert!(changed);
        let w = t.workloads();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].name, "db");
        assert!(!w[0].captured);
        assert_eq!(w[1].name, "web");
        assert!(w[1].captured);
        assert_eq!(w[1].ips, vec![IpAddr::from([198, 18, 0, 2])]);
        assert_eq!(t.versions().len(), 4);
    }

    #[test]
    fn a_host_network_workload_is_never_captured() {
        let mut t = Table::default();
        let mut w = workload(
            "node-exporter",
            "node-a",
            [10, 0, 0, 1],
            TunnelProtocol::Hbone,
        );
        w.network_mode = NetworkMode::HostNetwork as i32;
        let r = resource("ne", "1", address::Type::Workload(w));
        assert!(!t.apply("node-a", &response(vec![r], &[])).unwrap());
        assert!(t.workloads().is_empty());
    }

    #[test]
    fn a_malformed_resource_is_rejected_naming_it_and_nothing_is_applied() {
        let mut t = Table::default();
        t.apply(
            "node-a",
            &response(
                vec![wl_resource("web", "node-a", 2, TunnelProtocol::Hbone)],
                &[],
            ),
        )
        .unwrap();
        let mut bad = workload("bad", "node-a", [198, 18, 0, 9], TunnelProtocol::Hbone);
        bad.addresses = vec![vec![1, 2, 3]];
        let err = t
            .apply(
                "node-a",
                &response(
                    vec![
                        wl_resource("new", "node-a", 5, TunnelProtocol::Hbone),
                        resource("bad-one", "2", address::Type::Workload(bad)),
                    ],
                    &["Kubernetes//Pod/default/web"],
                ),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "resource \"bad-one\": an address of 3 bytes (expected 4 or 16)"
        );
        let w = t.workloads();
        assert_eq!(w.len(), 1, "the last good table stays: {w:?}");
        assert_eq!(w[0].name, "web");
    }

    #[test]
    fn undecodable_bytes_and_foreign_types_are_rejected() {
        let mut t = Table::default();
        let mut garbage = wl_resource("web", "node-a", 2, TunnelProtocol::Hbone);
        garbage.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
        let err = t
            .apply("node-a", &response(vec![garbage], &[]))
            .unwrap_err();
        assert!(
            err.to_string().contains("not an istio.workload.Address"),
            "{err}"
        );
        let mut other = response(Vec::new(), &[]);
        other.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(matches!(
            t.apply("node-a", &other),
            Err(ResponseError::TypeUrl(_))
        ));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut t = Table::default();
        let mut r = wl_resource("web", "node-a", 2, TunnelProtocol::Hbone);
        // Field 99, varint 1: a field of a newer Istio.
        r.resource
            .as_mut()
            .unwrap()
            .value
            .extend([0x98, 0x06, 0x01]);
        assert!(t.apply("node-a", &response(vec![r], &[])).unwrap());
        assert_eq!(t.workloads().len(), 1);
    }

    #[test]
    fn removal_forgets_the_workload_and_its_version() {
        let mut t = Table::default();
        t.apply(
            "node-a",
            &response(
                vec![wl_resource("web", "node-a", 2, TunnelProtocol::Hbone)],
                &[],
            ),
        )
        .unwrap();
        assert!(
            t.apply(
                "node-a",
                &response(Vec::new(), &["Kubernetes//Pod/default/web", "unknown"])
            )
            .unwrap()
        );
        assert!(t.workloads().is_empty());
        assert!(t.versions().is_empty());
    }

    #[test]
    fn an_unchanged_resend_is_not_a_change() {
        let mut t = Table::default();
        let r = response(
            vec![wl_resource("web", "node-a", 2, TunnelProtocol::Hbone)],
            &[],
        );
        assert!(t.apply("node-a", &r).unwrap());
        assert!(!t.apply("node-a", &r).unwrap());
    }
}
