//! `ambridge-probe`: what runs *inside* a sandbox pod for the conformance
//! suite and the demo. It first joins a cgroup and a network namespace (so its
//! sockets are charged to the pod and live in its netns, as a container's
//! would), then plays one role and reports JSON lines on stdout.

use std::{
    fs,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use clap::{Parser, Subcommand};
use serde_json::json;
use socket2::{Domain, SockAddr, Socket, Type};

/// The mark ztunnel puts on every socket it opens in a pod (0x539).
const ZTUNNEL_MARK: u32 = 1337;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
struct Cli {
    /// cgroup v2 directory to join before anything else.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Network namespace (e.g. /run/netns/NAME) to enter.
    #[arg(long)]
    netns: Option<PathBuf>,
    #[command(subcommand)]
    role: Role,
}

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
    },
    /// Echo server: report every accepted connection, echo until EOF.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// ztunnel stand-in: listen on `port` inside each pod netns, read
    /// SO_ORIGINAL_DST as ztunnel does, relay to the original destination.
    Ztunnel {
        /// Pod network namespaces to open listeners in.
        #[arg(long = "pod-netns", required = true)]
        pods: Vec<PathBuf>,
        #[arg(long, default_value_t = 15001)]
        port: u16,
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
    /// Read socket options on both ends of a loopback connection and print
    /// them, to compare with and without the getsockopt program.
    Sockopts,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = enter(&cli) {
        report(json!({"event": "error", "error": format!("entering the pod: {e}")}));
        std::process::exit(2);
    }
    let result = match cli.role {
        Role::Connect {
            to,
            bytes,
            count: 1,
        } => connect(to, bytes).map(report),
        Role::Connect { to, bytes, count } => connect_many(to, bytes, count),
        Role::Echo { listen } => echo(listen),
        Role::Ztunnel { pods, port } => ztunnel(&pods, port),
        Role::UdpEcho { listen } => udp_echo(listen),
        Role::Udp { to } => udp(to),
        Role::Sockopts => sockopts(),
    };
    if let Err(e) = result {
        report(json!({"event": "error", "error": e.to_string()}));
        std::process::exit(1);
    }
}

fn report(value: serde_json::Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Joins the cgroup (the whole process: sockets are charged to the creating
/// task's cgroup) and then the network namespace.
fn enter(cli: &Cli) -> io::Result<()> {
    if let Some(cgroup) = &cli.cgroup {
        fs::write(cgroup.join("cgroup.procs"), "0")?;
    }
    if let Some(netns) = &cli.netns {
        enter_netns(netns)?;
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

fn connect_many(to: SocketAddr, bytes: usize, count: usize) -> io::Result<()> {
    let mut ok = 0;
    let mut failures = Vec::new();
    for _ in 0..count {
        let result = connect(to, bytes)?;
        if result["ok"] == true {
            ok += 1;
        } else if failures.len() < 5 {
            failures.push(result);
        }
    }
    report(json!({
        "event": "connect-summary", "to": to.to_string(),
        "ok": ok, "failed": count - ok, "failures": failures,
    }));
    Ok(())
}

fn connect(to: SocketAddr, bytes: usize) -> io::Result<serde_json::Value> {
    let stream = match TcpStream::connect_timeout(&to, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            return Ok(json!({
                "event": "connect", "ok": false, "to": to.to_string(), "error": e.to_string(),
            }));
        }
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let sent = pattern(bytes);
    let writer = {
        let mut s = stream.try_clone()?;
        let sent = sent.clone();
        thread::spawn(move || -> io::Result<()> {
            s.write_all(&sent)?;
            s.shutdown(Shutdown::Write)
        })
    };
    let mut got = Vec::with_capacity(bytes);
    let read = (&stream).read_to_end(&mut got);
    let wrote = writer.join().expect("writer thread");
    Ok(json!({
        "event": "connect",
        "ok": read.is_ok() && wrote.is_ok() && got == sent,
        "to": to.to_string(),
        "local": local.to_string(),
        "peer": peer.to_string(),
        "sent": sent.len(),
        "received": got.len(),
        "intact": got == sent,
        "error": read.err().or(wrote.err()).map(|e| e.to_string()),
    }))
}

/// A dual-stack listener when `addr` is `[::]`.
fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn echo(addr: SocketAddr) -> io::Result<()> {
    let listener = listener(addr)?;
    report(json!({"event": "listening", "addr": addr.to_string()}));
    for conn in listener.incoming() {
        let mut conn = conn?;
        report(json!({
            "event": "accepted",
            "peer": conn.peer_addr()?.to_string(),
            "local": conn.local_addr()?.to_string(),
        }));
        thread::spawn(move || {
            let mut back = conn.try_clone()?;
            io::copy(&mut conn, &mut back)?;
            back.shutdown(Shutdown::Write)
        });
    }
    Ok(())
}

fn udp_echo(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    report(json!({"event": "listening", "addr": addr.to_string()}));
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        report(json!({"event": "datagram", "from": from.to_string(), "bytes": n}));
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
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.connect(to)?;
    socket.send(b"ping")?;
    let mut buf = [0u8; 16];
    let n = socket.recv(&mut buf)?;
    report(json!({
        "event": "udp", "ok": &buf[..n] == b"ping",
        "peer": socket.peer_addr()?.to_string(), "to": to.to_string(),
    }));
    Ok(())
}

/// Reads the original destination exactly as ztunnel does: `SOL_IP`
/// first, then `SOL_IPV6`.
fn original_dst(socket: &Socket) -> io::Result<SocketAddr> {
    let addr: SockAddr = socket
        .original_dst_v4()
        .or_else(|_| socket.original_dst_v6())?;
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))
}

fn ztunnel(pods: &[PathBuf], port: u16) -> io::Result<()> {
    let mut threads = Vec::new();
    for pod_path in pods {
        let pod = pod_path.clone();
        // Listeners are opened inside each pod's netns, as in-pod ztunnel
        // does; a socket keeps the netns it was created in.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(thread::spawn(move || -> io::Result<()> {
            enter_netns(&pod)?;
            let l = listener(SocketAddr::from(([0u16; 8], port)))?;
            ready_tx.send(()).ok();
            for conn in l.incoming() {
                let conn = Socket::from(conn?);
                let pod = pod.clone();
                thread::spawn(move || relay(&pod, conn));
            }
            Ok(())
        }));
        if ready_rx.recv().is_err() {
            let result = threads.pop().expect("just pushed").join();
            return Err(io::Error::other(format!(
                "listener in {} failed: {result:?}",
                pod_path.display()
            )));
        }
    }
    report(json!({"event": "listening", "pods": pods.len(), "port": port}));
    for t in threads {
        t.join().expect("listener thread")?;
    }
    Ok(())
}

fn relay(pod: &Path, client: Socket) -> io::Result<()> {
    let peer = client.peer_addr()?.as_socket();
    let local = client.local_addr()?.as_socket();
    let orig = original_dst(&client);
    report(json!({
        "event": "accepted",
        "pod": pod.display().to_string(),
        "peer": peer.map(|a| a.to_string()),
        "local": local.map(|a| a.to_string()),
        "orig_dst": orig.as_ref().ok().map(|a| a.to_string()),
        "orig_dst_error": orig.as_ref().err().map(|e| e.to_string()),
    }));
    let orig = orig?;
    // The upstream leg is opened in the pod's netns (this thread's), marked
    // as ztunnel marks its sockets.
    let upstream = Socket::new(Domain::for_address(orig), Type::STREAM, None)?;
    upstream.set_mark(ZTUNNEL_MARK)?;
    upstream.connect_timeout(&orig.into(), IO_TIMEOUT)?;
    let client: TcpStream = client.into();
    let upstream: TcpStream = upstream.into();
    let up = pump(client.try_clone()?, upstream.try_clone()?);
    let down = pump(upstream, client);
    let up = up.join().expect("relay thread")?;
    let down = down.join().expect("relay thread")?;
    report(
        json!({"event": "relayed", "orig_dst": orig.to_string(), "bytes_up": up, "bytes_down": down}),
    );
    Ok(())
}

fn pump(mut from: TcpStream, mut to: TcpStream) -> thread::JoinHandle<io::Result<u64>> {
    thread::spawn(move || {
        let n = io::copy(&mut from, &mut to)?;
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
            report(json!({
                "event": "sockopt", "end": end, "name": name,
                "ret": ret, "errno": errno, "optlen": optlen, "value": value,
            }));
        }
    }
    Ok(())
}
