//! `ambridge-probe`: what runs *inside* a sandbox pod for the conformance
//! suite and the demo. It first joins a cgroup and a network namespace (so its
//! sockets are charged to the pod and live in its netns, as a container's
//! would), then plays one role and reports JSON lines on stdout.

use std::{
    fs,
    io::{self, Read, Write},
    mem,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use ambridge_conformance::event::{self as ev, ProbeEvent};
use clap::{Parser, Subcommand};
use socket2::{Domain, SockAddr, Socket, Type};

/// The mark ztunnel puts on every socket it opens in a pod (0x539).
const ZTUNNEL_MARK: u32 = 1337;
/// Whether the stand-in marks its sockets with [`ZTUNNEL_MARK`]: not when
/// it runs as an unprivileged `--user` (a sidecar proxy marks nothing, and
/// `SO_MARK` needs `CAP_NET_ADMIN`).
static MARK_SOCKETS: AtomicBool = AtomicBool::new(true);

/// Marks `socket` as ztunnel marks the sockets it opens, unless the probe
/// runs as an unprivileged `--user`.
fn mark_as_ztunnel(socket: &Socket) -> io::Result<()> {
    if MARK_SOCKETS.load(Ordering::Relaxed) {
        socket.set_mark(ZTUNNEL_MARK)?;
    }
    Ok(())
}
/// I/O and connect timeout in milliseconds (`--timeout-ms`).
static TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(10_000);

fn io_timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

#[derive(Parser)]
struct Cli {
    /// cgroup v2 directory to join before anything else.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Network namespace (e.g. /run/netns/NAME) to enter.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Connect and I/O timeout.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Wait for a line on stdin before joining the cgroup and netns (and
    /// report `released` with the CLOCK_MONOTONIC time then): a container
    /// whose first instruction runs the instant its runtime starts it.
    #[arg(long)]
    start_on_stdin: bool,
    /// Run as `UID:GID`, with no supplementary group and no capability,
    /// once the cgroup and netns are joined, as a sidecar proxy runs
    /// (Istio's as 1337:1337). The ztunnel stand-in takes it on once its
    /// listeners are open (`--pod-netns` only: opening them needs
    /// privilege), and then marks none of its sockets.
    #[arg(long, value_parser = parse_user)]
    user: Option<User>,
    #[command(subcommand)]
    role: Role,
}

/// A process's identity for `--user`.
#[derive(Clone, Copy, Debug)]
struct User {
    uid: u32,
    gid: u32,
}

fn parse_user(text: &str) -> Result<User, String> {
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not UID:GID"))?;
    let number = |n: &str| {
        n.parse::<u32>()
            .map_err(|e| format!("{n:?} in {text:?}: {e}"))
    };
    Ok(User {
        uid: number(uid)?,
        gid: number(gid)?,
    })
}

/// Becomes `user` in every thread (glibc applies set*id calls to the
/// whole process): real, effective and saved IDs, no supplementary group;
/// a non-zero UID drops every capability.
fn become_user(user: User) -> io::Result<()> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    setgroups(&[])?;
    setresgid(gid, gid, gid)?;
    setresuid(uid, uid, uid)?;
    MARK_SOCKETS.store(false, Ordering::Relaxed);
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Io {
    Blocking,
    Poll,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Relay {
    Poll,
    Splice,
}

/// The port of the inbound (HBONE) leg.
const HBONE_PORT: u16 = 15008;
/// The port of plaintext inbound capture.
const INBOUND_PLAINTEXT_PORT: u16 = 15006;

#[derive(Subcommand)]
enum Role {
    /// Connect, send `bytes` bytes, read them back, report both ends. With
    /// `--count` above 1, connect that many times one after another and
    /// report one summary.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// How the client reads: `blocking` (plain blocking recv, like
        /// C, Java or Rust std code) or `poll` (non-blocking, like tokio,
        /// Go or Node).
        #[arg(long, value_enum, default_value = "blocking")]
        io: Io,
        /// Write the bytes and close at once, reading nothing back (a
        /// syslog or statsd client, `nc -q0`).
        #[arg(long)]
        write_only: bool,
        /// Connect one after another until this file exists (`--count`
        /// is then ignored), then report the summary.
        #[arg(long)]
        until: Option<PathBuf>,
        /// Bind to this address (a fixed source port) before connecting,
        /// with `SO_REUSEADDR` as such clients set it.
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// Keep the connection open this long after connecting, before the
        /// exchange (a connection that stays up while others start).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Echo server: report every accepted connection, echo until EOF.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// ztunnel stand-in: listen on `port` inside each pod netns (named
    /// with `--pod-netns`, or handed over ZDS with `--zds`), read
    /// SO_ORIGINAL_DST as ztunnel does, relay to the original destination.
    Ztunnel {
        /// Pod network namespaces to open listeners in.
        #[arg(long = "pod-netns", required_unless_present_any = ["zds", "in_place"])]
        pods: Vec<PathBuf>,
        /// Listen in the network namespace this probe entered (`--netns`)
        /// instead, without switching namespaces, as a sidecar proxy
        /// listens in its own pod: with `--user`, the user is taken on
        /// first, so the listeners are bound by it (the node agent
        /// registers a sidecar proxy's 15006 only when the proxy's uid or
        /// gid binds it).
        #[arg(long, conflicts_with_all = ["pods", "zds"])]
        in_place: bool,
        /// The inbound leg to the application binds this address (port
        /// 0), one per family, rather than the client's
        /// (`IP_TRANSPARENT`): a sidecar's Envoy connects to the
        /// application from 127.0.0.6 (its inbound passthrough).
        #[arg(long = "inbound-source")]
        inbound_sources: Vec<std::net::IpAddr>,
        /// Answer plaintext inbound connections (15006) itself, echoing
        /// what the client sends, rather than relaying them to the
        /// application: for tests of where connections land, apart from
        /// where the proxy's own legs go.
        #[arg(long)]
        inbound_echo: bool,
        /// Answer outbound connections (`port`) itself, once it has their
        /// original destination, echoing what the client sends, rather
        /// than relaying them: for tests of where connections land, apart
        /// from where the proxy's own legs go.
        #[arg(long)]
        outbound_echo: bool,
        #[arg(long, default_value_t = 15001)]
        port: u16,
        /// How bytes are relayed: `poll` (buffered reads like today's
        /// ztunnel) or `splice` (zero-copy, like older proxies).
        #[arg(long, value_enum, default_value = "poll")]
        relay: Relay,
        /// Also listen on 15008 for the inbound leg, and send outbound
        /// connections to `<original ip>:15008` with a header naming the
        /// target and the client, as HBONE does.
        #[arg(long)]
        hbone: bool,
        /// Send the HBONE leg here instead of `<original ip>:15008` (the
        /// shared-ztunnel model, where ztunnel serves the destination too).
        #[arg(long)]
        hbone_via: Option<SocketAddr>,
        /// Also take pods over ZDS, as in-pod ztunnel does: connect to the
        /// node agent's `SOCK_SEQPACKET` socket here, say hello, and open
        /// the listeners in the netns each Add carries.
        #[arg(long)]
        zds: Option<PathBuf>,
        /// Refuse the first `--zds-nack-count` Adds of this pod UID, so
        /// that tests can see a refused pod retried.
        #[arg(long = "zds-nack", requires = "zds")]
        zds_nacks: Vec<String>,
        /// How many Adds of each `--zds-nack` UID to refuse.
        #[arg(long, default_value_t = 1, requires = "zds")]
        zds_nack_count: usize,
        /// Close the first ZDS connection after answering this many
        /// requests (keeping its listeners) and connect again, as ztunnel
        /// does when its ZDS connection fails.
        #[arg(long, requires = "zds")]
        zds_drop_after: Option<usize>,
        /// Do not listen on 15006 (plaintext inbound) in each pod.
        #[arg(long)]
        no_inbound: bool,
        /// Do not open the DNS proxy (127.0.0.1:15053 and [::1]:15053, UDP
        /// and TCP) in each pod.
        #[arg(long)]
        no_dns: bool,
        /// Forward each DNS query here (from a new marked socket in the pod,
        /// over the query's transport) instead of answering it itself.
        #[arg(long, conflicts_with = "no_dns")]
        dns_upstream: Option<SocketAddr>,
        /// Wait this long before each `accept()` on the capture ports, as
        /// a busy ztunnel does.
        #[arg(long, default_value_t = 0)]
        accept_delay_ms: u64,
        /// Listen on each capture port twice, on `0.0.0.0` and on an
        /// IPv6-only `[::]`, as a dual-stack Envoy does, rather than once
        /// on a dual-stack `[::]`.
        #[arg(long)]
        split_stack: bool,
    },
    /// Sleep until killed: the pod sandbox's own process.
    Pause,
    /// Benchmark echo server (tokio).
    BenchEcho {
        #[arg(long)]
        listen: SocketAddr,
        /// Listen on this many consecutive ports from `--listen`'s.
        #[arg(long, default_value_t = 1)]
        ports: u16,
    },
    /// Benchmark relay (tokio) listening in each pod netns.
    BenchRelay(bench::RelayArgs),
    /// Benchmark DNS server (tokio, UDP): answers each query with itself.
    BenchDns {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Benchmark load generator (tokio).
    BenchLoad {
        #[arg(long)]
        to: SocketAddr,
        #[command(subcommand)]
        what: bench::Load,
    },
    /// UDP echo server: report every datagram's source, send it back.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect a UDP socket, send one datagram, report who answered.
    Udp {
        #[arg(long)]
        to: SocketAddr,
    },
    /// DNS server: answer every query with `server:` + the query, over UDP
    /// and TCP (2-byte length framing) on the same address.
    DnsServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send one DNS query, wait for one answer, report it (or why there was
    /// none, still exiting 0).
    Dns {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_enum)]
        transport: dns::ClientTransport,
        #[arg(long)]
        query: String,
    },
    /// Read socket options on both ends of a loopback connection and print
    /// them, to compare with and without the getsockopt program.
    Sockopts,
    /// A victim's long-lived connection: a numbered message every
    /// `--interval-ms`, each echo checked.
    Session {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 20)]
        messages: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Create a TCP socket and hand it to the process on the unix socket
    /// `--via`, unconnected.
    FdSend {
        #[arg(long)]
        via: PathBuf,
        /// Its family is this address's.
        #[arg(long)]
        to: SocketAddr,
    },
    /// Take a TCP socket handed over on the unix socket `--at` and connect
    /// it to `--to` from this process.
    FdConnect {
        #[arg(long)]
        at: PathBuf,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 16)]
        bytes: usize,
    },
    /// An attacker's loop connection with a victim's 4-tuple, in a netns
    /// holding the victim's address: reports what it received.
    Hijack {
        /// The victim's address, its connection's source.
        #[arg(long)]
        addr: std::net::IpAddr,
        #[arg(long)]
        source_port: u16,
        /// Where the victim's connection landed (its destination); the
        /// victim's address by default.
        #[arg(long)]
        landed: Option<std::net::IpAddr>,
        #[arg(long, default_value_t = 15001)]
        port: u16,
        #[arg(long, default_value_t = 1000)]
        duration_ms: u64,
    },
    /// A scripted ZDS peer, for misbehaving ones: connect to the node
    /// agent's socket, play the steps in order, then wait until the node
    /// agent closes the connection.
    ZdsPeer {
        #[arg(long)]
        zds: PathBuf,
        /// `hello` (ztunnel's V1 hello), `send:<hex>` (one datagram),
        /// `send:<hex byte>x<count>` (one datagram of `count` such bytes),
        /// or `recv` (one datagram, reported with the fds it carried).
        steps: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    TIMEOUT_MS.store(cli.timeout_ms, std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = enter(&cli) {
        report(ev::Error {
            error: format!("entering the pod: {e}"),
            netns: None,
        });
        std::process::exit(2);
    }
    let result = match cli.role {
        Role::Connect {
            to,
            bytes,
            count,
            write_only: true,
            ..
        } => write_and_close(to, bytes, count),
        Role::Connect {
            to,
            bytes,
            io,
            until: Some(stop),
            ..
        } => connect_many(to, bytes, Until::Exists(stop), io),
        Role::Connect {
            to,
            bytes,
            count: 1,
            io,
            bind,
            hold_ms,
            ..
        } => connect(to, bytes, io, bind, Duration::from_millis(hold_ms)).map(report),
        Role::Connect {
            to,
            bytes,
            count,
            io,
            ..
        } => connect_many(to, bytes, Until::Count(count), io),
        Role::Echo { listen } => echo(listen),
        Role::Ztunnel {
            pods,
            in_place,
            inbound_sources,
            inbound_echo,
            outbound_echo,
            port,
            relay,
            hbone,
            hbone_via,
            zds,
            zds_nacks,
            zds_nack_count,
            zds_drop_after,
            no_inbound,
            no_dns,
            dns_upstream,
            accept_delay_ms,
            split_stack,
        } => ztunnel(
            &pods,
            in_place.then(|| cli.netns.as_deref().unwrap_or(Path::new("own netns"))),
            cli.user,
            Serving {
                port,
                relay,
                hbone: hbone.then_some(hbone_via),
                inbound: !no_inbound,
                inbound_source4: inbound_sources.iter().find(|ip| ip.is_ipv4()).copied(),
                inbound_source6: inbound_sources.iter().find(|ip| ip.is_ipv6()).copied(),
                inbound_echo,
                outbound_echo,
                dns: !no_dns,
                dns_upstream,
                accept_delay: Duration::from_millis(accept_delay_ms),
                split_stack,
            },
            zds.map(|socket| zds::Options {
                socket,
                nacks: zds_nacks,
                nack_count: zds_nack_count,
                drop_after: zds_drop_after,
            }),
        ),
        Role::Pause => loop {
            thread::park();
        },
        Role::BenchEcho { listen, ports } => bench::echo(listen, ports),
        Role::BenchRelay(args) => bench::relay(args),
        Role::BenchDns { listen } => bench::dns_server(listen),
        Role::BenchLoad { to, what } => bench::load(to, what),
        Role::UdpEcho { listen } => udp_echo(listen),
        Role::Udp { to } => udp(to),
        Role::DnsServer { listen } => dns::server(listen),
        Role::Dns {
            to,
            transport,
            query,
        } => dns::client(to, transport, &query),
        Role::Sockopts => sockopts(),
        Role::Session {
            to,
            messages,
            interval_ms,
        } => attack::session(to, messages, Duration::from_millis(interval_ms)),
        Role::FdSend { via, to } => attack::fd_send(&via, to),
        Role::FdConnect { at, to, bytes } => attack::fd_connect(&at, to, bytes),
        Role::Hijack {
            addr,
            source_port,
            landed,
            port,
            duration_ms,
        } => attack::hijack(
            (addr, source_port),
            SocketAddr::new(landed.unwrap_or(addr), port),
            Duration::from_millis(duration_ms),
        ),
        Role::ZdsPeer { zds, steps } => zds::scripted_peer(&zds, &steps),
    };
    if let Err(e) = result {
        report(ev::Error {
            error: e.to_string(),
            netns: None,
        });
        std::process::exit(1);
    }
}

fn report(event: impl Into<ProbeEvent>) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", event.into());
    let _ = out.flush();
}

/// Joins the cgroup (the whole process: sockets are charged to the creating
/// task's cgroup) and then the network namespace.
fn enter(cli: &Cli) -> io::Result<()> {
    if cli.start_on_stdin {
        let mut line = String::new();
        io::stdin().read_line(&mut line)?;
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
        let at_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        report(ev::Released {
            monotonic_ns: at_ns,
        });
    }
    if let Some(cgroup) = &cli.cgroup {
        fs::write(cgroup.join("cgroup.procs"), "0")?;
    }
    if let Some(netns) = &cli.netns {
        enter_netns(netns)?;
    }
    // The stand-in still opens its listeners first (`ztunnel`).
    if let Some(user) = cli.user
        && !matches!(cli.role, Role::Ztunnel { .. })
    {
        become_user(user)?;
    }
    Ok(())
}

/// Moves the calling thread into a network namespace.
fn enter_netns(path: &Path) -> io::Result<()> {
    let ns = fs::File::open(path)?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// `count` connections at once, each writing `bytes` and closing without
/// reading; one summary.
fn write_and_close(to: SocketAddr, bytes: usize, count: usize) -> io::Result<()> {
    let workers: Vec<_> = (0..count)
        .map(|_| {
            thread::spawn(move || -> io::Result<()> {
                let mut s = TcpStream::connect_timeout(&to, io_timeout())?;
                s.write_all(&pattern(bytes))?;
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .filter_map(|w| match w.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("writer panicked".into()),
        })
        .collect();
    report(ev::ConnectSummary {
        to,
        ok: (count - failures.len()) as u64,
        failed: failures.len() as u64,
        failures,
    });
    Ok(())
}

/// When a connect loop ends.
enum Until {
    Count(usize),
    Exists(PathBuf),
}

fn connect_many(to: SocketAddr, bytes: usize, until: Until, io: Io) -> io::Result<()> {
    let mut ok = 0;
    let mut count = 0;
    let mut failures: Vec<String> = Vec::new();
    while match &until {
        Until::Count(n) => count < *n,
        Until::Exists(stop) => !stop.exists(),
    } {
        count += 1;
        let result = connect(to, bytes, io, None, Duration::ZERO)?;
        if result.ok {
            ok += 1;
            continue;
        }
        // The first few distinct reasons: a rare one after many of a
        // common one (EPERM while held) is the one worth reading.
        let reason = result.error.unwrap_or_else(|| {
            format!(
                "{} of {} bytes came back, intact: {}",
                result.received, result.sent, result.intact
            )
        });
        if failures.len() < 5 && !failures.contains(&reason) {
            failures.push(reason);
        }
    }
    report(ev::ConnectSummary {
        to,
        ok: ok as u64,
        failed: (count - ok) as u64,
        failures,
    });
    Ok(())
}

/// A TCP connection to `to`, from `bind` if given.
fn open(to: SocketAddr, bind: Option<SocketAddr>) -> io::Result<TcpStream> {
    let Some(bind) = bind else {
        return TcpStream::connect_timeout(&to, io_timeout());
    };
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&bind.into())?;
    socket.connect_timeout(&to.into(), io_timeout())?;
    Ok(socket.into())
}

fn connect(
    to: SocketAddr,
    bytes: usize,
    io: Io,
    bind: Option<SocketAddr>,
    hold: Duration,
) -> io::Result<ev::Connect> {
    // Refused, or reset right after its handshake (no peer any more,
    // ENOTCONN): a failed connect, not the loop's end.
    let opened = open(to, bind).and_then(|stream| {
        let ends = (stream.local_addr()?, stream.peer_addr()?);
        Ok((stream, ends))
    });
    let (stream, (local, peer)) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            return Ok(ev::Connect {
                ok: false,
                to,
                local: None,
                peer: None,
                sent: 0,
                received: 0,
                intact: false,
                error: Some(e.to_string()),
            });
        }
    };
    stream.set_read_timeout(Some(io_timeout()))?;
    stream.set_write_timeout(Some(io_timeout()))?;
    thread::sleep(hold);
    let sent = pattern(bytes);
    let writer = {
        let mut s = stream.try_clone()?;
        let sent = sent.clone();
        thread::spawn(move || -> io::Result<()> {
            match io {
                Io::Blocking => s.write_all(&sent)?,
                Io::Poll => polled::send_all(&s, &sent)?,
            }
            s.shutdown(Shutdown::Write)
        })
    };
    let mut got = Vec::with_capacity(bytes);
    let read = match io {
        Io::Blocking => (&stream).read_to_end(&mut got),
        Io::Poll => polled::read_to_end(&stream, &mut got),
    };
    let wrote = writer.join().expect("writer thread");
    Ok(ev::Connect {
        ok: read.is_ok() && wrote.is_ok() && got == sent,
        to,
        local: Some(local),
        peer: Some(peer),
        sent: sent.len() as u64,
        received: got.len() as u64,
        intact: got == sent,
        error: read.err().or(wrote.err()).map(|e| e.to_string()),
    })
}

/// A TCP connection's peer and local addresses.
fn inet_ends(conn: &Socket) -> io::Result<(SocketAddr, SocketAddr)> {
    let inet = |addr: SockAddr| {
        addr.as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    };
    Ok((inet(conn.peer_addr()?)?, inet(conn.local_addr()?)?))
}

/// A dual-stack listener when `addr` is `[::]`.
fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn echo(addr: SocketAddr) -> io::Result<()> {
    let listener = listener(addr)?;
    report(ev::Listening { addr });
    loop {
        let (mut conn, accepted_from) = listener.accept()?;
        report(ev::Accepted {
            accept_addr: accepted_from,
            peer: conn.peer_addr()?,
            local: conn.local_addr()?,
        });
        thread::spawn(move || {
            let mut back = conn.try_clone()?;
            io::copy(&mut conn, &mut back)?;
            back.shutdown(Shutdown::Write)
        });
    }
}

fn udp_echo(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    report(ev::Listening { addr });
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        report(ev::Datagram {
            from,
            bytes: n as u64,
        });
        socket.send_to(&buf[..n], from)?;
    }
}

fn udp(to: SocketAddr) -> io::Result<()> {
    let bind: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(io_timeout()))?;
    socket.connect(to)?;
    socket.send(b"ping")?;
    let mut buf = [0u8; 16];
    let n = socket.recv(&mut buf)?;
    report(ev::Udp {
        ok: &buf[..n] == b"ping",
        peer: socket.peer_addr()?,
        to,
    });
    Ok(())
}

mod attack;
mod bench;
mod dns;
mod polled;

mod spliced;

mod zds;

/// Reads the original destination exactly as ztunnel does: `SOL_IP`
/// first, then `SOL_IPV6`.
fn original_dst(socket: &Socket) -> io::Result<SocketAddr> {
    let addr: SockAddr = socket
        .original_dst_v4()
        .or_else(|_| socket.original_dst_v6())?;
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))
}

/// How the stand-in serves every pod, whether it was named with
/// `--pod-netns` or handed over ZDS.
#[derive(Clone, Copy)]
struct Serving {
    /// The capture port (15001 outbound, 15006 inbound plaintext).
    port: u16,
    relay: Relay,
    /// `None` relays straight to the original destination; `Some(via)`
    /// also serves the inbound leg on 15008 and sends outbound connections
    /// to `via` (or `<original ip>:15008`).
    hbone: Option<Option<SocketAddr>>,
    /// Also serve plaintext inbound on 15006, as ztunnel always does.
    inbound: bool,
    /// What the inbound leg binds, by the application's family, rather
    /// than the client's address (`--inbound-source`).
    inbound_source4: Option<std::net::IpAddr>,
    inbound_source6: Option<std::net::IpAddr>,
    /// Echo plaintext inbound connections rather than relay them
    /// (`--inbound-echo`).
    inbound_echo: bool,
    /// Echo outbound connections rather than relay them
    /// (`--outbound-echo`).
    outbound_echo: bool,
    /// Also serve ztunnel's DNS proxy on 15053 (UDP and TCP, both
    /// loopbacks).
    dns: bool,
    /// Where the DNS proxy forwards queries; `None` answers them itself.
    dns_upstream: Option<SocketAddr>,
    /// How long each TCP `accept()` waits first.
    accept_delay: Duration,
    /// Each capture port on two sockets, one per family (`--split-stack`).
    split_stack: bool,
}

/// One socket the stand-in listens on in a pod, served by its own thread.
#[derive(Clone, Copy)]
enum Listen {
    /// A TCP capture port (outbound, 15006 or 15008), for the families of
    /// its [`Stack`].
    Capture(u16, Stack),
    /// The DNS proxy on one loopback address.
    Dns(SocketAddr, dns::Transport),
}

/// The families a capture listener takes.
#[derive(Clone, Copy)]
enum Stack {
    /// `[::]` with `IPV6_V6ONLY` off: both.
    Dual,
    /// `0.0.0.0`.
    V4,
    /// `[::]` with `IPV6_V6ONLY` on.
    V6Only,
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Capture(port, Stack::Dual) => write!(f, "listener on {port}"),
            Listen::Capture(port, Stack::V4) => write!(f, "IPv4 listener on {port}"),
            Listen::Capture(port, Stack::V6Only) => write!(f, "IPv6-only listener on {port}"),
            Listen::Dns(addr, dns::Transport::Udp) => write!(f, "DNS proxy on udp {addr}"),
            Listen::Dns(addr, dns::Transport::Tcp) => write!(f, "DNS proxy on tcp {addr}"),
        }
    }
}

impl Serving {
    /// What to open in each pod; a port asked for twice is opened once.
    fn listens(&self) -> Vec<Listen> {
        let mut ports = vec![self.port];
        for (wanted, port) in [
            (self.hbone.is_some(), HBONE_PORT),
            (self.inbound, INBOUND_PLAINTEXT_PORT),
        ] {
            if wanted && !ports.contains(&port) {
                ports.push(port);
            }
        }
        let stacks: &[Stack] = if self.split_stack {
            &[Stack::V4, Stack::V6Only]
        } else {
            &[Stack::Dual]
        };
        let mut listens: Vec<Listen> = ports
            .into_iter()
            .flat_map(|port| {
                stacks
                    .iter()
                    .map(move |stack| Listen::Capture(port, *stack))
            })
            .collect();
        if self.dns {
            for addr in dns::PROXY_ADDRS {
                for transport in [dns::Transport::Udp, dns::Transport::Tcp] {
                    listens.push(Listen::Dns(addr, transport));
                }
            }
        }
        listens
    }
}

/// One pod's listeners, each serving on its own thread inside the pod's
/// netns. Dropping it stops them: nothing listens on their ports in the
/// pod once the drop returns.
struct PodListeners {
    /// A second handle on each listening socket. Shutting it down stops a
    /// TCP listener and wakes its thread's blocked `accept` (with `EINVAL`);
    /// on a UDP socket it wakes the blocked `recv_from` (which returns 0).
    /// The thread then drops its socket, which closes it (the port is free
    /// once the thread is joined and the handle dropped).
    handles: Vec<Socket>,
    /// Tells the threads that a failing `accept` (or a UDP wake-up) is the
    /// stop, not an error or a datagram.
    stopped: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<io::Result<()>>>,
}

impl PodListeners {
    /// Opens the listeners `serving` asks for inside the network namespace
    /// `netns`; `pod` names the pod in events and errors.
    fn open(netns: OwnedFd, pod: &str, serving: Serving) -> io::Result<Self> {
        Self::open_in(Some(netns), pod, serving)
    }

    /// As [`PodListeners::open`], in the calling thread's own network
    /// namespace with `None` (no namespace switch: no privilege needed).
    fn open_in(netns: Option<OwnedFd>, pod: &str, serving: Serving) -> io::Result<Self> {
        let netns = Arc::new(netns);
        let mut opened = PodListeners {
            handles: Vec::new(),
            stopped: Arc::default(),
            threads: Vec::new(),
        };
        for listen in serving.listens() {
            let (ready_tx, ready_rx) = mpsc::channel();
            let netns = netns.clone();
            let stopped = opened.stopped.clone();
            let pod_label = pod.to_string();
            opened
                .threads
                .push(thread::spawn(move || -> io::Result<()> {
                    let socket = match bind_in(netns.as_ref().as_ref(), listen) {
                        Ok(Some((socket, handle))) => {
                            ready_tx.send(Ok(Some(handle))).ok();
                            socket
                        }
                        // Skipped (no IPv6 loopback) or failed: the opener
                        // goes on or returns the error; this thread has
                        // nothing to serve.
                        other => {
                            ready_tx.send(other.map(|_| None)).ok();
                            return Ok(());
                        }
                    };
                    serve_listen(&pod_label, socket, listen, serving, &stopped)
                }));
            // On error, dropping `opened` stops the listeners already open.
            let handle = ready_rx
                .recv()
                .map_err(|_| io::Error::other(format!("listener thread for {pod} died")))?
                .map_err(|e| io::Error::new(e.kind(), format!("{listen} in {pod}: {e}")))?;
            opened.handles.extend(handle);
        }
        Ok(opened)
    }

    /// Serves until a listener fails, which ends the wait with its error.
    fn serve(mut self) -> io::Result<()> {
        for t in mem::take(&mut self.threads) {
            t.join().expect("listener thread")?;
        }
        Ok(())
    }
}

impl Drop for PodListeners {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        for handle in &self.handles {
            // A listener's only failure mode here is being stopped already;
            // an unconnected UDP socket answers `ENOTCONN` but is woken.
            let _ = handle.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread into `netns` for good and opens `listen` there,
/// as in-pod ztunnel does: a socket keeps the netns it was created in, and
/// the threads this one spawns (connections, DNS upstreams) start in it.
/// With no `netns`, opens it in the thread's own. Returns the socket and a
/// second handle on it, or `None` for the `[::1]` DNS proxy in a netns
/// without IPv6 loopback (ztunnel then serves IPv4 only).
fn bind_in(netns: Option<&OwnedFd>, listen: Listen) -> io::Result<Option<(Socket, Socket)>> {
    if let Some(netns) = netns {
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    let (addr, ty) = match listen {
        Listen::Capture(port, Stack::V4) => (SocketAddr::from(([0u8; 4], port)), Type::STREAM),
        Listen::Capture(port, _) => (SocketAddr::from(([0u16; 8], port)), Type::STREAM),
        Listen::Dns(addr, transport) => (addr, transport.socket_type()),
    };
    let ipv6_optional = matches!(listen, Listen::Dns(..)) && addr.is_ipv6();
    let socket = match Socket::new(Domain::for_address(addr), ty, None) {
        Err(e) if ipv6_optional && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return Ok(None);
        }
        socket => socket?,
    };
    if addr.is_ipv6() {
        // A dual-stack capture port takes both families; `[::1]` is IPv6
        // only.
        socket.set_only_v6(!matches!(listen, Listen::Capture(_, Stack::Dual)))?;
    }
    socket.set_reuse_address(true)?;
    // During an upgrade a new ztunnel binds the same ports in the pod's
    // netns while the old one still serves, as ztunnel does.
    socket.set_reuse_port(true)?;
    match socket.bind(&addr.into()) {
        Err(e) if ipv6_optional && e.kind() == io::ErrorKind::AddrNotAvailable => {
            return Ok(None);
        }
        bound => bound?,
    }
    if ty == Type::STREAM {
        // tokio's default backlog, which ztunnel's listeners have.
        socket.listen(1024)?;
    }
    let handle = socket.try_clone()?;
    Ok(Some((socket, handle)))
}

/// Serves one listener until it is stopped (`stopped` set and the socket
/// shut down) or fails; each TCP connection is served on its own thread,
/// which inherits this thread's netns, so that its upstream sockets are
/// opened in the pod, as ztunnel's are.
fn serve_listen(
    pod: &str,
    socket: Socket,
    listen: Listen,
    serving: Serving,
    stopped: &AtomicBool,
) -> io::Result<()> {
    if let Listen::Dns(addr, dns::Transport::Udp) = listen {
        return dns::proxy_udp(pod, socket.into(), addr, serving.dns_upstream, stopped);
    }
    let l: TcpListener = socket.into();
    loop {
        thread::sleep(serving.accept_delay);
        let conn = match l.accept().map(|(conn, _)| conn) {
            Ok(conn) => Socket::from(conn),
            Err(_) if stopped.load(Ordering::Acquire) => return Ok(()),
            Err(e) => return Err(e),
        };
        let pod = pod.to_string();
        thread::spawn(move || {
            let result = match listen {
                Listen::Capture(HBONE_PORT, _) => inbound_hbone(&pod, conn, serving),
                Listen::Capture(INBOUND_PLAINTEXT_PORT, _) => {
                    inbound_plaintext(&pod, conn, serving)
                }
                Listen::Capture(..) => outbound(&pod, conn, serving),
                Listen::Dns(addr, _) => dns::proxy_tcp(&pod, conn, addr, serving.dns_upstream),
            };
            if let Err(e) = result {
                let error = e.to_string();
                match listen {
                    Listen::Capture(..) => report(ev::RelayError { pod, error }),
                    Listen::Dns(..) => report(ev::DnsError {
                        pod: Some(pod),
                        peer: None,
                        error,
                    }),
                }
            }
        });
    }
}

/// Opens the listeners in each of `pods` and, with `zds`, in each pod the
/// node agent hands over; then, with `user`, becomes that user; serves
/// until killed. With `in_place` (the netns the probe entered), becomes
/// `user` first and opens the listeners there, in its own netns.
fn ztunnel(
    pods: &[PathBuf],
    in_place: Option<&Path>,
    user: Option<User>,
    serving: Serving,
    zds: Option<zds::Options>,
) -> io::Result<()> {
    if user.is_some() && zds.is_some() {
        return Err(io::Error::other(
            "--user with --zds: the listeners of pods handed over later could not be opened",
        ));
    }
    let mut named = Vec::new();
    if let Some(netns) = in_place {
        if let Some(user) = user {
            become_user(user)?;
        }
        named.push(PodListeners::open_in(
            None,
            &netns.display().to_string(),
            serving,
        )?);
    }
    for path in pods {
        let netns = fs::File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
        named.push(PodListeners::open(
            netns.into(),
            &path.display().to_string(),
            serving,
        )?);
    }
    if let Some(user) = user.filter(|_| in_place.is_none()) {
        become_user(user)?;
    }
    let session = zds.as_ref().map(zds::Session::connect).transpose()?;
    report(ev::ZtunnelListening {
        pods: named.len() as u64,
        port: serving.port,
        hbone: serving.hbone.is_some(),
        inbound: serving.inbound,
        dns: serving.dns,
        dns_upstream: serving.dns_upstream,
        zds: zds.as_ref().map(|z| z.socket.clone()),
    });
    if let Some(session) = session {
        thread::spawn(move || {
            if let Err(e) = session.run(serving) {
                report(ev::Error {
                    error: format!("ZDS: {e}"),
                    netns: None,
                });
                std::process::exit(1);
            }
        });
    }
    for pod in named {
        pod.serve()?;
    }
    // Reached only with no `--pod-netns`, so with `--zds`.
    loop {
        thread::park();
    }
}

/// The outbound leg: where was the client going, and relay there (or to the
/// destination's HBONE port, telling it the target and the client; or, with
/// `--outbound-echo`, echo it).
fn outbound(pod: &str, client: Socket, serving: Serving) -> io::Result<()> {
    let (relay, hbone) = (serving.relay, serving.hbone);
    let (peer, local) = inet_ends(&client)?;
    let orig = original_dst(&client);
    report(ev::OutboundAccepted {
        pod: pod.to_string(),
        peer,
        local,
        orig_dst: orig.as_ref().ok().copied(),
        orig_dst_error: orig.as_ref().err().map(|e| e.to_string()),
    });
    let orig = orig?;
    if serving.outbound_echo {
        let mut client: TcpStream = client.into();
        let mut back = client.try_clone()?;
        io::copy(&mut client, &mut back)?;
        return back.shutdown(Shutdown::Write);
    }
    let next_hop = match hbone {
        None => orig,
        Some(via) => via.unwrap_or(SocketAddr::new(orig.ip(), HBONE_PORT)),
    };
    // The upstream leg is opened in the pod's netns (this thread's), marked
    // as ztunnel marks its sockets.
    let upstream = Socket::new(Domain::for_address(next_hop), Type::STREAM, None)?;
    mark_as_ztunnel(&upstream)?;
    upstream.connect_timeout(&next_hop.into(), io_timeout())?;
    let upstream: TcpStream = upstream.into();
    if hbone.is_some() {
        let client_ip = peer.ip().to_canonical();
        polled::send_all(
            &upstream,
            format!("CONNECT {orig} {client_ip}\n").as_bytes(),
        )?;
    }
    let (up, down) = relay_both(client.into(), upstream, relay)?;
    report(ev::OutboundRelayed {
        orig_dst: orig,
        bytes_up: up,
        bytes_down: down,
    });
    Ok(())
}

/// The HBONE inbound leg: the header names the target and the client.
fn inbound_hbone(pod: &str, conn: Socket, serving: Serving) -> io::Result<()> {
    let conn: TcpStream = conn.into();
    let header = read_line(&conn)?;
    let mut words = header.split_whitespace();
    let (Some("CONNECT"), Some(target), Some(client)) = (words.next(), words.next(), words.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad header {header:?}"),
        ));
    };
    let target: SocketAddr = target
        .parse()
        .map_err(|e| io::Error::other(format!("{e}")))?;
    let client: std::net::IpAddr = client
        .parse()
        .map_err(|e| io::Error::other(format!("{e}")))?;
    inbound(pod, conn, target, client, serving)
}

/// The plaintext inbound leg (15006): the target is the original
/// destination (the local address if there is none, as ztunnel falls back
/// to), the client is the peer.
fn inbound_plaintext(pod: &str, conn: Socket, serving: Serving) -> io::Result<()> {
    let (peer, local) = inet_ends(&conn)?;
    let orig = original_dst(&conn);
    report(ev::InboundAccepted {
        pod: pod.to_string(),
        peer,
        local,
        orig_dst: orig.as_ref().ok().copied(),
        orig_dst_error: orig.as_ref().err().map(|e| e.to_string()),
    });
    if serving.inbound_echo {
        let mut conn: TcpStream = conn.into();
        let mut back = conn.try_clone()?;
        io::copy(&mut conn, &mut back)?;
        return back.shutdown(Shutdown::Write);
    }
    let target = orig.unwrap_or(local);
    // A dual-stack listener reports IPv4 as IPv4-mapped; ztunnel connects
    // to the canonical address, in the family of the client's.
    let target = SocketAddr::new(target.ip().to_canonical(), target.port());
    // ztunnel refuses a self-call: nothing to relay to.
    if [15001, HBONE_PORT, INBOUND_PLAINTEXT_PORT].contains(&target.port()) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{target} is one of ztunnel's own capture ports"),
        ));
    }
    let client = peer.ip().to_canonical();
    // A leg of its own captured back to it would go round for ever.
    if [serving.inbound_source4, serving.inbound_source6].contains(&Some(client)) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{peer} is an inbound leg of its own, captured back to {local}"),
        ));
    }
    inbound(pod, conn.into(), target, client, serving)
}

/// The inbound leg to the application: bind the client's address
/// (`IP_TRANSPARENT` + `IP_FREEBIND`, port 0) as ztunnel's ORIGINAL_SRC does,
/// or the `--inbound-source` of the target's family as a sidecar's Envoy
/// binds 127.0.0.6, connect to the target, relay. A failed bind is
/// reported and the connection goes on with a kernel-chosen source, as
/// ztunnel does.
fn inbound(
    pod: &str,
    conn: TcpStream,
    target: SocketAddr,
    client: std::net::IpAddr,
    serving: Serving,
) -> io::Result<()> {
    let upstream = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    mark_as_ztunnel(&upstream)?;
    let source = if target.is_ipv4() {
        serving.inbound_source4
    } else {
        serving.inbound_source6
    };
    let bind = (|| -> io::Result<()> {
        if let Some(source) = source {
            return upstream.bind(&SocketAddr::new(source, 0).into());
        }
        if target.is_ipv4() {
            upstream.set_ip_transparent_v4(true)?;
            upstream.set_freebind_v4(true)?;
        } else {
            upstream.set_ip_transparent_v6(true)?;
            upstream.set_freebind_v6(true)?;
        }
        upstream.bind(&SocketAddr::new(client, 0).into())
    })();
    upstream.connect_timeout(&target.into(), io_timeout())?;
    let upstream: TcpStream = upstream.into();
    report(ev::InboundConnected {
        pod: pod.to_string(),
        target,
        client,
        bind_error: bind.err().map(|e| e.to_string()),
        source: upstream.local_addr()?,
    });
    let (up, down) = relay_both(conn, upstream, serving.relay)?;
    report(ev::InboundRelayed {
        target,
        bytes_up: up,
        bytes_down: down,
    });
    Ok(())
}

/// Reads one `\n`-terminated line, byte by byte (nothing past it).
fn read_line(conn: &TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if polled::recv(conn, &mut byte)? == 0 || byte[0] == b'\n' || line.len() > 512 {
            return String::from_utf8(line).map_err(|e| io::Error::other(e.to_string()));
        }
        line.push(byte[0]);
    }
}

/// Relays both directions until both reach EOF; returns the byte counts.
/// Relays both ways; returns the bytes moved from `a` to `b` and back. A
/// client that wrote and closed (`a` gone) ends the way back early, as it
/// does for ztunnel: what it sent is still relayed, and counted.
fn relay_both(a: TcpStream, b: TcpStream, relay: Relay) -> io::Result<(u64, u64)> {
    let up = pump(a.try_clone()?, b.try_clone()?, relay);
    let down = pump(b, a, relay);
    let up = up.join().expect("relay thread")?;
    let down = match down.join().expect("relay thread") {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::NotConnected
            ) =>
        {
            0
        }
        down => down?,
    };
    Ok((up, down))
}

fn pump(from: TcpStream, to: TcpStream, relay: Relay) -> thread::JoinHandle<io::Result<u64>> {
    thread::spawn(move || {
        let n = match relay {
            Relay::Poll => polled::copy(&from, &to)?,
            Relay::Splice => spliced::copy(&from, &to)?,
        };
        to.shutdown(Shutdown::Write)?;
        Ok(n)
    })
}

/// Options compared between a cgroup with the programs and one without.
/// TCP_INFO is read with an 8 KiB buffer, larger than a page's worth the
/// kernel hands BPF, to catch a program that clamps `optlen`.
fn sockopts() -> io::Result<()> {
    use libc::*;
    let l = listener("127.0.0.1:0".parse().unwrap())?;
    let client = TcpStream::connect(l.local_addr()?)?;
    let (server, _) = l.accept()?;
    let cases: [(&str, c_int, c_int, usize); 12] = [
        ("SO_TYPE", SOL_SOCKET, SO_TYPE, 4),
        ("SO_RCVBUF", SOL_SOCKET, SO_RCVBUF, 4),
        ("SO_SNDBUF", SOL_SOCKET, SO_SNDBUF, 4),
        ("SO_ERROR", SOL_SOCKET, SO_ERROR, 4),
        ("SO_MARK", SOL_SOCKET, SO_MARK, 4),
        ("TCP_NODELAY", IPPROTO_TCP, TCP_NODELAY, 4),
        ("TCP_MAXSEG", IPPROTO_TCP, TCP_MAXSEG, 4),
        ("TCP_CONGESTION", IPPROTO_TCP, TCP_CONGESTION, 16),
        ("TCP_INFO_8K", IPPROTO_TCP, TCP_INFO, 8192),
        ("IP_TTL", IPPROTO_IP, IP_TTL, 4),
        ("SO_ORIGINAL_DST", IPPROTO_IP, 80, 16),
        ("IP6T_SO_ORIGINAL_DST", IPPROTO_IPV6, 80, 28),
    ];
    for (end, sock) in [("client", &client), ("server", &server)] {
        for (name, level, opt, len) in cases {
            let mut buf = vec![0u8; len];
            let mut optlen = len as socklen_t;
            // SAFETY: buf outlives the call and optlen matches its size.
            let ret = unsafe {
                getsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(sock),
                    level,
                    opt,
                    buf.as_mut_ptr().cast(),
                    &mut optlen,
                )
            };
            let errno = (ret != 0).then(|| io::Error::last_os_error().raw_os_error());
            // TCP_INFO holds timers and counters that change between reads:
            // compare its length and outcome, not its bytes.
            let value = (ret == 0 && name != "TCP_INFO_8K").then(|| {
                buf[..optlen as usize]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            });
            report(ev::Sockopt {
                end: end.into(),
                name: name.into(),
                ret,
                errno: errno.flatten(),
                optlen,
                value,
            });
        }
    }
    Ok(())
}
