//! A fake istiod for the workload-discovery feed's tests: delta ADS over
//! TLS on loopback (a CA and a server certificate made for the test), which
//! records every request (node id, bearer token, initial resource versions,
//! ACK or NACK) and sends the responses the test scripts.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Identity, Server, ServerTlsConfig},
};

use crate::eventually;

/// The service side of delta ADS (its messages are `ambridge::pb`'s).
mod ads {
    tonic::include_proto!("envoy.service.discovery.v3");
}

use ads::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambridge::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource},
    istio::workload::{Address, TunnelProtocol, Workload, address},
};

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// The name on istiod's certificate.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";
pub const TOKEN: &str = "test-token-audience-istio-ca";

/// One request istiod received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Which stream (1 for the first connection).
    pub stream: u32,
    pub node_id: Option<String>,
    pub authorization: Option<String>,
    pub initial_versions: BTreeMap<String, String>,
    pub nonce: String,
    /// A NACK's message.
    pub error: Option<String>,
}

type Outbound = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

#[derive(Default)]
struct Shared {
    streams: u32,
    current: Option<Outbound>,
    seen: Vec<Seen>,
    nonces: u32,
}

struct Ads {
    shared: Arc<Mutex<Shared>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = {
            let mut s = self.shared.lock().unwrap();
            s.streams += 1;
            s.current = Some(tx);
            s.streams
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                shared.lock().unwrap().seen.push(Seen {
                    stream,
                    node_id: req.node.map(|n| n.id),
                    authorization: authorization.clone(),
                    initial_versions: req.initial_resource_versions.into_iter().collect(),
                    nonce: req.response_nonce,
                    error: req.error_detail.map(|e| e.message),
                });
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The server, with its CA and token files in `dir`; stops when dropped.
pub struct FakeIstiod {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Mutex<Shared>>,
    port: u16,
    dir: PathBuf,
}

impl FakeIstiod {
    pub fn start(dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test istio root CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .expect("server params")
            .signed_by(&key, &issuer)
            .expect("server certificate");
        std::fs::write(dir.join("root-cert.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("istio-token"), format!("{TOKEN}\n")).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake istiod");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let ads = Ads {
            shared: shared.clone(),
        };
        let identity = Identity::from_pem(cert.pem(), key.serialize_pem());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            Server::builder()
                .tls_config(ServerTlsConfig::new().identity(identity))
                .expect("server TLS")
                .add_service(AggregatedDiscoveryServiceServer::new(ads))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("fake istiod");
        });
        FakeIstiod {
            runtime,
            shared,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// The `ambridge run` arguments that reach this istiod as `node`.
    pub fn daemon_args(&self, node: &str) -> Vec<String> {
        [
            "--source",
            "xds",
            "--node-name",
            node,
            "--xds-address",
            &format!("https://127.0.0.1:{}", self.port),
            "--xds-server-name",
            SERVER_NAME,
            "--xds-root-cert",
            &self.dir.join("root-cert.pem").display().to_string(),
            "--xds-token",
            &self.dir.join("istio-token").display().to_string(),
            "--pod-name",
            "ambridge-test",
            "--instance-ip",
            "10.0.0.7",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Sends a response on the open stream (waiting for one) and returns
    /// its nonce.
    pub fn send(&self, resources: Vec<Resource>, removed: &[&str]) -> String {
        let (tx, nonce) = eventually(Duration::from_secs(15), || {
            let mut s = self.shared.lock().unwrap();
            let tx = s.current.clone()?;
            s.nonces += 1;
            Some((tx, format!("nonce-{}", s.nonces)))
        })
        .expect("the daemon never opened a stream");
        let response = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: nonce.clone(),
            system_version_info: String::new(),
        };
        self.runtime
            .block_on(tx.send(Ok(response)))
            .expect("the stream is open");
        nonce
    }

    /// The daemon's answer to `nonce`: `Ok` for an ACK, `Err(message)` for
    /// a NACK.
    pub fn reply(&self, nonce: &str) -> Result<(), String> {
        let seen = eventually(Duration::from_secs(15), || {
            self.shared
                .lock()
                .unwrap()
                .seen
                .iter()
                .find(|s| s.nonce == nonce)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no ACK or NACK for {nonce}"));
        match seen.error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().seen.clone()
    }

    /// Ends the open stream with an error, as a restarting istiod does.
    pub fn end_stream(&self) {
        let tx = self.shared.lock().unwrap().current.take();
        if let Some(tx) = tx {
            let _ = self
                .runtime
                .block_on(tx.send(Err(Status::unavailable("istiod restarting"))));
        }
    }
}

/// A workload resource as istiod names and encodes it.
pub fn workload(
    namespace: &str,
    name: &str,
    node: &str,
    ips: &[std::net::IpAddr],
    protocol: TunnelProtocol,
    version: &str,
) -> Resource {
    let uid = workload_uid(namespace, name);
    let address = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.clone(),
            name: name.into(),
            namespace: namespace.into(),
            addresses: ips
                .iter()
                .map(|ip| match ip {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                })
                .collect(),
            tunnel_protocol: protocol as i32,
            node: node.into(),
            ..Default::default()
        })),
    };
    resource(&uid, version, address.encode_to_vec())
}

/// A resource with `body` as its `istio.workload.Address` bytes.
pub fn resource(name: &str, version: &str, body: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE.into(),
            value: body,
        }),
        aliases: Vec::new(),
    }
}

/// Istio's id of a pod.
pub fn workload_uid(namespace: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{namespace}/{name}")
}
