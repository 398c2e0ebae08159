//! The istiod workload-discovery feed: a delta ADS client for
//! `istio.workload.Address`, connecting like ztunnel does (TLS with the
//! Istio root CA, a bearer token, ztunnel's node id), ACKing what it
//! applies and NACKing what it cannot decode. It reconnects with backoff,
//! offering what it holds as `initial_resource_versions`, so a restart of
//! istiod costs only the resources that changed.

mod table;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use prost_types::{Struct, Value, value::Kind};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{error, info, warn};

pub use table::{ADDRESS_TYPE, ResponseError, Table, Workload};

use crate::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status,
};
use crate::{
    node::spec::{Mode, PodSpec},
    supervise::{Backoff, Component, Health, Policy},
};

/// Where istiod is and who we are to it.
#[derive(Clone, Debug)]
pub struct XdsSource {
    /// istiod's URL, `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// The Istio root CA (PEM), read at each connection (it rotates).
    pub root_cert: PathBuf,
    /// A token of audience `istio-ca`, read at each connection; `None`:
    /// no `authorization` header.
    pub token: Option<PathBuf>,
    /// The name istiod's certificate is checked against; `None`: the host
    /// of `address`.
    pub server_name: Option<String>,
    /// This node (`Workload.node` of the pods to capture).
    pub node_name: String,
    pub cluster_id: String,
    /// The agent's own pod, IP and namespace, for the node id.
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: String,
}

impl XdsSource {
    /// ztunnel's node id: istiod serves workload discovery to ztunnel
    /// proxies.
    pub fn node_id(&self) -> String {
        format!(
            "ztunnel~{}~{}.{}~{}.svc.cluster.local",
            self.instance_ip, self.pod_name, self.pod_namespace, self.pod_namespace
        )
    }

    fn node(&self) -> Node {
        let field = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        let metadata = [
            ("NAME", &self.pod_name),
            ("NAMESPACE", &self.pod_namespace),
            ("NODE_NAME", &self.node_name),
            ("CLUSTER_ID", &self.cluster_id),
            ("INSTANCE_IPS", &self.instance_ip),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), field(v)))
        .collect();
        Node {
            id: self.node_id(),
            cluster: self.cluster_id.clone(),
            metadata: Some(Struct { fields: metadata }),
        }
    }
}

/// What the feed says about the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// This node's workloads (host-network ones left out).
    pub workloads: Vec<Workload>,
}

/// Where Kubernetes's decisions (`pods`) and istiod's (`workloads` of the
/// same node) differ, one line per pod. Transient while istio-cni (or
/// ambridge) has not yet marked a new pod `redirection: enabled`; lasting
/// otherwise.
pub fn disagreements<'a>(
    pods: impl IntoIterator<Item = &'a PodSpec> + Clone,
    workloads: &[Workload],
) -> BTreeSet<String> {
    // Indexed, as both sides hold every pod of the node.
    let by_name: std::collections::HashMap<(&str, &str), &Workload> = workloads
        .iter()
        .map(|w| ((w.namespace.as_str(), w.name.as_str()), w))
        .collect();
    let pod_names: std::collections::HashSet<(&str, &str)> = pods
        .clone()
        .into_iter()
        .map(|p| (p.namespace.as_str(), p.name.as_str()))
        .collect();
    let mut out = BTreeSet::new();
    for pod in pods {
        let enrolled = pod.mode == Mode::Ambient;
        let workload = by_name.get(&(pod.namespace.as_str(), pod.name.as_str()));
        let line = match workload {
            None if enrolled => "enrolled, but istiod does not list it on this node",
            Some(w) if enrolled && !w.captured => "enrolled, but istiod does not report HBONE",
            Some(w) if !enrolled && w.captured => "not enrolled, but istiod reports HBONE",
            _ => continue,
        };
        out.insert(format!("pod {}/{}: {line}", pod.namespace, pod.name));
    }
    for w in workloads.iter().filter(|w| w.captured) {
        if !pod_names.contains(&(w.namespace.as_str(), w.name.as_str())) {
            out.insert(format!(
                "workload {}: istiod reports HBONE, Kubernetes has no such pod on this node",
                w.uid
            ));
        }
    }
    out
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("reading the Istio root certificate {path}: {source}")]
    RootCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the istiod token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the xDS address {0:?} is not a URL")]
    Address(String),
    #[error("connecting to istiod: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the token is not a valid header value")]
    TokenHeader,
    #[error("istiod: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("istiod closed the stream")]
    Closed,
}

/// Follows istiod until the daemon exits, publishing a snapshot after the
/// first response and whenever this node's workloads change.
pub async fn run(source: XdsSource, tx: watch::Sender<Option<Snapshot>>, health: Health) {
    let mut table = Table::default();
    // Back to the first wait once a stream has delivered a response.
    let mut backoff = Backoff::new(Policy::TASKS);
    loop {
        let started = Instant::now();
        let mut delivered = false;
        let result = stream(&source, &mut table, &tx, &mut delivered, &health).await;
        if delivered {
            backoff.reset();
        }
        let wait = backoff.failed(Duration::ZERO);
        match result {
            Ok(()) => return,
            Err(e) => {
                warn!(
                    address = %source.address,
                    after_ms = started.elapsed().as_millis() as u64,
                    retry_in_ms = wait.as_millis() as u64,
                    "workload discovery stream ended, keeping the last state: {e}"
                );
                health.failed(Component::Istiod, format!("{}: {e}", source.address));
            }
        }
        tokio::time::sleep(wait).await;
    }
}

async fn channel(source: &XdsSource) -> Result<Channel, StreamError> {
    let pem = tokio::fs::read(&source.root_cert)
        .await
        .map_err(|e| StreamError::RootCert {
            path: source.root_cert.clone(),
            source: e,
        })?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
    if let Some(name) = &source.server_name {
        tls = tls.domain_name(name.clone());
    }
    Endpoint::from_shared(source.address.clone())
        .map_err(|_| StreamError::Address(source.address.clone()))?
        .tls_config(tls)
        .map_err(StreamError::Connect)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await
        .map_err(StreamError::Connect)
}

/// One stream: subscribe, then apply and (N)ACK each response. Returns
/// `Ok` only when the daemon is gone.
async fn stream(
    source: &XdsSource,
    table: &mut Table,
    tx: &watch::Sender<Option<Snapshot>>,
    delivered: &mut bool,
    health: &Health,
) -> Result<(), StreamError> {
    let channel = channel(source).await?;
    let (requests, outbound) = mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(source.node()),
            type_url: ADDRESS_TYPE.into(),
            initial_resource_versions: table
                .versions()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        })
        .await
        .expect("the receiver is held below");
    let mut request = tonic::Request::new(ReceiverStream::new(outbound));
    if let Some(path) = &source.token {
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| StreamError::Token {
                path: path.clone(),
                source: e,
            })?;
        let header = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| StreamError::TokenHeader)?;
        request.metadata_mut().insert("authorization", header);
    }
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    info!(address = %source.address, node_id = %source.node_id(), known = table.versions().len(), "workload discovery stream open");
    while let Some(response) = responses.message().await? {
        *delivered = true;
        health.running(Component::Istiod);
        let reply = handle(source, table, tx, &response);
        if requests.send(reply).await.is_err() {
            return Err(StreamError::Closed);
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
    Err(StreamError::Closed)
}

/// Applies a response and says what to answer: an ACK, or a NACK naming
/// what was wrong (the table then stays as it was).
fn handle(
    source: &XdsSource,
    table: &mut Table,
    tx: &watch::Sender<Option<Snapshot>>,
    response: &DeltaDiscoveryResponse,
) -> DeltaDiscoveryRequest {
    let mut reply = DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    };
    match table.apply(&source.node_name, response) {
        Ok(changed) => {
            if changed || tx.borrow().is_none() {
                let workloads = table.workloads();
                info!(
                    workloads = workloads.len(),
                    captured = workloads.iter().filter(|w| w.captured).count(),
                    "workloads of this node from istiod"
                );
                tx.send_replace(Some(Snapshot { workloads }));
            }
        }
        Err(e) => {
            error!(nonce = %response.nonce, "NACK to istiod, keeping the last good state: {e}");
            reply.error_detail = Some(Status {
                // INVALID_ARGUMENT.
                code: 3,
                message: e.to_string(),
                details: Vec::new(),
            });
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> XdsSource {
        XdsSource {
            address: "https://istiod.istio-system.svc:15012".into(),
            root_cert: "/nonexistent".into(),
            token: None,
            server_name: None,
            node_name: "node-a".into(),
            cluster_id: "Kubernetes".into(),
            pod_name: "ambridge-x1".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: "10.0.0.7".into(),
        }
    }

    fn pod(name: &str, mode: Mode) -> PodSpec {
        PodSpec {
            kept_because: None,
            uid: crate::types::WorkloadId::kubernetes(format!("uid-{name}")),
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: crate::node::spec::PodCgroup::Uid,
            netns: None,
            ips: Vec::new(),
            mode,
            accelerate: None,
            capture: Default::default(),
        }
    }

    fn workload(name: &str, captured: bool) -> Workload {
        Workload {
            uid: format!("Kubernetes//Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            ips: Vec::new(),
            captured,
        }
    }

    #[test]
    fn kubernetes_and_istiod_disagreements_are_named_per_pod() {
        let pods = [
            pod("agree", Mode::Ambient),
            pod("out", Mode::None),
            pod("pending", Mode::Ambient),
            pod("unlisted", Mode::Ambient),
            pod("opted-out", Mode::None),
        ];
        let workloads = [
            workload("agree", true),
            workload("out", false),
            workload("pending", false),
            workload("opted-out", true),
            workload("stranger", true),
        ];
        let got: Vec<_> = disagreements(&pods, &workloads).into_iter().collect();
        assert_eq!(
            got,
            [
                "pod default/opted-out: not enrolled, but istiod reports HBONE",
                "pod default/pending: enrolled, but istiod does not report HBONE",
                "pod default/unlisted: enrolled, but istiod does not list it on this node",
                "workload Kubernetes//Pod/default/stranger: istiod reports HBONE, Kubernetes has no such pod on this node",
            ]
        );
    }

    #[test]
    fn the_node_id_is_ztunnels_form() {
        assert_eq!(
            source().node_id(),
            "ztunnel~10.0.0.7~ambridge-x1.istio-system~istio-system.svc.cluster.local"
        );
    }

    #[test]
    fn a_bad_response_is_nacked_and_a_good_one_acked() {
        let (tx, _rx) = watch::channel(None);
        let mut table = Table::default();
        let good = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "1".into(),
            ..Default::default()
        };
        let ack = handle(&source(), &mut table, &tx, &good);
        assert_eq!(ack.response_nonce, "1");
        assert!(ack.error_detail.is_none());
        // The first response publishes, even when the node has no workload.
        assert_eq!(*tx.borrow(), Some(Snapshot::default()));
        let bad = DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/other".into(),
            nonce: "2".into(),
            ..Default::default()
        };
        let nack = handle(&source(), &mut table, &tx, &bad);
        assert_eq!(nack.response_nonce, "2");
        let detail = nack.error_detail.expect("a NACK");
        assert!(
            detail.message.contains("type.googleapis.com/other"),
            "{detail:?}"
        );
    }
}
