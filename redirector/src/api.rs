//! The local API, `ambridge.v1`, on a unix socket only root can use: the
//! socket file is mode 0600 from the moment it exists, and every call checks
//! the caller's credentials (`SO_PEERCRED`) as well. One connection may
//! hold at most [`MAX_STREAMS_PER_CONNECTION`] requests at once.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use tokio::{
    net::UnixListener,
    sync::{broadcast, mpsc, oneshot},
};
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use ambridge_common::flags;

use crate::{
    cni::source as cni,
    datapath::{self, Pins},
    reconcile::Desired,
    state::{Mode, NodeSpec, OriginalSrc, PodCgroup, PodSpec, Settings},
    supervise::{Backoff, Component, Health, Policy},
    types::{CgroupId, PodUid},
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
    let mut problems: BTreeMap<&PodUid, Vec<&str>> = BTreeMap::new();
    for u in &desired.unresolved {
        if let Some(uid) = &u.uid {
            problems.entry(uid).or_default().push(&u.error);
        }
    }
    let pods = spec
        .pods
        .iter()
        .map(|pod| {
            let placed = desired.placed.get(&pod.uid);
            let entry = placed.and_then(|(_, id)| desired.cgroups.get(id));
            let problem = problems
                .get(&pod.uid)
                .map(|p| p.join("; "))
                .unwrap_or_default();
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
                held: entry.is_some_and(|e| e.flags & flags::HELD != 0),
                inbound: inbound_state(pod, spec, desired).into(),
                dns_captured: entry.is_some_and(|e| e.flags & flags::DNS_CAPTURE != 0),
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

/// Where a pod's inbound capture stands (see `Pod.inbound` in the proto).
fn inbound_state(pod: &PodSpec, spec: &NodeSpec, desired: &Desired) -> &'static str {
    if pod.mode != Mode::Ambient || spec.redirect.is_some() {
        "none"
    } else if !pod.capture.inbound {
        "bypassed"
    } else if desired
        .pod_netns
        .get(&pod.uid)
        .is_some_and(|n| desired.inbound_netns.contains(n))
    {
        "captured"
    } else {
        "waiting"
    }
}

/// What changed between two views, pod by pod (by UID).
pub fn changes(old: &View, new: &View) -> Vec<pb::Change> {
    use pb::change::Kind;
    let before: BTreeMap<&str, &pb::Pod> = old.pods.iter().map(|p| (p.uid.as_str(), p)).collect();
    let after: BTreeMap<&str, &pb::Pod> = new.pods.iter().map(|p| (p.uid.as_str(), p)).collect();
    let mut out = Vec::new();
    for (uid, pod) in &after {
        let kind = match before.get(uid) {
            None => Kind::Added,
            Some(was) if was != pod => Kind::Updated,
            Some(_) => continue,
        };
        out.push(pb::Change {
            kind: kind as i32,
            pod: Some((*pod).clone()),
        });
    }
    for (uid, pod) in &before {
        if !after.contains_key(uid) {
            out.push(pb::Change {
                kind: Kind::Removed as i32,
                pod: Some((*pod).clone()),
            });
        }
    }
    out
}

/// An entry pushed by an external agent, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pushed {
    Pod(PodSpec),
    RemovePod(PodUid),
    Ztunnel { cgroup: PathBuf, zero_copy: bool },
    RemoveZtunnel(PathBuf),
}

fn stopping() -> Status {
    Status::unavailable("the daemon is stopping")
}

/// The longest an ADD may ask to wait.
pub const CNI_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Checks an ADD; errors name the offending field. Public for the fuzz
/// target, which feeds it what the plugin builds from a runtime's input.
pub fn cni_sandbox(
    req: pb::CniAddRequest,
) -> Result<(PodUid, cni::Sandbox, std::time::Duration), Status> {
    let sandbox = req
        .sandbox
        .ok_or_else(|| invalid("sandbox", "missing".into()))?;
    for (field, value) in [
        ("sandbox.uid", &sandbox.uid),
        ("sandbox.namespace", &sandbox.namespace),
        ("sandbox.name", &sandbox.name),
        ("sandbox.container_id", &sandbox.container_id),
    ] {
        if value.is_empty() {
            return Err(invalid(field, "must not be empty".into()));
        }
    }
    let netns = PathBuf::from(&req.netns);
    if !netns.is_absolute() {
        return Err(invalid(
            "netns",
            format!("{:?} is not an absolute path", req.netns),
        ));
    }
    let ips = req
        .ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            ip.parse::<IpAddr>()
                .map_err(|e| invalid(&format!("ips[{i}]"), format!("{ip:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = std::time::Duration::from_millis(req.timeout_ms.into());
    if timeout.is_zero() || timeout > CNI_MAX_WAIT {
        return Err(invalid(
            "timeout_ms",
            format!(
                "{} is not between 1 and {}",
                req.timeout_ms,
                CNI_MAX_WAIT.as_millis()
            ),
        ));
    }
    Ok((
        PodUid(sandbox.uid),
        cni::Sandbox {
            namespace: sandbox.namespace,
            name: sandbox.name,
            container_id: sandbox.container_id,
            netns,
            ips,
        },
        timeout,
    ))
}

fn invalid(field: &str, message: String) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// Checks a push request; errors name the offending field.
pub fn pushed(req: pb::PushCgroupRequest) -> Result<Pushed, Status> {
    let cgroup_path = |field: &str, raw: &str| -> Result<Option<PathBuf>, Status> {
        if raw.is_empty() {
            return Ok(None);
        }
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(invalid(field, format!("{raw:?} is not an absolute path")));
        }
        // `..` would let a path name a cgroup other than the one it spells,
        // out of reach of the checks of [`refuse_containing`].
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(invalid(field, format!("{raw:?} must not contain `..`")));
        }
        Ok(Some(path))
    };
    match req.entry {
        None => Err(invalid("entry", "give a pod or a ztunnel".into())),
        Some(pb::push_cgroup_request::Entry::Pod(p)) => {
            if p.uid.is_empty() {
                return Err(invalid("pod.uid", "must not be empty".into()));
            }
            if req.remove {
                return Ok(Pushed::RemovePod(PodUid(p.uid)));
            }
            let cgroup = cgroup_path("pod.cgroup", &p.cgroup)?;
            if cgroup.is_none() && !crate::cgroup::is_pod_uid(&p.uid) {
                return Err(invalid(
                    "pod.uid",
                    format!("{:?} is not a Kubernetes pod UID; give pod.cgroup", p.uid),
                ));
            }
            let ips = p
                .ips
                .iter()
                .map(|ip| {
                    ip.parse::<IpAddr>()
                        .map_err(|e| invalid("pod.ips", format!("{ip:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mode = match p.mode.as_str() {
                "ambient" => Mode::Ambient,
                "none" => Mode::None,
                other => {
                    return Err(invalid(
                        "pod.mode",
                        format!("{other:?}: expected \"ambient\" or \"none\""),
                    ));
                }
            };
            Ok(Pushed::Pod(PodSpec {
                uid: PodUid(p.uid),
                name: p.name,
                namespace: p.namespace,
                service_account: crate::state::service_account_or_default(Some(p.service_account)),
                cgroup: cgroup.map_or(PodCgroup::Uid, PodCgroup::Path),
                netns: None,
                ips,
                mode,
                accelerate: None,
                capture: Default::default(),
            }))
        }
        Some(pb::push_cgroup_request::Entry::Ztunnel(z)) => {
            let cgroup = cgroup_path("ztunnel.cgroup", &z.cgroup)?
                .ok_or_else(|| invalid("ztunnel.cgroup", "must not be empty".into()))?;
            Ok(if req.remove {
                Pushed::RemoveZtunnel(cgroup)
            } else {
                Pushed::Ztunnel {
                    cgroup,
                    zero_copy: z.zero_copy,
                }
            })
        }
    }
}

/// A pod of the node state on the cgroup the last reconcile found for it:
/// what a pushed cgroup must not contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedPod {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    pub cgroup: PathBuf,
}

/// A directory that holds pods and is never one pod, with what it is: the
/// cgroup the programs attach to, the kubepods parent, the kubelet's
/// `kubepods` and QoS directories.
pub type PodParent = (PathBuf, &'static str);

/// The directories of [`PodParent`] for a daemon attached at `cgroup_root`
/// whose kubelet cgroups live under `kubepods_parent`.
pub fn pod_parents(cgroup_root: &Path, kubepods_parent: &Path) -> Vec<PodParent> {
    let mut dirs = vec![
        (
            cgroup_root.to_path_buf(),
            "the cgroup the programs attach to",
        ),
        (kubepods_parent.to_path_buf(), "the kubepods parent"),
    ];
    dirs.extend(
        crate::cgroup::kubelet_pod_dirs(kubepods_parent)
            .into_iter()
            .map(|d| (d, "the kubelet's pod directory")),
    );
    dirs
}

/// Refuses a push whose cgroup is not a pod-level cgroup of its own: one
/// that is, or is an ancestor of, another pod's cgroup in `placed`, or of a
/// directory of `parents`. A ztunnel cgroup there would exempt every pod
/// below it from capture, and a pod's entry would be taken by every pod
/// below it that has none. Cgroups are compared by id (`id_of`, `None` for
/// a path that is not a cgroup), so another mount of cgroup2 does not
/// hide one, and by path, for a cgroup not created yet. A pushed pod may
/// share its cgroup with the pod of the same UID it replaces.
pub fn refuse_containing(
    entry: &Pushed,
    placed: &[PlacedPod],
    parents: &[PodParent],
    id_of: &mut dyn FnMut(&Path) -> Option<CgroupId>,
) -> Result<(), Status> {
    let (field, pushed, uid) = match entry {
        Pushed::Ztunnel { cgroup, .. } => ("ztunnel.cgroup", cgroup, None),
        Pushed::Pod(PodSpec {
            cgroup: PodCgroup::Path(cgroup),
            uid,
            ..
        }) => ("pod.cgroup", cgroup, Some(uid)),
        _ => return Ok(()),
    };
    let mut ids: HashMap<PathBuf, Option<CgroupId>> = HashMap::new();
    let mut id = |path: &Path| *ids.entry(path.to_path_buf()).or_insert_with(|| id_of(path));
    let pushed_id = id(pushed);
    let mut is_pushed =
        |path: &Path| path == pushed || (pushed_id.is_some() && id(path) == pushed_id);
    for pod in placed.iter().filter(|p| Some(&p.uid) != uid) {
        if let Some(depth) = pod.cgroup.ancestors().position(&mut is_pushed) {
            let relation = if depth == 0 { "is" } else { "contains" };
            return Err(invalid(
                field,
                format!(
                    "{} {relation} the cgroup of pod {}/{} ({}, cgroup {}): push a pod-level cgroup that holds no other pod",
                    pushed.display(),
                    pod.namespace,
                    pod.name,
                    pod.uid,
                    pod.cgroup.display()
                ),
            ));
        }
    }
    for (dir, what) in parents {
        if dir.ancestors().any(&mut is_pushed) {
            return Err(invalid(
                field,
                format!(
                    "{} is or contains {what} {}: not a pod-level cgroup",
                    pushed.display(),
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A push checked field by field, and where the daemon answers it once it
/// has checked it against the node and applied it (or refused it).
pub struct PushRequest {
    pub entry: Pushed,
    pub reply: oneshot::Sender<Result<(), Status>>,
}

/// The view shared between the reconcile loop (writer) and the API.
pub type SharedView = Arc<RwLock<View>>;

struct Node {
    view: SharedView,
    settings: Settings,
    cgroup_root: PathBuf,
    pins: Pins,
    push: mpsc::Sender<PushRequest>,
    cni: mpsc::Sender<cni::Request>,
    changes: broadcast::Sender<pb::Change>,
    reports: Reports,
}

/// What the daemon's parts report, for `Status`.
#[derive(Clone, Debug, Default)]
pub struct Reports {
    /// With `--zds serve`: the ZDS server's connections and refusals.
    pub zds: Option<Arc<crate::zds::server::Stats>>,
    /// The supervised components and readiness.
    pub health: Health,
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
impl pb::node_server::Node for Node {
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
            .iter()
            .map(|pod| {
                Ok(pb::Change {
                    kind: pb::change::Kind::Added as i32,
                    pod: Some(pod.clone()),
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
        let (uid, sandbox, timeout) = cni_sandbox(req.into_inner())?;
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
            .ok_or_else(|| invalid("sandbox", "missing".into()))?;
        if sandbox.uid.is_empty() {
            return Err(invalid("sandbox.uid", "must not be empty".into()));
        }
        let (reply, answer) = oneshot::channel();
        let request = cni::Request::Del {
            uid: PodUid(sandbox.uid),
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
            return Err(invalid("uid", "must not be empty".into()));
        }
        let (reply, answer) = oneshot::channel();
        let request = cni::Request::Check {
            uid: PodUid(uid),
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
        let counters = datapath::read_counters(&self.pins)
            .map_err(|e| Status::internal(format!("reading counters: {e:#}")))?
            .into_iter()
            .map(|(c, value)| pb::Counter {
                name: c.name().to_string(),
                value,
            })
            .collect();
        let map_entries = datapath::map_occupancy(&self.pins)
            .map_err(|e| Status::internal(format!("reading maps: {e:#}")))?
            .into_iter()
            .map(|(name, n)| pb::Counter {
                name: name.to_string(),
                value: n as u64,
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
                    state: health.state.name().into(),
                    last_error: health.last_error.unwrap_or_default(),
                    restarts: health.restarts,
                    since_unix_seconds: health
                        .since
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                })
                .collect(),
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

pub async fn serve(
    listener: UnixListener,
    view: SharedView,
    channels: Channels,
    settings: Settings,
    cgroup_root: PathBuf,
    pins: Pins,
    reports: Reports,
) -> anyhow::Result<()> {
    let health = reports.health.clone();
    let node = Node {
        view,
        settings,
        cgroup_root,
        pins,
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

/// Where `ambridge run` serves the API unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ambridge/api.sock";

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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, in_datapath: bool) -> pb::Pod {
        pb::Pod {
            uid: uid.into(),
            in_datapath,
            ..pb::Pod::default()
        }
    }

    fn view(pods: Vec<pb::Pod>) -> View {
        View {
            pods,
            ..View::default()
        }
    }

    #[test]
    fn changes_name_every_added_updated_and_removed_pod_once() {
        use pb::change::Kind;
        let old = view(vec![pod("a", true), pod("b", false), pod("c", true)]);
        let new = view(vec![pod("a", true), pod("b", true), pod("d", false)]);
        let got: Vec<(i32, String)> = changes(&old, &new)
            .into_iter()
            .map(|c| (c.kind, c.pod.unwrap().uid))
            .collect();
        assert_eq!(
            got,
            vec![
                (Kind::Updated as i32, "b".into()),
                (Kind::Added as i32, "d".into()),
                (Kind::Removed as i32, "c".into()),
            ]
        );
        assert!(changes(&new, &new).is_empty());
    }

    fn push_pod(p: pb::PushedPod, remove: bool) -> Result<Pushed, Status> {
        pushed(pb::PushCgroupRequest {
            entry: Some(pb::push_cgroup_request::Entry::Pod(p)),
            remove,
        })
    }

    #[test]
    fn a_pushed_pod_is_validated_field_by_field() {
        let good = pb::PushedPod {
            uid: "u1".into(),
            namespace: "default".into(),
            name: "sleep".into(),
            cgroup: "/sys/fs/cgroup/x".into(),
            ips: vec!["198.18.0.2".into()],
            mode: "ambient".into(),
            service_account: String::new(),
        };
        assert!(
            matches!(push_pod(good.clone(), false), Ok(Pushed::Pod(p)) if p.mode == Mode::Ambient)
        );
        for (bad, field) in [
            (
                pb::PushedPod {
                    mode: "sidecar".into(),
                    ..good.clone()
                },
                "pod.mode",
            ),
            (
                pb::PushedPod {
                    ips: vec!["300.1.1.1".into()],
                    ..good.clone()
                },
                "pod.ips",
            ),
            (
                pb::PushedPod {
                    cgroup: "relative".into(),
                    ..good.clone()
                },
                "pod.cgroup",
            ),
            (
                pb::PushedPod {
                    cgroup: String::new(),
                    ..good.clone()
                },
                "pod.uid",
            ),
            (
                pb::PushedPod {
                    uid: String::new(),
                    ..good.clone()
                },
                "pod.uid",
            ),
        ] {
            let err = push_pod(bad, false).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().starts_with(field),
                "{field}: {}",
                err.message()
            );
        }
        assert_eq!(
            push_pod(good, true).unwrap(),
            Pushed::RemovePod(PodUid("u1".into()))
        );
    }

    #[test]
    fn a_pushed_cgroup_with_dotdot_is_refused() {
        let err = pushed(pb::PushCgroupRequest {
            entry: Some(pb::push_cgroup_request::Entry::Ztunnel(pb::PushedZtunnel {
                cgroup: "/sys/fs/cgroup/kubepods/pod1/../..".into(),
                zero_copy: false,
            })),
            remove: false,
        })
        .unwrap_err();
        assert!(
            err.message().starts_with("ztunnel.cgroup"),
            "{}",
            err.message()
        );
        assert!(err.message().contains("`..`"), "{}", err.message());
    }

    fn placed(uid: &str, cgroup: &str) -> PlacedPod {
        PlacedPod {
            uid: PodUid(uid.into()),
            namespace: "default".into(),
            name: format!("pod-{uid}"),
            cgroup: cgroup.into(),
        }
    }

    /// Cgroup ids by path: `/cg` is the cgroup2 mount, `/alias` another
    /// mount of it; anything else is not a cgroup.
    fn fake_id(path: &Path) -> Option<CgroupId> {
        let inside = path
            .strip_prefix("/cg")
            .or_else(|_| path.strip_prefix("/alias"))
            .ok()?;
        let hash = inside
            .to_str()?
            .bytes()
            .fold(1u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        Some(CgroupId(hash))
    }

    fn ztunnel(path: &str) -> Pushed {
        Pushed::Ztunnel {
            cgroup: path.into(),
            zero_copy: false,
        }
    }

    fn pod_at(uid: &str, path: &str) -> Pushed {
        Pushed::Pod(PodSpec {
            uid: PodUid(uid.into()),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            cgroup: PodCgroup::Path(path.into()),
            netns: None,
            ips: vec![],
            mode: Mode::None,
            accelerate: None,
            capture: Default::default(),
        })
    }

    #[test]
    fn a_pushed_cgroup_that_is_or_holds_another_pods_is_refused_naming_both() {
        let pods = [placed("a", "/cg/kubepods/burstable/poda")];
        let parents = pod_parents(Path::new("/cg"), Path::new("/cg"));
        let check = |entry: &Pushed| refuse_containing(entry, &pods, &parents, &mut fake_id);
        for (entry, field, relation) in [
            (
                ztunnel("/cg/kubepods/burstable"),
                "ztunnel.cgroup",
                "contains",
            ),
            (
                ztunnel("/cg/kubepods/burstable/poda"),
                "ztunnel.cgroup",
                "is",
            ),
            // Another mount of cgroup2 names the same cgroups.
            (
                ztunnel("/alias/kubepods/burstable"),
                "ztunnel.cgroup",
                "contains",
            ),
            (pod_at("b", "/cg/kubepods"), "pod.cgroup", "contains"),
            (
                pod_at("b", "/cg/kubepods/burstable/poda"),
                "pod.cgroup",
                "is",
            ),
        ] {
            let err = check(&entry).unwrap_err();
            let message = err.message();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(message.starts_with(field), "{message}");
            assert!(
                message.contains(&format!("{relation} the cgroup of pod default/pod-a (a")),
                "{message}"
            );
        }
        // ztunnel's own pod-level cgroup, a ztunnel nested under a pod, and
        // the pod itself pushed again under its UID are fine.
        for entry in [
            ztunnel("/cg/kubepods/burstable/podz"),
            ztunnel("/cg/kubepods/burstable/poda/ztunnel"),
            pod_at("a", "/cg/kubepods/burstable/poda"),
            Pushed::RemoveZtunnel("/cg".into()),
        ] {
            assert!(check(&entry).is_ok(), "{entry:?}");
        }
    }

    #[test]
    fn the_kubelets_pod_directories_are_refused_even_with_no_pod_in_them() {
        let parents = pod_parents(Path::new("/cg/node"), Path::new("/cg"));
        for (path, what) in [
            ("/cg/kubepods.slice", "kubelet's pod directory"),
            ("/cg/kubepods/besteffort", "kubelet's pod directory"),
            ("/cg", "the cgroup the programs attach to"),
            ("/cg/node", "the cgroup the programs attach to"),
        ] {
            let err = refuse_containing(&ztunnel(path), &[], &parents, &mut fake_id).unwrap_err();
            assert!(err.message().contains(what), "{path}: {}", err.message());
        }
    }

    #[test]
    fn a_push_without_an_entry_is_refused() {
        let err = pushed(pb::PushCgroupRequest::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
