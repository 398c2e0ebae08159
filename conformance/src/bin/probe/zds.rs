//! The ztunnel stand-in's side of ZDS. Like in-pod ztunnel, it connects to
//! the node agent's `SOCK_SEQPACKET` socket and says hello, then serves the
//! node agent's requests in order, one datagram each, acking every one: an
//! Add opens the stand-in's listeners in the netns it carries, a Del closes
//! them. When the node agent goes away it keeps serving its pods and
//! reconnects; the new snapshot then says which pods to keep.

use std::{
    collections::{HashMap, HashSet},
    error::Error,
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use ambridge::publish::zds::wire::{self, Ack, Datagram, MAX_DATAGRAM, Request, WireError};
use ambridge_conformance::event as ev;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::{PodListeners, Serving, report};

/// How long the node agent's socket may take to exist and accept.
const CONNECT_FOR: Duration = Duration::from_secs(15);
/// The pause before connecting again once the node agent went away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(300);
/// The pause between two connection attempts.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// What `--zds`, `--zds-nack` and `--zds-nack-count` ask for.
pub struct Options {
    /// The node agent's socket.
    pub socket: PathBuf,
    /// UIDs whose first Adds are refused.
    pub nacks: Vec<String>,
    /// How many Adds of each of `nacks` are refused.
    pub nack_count: usize,
    /// Close the first connection after this many answers.
    pub drop_after: Option<usize>,
}

/// A ZDS connection to the node agent, hello sent.
pub struct Session {
    conn: OwnedFd,
    socket: PathBuf,
    /// Pods added or kept since the connection opened, until SnapshotSent.
    snapshot: Option<HashSet<String>>,
    /// Answers left before the connection is dropped on purpose.
    drop_after: Option<usize>,
    /// How many more Adds of each `--zds-nack` UID to refuse.
    nacks_left: HashMap<String, usize>,
    /// The listeners of every pod handed over and not deleted, by UID, with
    /// the identity (device, inode) of the netns they live in.
    pods: HashMap<String, (PodListeners, (u64, u64))>,
}

impl Session {
    /// Connects to the node agent's socket, retrying while it does not
    /// exist or refuses for up to [`CONNECT_FOR`], and says hello (V1).
    pub fn connect(options: &Options) -> io::Result<Session> {
        let path = &options.socket;
        let deadline = Instant::now() + CONNECT_FOR;
        let conn = loop {
            match try_connect(path) {
                Ok(conn) => break conn,
                Err(_) if Instant::now() < deadline => thread::sleep(CONNECT_RETRY),
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "connecting to the ZDS socket {} (still failing after {CONNECT_FOR:?}): {e}",
                            path.display()
                        ),
                    ));
                }
            }
        };
        hello(&conn, path)?;
        Ok(Session {
            conn,
            socket: path.clone(),
            snapshot: Some(HashSet::new()),
            drop_after: options.drop_after,
            nacks_left: options
                .nacks
                .iter()
                .map(|uid| (uid.clone(), options.nack_count))
                .collect(),
            pods: HashMap::new(),
        })
    }

    /// Serves the node agent until the stand-in is killed: when the node
    /// agent goes away (a restart), its pods stay served and the stand-in
    /// connects again.
    pub fn run(mut self, serving: Serving) -> io::Result<()> {
        loop {
            self.serve(serving)?;
            // A gap before reconnecting, as ztunnel's backoff leaves one.
            thread::sleep(RECONNECT_PAUSE);
            self.conn = loop {
                match try_connect(&self.socket) {
                    Ok(conn) => break conn,
                    Err(_) => thread::sleep(CONNECT_RETRY),
                }
            };
            hello(&self.conn, &self.socket)?;
            self.snapshot = Some(HashSet::new());
            report(ev::ZdsReconnected {});
        }
    }

    /// Serves the node agent's requests until it closes the connection.
    fn serve(&mut self, serving: Serving) -> io::Result<()> {
        let mut buf = [0; MAX_DATAGRAM];
        loop {
            let ack = match wire::recv(self.conn.as_fd(), &mut buf) {
                Ok(Datagram::Closed) => break,
                Ok(Datagram::Message { len, fds }) => self.answer(&buf[..len], fds, serving),
                // Consumed whole, so the next datagram reads intact.
                Err(e @ WireError::TooLarge { .. }) => refuse(chain(&e)),
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "receiving from the ZDS socket: {}",
                        chain(&e)
                    )));
                }
            };
            match wire::send(self.conn.as_fd(), &ack.encode(), None) {
                Ok(()) => {
                    if let Some(left) = &mut self.drop_after {
                        *left = left.saturating_sub(1);
                        if *left == 0 {
                            self.drop_after = None;
                            report(ev::ZdsDropping {});
                            // The node agent sees the end now, not at the
                            // reconnect.
                            let _ = socket2::SockRef::from(&self.conn)
                                .shutdown(std::net::Shutdown::Both);
                            break;
                        }
                    }
                }
                // The node agent went before reading its ack.
                Err(WireError::Syscall { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    break;
                }
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "sending a ZDS ack: {}",
                        chain(&e)
                    )));
                }
            }
        }
        report(ev::ZdsClosed {});
        Ok(())
    }

    /// Applies one request and says how to answer it.
    fn answer(&mut self, bytes: &[u8], fds: Vec<OwnedFd>, serving: Serving) -> Ack {
        let request = match Request::decode(bytes) {
            Ok(request) => request,
            Err(e) => return refuse(chain(&e)),
        };
        match request {
            Request::Add {
                uid,
                name,
                namespace,
                service_account,
            } => self.add(uid, [name, namespace, service_account], fds, serving),
            Request::Keep { uid } => {
                if let Some(snapshot) = &mut self.snapshot {
                    snapshot.insert(uid.clone());
                }
                report(ev::ZdsKeep { uid });
                Ack::Ok
            }
            Request::Del { uid } => {
                // Dropped here, so the listeners are closed before the ack.
                let listeners = self.pods.remove(&uid);
                let known = listeners.is_some();
                drop(listeners);
                report(ev::ZdsDel { uid, known });
                Ack::Ok
            }
            Request::SnapshotSent => {
                // As ztunnel does: what the snapshot did not name is gone.
                let named = self.snapshot.take().unwrap_or_default();
                let dropped: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|uid| !named.contains(*uid))
                    .cloned()
                    .collect();
                for uid in &dropped {
                    self.pods.remove(uid);
                }
                report(ev::ZdsSnapshotSent { dropped });
                Ack::Ok
            }
        }
    }

    /// Opens the pod's listeners; `info` is its name, namespace and service
    /// account as ZDS gave them.
    fn add(&mut self, uid: String, info: [String; 3], fds: Vec<OwnedFd>, serving: Serving) -> Ack {
        let [name, namespace, service_account] = info;
        let netns = match wire::single_fd(fds) {
            Ok(netns) => netns,
            Err(e) => return refuse(format!("AddWorkload {uid}: {}", chain(&e))),
        };
        if let Some(left) = self.nacks_left.get_mut(&uid).filter(|left| **left > 0) {
            *left -= 1;
            let error = format!("stand-in refuses {uid}");
            report(ev::ZdsNack {
                uid,
                error: error.clone(),
            });
            return Ack::Nack(error);
        }
        let id = match nix::sys::stat::fstat(&netns) {
            Ok(st) => (st.st_dev, st.st_ino),
            Err(e) => return refuse(format!("AddWorkload {uid}: fstat of its netns: {e}")),
        };
        if let Some(snapshot) = &mut self.snapshot {
            snapshot.insert(uid.clone());
        }
        // An Add of a pod it has, in the same netns (a new node agent's
        // snapshot), changes nothing, as in ztunnel: its listeners stay.
        if self.pods.get(&uid).is_some_and(|(_, had)| *had == id) {
            report(ev::ZdsAdd {
                uid,
                name,
                namespace,
                service_account,
                netns_ino: id.1,
                kept: true,
                replaced: false,
            });
            return Ack::Ok;
        }
        // A sandbox recreated under the same UID comes as an Add with a new
        // netns: the old listeners close.
        let replaced = self.pods.remove(&uid).is_some();
        match PodListeners::open(netns, &uid, serving) {
            Ok(listeners) => {
                self.pods.insert(uid.clone(), (listeners, id));
                report(ev::ZdsAdd {
                    uid,
                    name,
                    namespace,
                    service_account,
                    netns_ino: id.1,
                    kept: false,
                    replaced,
                });
                Ack::Ok
            }
            Err(e) => refuse(format!("AddWorkload {uid}: {e}")),
        }
    }
}

/// Plays `steps` (see the `zds-peer` role) on a new connection to the node
/// agent's `socket`, reporting every datagram it receives, then reports
/// `zds-peer-closed` once the node agent closes the connection, which may
/// come before a step could be sent (a refused peer).
pub fn scripted_peer(socket: &Path, steps: &[String]) -> io::Result<()> {
    let conn = try_connect(socket)?;
    report(ev::ZdsPeerConnected {});
    let sock = socket2::SockRef::from(&conn);
    let mut buf = [0; MAX_DATAGRAM];
    // Reports what arrives; false once the node agent closed.
    let mut receive = || match wire::recv(conn.as_fd(), &mut buf) {
        Ok(Datagram::Message { len, fds }) => {
            report(ev::ZdsPeerReceived {
                len: len as u64,
                fds: fds.len() as u64,
            });
            Ok(true)
        }
        Ok(Datagram::Closed) => Ok(false),
        Err(e) => Err(io::Error::other(chain(&e))),
    };
    let mut open = true;
    for step in steps {
        let bytes = match step.as_str() {
            "recv" => {
                open = receive()?;
                if !open {
                    break;
                }
                continue;
            }
            "hello" => wire::encode_hello(),
            other => other
                .strip_prefix("send:")
                .and_then(datagram)
                .ok_or_else(|| io::Error::other(format!("not a zds-peer step: {other:?}")))?,
        };
        match sock.send(&bytes) {
            Ok(_) => {}
            // The node agent closed first.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                open = false;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    // Whatever the node agent still sends, until it closes.
    while open {
        open = receive()?;
    }
    report(ev::ZdsPeerClosed {});
    Ok(())
}

/// The bytes of a `send:` step: hex, or `<hex byte>x<count>`.
fn datagram(spec: &str) -> Option<Vec<u8>> {
    if let Some((byte, count)) = spec.split_once('x') {
        return Some(vec![
            u8::from_str_radix(byte, 16).ok()?;
            count.parse().ok()?
        ]);
    }
    (0..spec.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(spec.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Says hello (V1) on a new connection.
fn hello(conn: &OwnedFd, path: &Path) -> io::Result<()> {
    wire::send(conn.as_fd(), &wire::encode_hello(), None).map_err(|e| {
        io::Error::other(format!(
            "sending the ZDS hello on {}: {}",
            path.display(),
            chain(&e)
        ))
    })
}

/// One attempt to connect to the node agent's socket.
fn try_connect(path: &Path) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(socket.into())
}

/// Refuses a request the stand-in could not apply, reporting why.
fn refuse(error: String) -> Ack {
    report(ev::ZdsError {
        error: error.clone(),
    });
    Ack::Nack(error)
}

/// An error and its causes, outermost first: the wire's errors keep the
/// decoder's and the kernel's words in their sources.
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}
