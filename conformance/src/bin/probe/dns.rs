//! DNS for the conformance suite: the stand-in's DNS proxy (what in-pod
//! ztunnel serves on `127.0.0.1:15053` and `[::1]:15053`), a DNS server
//! (`dns-server`) and a client (`dns`). No real DNS is parsed: a query is
//! opaque bytes and each answer says who gave it (`ztunnel:` or `server:`
//! followed by the query or the upstream's answer), so tests see which
//! hops a query went through. Over TCP, messages use DNS's framing: a 2-byte
//! big-endian length, then the payload.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use ambridge_conformance::event::{self as ev, DnsTransport};
use socket2::{Domain, Socket, Type};

use crate::{io_timeout, mark_as_ztunnel, report};

/// The addresses in-pod ztunnel's DNS proxy listens on, UDP and TCP.
pub const PROXY_ADDRS: [SocketAddr; 2] = [
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15053),
    SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 15053),
];
/// How long the proxy waits for `--dns-upstream` (connect and answer).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for the largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// The transport a query came over.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn socket_type(self) -> Type {
        match self {
            Transport::Udp => Type::DGRAM,
            Transport::Tcp => Type::STREAM,
        }
    }

    fn reported(self) -> DnsTransport {
        match self {
            Transport::Udp => DnsTransport::Udp,
            Transport::Tcp => DnsTransport::Tcp,
        }
    }
}

/// How the `dns` client sends its query.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientTransport {
    /// `sendto` + `recvfrom` on an unconnected socket, as musl's resolver
    /// does: an answer from any source is received.
    Udp,
    /// `connect` + `send` + `recvfrom`, as glibc's resolver does: the
    /// kernel drops answers from any other source than the connected one.
    UdpConnected,
    /// DNS over TCP: one framed query, one framed answer.
    Tcp,
}

impl ClientTransport {
    fn reported(self) -> DnsTransport {
        match self {
            ClientTransport::Udp => DnsTransport::Udp,
            ClientTransport::UdpConnected => DnsTransport::UdpConnected,
            ClientTransport::Tcp => DnsTransport::Tcp,
        }
    }
}

/// Reads one framed message; `None` at EOF before its first byte.
fn read_framed(conn: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    loop {
        match conn.read(&mut len[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    conn.read_exact(&mut len[1..])?;
    let mut message = vec![0; u16::from_be_bytes(len).into()];
    conn.read_exact(&mut message)?;
    Ok(Some(message))
}

/// Writes one framed message, in one write as resolvers do.
fn write_framed(conn: &mut impl Write, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte message does not fit DNS/TCP framing",
                message.len()
            ),
        )
    })?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    conn.write_all(&framed)
}

/// A receive timeout (`EAGAIN` from `SO_RCVTIMEO`) said as one.
fn timed_out(e: io::Error, after: Duration) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {after:?}"),
        )
    } else {
        e
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `prefix` followed by `body`.
fn prefixed(prefix: &[u8], body: &[u8]) -> Vec<u8> {
    [prefix, body].concat()
}

/// The stand-in's UDP DNS proxy on `socket` (bound to `local`): answers
/// each datagram to its sender from the same socket, until the socket is
/// shut down with `stopped` set (its blocked `recv_from` then returns).
pub fn proxy_udp(
    pod: &str,
    socket: UdpSocket,
    local: SocketAddr,
    upstream: Option<SocketAddr>,
    stopped: &AtomicBool,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = socket.recv_from(&mut buf);
        if stopped.load(Ordering::Acquire) {
            return Ok(());
        }
        let (n, peer) = received?;
        let answer = proxy_answer(pod, Transport::Udp, peer, local, &buf[..n], upstream);
        // One client gone is no reason to stop serving the others.
        if let Err(e) = socket.send_to(&answer, peer) {
            report(ev::DnsError {
                pod: Some(pod.to_string()),
                peer: Some(peer),
                error: e.to_string(),
            });
        }
    }
}

/// One TCP connection to the stand-in's DNS proxy on `local`: answers
/// framed queries until the client's EOF.
pub fn proxy_tcp(
    pod: &str,
    conn: Socket,
    local: SocketAddr,
    upstream: Option<SocketAddr>,
) -> io::Result<()> {
    let mut conn: TcpStream = conn.into();
    let peer = conn.peer_addr()?;
    while let Some(query) = read_framed(&mut conn)? {
        let answer = proxy_answer(pod, Transport::Tcp, peer, local, &query, upstream);
        write_framed(&mut conn, &answer)?;
    }
    Ok(())
}

/// The proxy's answer to `query`: `ztunnel:` followed by the query, or by
/// the upstream's answer when there is an upstream (`upstream-error` when
/// it fails). Reports the query.
fn proxy_answer(
    pod: &str,
    transport: Transport,
    peer: SocketAddr,
    local: SocketAddr,
    query: &[u8],
    upstream: Option<SocketAddr>,
) -> Vec<u8> {
    let forwarded = upstream.map(|to| forward(to, transport, query));
    report(ev::DnsQuery {
        pod: Some(pod.to_string()),
        transport: transport.reported(),
        peer,
        local,
        query: text(query),
        upstream,
        upstream_reply: forwarded
            .as_ref()
            .and_then(|r| r.as_ref().ok())
            .map(|r| text(r)),
        upstream_error: forwarded
            .as_ref()
            .and_then(|r| r.as_ref().err())
            .map(|e| e.to_string()),
    });
    let body: &[u8] = match &forwarded {
        None => query,
        Some(Ok(reply)) => reply,
        Some(Err(_)) => b"upstream-error",
    };
    prefixed(b"ztunnel:", body)
}

/// Forwards `query` to `upstream` as ztunnel's proxy does: from a new
/// socket, opened in the calling thread's netns (the pod's) and marked as
/// ztunnel marks its sockets, over the transport the query came over.
fn forward(upstream: SocketAddr, transport: Transport, query: &[u8]) -> io::Result<Vec<u8>> {
    let socket = Socket::new(Domain::for_address(upstream), transport.socket_type(), None)?;
    mark_as_ztunnel(&socket)?;
    socket.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    socket.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    match transport {
        Transport::Udp => {
            let socket: UdpSocket = socket.into();
            socket.send_to(query, upstream)?;
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let (n, from) = socket
                .recv_from(&mut buf)
                .map_err(|e| timed_out(e, UPSTREAM_TIMEOUT))?;
            // A resolver takes answers from the server it asked only.
            if from != upstream {
                return Err(io::Error::other(format!(
                    "answer from {from}, not from {upstream}"
                )));
            }
            Ok(buf[..n].to_vec())
        }
        Transport::Tcp => {
            socket.connect_timeout(&upstream.into(), UPSTREAM_TIMEOUT)?;
            let mut conn: TcpStream = socket.into();
            write_framed(&mut conn, query)?;
            read_framed(&mut conn)
                .map_err(|e| timed_out(e, UPSTREAM_TIMEOUT))?
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed without answering",
                    )
                })
        }
    }
}

/// The `dns-server` role: answers `server:` + the query over UDP and TCP on
/// `listen` (dual-stack when `[::]`) until killed.
pub fn server(listen: SocketAddr) -> io::Result<()> {
    let udp = Socket::new(Domain::for_address(listen), Type::DGRAM, None)?;
    if listen.is_ipv6() {
        udp.set_only_v6(false)?;
    }
    udp.bind(&listen.into())?;
    let udp: UdpSocket = udp.into();
    // The same port for TCP, also when `listen` asked for any port.
    let addr = udp.local_addr()?;
    let tcp = crate::listener(addr)?;
    report(ev::Listening { addr });
    let (done_tx, done_rx) = mpsc::channel();
    let udp_done = done_tx.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let result = (|| loop {
            let (n, peer) = udp.recv_from(&mut buf)?;
            report(ev::DnsQuery {
                pod: None,
                transport: DnsTransport::Udp,
                peer,
                local: addr,
                query: text(&buf[..n]),
                upstream: None,
                upstream_reply: None,
                upstream_error: None,
            });
            udp.send_to(&prefixed(b"server:", &buf[..n]), peer)?;
        })();
        udp_done.send(result).ok();
    });
    thread::spawn(move || {
        let result = (|| loop {
            let (conn, peer) = tcp.accept()?;
            thread::spawn(move || {
                if let Err(e) = serve_tcp(conn, peer) {
                    report(ev::DnsError {
                        pod: None,
                        peer: Some(peer),
                        error: e.to_string(),
                    });
                }
            });
        })();
        done_tx.send(result).ok();
    });
    // Serves until one of the two fails.
    done_rx.recv().expect("a server thread reports")
}

/// One TCP connection to `dns-server`: answers framed queries until EOF.
fn serve_tcp(mut conn: TcpStream, peer: SocketAddr) -> io::Result<()> {
    let local = conn.local_addr()?;
    while let Some(query) = read_framed(&mut conn)? {
        report(ev::DnsQuery {
            pod: None,
            transport: DnsTransport::Tcp,
            peer,
            local,
            query: text(&query),
            upstream: None,
            upstream_reply: None,
            upstream_error: None,
        });
        write_framed(&mut conn, &prefixed(b"server:", &query))?;
    }
    Ok(())
}

/// What the client learnt about its socket, whether or not it got an answer.
#[derive(Default)]
struct Seen {
    from: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

/// The `dns` role: sends one query to `to` and reports the answer. A
/// failure (refused, timed out) is reported with `"ok": false`, not as the
/// process's error, so tests can assert on it.
pub fn client(to: SocketAddr, transport: ClientTransport, query: &str) -> io::Result<()> {
    let mut seen = Seen::default();
    let reply = ask(to, transport, query.as_bytes(), &mut seen);
    report(ev::Dns {
        ok: reply.is_ok(),
        transport: transport.reported(),
        to,
        reply: reply.as_ref().ok().map(|r| text(r)),
        from: seen.from,
        peer: seen.peer,
        local: seen.local,
        error: reply.as_ref().err().map(|e| e.to_string()),
    });
    Ok(())
}

fn ask(
    to: SocketAddr,
    transport: ClientTransport,
    query: &[u8],
    seen: &mut Seen,
) -> io::Result<Vec<u8>> {
    let ty = match transport {
        ClientTransport::Tcp => Type::STREAM,
        ClientTransport::Udp | ClientTransport::UdpConnected => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(to), ty, None)?;
    let wildcard = match to {
        SocketAddr::V4(_) => SocketAddr::from(([0u8; 4], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    socket.bind(&wildcard.into())?;
    seen.local = socket.local_addr()?.as_socket();
    socket.set_read_timeout(Some(io_timeout()))?;
    socket.set_write_timeout(Some(io_timeout()))?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    match transport {
        ClientTransport::Udp => {
            let socket: UdpSocket = socket.into();
            socket.send_to(query, to)?;
            let (n, from) = socket
                .recv_from(&mut buf)
                .map_err(|e| timed_out(e, io_timeout()))?;
            seen.from = Some(from);
            Ok(buf[..n].to_vec())
        }
        ClientTransport::UdpConnected => {
            let socket: UdpSocket = socket.into();
            socket.connect(to)?;
            seen.local = Some(socket.local_addr()?);
            seen.peer = Some(socket.peer_addr()?);
            socket.send(query)?;
            let (n, from) = socket
                .recv_from(&mut buf)
                .map_err(|e| timed_out(e, io_timeout()))?;
            seen.from = Some(from);
            Ok(buf[..n].to_vec())
        }
        ClientTransport::Tcp => {
            socket.connect_timeout(&to.into(), io_timeout())?;
            let mut conn: TcpStream = socket.into();
            seen.local = Some(conn.local_addr()?);
            seen.peer = Some(conn.peer_addr()?);
            write_framed(&mut conn, query)?;
            read_framed(&mut conn)
                .map_err(|e| timed_out(e, io_timeout()))?
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "closed without answering")
                })
        }
    }
}
