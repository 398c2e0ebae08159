//! The ZDS server (`--zds serve`): ztunnel connects, says hello, and is
//! handed every enrolled pod's network namespace, one acknowledged request
//! at a time, then the pods that come and go.
//!
//! Each connection runs as its own task. Adds go to the newest connection
//! only (a new ztunnel takes over during an upgrade while the old one keeps
//! serving what it has), Dels to every connection. A pod is *ready* once
//! some connection acknowledged its Add; the daemon holds (refuses the
//! connects of) enrolled pods that are not. A NACKed Add is retried with
//! backoff. A connection that sends something that is not ZDS, or goes
//! silent, is closed with an error naming why; the others carry on.
//!
//! A snapshot ends (SnapshotSent, after which ztunnel drops every pod it
//! was not given) only once the daemon's pods are complete: every source
//! has delivered since the daemon started. Until then ztunnel is given
//! the pods known so far and those that come, and keeps serving the ones
//! an earlier daemon gave it, as the pinned state keeps them captured.
//!
//! Only ztunnel may connect: the socket is root-only, and a peer whose
//! process (`SO_PEERCRED`) is not in a ztunnel cgroup the node state names
//! (or one below it, a container's) is refused before anything is read or
//! sent, so no other process is handed a pod's netns or can mark a pod
//! ready.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, socket,
};
use tokio::{io::unix::AsyncFd, sync::watch, time::Instant};
use tracing::{info, warn};

use super::wire::{self, Ack, Request, WireError, ZdsConn};
use crate::{
    host::cgroup,
    host::netns,
    supervise::{Backoff, Component, Health, Policy},
    types::{CgroupId, NetnsCookie, WorkloadId},
};

/// How long ztunnel may take to answer a request (or to say hello).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before re-sending a NACKed Add; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// A pod ztunnel should capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZdsPod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod-level cgroup; its processes lead to the pod's netns.
    pub cgroup: Arc<Path>,
    /// The pod's netns file, where a source named it (the CNI plugin):
    /// opened instead of going through the cgroup's processes.
    pub netns_file: Option<PathBuf>,
    /// The pod's netns as the daemon last found it (`None` while it is not
    /// known): a new cookie is a recreated sandbox, to be added again.
    pub netns: Option<NetnsCookie>,
}

/// The pods ztunnel should capture, by workload id (a Kubernetes pod UID,
/// or istiod's name for a workload it describes), which is ZDS's `uid`.
pub type Pods = BTreeMap<WorkloadId, ZdsPod>;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("ZDS: {0}")]
    Bind(#[from] crate::local_socket::BindError),
    #[error("{call} for the ZDS socket {path}: {source}")]
    Socket {
        call: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The ztunnel cgroups of the node state, as the last reconcile found them;
/// `None` until the first one.
pub type ZtunnelCgroups = Option<BTreeSet<CgroupId>>;

/// What the server reports to the local API.
#[derive(Debug, Default)]
pub struct Stats {
    /// ztunnel connections past their hello.
    connections: AtomicU64,
    /// Peers refused for not being (provably) ztunnel.
    refused: AtomicU64,
}

impl Stats {
    /// ztunnel connections past their hello.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Peers refused since the daemon started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Who connected, as read when the connection was accepted.
#[derive(Debug)]
struct Peer {
    pid: i32,
    /// Its cgroup, relative to the cgroup2 mount.
    cgroup: PathBuf,
    /// The ids of that cgroup and of every cgroup above it.
    lineage: Vec<CgroupId>,
}

/// Why a peer was refused.
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("its credentials (SO_PEERCRED) cannot be read: {0}")]
    Credentials(nix::Error),
    #[error("its process is in another PID namespace (SO_PEERCRED pid 0)")]
    NoPid,
    #[error("the cgroup of its process (pid {pid}) cannot be read: {source}")]
    Cgroup { pid: i32, source: std::io::Error },
    #[error(
        "its process (pid {pid}) is in cgroup /{cgroup}, which is not a ztunnel cgroup of the node state (nor below one)"
    )]
    NotZtunnel { pid: i32, cgroup: String },
    #[error(
        "no node state names a ztunnel cgroup yet (waited {0:?}); its process (pid {pid}) is in cgroup /{cgroup}",
        pid = .1.pid, cgroup = .1.cgroup.display()
    )]
    NoState(Duration, Peer),
}

impl PeerError {
    /// The peer's pid, when it is known.
    fn pid(&self) -> Option<i32> {
        match self {
            PeerError::Credentials(_) | PeerError::NoPid => None,
            PeerError::Cgroup { pid, .. } | PeerError::NotZtunnel { pid, .. } => Some(*pid),
            PeerError::NoState(_, peer) => Some(peer.pid),
        }
    }
}

/// Reads who is at the other end of `fd`: its process, and that process's
/// cgroup under the cgroup2 `mount`. Done at once on accept, while the
/// process that connected is most likely still the one with that pid.
fn identify(fd: &OwnedFd, mount: &Path) -> Result<Peer, PeerError> {
    let cred = nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(PeerError::Credentials)?;
    let pid = cred.pid();
    if pid <= 0 {
        return Err(PeerError::NoPid);
    }
    let found = cgroup::cgroup_of_pid(pid as u32).and_then(|cgroup| {
        let lineage = cgroup::lineage(mount, &cgroup)?;
        Ok((cgroup, lineage))
    });
    let (cgroup, lineage) = found.map_err(|source| PeerError::Cgroup { pid, source })?;
    Ok(Peer {
        pid,
        cgroup,
        lineage,
    })
}

/// Admits `peer` if its cgroup is, or is below, a ztunnel cgroup of the
/// node state, waiting up to [`ANSWER_TIMEOUT`] for the first node state.
async fn admit(
    peer: Peer,
    ztunnels: &mut watch::Receiver<ZtunnelCgroups>,
) -> Result<Peer, PeerError> {
    let known = tokio::time::timeout(ANSWER_TIMEOUT, ztunnels.wait_for(Option::is_some)).await;
    let known = match known {
        Ok(Ok(known)) => known.clone().unwrap_or_default(),
        _ => return Err(PeerError::NoState(ANSWER_TIMEOUT, peer)),
    };
    if peer.lineage.iter().any(|id| known.contains(id)) {
        Ok(peer)
    } else {
        Err(PeerError::NotZtunnel {
            pid: peer.pid,
            cgroup: peer.cgroup.display().to_string(),
        })
    }
}

/// Why one ztunnel connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("ztunnel closed the connection")]
    Closed,
    #[error("ztunnel did not answer within {0:?}")]
    Timeout(Duration),
    #[error("ztunnel refused SnapshotSent: {0}")]
    SnapshotRefused(String),
    #[error("ztunnel sent a {0}-byte datagram that answers no request")]
    Unasked(usize),
}

/// What ztunnel has acknowledged, as the server publishes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acknowledged {
    /// The pods acknowledged by live connections, and by those that ended
    /// since the last snapshot.
    pub pods: BTreeSet<WorkloadId>,
    /// Whether a snapshot has ended since the daemon started. Until then
    /// `pods` is only what this daemon handed over: ztunnel may still serve
    /// pods an earlier daemon gave it.
    pub snapshot_taken: bool,
}

/// Which pods ztunnel has, as far as the server knows.
#[derive(Default)]
struct Acked {
    /// By live connection.
    by_conn: BTreeMap<u64, BTreeSet<WorkloadId>>,
    /// Those of connections that ended since the last snapshot. ztunnel
    /// keeps serving its pods while it reconnects (and a ztunnel that is
    /// gone has no listener anyway), so they stay ready until a new
    /// snapshot says which pods ztunnel has.
    departed: BTreeSet<WorkloadId>,
    /// Whether any connection completed a snapshot since the daemon
    /// started.
    snapshot_seen: bool,
}

impl Acked {
    fn ready(&self) -> Acknowledged {
        Acknowledged {
            pods: self
                .by_conn
                .values()
                .flatten()
                .chain(&self.departed)
                .cloned()
                .collect(),
            snapshot_taken: self.snapshot_seen,
        }
    }
}

/// What the connections share: which pods each has acknowledged, and the
/// newest connection's number.
struct Shared {
    acked: Mutex<Acked>,
    ready: watch::Sender<Acknowledged>,
    /// Connections past their hello.
    live: Mutex<BTreeSet<u64>>,
    newest: watch::Sender<u64>,
    stats: Arc<Stats>,
}

impl Shared {
    /// A connection said hello: it is the newest ztunnel, the one new pods
    /// go to.
    fn joined(&self, conn: u64) {
        let mut live = self.live.lock().expect("live lock");
        live.insert(conn);
        self.stats
            .connections
            .store(live.len() as u64, Ordering::Relaxed);
        self.newest.send_replace(conn);
    }

    /// A connection ended: its pods count as departed (see [`Acked`]), and
    /// if it was the newest, the newest one left takes over.
    fn left(&self, conn: u64) {
        self.update(|acked| {
            if let Some(pods) = acked.by_conn.remove(&conn) {
                acked.departed.extend(pods);
            }
        });
        let mut live = self.live.lock().expect("live lock");
        live.remove(&conn);
        self.stats
            .connections
            .store(live.len() as u64, Ordering::Relaxed);
        let fallback = live.last().copied().unwrap_or(0);
        self.newest.send_if_modified(|newest| {
            let was = *newest == conn;
            if was {
                *newest = fallback;
            }
            was
        });
    }

    /// A connection's snapshot is complete: what it acknowledged is now the
    /// word on the pods of departed connections too.
    fn snapshot_taken(&self, conn: u64, pods: &BTreeSet<WorkloadId>) {
        self.update(|acked| {
            acked.by_conn.insert(conn, pods.clone());
            acked.departed.clear();
            acked.snapshot_seen = true;
        });
    }

    /// A connection's acknowledged pods changed.
    fn publish(&self, conn: u64, pods: &BTreeSet<WorkloadId>) {
        self.update(|acked| {
            acked.by_conn.insert(conn, pods.clone());
        });
    }

    /// Changes what is acknowledged and publishes the ready pods.
    fn update(&self, change: impl FnOnce(&mut Acked)) {
        let mut acked = self.acked.lock().expect("acked lock");
        change(&mut acked);
        let ready = acked.ready();
        self.ready.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
    }
}

/// The listening ZDS socket.
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

/// Listens on `path` (mode 0600 from the start, replacing a stale socket
/// file).
pub fn listen(path: &Path) -> Result<Listener, ServeError> {
    Ok(Listener {
        fd: listen_on(path)?,
        path: path.to_path_buf(),
    })
}

/// What the server is given by the daemon and gives back.
pub struct Links {
    /// The pods ztunnel should capture.
    pub pods: watch::Receiver<Pods>,
    /// Whether `pods` holds every source's pods: a snapshot ends only then.
    pub pods_complete: watch::Receiver<bool>,
    /// The ztunnel cgroups: only their processes may connect.
    pub ztunnels: watch::Receiver<ZtunnelCgroups>,
    /// The pods ztunnel has acknowledged.
    pub ready: watch::Sender<Acknowledged>,
    /// Connections and refused peers, for the local API.
    pub stats: Arc<Stats>,
}

/// The ZDS server: what its connections share survives a restart of its
/// accept loop on a new listener.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    pods: watch::Receiver<Pods>,
    pods_complete: watch::Receiver<bool>,
    ztunnels: watch::Receiver<ZtunnelCgroups>,
    /// The cgroup2 mount, where a peer's cgroup is looked up.
    cgroup2: PathBuf,
    health: Health,
    /// Connections accepted since the daemon started, numbering them.
    accepted: Arc<AtomicU64>,
}

impl Server {
    /// A server for the pods of `links.pods`; `cgroup2` is the cgroup2
    /// mount. It reports to `health` as [`Component::ZdsServer`].
    pub fn new(links: Links, cgroup2: PathBuf, health: Health) -> Self {
        let Links {
            pods,
            pods_complete,
            ztunnels,
            ready,
            stats,
        } = links;
        Self {
            shared: Arc::new(Shared {
                acked: Mutex::default(),
                ready,
                live: Mutex::default(),
                newest: watch::Sender::new(0),
                stats,
            }),
            pods,
            pods_complete,
            ztunnels,
            cgroup2,
            health,
            accepted: Arc::default(),
        }
    }

    /// Serves every ztunnel that connects on `listener`, until the daemon
    /// exits. A failed `accept` (out of file descriptors, say) marks the
    /// server failed and is retried with [`Policy::ACCEPT`] backoff, never
    /// at once.
    pub async fn serve(self, listener: Listener) -> Result<(), ServeError> {
        let Listener { fd: listener, path } = listener;
        info!(socket = %path.display(), "serving ZDS");
        self.health.running(Component::ZdsServer);
        let mut backoff = Backoff::new(Policy::ACCEPT);
        loop {
            let accepted = {
                let mut guard = listener
                    .readable()
                    .await
                    .map_err(|source| ServeError::Socket {
                        call: "epoll_wait",
                        path: path.clone(),
                        source,
                    })?;
                match guard.try_io(|fd| {
                    accept4(
                        std::os::fd::AsRawFd::as_raw_fd(fd.get_ref()),
                        SockFlag::SOCK_CLOEXEC,
                    )
                    .map_err(std::io::Error::from)
                }) {
                    Ok(result) => result,
                    Err(_would_block) => continue,
                }
            };
            let fd = match accepted {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(raw) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) },
                Err(e) => {
                    // The peer stays queued (the socket stays readable):
                    // trying again at once would spin.
                    let wait = backoff.failed(Duration::ZERO);
                    warn!(socket = %path.display(), retry_in_ms = wait.as_millis() as u64, "accept on the ZDS socket failed: {e}");
                    self.health.failed(
                        Component::ZdsServer,
                        format!("accept on the ZDS socket {}: {e}", path.display()),
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            backoff.reset();
            self.health.running(Component::ZdsServer);
            self.connection(fd);
        }
    }

    /// Identifies, admits and serves one accepted peer, as its own task.
    fn connection(&self, fd: OwnedFd) {
        let conn_no = self.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        let peer = identify(&fd, &self.cgroup2);
        let shared = self.shared.clone();
        let (pods, pods_complete) = (self.pods.clone(), self.pods_complete.clone());
        let mut ztunnels = self.ztunnels.clone();
        tokio::spawn(async move {
            let admitted = match peer {
                Ok(peer) => admit(peer, &mut ztunnels).await,
                Err(e) => Err(e),
            };
            let peer = match admitted {
                Ok(peer) => peer,
                Err(e) => {
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        conn = conn_no,
                        pid = e.pid(),
                        "refused a ZDS peer, closing its connection unread: {e}"
                    );
                    return;
                }
            };
            let conn = match ZdsConn::from_std(fd) {
                Ok(c) => c,
                Err(e) => {
                    warn!(conn = conn_no, "ZDS connection unusable: {e}");
                    return;
                }
            };
            info!(conn = conn_no, pid = peer.pid, cgroup = %Path::new("/").join(&peer.cgroup).display(), "ztunnel connected over ZDS");
            let result = Connection::new(conn, conn_no, shared.clone(), pods, pods_complete)
                .run()
                .await;
            shared.left(conn_no);
            match result {
                Err(ConnError::Closed) => info!(conn = conn_no, "ztunnel disconnected from ZDS"),
                Err(e) => warn!(conn = conn_no, "closing the ZDS connection: {e}"),
                Ok(()) => {}
            }
        });
    }
}

fn listen_on(path: &Path) -> Result<AsyncFd<OwnedFd>, ServeError> {
    let err = |call| {
        move |source: nix::Error| ServeError::Socket {
            call,
            path: path.to_path_buf(),
            source: source.into(),
        }
    };
    // Only root (ztunnel runs as root in its pod) may connect: the socket is
    // mode 0600 from the moment it exists.
    let fd = crate::local_socket::bind_private(path, |staged| {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(staged)?,
        )?;
        Ok(fd)
    })?;
    nix::sys::socket::listen(&fd, Backlog::new(16).expect("a valid backlog"))
        .map_err(err("listen"))?;
    // SAFETY: the fd moves into the `AsyncFd`, which owns it from now on.
    unsafe { AsyncFd::register(fd) }.map_err(|e| ServeError::Socket {
        call: "epoll_ctl",
        path: path.to_path_buf(),
        source: e.into_parts().1,
    })
}

/// A pod whose Add ztunnel refused, and when to try again.
struct Retry {
    at: Instant,
    wait: Duration,
}

/// One ztunnel connection.
struct Connection {
    conn: ZdsConn,
    no: u64,
    shared: Arc<Shared>,
    pods: watch::Receiver<Pods>,
    pods_complete: watch::Receiver<bool>,
    /// Whether this connection's snapshot has ended (SnapshotSent).
    snapshot_sent: bool,
    /// Pods this ztunnel acknowledged, with the netns it was given (`None`
    /// after a Keep). Cookies are never reused, so a recreated sandbox is
    /// always told apart.
    acked: BTreeMap<WorkloadId, Option<NetnsCookie>>,
    retries: BTreeMap<WorkloadId, Retry>,
}

impl Connection {
    fn new(
        conn: ZdsConn,
        no: u64,
        shared: Arc<Shared>,
        pods: watch::Receiver<Pods>,
        pods_complete: watch::Receiver<bool>,
    ) -> Self {
        Self {
            conn,
            no,
            shared,
            pods,
            pods_complete,
            snapshot_sent: false,
            acked: BTreeMap::new(),
            retries: BTreeMap::new(),
        }
    }

    async fn run(mut self) -> Result<(), ConnError> {
        let hello = self.answer().await?;
        wire::decode_hello(&hello)?;
        self.shared.joined(self.no);
        self.snapshot().await?;
        let mut newest = self.shared.newest.subscribe();
        loop {
            let pods = self.pods.borrow_and_update().clone();
            self.delete_gone(&pods).await?;
            if *newest.borrow_and_update() == self.no {
                self.add_new(&pods).await?;
            }
            if !self.snapshot_sent && *self.pods_complete.borrow_and_update() {
                self.end_snapshot().await?;
            }
            // Wake for a change of the pods (the daemon's reconcile finds new
            // sandboxes), of the newest ztunnel, for the pods to be complete
            // while the snapshot waits for them, or for a due retry.
            let retry = self.retries.values().map(|r| r.at).min();
            let waiting = !self.snapshot_sent;
            tokio::select! {
                changed = self.pods.changed() => if changed.is_err() { return Ok(()) },
                changed = self.pods_complete.changed(), if waiting => if changed.is_err() { return Ok(()) },
                _ = newest.changed() => {}
                _ = sleep_until(retry) => {}
                // ztunnel only ever answers requests: anything it sends
                // between them is its end of the connection, or not ZDS.
                unasked = self.conn.recv() => return match unasked? {
                    None => Err(ConnError::Closed),
                    Some(bytes) => Err(ConnError::Unasked(bytes.len())),
                },
            }
        }
    }

    /// The next datagram, within [`ANSWER_TIMEOUT`].
    async fn answer(&self) -> Result<Vec<u8>, ConnError> {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.conn.recv()).await {
            Err(_) => Err(ConnError::Timeout(ANSWER_TIMEOUT)),
            Ok(Ok(Some(bytes))) => Ok(bytes),
            Ok(Ok(None)) => Err(ConnError::Closed),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Sends one request and waits for ztunnel's answer.
    async fn request(
        &self,
        request: &Request,
        netns: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Ack, ConnError> {
        self.conn.send(request, netns).await?;
        Ok(wire::decode_ack(&self.answer().await?)?)
    }

    /// Every pod, as Add (or Keep when its netns is not known or cannot be
    /// opened), then SnapshotSent if the pods are complete; otherwise the
    /// snapshot ends once they are ([`Connection::run`]).
    async fn snapshot(&mut self) -> Result<(), ConnError> {
        let complete = *self.pods_complete.borrow_and_update();
        let pods = self.pods.borrow_and_update().clone();
        for (uid, pod) in &pods {
            match pod.netns.and_then(|_| open_netns(pod)) {
                Some(ns) => self.add(uid, pod, &ns).await?,
                None => {
                    let keep = Request::Keep {
                        uid: uid.to_string(),
                    };
                    match self.request(&keep, None).await? {
                        Ack::Ok => {
                            self.acked.insert(uid.clone(), None);
                        }
                        Ack::Nack(e) => {
                            warn!(conn = self.no, pod = %uid, "ztunnel refused KeepWorkload: {e}")
                        }
                    }
                }
            }
        }
        if complete {
            self.end_snapshot().await
        } else {
            info!(
                conn = self.no,
                pods = self.acked.len(),
                "ZDS snapshot waits for every source to deliver; ztunnel keeps the pods it has"
            );
            Ok(())
        }
    }

    /// SnapshotSent: ztunnel drops the pods it was not given.
    async fn end_snapshot(&mut self) -> Result<(), ConnError> {
        match self.request(&Request::SnapshotSent, None).await? {
            Ack::Ok => {}
            Ack::Nack(e) => return Err(ConnError::SnapshotRefused(e)),
        }
        self.snapshot_sent = true;
        info!(conn = self.no, pods = self.acked.len(), "ZDS snapshot sent");
        self.shared.snapshot_taken(self.no, &self.keys());
        Ok(())
    }

    fn keys(&self) -> BTreeSet<WorkloadId> {
        self.acked.keys().cloned().collect()
    }

    /// Sends one Add with the pod's netns; a NACK schedules a retry.
    async fn add(
        &mut self,
        uid: &WorkloadId,
        pod: &ZdsPod,
        ns: &fs::File,
    ) -> Result<(), ConnError> {
        let add = Request::Add {
            uid: uid.to_string(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        };
        match self.request(&add, Some(ns.as_fd())).await? {
            Ack::Ok => {
                self.retries.remove(uid);
                self.acked.insert(uid.clone(), pod.netns);
                info!(conn = self.no, pod = %uid, name = %pod.name, namespace = %pod.namespace, "ztunnel acknowledged AddWorkload");
            }
            Ack::Nack(e) => {
                let wait = self.retry_later(uid);
                warn!(conn = self.no, pod = %uid, name = %pod.name, namespace = %pod.namespace, retry_in_ms = wait.as_millis() as u64, "ztunnel refused AddWorkload: {e}");
            }
        }
        Ok(())
    }

    /// Schedules another Add of `uid`, backing off; returns the wait.
    fn retry_later(&mut self, uid: &WorkloadId) -> Duration {
        let wait = self
            .retries
            .get(uid)
            .map_or(RETRY_FIRST, |r| (r.wait * 2).min(RETRY_MAX));
        self.retries.insert(
            uid.clone(),
            Retry {
                at: Instant::now() + wait,
                wait,
            },
        );
        wait
    }

    /// Adds pods not acknowledged yet (their retry due), and re-adds pods
    /// whose sandbox got a new netns. Pods whose netns is not known yet
    /// wait for the daemon to find it.
    async fn add_new(&mut self, pods: &Pods) -> Result<(), ConnError> {
        let now = Instant::now();
        let mut changed = false;
        for (uid, pod) in pods {
            let Some(netns) = pod.netns else {
                continue;
            };
            if self.acked.get(uid) == Some(&Some(netns))
                || self.retries.get(uid).is_some_and(|r| r.at > now)
            {
                continue;
            }
            match open_netns(pod) {
                Some(ns) => self.add(uid, pod, &ns).await?,
                // Its process just exited: try again shortly.
                None => {
                    self.retry_later(uid);
                    continue;
                }
            }
            changed = true;
        }
        if changed {
            self.shared.publish(self.no, &self.keys());
        }
        Ok(())
    }

    /// Sends a Del for every acknowledged pod no longer wanted. The daemon
    /// removes a pod from `pods` only after its redirect entries are gone.
    async fn delete_gone(&mut self, pods: &Pods) -> Result<(), ConnError> {
        let gone: Vec<WorkloadId> = self
            .acked
            .keys()
            .filter(|uid| !pods.contains_key(uid))
            .cloned()
            .collect();
        self.retries.retain(|uid, _| pods.contains_key(uid));
        for uid in gone {
            match self
                .request(
                    &Request::Del {
                        uid: uid.to_string(),
                    },
                    None,
                )
                .await?
            {
                Ack::Ok => info!(conn = self.no, pod = %uid, "ztunnel acknowledged DelWorkload"),
                Ack::Nack(e) => {
                    warn!(conn = self.no, pod = %uid, "ztunnel refused DelWorkload: {e}")
                }
            }
            self.acked.remove(&uid);
            self.shared.publish(self.no, &self.keys());
        }
        Ok(())
    }
}

/// The pod's netns, opened from its file or through a process of its
/// cgroup; `None` while neither is there (or the process just exited).
fn open_netns(pod: &ZdsPod) -> Option<fs::File> {
    let path = match &pod.netns_file {
        Some(file) => file.clone(),
        None => netns::netns_of_cgroup(&pod.cgroup).ok()??,
    };
    fs::File::open(path).ok()
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(uids: &[&str]) -> BTreeSet<WorkloadId> {
        uids.iter()
            .map(|u| WorkloadId::kubernetes(u.to_string()))
            .collect()
    }

    fn shared() -> (Shared, watch::Receiver<Acknowledged>) {
        let (ready, rx) = watch::channel(Acknowledged::default());
        let shared = Shared {
            acked: Mutex::default(),
            ready,
            live: Mutex::default(),
            newest: watch::Sender::new(0),
            stats: Arc::default(),
        };
        (shared, rx)
    }

    fn peer(lineage: &[u64]) -> Peer {
        Peer {
            pid: 4242,
            cgroup: PathBuf::from("kubepods/burstable/podz/ztunnel"),
            lineage: lineage.iter().copied().map(CgroupId).collect(),
        }
    }

    #[tokio::test]
    async fn only_a_peer_at_or_below_a_ztunnel_cgroup_is_admitted() {
        let (_tx, mut known) = watch::channel(Some([CgroupId(7)].into()));
        // Its container cgroup (9) is below ztunnel's pod cgroup (7).
        assert!(admit(peer(&[9, 7, 3, 1]), &mut known).await.is_ok());
        let err = admit(peer(&[8, 3, 1]), &mut known).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("pid 4242) is in cgroup /kubepods/burstable/podz/ztunnel"),
            "{err}"
        );
        assert_eq!(err.pid(), Some(4242));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_waits_for_the_first_node_state_and_no_longer() {
        let (tx, mut known) = watch::channel(None);
        let admitted = tokio::spawn(async move { admit(peer(&[7, 1]), &mut known).await });
        tokio::time::sleep(ANSWER_TIMEOUT / 2).await;
        tx.send_replace(Some([CgroupId(7)].into()));
        assert!(admitted.await.unwrap().is_ok());
        let (_tx, mut never) = watch::channel(None);
        let err = admit(peer(&[7, 1]), &mut never).await.unwrap_err();
        assert!(matches!(err, PeerError::NoState(..)), "{err}");
    }

    fn acknowledged(uids: &[&str], snapshot_taken: bool) -> Acknowledged {
        Acknowledged {
            pods: pods(uids),
            snapshot_taken,
        }
    }

    #[test]
    fn acks_before_a_snapshot_completes_are_published_as_not_the_whole_word() {
        let (s, rx) = shared();
        s.joined(1);
        s.publish(1, &pods(&["a"]));
        assert_eq!(*rx.borrow(), acknowledged(&["a"], false));
        s.left(1);
        s.joined(2);
        s.snapshot_taken(2, &pods(&["b"]));
        assert_eq!(*rx.borrow(), acknowledged(&["b"], true));
    }

    #[test]
    fn a_departed_ztunnels_pods_stay_ready_until_the_next_snapshot() {
        let (s, rx) = shared();
        s.joined(1);
        s.snapshot_taken(1, &pods(&["a", "b"]));
        s.left(1);
        assert_eq!(*rx.borrow(), acknowledged(&["a", "b"], true));
        // The reconnected ztunnel's snapshot is the new word.
        s.joined(2);
        s.snapshot_taken(2, &pods(&["a"]));
        assert_eq!(*rx.borrow(), acknowledged(&["a"], true));
    }

    #[test]
    fn new_pods_go_to_the_newest_ztunnel_and_back_to_the_older_when_it_leaves() {
        let (s, _rx) = shared();
        s.joined(1);
        s.joined(2);
        assert_eq!(*s.newest.borrow(), 2);
        s.left(2);
        assert_eq!(*s.newest.borrow(), 1);
        s.left(1);
        assert_eq!(*s.newest.borrow(), 0);
    }
}
