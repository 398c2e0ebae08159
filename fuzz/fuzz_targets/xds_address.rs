//! istiod's workload discovery: any bytes that decode as a
//! `DeltaDiscoveryResponse` (the `istio.workload.Address` resources in it
//! included) are applied to the node's table whole or NACKed with nothing
//! applied, never a panic. An applied response leaves each resource at the
//! version it gave, forgets the removed ones, reports every change of this
//! node's workloads, and applying it again changes nothing.

#![no_main]

use ambridge::{
    pb::{
        envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
        istio::workload::{self as wl, Address, TunnelProtocol, address},
    },
    sources::xds::{ADDRESS_TYPE, ResponseError, Table},
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use prost_types::Any;

/// The node the table is built for; the seeds' local workloads name it.
const NODE: &str = "node-a";

/// A table already holding one workload of this node and one of another,
/// so a response can change, remove or keep what was there.
fn baseline() -> Table {
    let workload = |name: &str, node: &str, ip: u8| Resource {
        name: format!("Kubernetes//Pod/default/{name}"),
        version: "1".into(),
        resource: Some(Any {
            type_url: ADDRESS_TYPE.into(),
            value: Address {
                r#type: Some(address::Type::Workload(wl::Workload {
                    uid: format!("Kubernetes//Pod/default/{name}"),
                    name: name.into(),
                    namespace: "default".into(),
                    addresses: vec![vec![198, 18, 0, ip]],
                    tunnel_protocol: TunnelProtocol::Hbone as i32,
                    node: node.into(),
                    ..Default::default()
                })),
            }
            .encode_to_vec(),
        }),
        aliases: Vec::new(),
    };
    let mut table = Table::default();
    let response = DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        resources: vec![workload("web", NODE, 2), workload("far", "node-b", 3)],
        nonce: "0".into(),
        ..Default::default()
    };
    table.apply(NODE, &response).expect("the baseline applies");
    table
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(response) = DeltaDiscoveryResponse::decode(bytes) else {
        return;
    };
    let mut table = baseline();
    let (versions, workloads) = (table.versions().clone(), table.workloads());
    match table.apply(NODE, &response) {
        Err(err) => {
            assert_eq!(
                table.versions(),
                &versions,
                "a NACKed response changed versions: {err}"
            );
            assert_eq!(
                table.workloads(),
                workloads,
                "a NACKed response changed workloads: {err}"
            );
            match &err {
                ResponseError::TypeUrl(type_url) => assert_eq!(type_url, &response.type_url),
                ResponseError::Resource { name, message } => {
                    assert!(!message.is_empty(), "{err}");
                    assert!(
                        response.resources.iter().any(|r| &r.name == name),
                        "the NACK names {name:?}, which the response does not hold"
                    );
                }
            }
        }
        Ok(changed) => {
            let after = table.workloads();
            assert!(changed || after == workloads, "a change reported as none");
            for w in &after {
                assert!(!w.uid.is_empty(), "a workload without uid was kept: {w:?}");
            }
            for name in &response.removed_resources {
                assert!(
                    !table.versions().contains_key(name),
                    "removed {name:?} kept its version"
                );
            }
            for r in &response.resources {
                if response.removed_resources.contains(&r.name) {
                    continue;
                }
                let last = response.resources.iter().rev().find(|o| o.name == r.name);
                assert_eq!(
                    table.versions().get(&r.name),
                    last.map(|o| &o.version),
                    "resource {:?} is not at the version it was last given",
                    r.name
                );
            }
            let versions = table.versions().clone();
            table
                .apply(NODE, &response)
                .expect("a response that applied applies again");
            assert_eq!(
                table.versions(),
                &versions,
                "a second apply changed versions"
            );
            assert_eq!(table.workloads(), after, "a second apply changed workloads");
        }
    }
});
