//! The local API, `ambridge.v1`, on a unix socket only root can use: the
//! socket file is mode 0600 from the moment it exists, and every call checks
//! the caller's credentials (`SO_PEERCRED`) as well. One connection may
//! hold at most [`MAX_STREAMS_PER_CONNECTION`] requests at once.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    net::UnixListener,
    sync::{broadcast, mpsc, oneshot},
};
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use crate::{
    datapath::{self, Pins},
    node::spec::Settings,
    sources::{
        cni,
        push::{PushRequest, pushed},
    },
    supervise::{Backoff, Component, Health, Policy},
    types::PodUid,
};

/// Generated from `proto/ambridge/v1/node.proto`.
pub mod pb {
    tonic::include_proto!("ambridge.v1");
}

pub mod client;
mod enums;
pub mod monitoring;
pub mod view;

pub use client::{DEFAULT_SOCKET, connect};
pub use view::{SharedView, View};

fn stopping() -> Status {
    Status::unavailable("the daemon is stopping")
}

/// The `ambridge.v1.Node` service.
struct Service {
    view: SharedView,
    settings: Settings,
    cgroup_root: PathBuf,
    pins: Pins,
    maps: Arc<datapath::ReadOnly>,
    push: mpsc::Sender<PushRequest>,
    cni: mpsc::Sender<cni::Request>,
    changes: broadcast::Sender<pb::Change>,
    reports: Reports,
}

/// What the daemon's parts report, for `Status`.
#[derive(Clone, Debug, Default)]
pub struct Reports {
    /// With `--zds serve`: the ZDS server's connections and refusals.
    pub zds: Option<Arc<crate::publish::zds::server::Stats>>,
    /// The supervised components and readiness.
    pub health: Health,
    /// Where the metrics and health probes are served, if anywhere.
    pub monitoring: Option<std::net::SocketAddr>,
}

/// The channels between the API and the reconcile loop.
pub struct Channels {
    /// Pushes checked field by field, for the reconcile loop to check
    /// against the node and apply.
    pub push: mpsc::Sender<PushRequest>,
    /// The CNI plugin's calls, checked field by field.
    pub cni: mpsc::Sender<cni::Request>,
    /// Changes after each reconcile, for watchers.
    pub changes: broadcast::Sender<pb::Change>,
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

type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::Change, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_server::Node for Service {
    type WatchStream = ChangeStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        require_root(&req)?;
        // Subscribe first, so nothing between the snapshot and the stream is
        // missed (a change may then arrive twice, as ADDED and UPDATED).
        let live = BroadcastStream::new(self.changes.subscribe()).map(|c| {
            c.map_err(|e| Status::data_loss(format!("watcher fell behind: {e}; watch again")))
        });
        let snapshot: Vec<Result<pb::Change, Status>> = self
            .view
            .read()
            .expect("view lock")
            .pods
            .values()
            .map(|pod| {
                Ok(pb::Change {
                    kind: pb::change::Kind::Added as i32,
                    pod: Some(pod.to_pb()),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(
            tokio_stream::iter(snapshot).chain(live),
        )))
    }

    async fn push_cgroup(
        &self,
        req: Request<pb::PushCgroupRequest>,
    ) -> Result<Response<pb::PushCgroupResponse>, Status> {
        require_root(&req)?;
        let entry = pushed(req.into_inner())?;
        let (reply, answer) = oneshot::channel();
        self.push
            .send(PushRequest { entry, reply })
            .await
            .map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())??;
        Ok(Response::new(pb::PushCgroupResponse {}))
    }

    async fn cni_add(
        &self,
        req: Request<pb::CniAddRequest>,
    ) -> Result<Response<pb::CniAddResponse>, Status> {
        require_root(&req)?;
        let (uid, sandbox, timeout) = cni::cni_sandbox(req.into_inner())?;
        let (reply, answer) = oneshot::channel();
        let request = cni::Request::Add {
            uid,
            sandbox,
            deadline: tokio::time::Instant::now() + timeout,
            reply,
        };
        self.cni.send(request).await.map_err(|_| stopping())?;
        Ok(Response::new(answer.await.map_err(|_| stopping())??))
    }

    async fn cni_del(
        &self,
        req: Request<pb::CniDelRequest>,
    ) -> Result<Response<pb::CniDelResponse>, Status> {
        require_root(&req)?;
        let sandbox = req
            .into_inner()
            .sandbox
            .ok_or_else(|| Status::invalid_argument("sandbox: missing"))?;
        if sandbox.uid.is_empty() {
            return Err(Status::invalid_argument("sandbox.uid: must not be empty"));
        }
        let (reply, answer) = oneshot::channel();
        let request = cni::Request::Del {
            uid: PodUid::new(sandbox.uid),
            container_id: sandbox.container_id,
            reply,
        };
        self.cni.send(request).await.map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())?;
        Ok(Response::new(pb::CniDelResponse {}))
    }

    async fn cni_check(
        &self,
        req: Request<pb::CniCheckRequest>,
    ) -> Result<Response<pb::CniAddResponse>, Status> {
        require_root(&req)?;
        let uid = req.into_inner().uid;
        if uid.is_empty() {
            return Err(Status::invalid_argument("uid: must not be empty"));
        }
        let (reply, answer) = oneshot::channel();
        let request = cni::Request::Check {
            uid: PodUid::new(uid),
            reply,
        };
        self.cni.send(request).await.map_err(|_| stopping())?;
        Ok(Response::new(answer.await.map_err(|_| stopping())?))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        require_root(&req)?;
        // Walking maps of up to 65,536 entries: off the reactor, so the
        // ZDS server and other calls are not stalled behind it.
        let maps = self.maps.clone();
        let (counters, occupancy) =
            tokio::task::spawn_blocking(move || (maps.counters(), maps.occupancy()))
                .await
                .map_err(|e| Status::internal(format!("reading the maps: {e}")))?;
        let counters = counters
            .map_err(|e| Status::internal(format!("reading counters: {e:#}")))?
            .into_iter()
            .map(|(c, value)| pb::Counter {
                name: c.name().to_string(),
                value,
            })
            .collect();
        let map_entries = occupancy
            .into_iter()
            .map(|(name, n)| pb::Counter {
                name: name.to_string(),
                value: n as u64,
            })
            .collect();
        let (state_loaded, pods, enrolled, ztunnels, unresolved) = {
            let view = self.view.read().expect("view lock");
            let enrolled = view
                .pods
                .values()
                .filter(|p| p.spec.mode == crate::node::spec::Mode::Ambient)
                .count();
            (
                view.state_loaded,
                view.pods.len() as u32,
                enrolled as u32,
                view.ztunnels,
                view.unresolved,
            )
        };
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            cgroup_root: self.cgroup_root.display().to_string(),
            bpffs: self.pins.root().display().to_string(),
            state_loaded,
            pods,
            enrolled,
            ztunnels,
            unresolved,
            original_src: pb::OriginalSrc::from(self.settings.original_src).into(),
            sockmap: self.settings.sockmap,
            counters,
            map_entries,
            zds: self.reports.zds.as_ref().map(|z| pb::ZdsStatus {
                connections: z.connections(),
                peers_refused: z.refused(),
            }),
            ready: self.reports.health.ready(),
            components: self
                .reports
                .health
                .components()
                .into_iter()
                .map(|(component, health)| pb::ComponentStatus {
                    name: component.name().into(),
                    state: pb::ComponentState::from(&health.state).into(),
                    last_error: health.last_error.unwrap_or_default(),
                    restarts: health.restarts,
                    since_unix_seconds: health
                        .since
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                })
                .collect(),
            monitoring_address: self
                .reports
                .monitoring
                .map(|a| a.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn list_pods(
        &self,
        req: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        require_root(&req)?;
        let pods = self
            .view
            .read()
            .expect("view lock")
            .pods
            .values()
            .map(view::PodRow::to_pb)
            .collect();
        Ok(Response::new(pb::ListPodsResponse { pods }))
    }
}

/// How many requests one client connection may have open at once (HTTP/2
/// `SETTINGS_MAX_CONCURRENT_STREAMS`). The CLI makes one call per
/// connection and a watcher holds one stream, so this only bounds what a
/// runaway client can pile onto the daemon through one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Serves the API on `socket` until the task is dropped. The socket is mode
/// 0600 from the moment it exists ([`crate::local_socket`]); a stale
/// socket file from an earlier run is replaced.
/// Binds the API socket at `socket` (mode 0600 from the start), so that it
/// exists before the daemon says it is ready. Call within the runtime.
pub fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    crate::local_socket::bind_private(socket, |path| {
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    })
    .map_err(Into::into)
}

/// What the API reports from, besides the view and the channels.
#[derive(Clone)]
pub struct Context {
    pub view: SharedView,
    pub settings: Settings,
    pub cgroup_root: PathBuf,
    pub pins: Pins,
    /// The datapath's maps, for reading.
    pub maps: Arc<datapath::ReadOnly>,
    pub reports: Reports,
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    context: Context,
    channels: Channels,
) -> anyhow::Result<()> {
    let Context {
        view,
        settings,
        cgroup_root,
        pins,
        maps,
        reports,
    } = context;
    let health = reports.health.clone();
    let node = Service {
        view,
        settings,
        cgroup_root,
        pins,
        maps,
        push: channels.push,
        cni: channels.cni,
        changes: channels.changes,
        reports,
    };
    health.running(Component::Api);
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(pb::node_server::NodeServer::new(node))
        .serve_with_incoming(accepted(listener, health))
        .await
        .context("serving the API")
}

/// The connections accepted on `listener`. A failed `accept` (out of file
/// descriptors, say) marks the API failed and is retried with
/// [`Policy::ACCEPT`] backoff: the server would otherwise try again at
/// once, forever.
fn accepted(
    listener: UnixListener,
    health: Health,
) -> impl Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    let state = (listener, health, Backoff::new(Policy::ACCEPT));
    futures::stream::unfold(state, |(listener, health, mut backoff)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    backoff.reset();
                    health.running(Component::Api);
                    return Some((Ok(stream), (listener, health, backoff)));
                }
                Err(e) => {
                    let wait = backoff.failed(std::time::Duration::ZERO);
                    tracing::warn!(
                        retry_in_ms = wait.as_millis() as u64,
                        "accept on the API socket failed: {e}"
                    );
                    health.failed(Component::Api, format!("accept on the API socket: {e}"));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    })
}
