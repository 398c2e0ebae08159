//! The ZDS wire: the typed messages ambridge exchanges with ztunnel, their
//! protobuf encoding, and one-datagram-at-a-time I/O on the
//! `SOCK_SEQPACKET` unix socket that carries them.
//!
//! Each datagram holds exactly one protobuf message, with no length prefix.
//! ztunnel reads into a [`MAX_DATAGRAM`]-byte buffer and fails on anything
//! longer, so both directions are held to that limit here, and an oversize
//! datagram is an error rather than a silently shortened message. An
//! `AddWorkload` carries the pod's netns as one `SCM_RIGHTS` fd.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, fcntl},
    sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg},
};
use prost::Message;
use tokio::io::unix::AsyncFd;

use crate::pb::istio::workload::zds::{
    self as pb, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};

/// The largest datagram either side may send: ztunnel's receive buffer.
pub const MAX_DATAGRAM: usize = 1024;

/// The kernel's cap on fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`). Room
/// for that many means the control data can never be cut short, so every fd
/// the kernel installs is seen and closed.
const SCM_MAX_FD: usize = 253;

/// Why a ZDS message could not be sent, received or understood.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A datagram exceeds what ztunnel can read.
    #[error("ZDS datagram of {len} bytes is larger than the {MAX_DATAGRAM}-byte limit")]
    TooLarge {
        /// The datagram's full length.
        len: usize,
    },
    /// The bytes are not a valid protobuf encoding of the expected message.
    #[error("malformed ZDS {message}")]
    Malformed {
        /// The protobuf message that was expected.
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    /// A message whose `payload` oneof is unset, so it says nothing.
    #[error("malformed ZDS {message}: its payload is unset")]
    NoPayload {
        /// The protobuf message that was received.
        message: &'static str,
    },
    /// ztunnel's hello asks for a protocol version other than V1.
    #[error("ZDS hello asks for version {0}; only V1 (= 1) is spoken")]
    UnsupportedVersion(i32),
    /// A datagram that must carry one fd (an `AddWorkload`) carries another
    /// number.
    #[error("expected exactly one file descriptor, got {0}")]
    FdCount(usize),
    /// ztunnel never sends fds, so a datagram with some is not ZDS.
    #[error("the ZDS peer sent {0} file descriptor(s); ztunnel never sends any")]
    UnexpectedFds(usize),
    /// A system call on the socket failed.
    #[error("{call} on the ZDS socket failed")]
    Syscall {
        /// The failing call.
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the server (ambridge) sends to ztunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Capture this pod; sent with the pod's netns fd.
    Add {
        /// The Kubernetes pod UID.
        uid: String,
        /// The pod's name.
        name: String,
        /// The pod's namespace.
        namespace: String,
        /// The pod's service account.
        service_account: String,
    },
    /// Keep this pod as ztunnel already has it (only before
    /// [`Request::SnapshotSent`]): its netns could not be opened again.
    Keep {
        /// The Kubernetes pod UID.
        uid: String,
    },
    /// Stop capturing this pod.
    Del {
        /// The Kubernetes pod UID.
        uid: String,
    },
    /// The snapshot is complete; ztunnel drops every pod it was not told
    /// about.
    SnapshotSent,
}

impl Request {
    /// The `WorkloadRequest` datagram for this request.
    pub fn encode(&self) -> Vec<u8> {
        use workload_request::Payload;
        let payload = match self.clone() {
            Request::Add {
                uid,
                name,
                namespace,
                service_account,
            } => Payload::Add(AddWorkload {
                uid,
                workload_info: Some(WorkloadInfo {
                    name,
                    namespace,
                    service_account,
                }),
            }),
            Request::Keep { uid } => Payload::Keep(KeepWorkload { uid }),
            Request::Del { uid } => Payload::Del(DelWorkload { uid }),
            Request::SnapshotSent => Payload::SnapshotSent(SnapshotSent {}),
        };
        WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    /// Reads a `WorkloadRequest` datagram, as ztunnel does (for stand-ins of
    /// ztunnel in tests). An `AddWorkload` without `workload_info` reads
    /// with empty names, as older node agents did not send it.
    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        use workload_request::Payload;
        let request = WorkloadRequest::decode(bytes).map_err(|source| WireError::Malformed {
            message: "WorkloadRequest",
            source,
        })?;
        Ok(
            match request.payload.ok_or(WireError::NoPayload {
                message: "WorkloadRequest",
            })? {
                Payload::Add(AddWorkload { uid, workload_info }) => {
                    let info = workload_info.unwrap_or_default();
                    Request::Add {
                        uid,
                        name: info.name,
                        namespace: info.namespace,
                        service_account: info.service_account,
                    }
                }
                Payload::Keep(KeepWorkload { uid }) => Request::Keep { uid },
                Payload::Del(DelWorkload { uid }) => Request::Del { uid },
                Payload::SnapshotSent(SnapshotSent {}) => Request::SnapshotSent,
            },
        )
    }
}

/// ztunnel's answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// ztunnel applied the request.
    Ok,
    /// ztunnel refused the request, saying why.
    Nack(String),
}

impl Ack {
    /// The `WorkloadResponse` datagram for this answer, as ztunnel sends it
    /// (for stand-ins of ztunnel in tests).
    pub fn encode(&self) -> Vec<u8> {
        let error = match self {
            Ack::Ok => String::new(),
            Ack::Nack(error) => error.clone(),
        };
        WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(pb::Ack { error })),
        }
        .encode_to_vec()
    }
}

/// The `ZdsHello` datagram ztunnel sends first (for stand-ins of ztunnel in
/// tests).
pub fn encode_hello() -> Vec<u8> {
    ZdsHello {
        version: Version::V1 as i32,
    }
    .encode_to_vec()
}

/// Reads ztunnel's `ZdsHello`, accepting only V1, the one version ambridge
/// speaks.
pub fn decode_hello(bytes: &[u8]) -> Result<Version, WireError> {
    let hello = ZdsHello::decode(bytes).map_err(|source| WireError::Malformed {
        message: "ZdsHello",
        source,
    })?;
    match Version::try_from(hello.version) {
        Ok(Version::V1) => Ok(Version::V1),
        _ => Err(WireError::UnsupportedVersion(hello.version)),
    }
}

/// Reads ztunnel's `WorkloadResponse`: an empty `ack.error` is success.
pub fn decode_ack(bytes: &[u8]) -> Result<Ack, WireError> {
    let response = WorkloadResponse::decode(bytes).map_err(|source| WireError::Malformed {
        message: "WorkloadResponse",
        source,
    })?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ack::Ok),
        Some(workload_response::Payload::Ack(ack)) => Ok(Ack::Nack(ack.error)),
        None => Err(WireError::NoPayload {
            message: "WorkloadResponse",
        }),
    }
}

/// What one [`recv`] read.
#[derive(Debug)]
pub enum Datagram {
    /// A datagram of `len` bytes, now at the start of the buffer, with the
    /// fds it carried (owned, so dropping them closes them).
    Message {
        /// The datagram's length.
        len: usize,
        /// The fds that came with it.
        fds: Vec<OwnedFd>,
    },
    /// The peer closed the connection.
    Closed,
}

/// Sends `msg` as one datagram on the connected `SOCK_SEQPACKET` socket
/// `fd`, with `netns` attached as the one `SCM_RIGHTS` fd when given.
pub fn send(
    fd: BorrowedFd<'_>,
    msg: &[u8],
    netns: Option<BorrowedFd<'_>>,
) -> Result<(), WireError> {
    if msg.len() > MAX_DATAGRAM {
        return Err(WireError::TooLarge { len: msg.len() });
    }
    let iov = [IoSlice::new(msg)];
    let raw = netns.map(|ns| [ns.as_raw_fd()]);
    let rights = raw.as_ref().map(|raw| ControlMessage::ScmRights(raw));
    // A seqpacket send is all or nothing, so success means the whole
    // datagram went. MSG_NOSIGNAL: a gone peer is an EPIPE error here, not a
    // process-killing SIGPIPE.
    loop {
        match sendmsg::<()>(
            fd.as_raw_fd(),
            &iov,
            rights.as_slice(),
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            // A signal arrived before any data moved.
            Err(Errno::EINTR) => continue,
            Err(errno) => {
                return Err(WireError::Syscall {
                    call: "sendmsg",
                    source: errno.into(),
                });
            }
        }
    }
}

/// Receives one datagram from the connected `SOCK_SEQPACKET` socket `fd`
/// into `buf`. A datagram longer than `buf` is consumed and reported as
/// [`WireError::TooLarge`]. A zero-length read is the peer closing: a
/// zero-length datagram would look the same, but the only ZDS messages that
/// encode to zero bytes (a hello without version, a response without
/// payload) are invalid anyway.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8; MAX_DATAGRAM]) -> Result<Datagram, WireError> {
    let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    // MSG_TRUNC makes the call return the datagram's full length, so an
    // oversize one is measured rather than cut to fit.
    let msg = loop {
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            // A signal arrived before any data moved.
            Err(Errno::EINTR) => continue,
            // The peer closed while our datagrams sat unread in its queue:
            // still just the peer closing.
            Err(Errno::ECONNRESET) => return Ok(Datagram::Closed),
            Err(errno) => {
                return Err(WireError::Syscall {
                    call: "recvmsg",
                    source: errno.into(),
                });
            }
        }
    };
    // Own every received fd before judging the datagram, so that any return
    // below closes them.
    let mut fds = Vec::new();
    let cmsgs = msg.cmsgs().map_err(|errno| WireError::Syscall {
        call: "recvmsg (control data)",
        source: errno.into(),
    })?;
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these fds for this process
            // and nothing else refers to them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 {
        return Ok(Datagram::Closed);
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.bytes > MAX_DATAGRAM {
        return Err(WireError::TooLarge { len: msg.bytes });
    }
    Ok(Datagram::Message {
        len: msg.bytes,
        fds,
    })
}

/// The one fd an `AddWorkload` datagram must carry.
pub fn single_fd(fds: Vec<OwnedFd>) -> Result<OwnedFd, WireError> {
    let count = fds.len();
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok(fd),
        _ => Err(WireError::FdCount(count)),
    }
}

/// One ZDS connection (to one ztunnel), driven by the tokio reactor.
pub struct ZdsConn {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConn {
    /// Takes over a connected `SOCK_SEQPACKET` socket (for instance one
    /// returned by `accept`), switching it to non-blocking mode. Must be
    /// called inside a tokio runtime.
    pub fn from_std(fd: OwnedFd) -> Result<Self, WireError> {
        let syscall = |call| {
            move |errno: Errno| WireError::Syscall {
                call,
                source: errno.into(),
            }
        };
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(syscall("fcntl(F_GETFL)"))?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(syscall("fcntl(F_SETFL, O_NONBLOCK)"))?;
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which keeps it
        // open, and always answers the same raw fd, for its whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| WireError::Syscall {
            call: "epoll_ctl(EPOLL_CTL_ADD)",
            source: e.into_parts().1,
        })?;
        Ok(ZdsConn { fd })
    }

    /// Sends `msg`, with the pod's `netns` fd for a [`Request::Add`],
    /// waiting while the socket's send buffer is full.
    pub async fn send(
        &self,
        msg: &Request,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), WireError> {
        let bytes = msg.encode();
        loop {
            let mut ready = self
                .fd
                .writable()
                .await
                .map_err(|source| WireError::Syscall {
                    call: "epoll_wait (writable)",
                    source,
                })?;
            match send(self.fd.get_ref().as_fd(), &bytes, netns) {
                Err(WireError::Syscall { source, .. })
                    if source.kind() == io::ErrorKind::WouldBlock =>
                {
                    ready.clear_ready();
                }
                sent => return sent,
            }
        }
    }

    /// The next datagram from ztunnel, or `None` once it closed the
    /// connection.
    pub async fn recv(&self) -> Result<Option<Vec<u8>>, WireError> {
        let mut buf = [0; MAX_DATAGRAM];
        loop {
            let mut ready = self
                .fd
                .readable()
                .await
                .map_err(|source| WireError::Syscall {
                    call: "epoll_wait (readable)",
                    source,
                })?;
            match recv(self.fd.get_ref().as_fd(), &mut buf) {
                Err(WireError::Syscall { source, .. })
                    if source.kind() == io::ErrorKind::WouldBlock =>
                {
                    ready.clear_ready();
                }
                Err(e) => return Err(e),
                Ok(Datagram::Closed) => return Ok(None),
                Ok(Datagram::Message { fds, .. }) if !fds.is_empty() => {
                    return Err(WireError::UnexpectedFds(fds.len()));
                }
                Ok(Datagram::Message { len, .. }) => return Ok(Some(buf[..len].to_vec())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use nix::sys::{
        socket::{AddressFamily, SockFlag, SockType, socketpair},
        stat::fstat,
    };

    use super::*;

    // Hand-written encodings, from the upstream field numbers. A tag byte is
    // (field << 3) | wire type, with wire type 0 for varints and 2 for
    // length-delimited (strings and messages): field 1 string = 0a, field 2
    // = 12, field 3 = 1a, field 5 = 2a, field 1 varint = 08.

    // WorkloadRequest.add(1) { AddWorkload.uid(1) "u1",
    //   workload_info(2) { name(1) "n", namespace(2) "ns", service_account(3) "sa" } }
    //   WorkloadInfo  = 0a 01 'n' | 12 02 'n' 's' | 1a 02 's' 'a'  = 11 bytes
    //   AddWorkload   = 0a 02 'u' '1' | 12 0b <WorkloadInfo>        = 17 bytes
    //   WorkloadRequest = 0a 11 <AddWorkload>                       = 19 bytes
    const ADD: &[u8] = &[
        0x0a, 0x11, // WorkloadRequest.add, 17 bytes
        0x0a, 0x02, 0x75, 0x31, // AddWorkload.uid "u1"
        0x12, 0x0b, // AddWorkload.workload_info, 11 bytes
        0x0a, 0x01, 0x6e, // WorkloadInfo.name "n"
        0x12, 0x02, 0x6e, 0x73, // WorkloadInfo.namespace "ns"
        0x1a, 0x02, 0x73, 0x61, // WorkloadInfo.service_account "sa"
    ];
    // WorkloadRequest.keep(5) { KeepWorkload.uid(1) "u1" }
    const KEEP: &[u8] = &[0x2a, 0x04, 0x0a, 0x02, 0x75, 0x31];
    // WorkloadRequest.del(2) { DelWorkload.uid(2, not 1) "u1" }
    const DEL: &[u8] = &[0x12, 0x04, 0x12, 0x02, 0x75, 0x31];
    // WorkloadRequest.snapshot_sent(3) {}: an empty message is its tag and a
    // zero length.
    const SNAPSHOT_SENT: &[u8] = &[0x1a, 0x00];
    // ZdsHello.version(1) = V1 (1).
    const HELLO_V1: &[u8] = &[0x08, 0x01];
    // WorkloadResponse.ack(1) {}: empty Ack.error, success.
    const ACK_OK: &[u8] = &[0x0a, 0x00];
    // WorkloadResponse.ack(1) { Ack.error(1) "bad" }
    const ACK_NACK: &[u8] = &[0x0a, 0x05, 0x0a, 0x03, 0x62, 0x61, 0x64];

    fn add() -> Request {
        Request::Add {
            uid: "u1".into(),
            name: "n".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        }
    }

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair(AF_UNIX, SOCK_SEQPACKET)")
    }

    fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
        let (a, b) = (fstat(a).unwrap(), fstat(b).unwrap());
        (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    }

    #[test]
    fn requests_encode_to_the_upstream_bytes() {
        assert_eq!(add().encode(), ADD);
        assert_eq!(Request::Keep { uid: "u1".into() }.encode(), KEEP);
        assert_eq!(Request::Del { uid: "u1".into() }.encode(), DEL);
        assert_eq!(Request::SnapshotSent.encode(), SNAPSHOT_SENT);
    }

    #[test]
    fn requests_decode_from_the_upstream_bytes() {
        assert_eq!(Request::decode(ADD).unwrap(), add());
        assert_eq!(
            Request::decode(KEEP).unwrap(),
            Request::Keep { uid: "u1".into() }
        );
        assert_eq!(
            Request::decode(DEL).unwrap(),
            Request::Del { uid: "u1".into() }
        );
        assert_eq!(
            Request::decode(SNAPSHOT_SENT).unwrap(),
            Request::SnapshotSent
        );
    }

    #[test]
    fn add_without_workload_info_decodes_with_empty_names() {
        // WorkloadRequest.add(1) { AddWorkload.uid(1) "u1" }
        let bytes = [0x0a, 0x04, 0x0a, 0x02, 0x75, 0x31];
        assert_eq!(
            Request::decode(&bytes).unwrap(),
            Request::Add {
                uid: "u1".into(),
                name: String::new(),
                namespace: String::new(),
                service_account: String::new(),
            }
        );
    }

    #[test]
    fn request_without_payload_is_rejected() {
        let err = Request::decode(&[]).unwrap_err();
        assert!(matches!(err, WireError::NoPayload { .. }), "{err}");
    }

    #[test]
    fn hello_v1_is_accepted() {
        assert_eq!(encode_hello(), HELLO_V1);
        assert_eq!(decode_hello(HELLO_V1).unwrap(), Version::V1);
    }

    #[test]
    fn hello_other_than_v1_is_rejected() {
        // Absent version (proto3 default NOT_USED = 0): zero bytes.
        let err = decode_hello(&[]).unwrap_err();
        assert!(matches!(err, WireError::UnsupportedVersion(0)), "{err}");
        // ZdsHello.version(1) = 0, written out explicitly.
        let err = decode_hello(&[0x08, 0x00]).unwrap_err();
        assert!(matches!(err, WireError::UnsupportedVersion(0)), "{err}");
        // ZdsHello.version(1) = 2, a version from the future.
        let err = decode_hello(&[0x08, 0x02]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ZDS hello asks for version 2; only V1 (= 1) is spoken"
        );
    }

    #[test]
    fn hello_with_wrong_wire_type_is_malformed() {
        // ZdsHello field 1 as a length-delimited (wire type 2) empty value.
        let err = decode_hello(&[0x0a, 0x00]).unwrap_err();
        assert!(matches!(err, WireError::Malformed { .. }), "{err}");
    }

    #[test]
    fn empty_ack_is_ok() {
        assert_eq!(Ack::Ok.encode(), ACK_OK);
        assert_eq!(decode_ack(ACK_OK).unwrap(), Ack::Ok);
    }

    #[test]
    fn ack_with_error_is_nack() {
        assert_eq!(Ack::Nack("bad".into()).encode(), ACK_NACK);
        assert_eq!(decode_ack(ACK_NACK).unwrap(), Ack::Nack("bad".into()));
    }

    #[test]
    fn response_without_payload_is_malformed() {
        let err = decode_ack(&[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed ZDS WorkloadResponse: its payload is unset"
        );
    }

    #[test]
    fn garbage_response_is_malformed() {
        // WorkloadResponse.ack(1) claiming 5 bytes, with only 1 there.
        let err = decode_ack(&[0x0a, 0x05, 0x01]).unwrap_err();
        assert!(matches!(err, WireError::Malformed { .. }), "{err}");
        assert_eq!(err.to_string(), "malformed ZDS WorkloadResponse");
        // A hello where an ack belongs: field 1 as a varint, not a message.
        let err = decode_ack(HELLO_V1).unwrap_err();
        assert!(matches!(err, WireError::Malformed { .. }), "{err}");
    }

    #[test]
    fn unknown_response_fields_are_skipped() {
        let bytes = [
            0x78, 0x01, // WorkloadResponse field 15 (varint) = 1, unknown
            0x0a, 0x03, // WorkloadResponse.ack(1), 3 bytes
            0x12, 0x01, 0x78, // Ack field 2 (string) "x", unknown
        ];
        assert_eq!(decode_ack(&bytes).unwrap(), Ack::Ok);
    }

    #[test]
    fn add_arrives_with_the_one_netns_fd_it_was_sent_with() {
        let (ours, theirs) = seqpacket_pair();
        let netns = File::open("/proc/self/ns/net").unwrap();
        send(ours.as_fd(), &add().encode(), Some(netns.as_fd())).unwrap();

        let mut buf = [0; MAX_DATAGRAM];
        let Datagram::Message { len, fds } = recv(theirs.as_fd(), &mut buf).unwrap() else {
            panic!("peer reported closed");
        };
        assert_eq!(&buf[..len], ADD);
        assert_eq!(Request::decode(&buf[..len]).unwrap(), add());
        let received = single_fd(fds).unwrap();
        assert!(same_file(received.as_fd(), netns.as_fd()));
    }

    #[test]
    fn oversize_datagram_is_reported_not_cut() {
        let (ours, theirs) = seqpacket_pair();
        // Bypasses `send`, which refuses to send it at all.
        let big = [0x55; 2000];
        sendmsg::<()>(
            ours.as_raw_fd(),
            &[IoSlice::new(&big)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        send(ours.as_fd(), SNAPSHOT_SENT, None).unwrap();

        let mut buf = [0; MAX_DATAGRAM];
        let err = recv(theirs.as_fd(), &mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ZDS datagram of 2000 bytes is larger than the 1024-byte limit"
        );
        // The oversize datagram is gone whole; the next one reads intact.
        let Datagram::Message { len, .. } = recv(theirs.as_fd(), &mut buf).unwrap() else {
            panic!("peer reported closed");
        };
        assert_eq!(&buf[..len], SNAPSHOT_SENT);
    }

    #[test]
    fn oversize_message_is_not_sent() {
        let (ours, _theirs) = seqpacket_pair();
        let err = send(ours.as_fd(), &[0; MAX_DATAGRAM + 1], None).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { len: 1025 }), "{err}");
    }

    #[test]
    fn add_with_other_than_one_fd_is_rejected() {
        let (ours, theirs) = seqpacket_pair();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let two = [netns.as_raw_fd(), netns.as_raw_fd()];
        sendmsg::<()>(
            ours.as_raw_fd(),
            &[IoSlice::new(ADD)],
            &[ControlMessage::ScmRights(&two)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        send(ours.as_fd(), ADD, None).unwrap();

        let mut buf = [0; MAX_DATAGRAM];
        for expected in [2, 0] {
            let Datagram::Message { fds, .. } = recv(theirs.as_fd(), &mut buf).unwrap() else {
                panic!("peer reported closed");
            };
            let err = single_fd(fds).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("expected exactly one file descriptor, got {expected}")
            );
        }
    }

    #[test]
    fn peer_close_is_reported_as_closed() {
        let (ours, theirs) = seqpacket_pair();
        drop(ours);
        let mut buf = [0; MAX_DATAGRAM];
        assert!(matches!(
            recv(theirs.as_fd(), &mut buf).unwrap(),
            Datagram::Closed
        ));
    }

    #[test]
    fn peer_close_with_unread_datagrams_is_reported_as_closed() {
        let (ours, theirs) = seqpacket_pair();
        send(theirs.as_fd(), SNAPSHOT_SENT, None).unwrap();
        // `ours` goes away without reading what `theirs` sent it.
        drop(ours);
        let mut buf = [0; MAX_DATAGRAM];
        assert!(matches!(
            recv(theirs.as_fd(), &mut buf).unwrap(),
            Datagram::Closed
        ));
    }

    #[tokio::test]
    async fn conn_exchanges_hello_request_and_ack() {
        let (ours, theirs) = seqpacket_pair();
        let server = ZdsConn::from_std(ours).unwrap();
        let ztunnel = ZdsConn::from_std(theirs).unwrap();

        send(ztunnel.fd.get_ref().as_fd(), &encode_hello(), None).unwrap();
        let hello = server.recv().await.unwrap().unwrap();
        assert_eq!(decode_hello(&hello).unwrap(), Version::V1);

        server.send(&Request::SnapshotSent, None).await.unwrap();
        let request = ztunnel.recv().await.unwrap().unwrap();
        assert_eq!(Request::decode(&request).unwrap(), Request::SnapshotSent);

        send(ztunnel.fd.get_ref().as_fd(), &Ack::Ok.encode(), None).unwrap();
        let ack = server.recv().await.unwrap().unwrap();
        assert_eq!(decode_ack(&ack).unwrap(), Ack::Ok);
    }

    #[tokio::test]
    async fn conn_send_waits_for_room_instead_of_failing() {
        let (ours, theirs) = seqpacket_pair();
        let server = ZdsConn::from_std(ours).unwrap();
        let ztunnel = ZdsConn::from_std(theirs).unwrap();
        // Far more than a socket buffer holds, so the sender must wait for
        // the reader.
        const COUNT: usize = 5000;
        let sender = async {
            for i in 0..COUNT {
                let del = Request::Del { uid: i.to_string() };
                server.send(&del, None).await.unwrap();
            }
        };
        let receiver = async {
            for i in 0..COUNT {
                let bytes = ztunnel.recv().await.unwrap().unwrap();
                assert_eq!(
                    Request::decode(&bytes).unwrap(),
                    Request::Del { uid: i.to_string() }
                );
            }
        };
        tokio::join!(sender, receiver);
    }

    #[tokio::test]
    async fn conn_recv_is_none_once_the_peer_closed() {
        let (ours, theirs) = seqpacket_pair();
        let server = ZdsConn::from_std(ours).unwrap();
        drop(theirs);
        assert!(server.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn conn_rejects_fds_from_the_peer() {
        let (ours, theirs) = seqpacket_pair();
        let server = ZdsConn::from_std(ours).unwrap();
        let netns = File::open("/proc/self/ns/net").unwrap();
        send(theirs.as_fd(), ACK_OK, Some(netns.as_fd())).unwrap();
        let err = server.recv().await.unwrap_err();
        assert!(matches!(err, WireError::UnexpectedFds(1)), "{err}");
    }
}
