//! The ztunnel stand-in taking its pods over ZDS, with the test itself as
//! the node agent: the stand-in opens its listeners in the netns an Add
//! carries and closes them on Del, acks every request, refuses what it
//! cannot apply, and keeps serving once the node agent is gone.

use std::{fs::File, os::fd::AsFd, time::Duration};

use ambridge::publish::zds::wire::{self, Ack, Datagram, MAX_DATAGRAM, Request};
use ambridge_conformance::{
    Background, Node, Pod,
    event::{
        Error, Kind, OutboundAccepted, ZdsAdd, ZdsClosed, ZdsDel, ZdsError, ZdsKeep, ZdsNack,
        ZdsSnapshotSent,
    },
    eventually, ztunnel_stand_in_zds,
};
use socket2::{Domain, SockAddr, Socket, Type};

/// How long the stand-in has to answer or to report.
const WAIT: Duration = Duration::from_secs(10);

/// The node agent's end of one ZDS connection.
struct Agent {
    conn: Socket,
}

impl Agent {
    /// Sends `request`, with `netns` as its fd, and returns the stand-in's
    /// answer.
    fn request(&self, request: &Request, netns: Option<&File>) -> Ack {
        self.request_bytes(&request.encode(), netns)
    }

    /// Sends `bytes` as one datagram, with `netns` as its fd, and returns
    /// the stand-in's answer.
    fn request_bytes(&self, bytes: &[u8], netns: Option<&File>) -> Ack {
        wire::send(self.conn.as_fd(), bytes, netns.map(File::as_fd))
            .expect("sending a ZDS request to the stand-in");
        let mut buf = [0; MAX_DATAGRAM];
        match wire::recv(self.conn.as_fd(), &mut buf).expect("reading the stand-in's ack") {
            Datagram::Message { len, fds } => {
                assert!(fds.is_empty(), "the stand-in sent fds with its ack");
                wire::decode_ack(&buf[..len]).expect("decoding the stand-in's ack")
            }
            Datagram::Closed => panic!("the stand-in closed the ZDS connection"),
        }
    }
}

fn add(pod: &Pod) -> Request {
    Request::Add {
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: "default".into(),
        service_account: "default".into(),
    }
}

/// Whether a TCP connect from inside `pod` to its own `ip:15001` is
/// accepted (`true`) or refused (`false`); anything else fails the test.
fn capture_port_open(pod: &Pod) -> bool {
    let result = pod.connect(&format!("{}:15001", pod.ip4), 1);
    if result.peer.is_some() {
        return true;
    }
    let error = result.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("refused"),
        "connect neither accepted nor refused: {result}"
    );
    false
}

/// A ZDS event about one pod.
trait AboutPod: Kind {
    fn uid(&self) -> &str;
}

impl AboutPod for ZdsAdd {
    fn uid(&self) -> &str {
        &self.uid
    }
}

impl AboutPod for ZdsNack {
    fn uid(&self) -> &str {
        &self.uid
    }
}

impl AboutPod for ZdsKeep {
    fn uid(&self) -> &str {
        &self.uid
    }
}

impl AboutPod for ZdsDel {
    fn uid(&self) -> &str {
        &self.uid
    }
}

/// Waits until the stand-in has reported `count` events of kind `K` about
/// `uid`, and returns the last.
fn reported<K: AboutPod>(ztunnel: &Background, uid: &str, count: usize) -> K {
    eventually(WAIT, || {
        let events: Vec<K> = ztunnel
            .all::<K>()
            .into_iter()
            .filter(|e| e.uid() == uid)
            .collect();
        (events.len() >= count).then(|| events.last().cloned())?
    })
    .unwrap_or_else(|| {
        panic!(
            "no {count} {} event(s) for {uid}; got {:?}",
            K::NAME,
            ztunnel.events()
        )
    })
}

#[test]
fn the_stand_in_opens_listeners_on_zds_add_and_closes_them_on_del() {
    let mut node = Node::new();
    let pod = node.add_pod("app");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    let socket_path = node.dir.join("zds.sock");
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).expect("SOCK_SEQPACKET socket");
    listener
        .bind(&SockAddr::unix(&socket_path).expect("ZDS socket path"))
        .expect("binding the ZDS socket");
    listener.listen(8).expect("listening on the ZDS socket");

    let ztunnel = ztunnel_stand_in_zds(
        &node,
        &ztunnel_cgroup,
        &socket_path,
        &["--port", "15001", "--zds-nack", &pod.uid],
    );
    let (conn, _) = listener.accept().expect("accepting the stand-in");
    conn.set_read_timeout(Some(WAIT))
        .expect("setting the ZDS read timeout");
    let mut buf = [0; MAX_DATAGRAM];
    let Datagram::Message { len, .. } =
        wire::recv(conn.as_fd(), &mut buf).expect("reading the hello")
    else {
        panic!("the stand-in closed before its hello");
    };
    wire::decode_hello(&buf[..len]).expect("the stand-in's hello is V1");
    let agent = Agent { conn };
    let netns = File::open(&pod.netns).expect("opening the pod's netns");
    assert!(!capture_port_open(&pod), "15001 open before any Add");

    // --zds-nack: the first Add is refused and opens nothing.
    assert_eq!(
        agent.request(&add(&pod), Some(&netns)),
        Ack::Nack(format!("stand-in refuses {}", pod.uid))
    );
    reported::<ZdsNack>(&ztunnel, &pod.uid, 1);
    assert!(!capture_port_open(&pod), "15001 open after a refused Add");

    // An Add must carry the netns; a datagram must be a WorkloadRequest.
    let Ack::Nack(error) = agent.request(&add(&pod), None) else {
        panic!("an Add without its netns fd was accepted");
    };
    assert!(
        error.ends_with("expected exactly one file descriptor, got 0"),
        "{error}"
    );
    let Ack::Nack(error) = agent.request_bytes(&[0xff], None) else {
        panic!("an undecodable request was accepted");
    };
    assert!(
        error.starts_with("malformed ZDS WorkloadRequest"),
        "{error}"
    );
    eventually(WAIT, || {
        let errors = ztunnel.all::<ZdsError>().len();
        (errors == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("not two zds-error events: {:?}", ztunnel.events()));

    // The Add retried: accepted, and the listener is the stand-in's, in the
    // pod's netns.
    assert_eq!(agent.request(&add(&pod), Some(&netns)), Ack::Ok);
    let added: ZdsAdd = reported(&ztunnel, &pod.uid, 1);
    assert_eq!(
        (
            added.name.as_str(),
            added.namespace.as_str(),
            added.replaced
        ),
        ("app", "default", false),
        "{added}"
    );
    assert!(capture_port_open(&pod), "15001 not open after the Add");
    ztunnel.wait_for(|e: &OutboundAccepted| e.pod == pod.uid, WAIT);

    // The same pod in the same netns again (a new node agent's snapshot):
    // its listeners stay, never closed in between.
    assert_eq!(agent.request(&add(&pod), Some(&netns)), Ack::Ok);
    let kept: ZdsAdd = reported(&ztunnel, &pod.uid, 2);
    assert!(kept.kept, "{kept}");
    assert!(capture_port_open(&pod), "15001 not open after the re-Add");

    assert_eq!(
        agent.request(
            &Request::Keep {
                uid: pod.uid.clone()
            },
            None
        ),
        Ack::Ok
    );
    reported::<ZdsKeep>(&ztunnel, &pod.uid, 1);
    assert_eq!(agent.request(&Request::SnapshotSent, None), Ack::Ok);
    ztunnel.wait_first::<ZdsSnapshotSent>(WAIT);

    // Del closes the listeners before its ack.
    let del = Request::Del {
        uid: pod.uid.clone(),
    };
    assert_eq!(agent.request(&del, None), Ack::Ok);
    assert!(reported::<ZdsDel>(&ztunnel, &pod.uid, 1).known);
    assert!(!capture_port_open(&pod), "15001 still open after the Del");

    // The node agent goes: the stand-in keeps serving the pods it has.
    assert_eq!(agent.request(&add(&pod), Some(&netns)), Ack::Ok);
    drop(agent);
    ztunnel.wait_first::<ZdsClosed>(WAIT);
    assert!(
        capture_port_open(&pod),
        "15001 closed once the node agent went"
    );
    assert!(
        ztunnel.all::<Error>().is_empty(),
        "the stand-in failed: {:?}",
        ztunnel.events()
    );
}
