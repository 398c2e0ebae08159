//! The local API, `ambridge.v1`, on a unix socket only root can use: the
//! socket file is mode 0600 and every call checks the caller's credentials
//! (`SO_PEERCRED`) as well.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use ambridge_common::flags;

use crate::{
    datapath::{self, Pins},
    reconcile::Desired,
    state::{Mode, NodeSpec, OriginalSrc, Settings},
};

/// Generated from `proto/ambridge/v1/node.proto`.
pub mod pb {
    tonic::include_proto!("ambridge.v1");
}

/// What the API reports about the node, refreshed after every reconcile.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub state_loaded: bool,
    pub pods: Vec<pb::Pod>,
    pub ztunnels: u32,
    pub unresolved: u32,
}

/// The API's picture of the node after a reconcile: every pod of the node
/// state with where it landed in the datapath.
pub fn view(spec: &NodeSpec, desired: &Desired) -> View {
    let pods = spec
        .pods
        .iter()
        .map(|pod| {
            let placed = desired.placed.get(&pod.uid);
            let entry = placed.and_then(|(_, id)| desired.cgroups.get(id));
            let problem = desired
                .unresolved
                .iter()
                .filter(|u| u.uid.as_ref() == Some(&pod.uid))
                .map(|u| u.error.clone())
                .collect::<Vec<_>>()
                .join("; ");
            pb::Pod {
                uid: pod.uid.0.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                mode: match pod.mode {
                    Mode::Ambient => "ambient".into(),
                    Mode::None => "none".into(),
                },
                ips: pod.ips.iter().map(ToString::to_string).collect(),
                cgroup: placed
                    .map(|(p, _)| p.display().to_string())
                    .unwrap_or_default(),
                cgroup_id: placed.map(|(_, id)| id.0).unwrap_or(0),
                in_datapath: placed.is_some(),
                accelerated: entry.is_some_and(|e| e.flags & flags::ACCEL != 0),
                problem,
            }
        })
        .collect();
    View {
        state_loaded: true,
        pods,
        ztunnels: spec.ztunnels.len() as u32,
        unresolved: desired.unresolved.len() as u32,
    }
}

/// The view shared between the reconcile loop (writer) and the API.
pub type SharedView = Arc<RwLock<View>>;

struct Node {
    view: SharedView,
    settings: Settings,
    cgroup_root: PathBuf,
    pins: Pins,
}

fn require_root<T>(req: &Request<T>) -> Result<(), Status> {
    let uid = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid());
    match uid {
        Some(0) => Ok(()),
        Some(uid) => Err(Status::permission_denied(format!(
            "the ambridge API is root only (caller uid {uid})"
        ))),
        None => Err(Status::permission_denied("caller credentials unknown")),
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for Node {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        require_root(&req)?;
        let counters = datapath::read_counters(&self.pins)
            .map_err(|e| Status::internal(format!("reading counters: {e:#}")))?
            .into_iter()
            .map(|(c, value)| pb::Counter {
                name: c.name().to_string(),
                value,
            })
            .collect();
        let view = self.view.read().expect("view lock").clone();
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            cgroup_root: self.cgroup_root.display().to_string(),
            bpffs: self.pins.root().display().to_string(),
            state_loaded: view.state_loaded,
            pods: view.pods.len() as u32,
            enrolled: view.pods.iter().filter(|p| p.mode == "ambient").count() as u32,
            ztunnels: view.ztunnels,
            unresolved: view.unresolved,
            original_src: match self.settings.original_src {
                OriginalSrc::Undo => "undo".into(),
                OriginalSrc::Preserve => "preserve".into(),
            },
            sockmap: self.settings.sockmap,
            counters,
        }))
    }

    async fn list_pods(
        &self,
        req: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        require_root(&req)?;
        let pods = self.view.read().expect("view lock").pods.clone();
        Ok(Response::new(pb::ListPodsResponse { pods }))
    }
}

/// Serves the API on `socket` until the task is dropped. A stale socket file
/// from an earlier run is replaced.
pub async fn serve(
    socket: PathBuf,
    view: SharedView,
    settings: Settings,
    cgroup_root: PathBuf,
    pins: Pins,
) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", socket.display()))?;
    let node = Node {
        view,
        settings,
        cgroup_root,
        pins,
    };
    tonic::transport::Server::builder()
        .add_service(pb::node_server::NodeServer::new(node))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await
        .context("serving the API")
}

/// A client of the API at `socket`.
pub async fn connect(
    socket: &Path,
) -> anyhow::Result<pb::node_client::NodeClient<tonic::transport::Channel>> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://ambridge.local")?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .context("connecting to the ambridge API (is `ambridge run` running, and are you root?)")?;
    Ok(pb::node_client::NodeClient::new(channel))
}
