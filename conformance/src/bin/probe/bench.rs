//! Roles of the datapath benchmark. They run on tokio, as ztunnel does, so
//! the relay and the server cost what an event-loop proxy costs and the
//! capture mechanism stays what the paths differ in. Each runs on one thread
//! (a current-thread runtime): client, relay and server share the machine's
//! cores.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use ambridge_conformance::event as ev;
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{enter_netns, listener, report};

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Echo server on `ports` consecutive ports from `addr`'s: every byte
/// back, until EOF.
pub fn echo(addr: SocketAddr, ports: u16) -> io::Result<()> {
    let listeners = (0..ports)
        .map(|i| {
            let l = listener(SocketAddr::new(addr.ip(), addr.port() + i))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .collect::<io::Result<Vec<_>>>()?;
    runtime()?.block_on(async move {
        let mut accepting = tokio::task::JoinSet::new();
        for l in listeners {
            let l = TcpListener::from_std(l)?;
            accepting.spawn(async move {
                loop {
                    let (mut conn, _) = l.accept().await?;
                    conn.set_nodelay(true)?;
                    tokio::spawn(async move {
                        let (mut r, mut w) = conn.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
            });
        }
        report(ev::Listening { addr });
        match accepting.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(io::Error::other(e)),
            None => Ok(()),
        }
    })
}

/// Where the relay listens and what it serves.
#[derive(clap::Args)]
pub struct RelayArgs {
    /// Pod netns where the relay takes outbound connections on `--port`.
    #[arg(long = "pod-netns")]
    pods: Vec<PathBuf>,
    #[arg(long, default_value_t = 15001)]
    port: u16,
    /// Where outbound connections without an original destination go (the
    /// explicit-proxy path).
    #[arg(long)]
    default_upstream: Option<SocketAddr>,
    /// Pod netns where the relay takes inbound connections on
    /// `--inbound-port` and relays them to the pod's application from
    /// inside that netns, as in-pod ztunnel does.
    #[arg(long = "inbound-pod-netns")]
    inbound_pods: Vec<PathBuf>,
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The application's port, for inbound connections addressed to the
    /// relay itself (the explicit path).
    #[arg(long, default_value_t = 8080)]
    app_port: u16,
    /// Pod netns where the relay answers DNS on 127.0.0.1:15053, as
    /// ztunnel's DNS proxy answers the names it knows.
    #[arg(long = "dns-pod-netns")]
    dns_pods: Vec<PathBuf>,
    /// Also take outbound connections on `--port` in the relay's own netns
    /// (`--netns`), as a sidecar proxy does in its pod; their upstream legs
    /// leave from that netns. The one listener an unprivileged `--user`
    /// can open: joining a `--pod-netns` needs privilege.
    #[arg(long)]
    in_own_netns: bool,
}

/// Where in-pod ztunnel's DNS proxy listens.
const DNS_PROXY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15053);

/// The relay every proxied path goes through. Outbound: listens on `port`
/// inside each pod netns (and, with `in_own_netns`, in its own), reads
/// `SO_ORIGINAL_DST` as ztunnel and a sidecar proxy do (or relays to
/// `default_upstream`, the explicit-proxy path), and copies both ways with
/// buffered reads; upstream legs leave from the relay's own netns. Inbound
/// and DNS: one thread per pod netns, so that upstream legs leave from
/// inside the pod as in-pod ztunnel's do.
pub fn relay(args: RelayArgs) -> io::Result<()> {
    let mut listeners = Vec::new();
    if args.in_own_netns {
        let l = listener(SocketAddr::from(([0u16; 8], args.port)))?;
        l.set_nonblocking(true)?;
        listeners.push(l);
    }
    for pod in &args.pods {
        let l = in_netns(pod, {
            let port = args.port;
            move || listener(SocketAddr::from(([0u16; 8], port)))
        })?;
        l.set_nonblocking(true)?;
        listeners.push(l);
    }
    for pod in &args.inbound_pods {
        let (port, app_port) = (args.inbound_port, args.app_port);
        serve_in_netns(pod, move || {
            let l = listener(SocketAddr::from(([0u16; 8], port)))?;
            l.set_nonblocking(true)?;
            let l = TcpListener::from_std(l)?;
            Ok(async move {
                while let Ok((conn, _)) = l.accept().await {
                    tokio::spawn(relay_inbound(conn, port, app_port));
                }
                Ok(())
            })
        })?;
    }
    for pod in &args.dns_pods {
        serve_in_netns(pod, || {
            let socket = std::net::UdpSocket::bind(DNS_PROXY)?;
            socket.set_nonblocking(true)?;
            Ok(answer_dns(tokio::net::UdpSocket::from_std(socket)?))
        })?;
    }
    let default_upstream = args.default_upstream;
    runtime()?.block_on(async move {
        for l in listeners {
            let l = TcpListener::from_std(l)?;
            tokio::spawn(async move {
                while let Ok((conn, _)) = l.accept().await {
                    tokio::spawn(relay_one(conn, default_upstream));
                }
            });
        }
        report(ev::RelayListening {
            pods: args.pods.len() as u64 + u64::from(args.in_own_netns),
            port: args.port,
            inbound_pods: args.inbound_pods.len() as u64,
            dns_pods: args.dns_pods.len() as u64,
        });
        std::future::pending::<io::Result<()>>().await
    })
}

/// Runs `f` on a thread inside `netns` and returns its result.
fn in_netns<T: Send + 'static>(
    netns: &std::path::Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns)?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Runs a server on a thread of its own inside `netns`, with its own
/// single-threaded runtime: `bind` opens its sockets there and returns the
/// future that serves them. Returns once the sockets are open, or failed to.
fn serve_in_netns<F, Fut>(netns: &std::path::Path, bind: F) -> io::Result<()>
where
    F: FnOnce() -> io::Result<Fut> + Send + 'static,
    Fut: std::future::Future<Output = io::Result<()>> + 'static,
{
    let netns = netns.to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match enter_netns(&netns).and_then(|()| runtime()) {
            Ok(rt) => rt,
            Err(e) => return ready_tx.send(Err(e)),
        };
        tokio::task::LocalSet::new().block_on(&rt, async move {
            let server = match bind() {
                Ok(server) => server,
                Err(e) => return ready_tx.send(Err(e)),
            };
            let _ = ready_tx.send(Ok(()));
            if let Err(e) = server.await {
                report(ev::Error {
                    error: e.to_string(),
                    netns: Some(netns),
                });
            }
            Ok(())
        })
    });
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("netns server thread ended"))?
}

/// An inbound connection, captured (original destination from conntrack
/// or, where `SO_ORIGINAL_DST` has no answer, the local address) or
/// addressed to the relay itself (then the application's port).
async fn relay_inbound(mut client: TcpStream, port: u16, app_port: u16) -> io::Result<()> {
    let sock = SockRef::from(&client);
    let local = client.local_addr()?;
    let target = sock
        .original_dst_v4()
        .or_else(|_| sock.original_dst_v6())
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(local);
    let ip = target.ip().to_canonical();
    let target = SocketAddr::new(
        ip,
        if target.port() == port {
            app_port
        } else {
            target.port()
        },
    );
    let mut upstream = TcpStream::connect(target).await?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// A DNS server that answers each query with the query itself, from the
/// socket it came to.
async fn answer_dns(socket: tokio::net::UdpSocket) -> io::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        socket.send_to(&buf[..n], from).await?;
    }
}

/// The benchmark's DNS server, the `direct` path's destination.
pub fn dns_server(addr: SocketAddr) -> io::Result<()> {
    runtime()?.block_on(async move {
        let socket = tokio::net::UdpSocket::bind(addr).await?;
        report(ev::Listening { addr });
        answer_dns(socket).await
    })
}

async fn relay_one(mut client: TcpStream, default_upstream: Option<SocketAddr>) -> io::Result<()> {
    let sock = SockRef::from(&client);
    let orig = sock
        .original_dst_v4()
        .or_else(|_| sock.original_dst_v6())
        .ok()
        .and_then(|a| a.as_socket())
        .or(default_upstream)
        .ok_or_else(|| io::Error::other("no original destination"))?;
    let mut upstream = TcpStream::connect(orig).await?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// What the load generator measures.
#[derive(Clone, Copy, clap::Subcommand)]
pub enum Load {
    /// New connections per second: each of `concurrency` workers connects,
    /// sends `size` bytes, reads them back and closes, in a loop.
    Cps {
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Spread the connects over this many destinations: `--to`'s port
        /// and the ones after it, in turn.
        #[arg(long, default_value_t = 1)]
        destinations: u16,
    },
    /// Request/response latency on one persistent connection.
    Rr {
        #[arg(long)]
        size: usize,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Single-connection bulk throughput: `bytes` sent and echoed back.
    Bulk {
        #[arg(long)]
        bytes: usize,
    },
    /// DNS over UDP: each of `concurrency` workers sends a query, waits for
    /// the answer and checks it came from `--to`, in a loop.
    Dns {
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        duration_ms: u64,
        /// A new connected socket per query, as glibc's resolver does;
        /// otherwise one unconnected socket per worker (`sendto` and
        /// `recvfrom`, as musl's does).
        #[arg(long)]
        socket_per_query: bool,
    },
}

pub fn load(to: SocketAddr, what: Load) -> io::Result<()> {
    runtime()?.block_on(async move {
        match what {
            Load::Cps {
                concurrency,
                duration_ms,
                size,
                destinations,
            } => {
                let to: Vec<SocketAddr> = (0..destinations.max(1))
                    .map(|i| SocketAddr::new(to.ip(), to.port() + i))
                    .collect();
                cps(to, concurrency, Duration::from_millis(duration_ms), size).await
            }
            Load::Rr { size, duration_ms } => {
                rr(to, size, Duration::from_millis(duration_ms)).await
            }
            Load::Bulk { bytes } => bulk(to, bytes).await,
            Load::Dns {
                concurrency,
                duration_ms,
                socket_per_query,
            } => {
                dns(
                    to,
                    concurrency,
                    Duration::from_millis(duration_ms),
                    socket_per_query,
                )
                .await
            }
        }
    })
}

/// How long one connect-and-exchange may take before it counts as failed
/// (a SYN dropped for a clashing conntrack entry is retried for minutes).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);

async fn one_exchange(to: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let exchange = async {
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        s.write_all(&buf[..]).await?;
        s.read_exact(buf).await?;
        Ok(())
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Connects, exchanges `size` bytes and closes (the client first), in a
/// loop on each of `concurrency` workers, each going through `to` in turn
/// from its own starting point.
async fn cps(
    to: Vec<SocketAddr>,
    concurrency: usize,
    duration: Duration,
    size: usize,
) -> io::Result<()> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let to = std::sync::Arc::new(to);
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let to = to.clone();
            tokio::spawn(async move {
                let mut buf = vec![7u8; size];
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut next = worker;
                while Instant::now() < deadline {
                    let dst = to[next % to.len()];
                    next += 1;
                    match one_exchange(dst, &mut buf).await {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.await.map_err(io::Error::other)?;
        ok += o;
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    report(ev::Cps {
        ok,
        failed,
        elapsed_s: elapsed,
        per_second: ok as f64 / elapsed,
    });
    Ok(())
}

/// The latency at fraction `p` of sorted nanosecond samples, in µs.
fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    sorted_ns[((sorted_ns.len() as f64 * p) as usize).min(sorted_ns.len() - 1)] as f64 / 1000.0
}

/// A query for `kubernetes.default.svc.cluster.local`, type A, as a
/// resolver sends it.
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in "kubernetes.default.svc.cluster.local".split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// How long a query waits for its answer before it counts as failed.
const DNS_TIMEOUT: Duration = Duration::from_secs(1);

/// One query on `socket` (connected or not); whether the answer came back
/// intact from `to`.
async fn dns_exchange(
    socket: &tokio::net::UdpSocket,
    to: SocketAddr,
    query: &[u8],
    buf: &mut [u8],
    connected: bool,
) -> io::Result<bool> {
    if connected {
        socket.send(query).await?;
    } else {
        socket.send_to(query, to).await?;
    }
    let (n, from) = tokio::time::timeout(DNS_TIMEOUT, socket.recv_from(buf))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    Ok(&buf[..n] == query && from.ip().to_canonical() == to.ip() && from.port() == to.port())
}

async fn dns(
    to: SocketAddr,
    concurrency: usize,
    duration: Duration,
    socket_per_query: bool,
) -> io::Result<()> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let bind_to = if to.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let query = dns_query();
                let mut buf = vec![0u8; 512];
                let mut samples_ns = Vec::with_capacity(1 << 14);
                let mut failed = 0u64;
                let shared = if socket_per_query {
                    None
                } else {
                    Some(tokio::net::UdpSocket::bind(bind_to).await?)
                };
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let answered = match &shared {
                        Some(socket) => dns_exchange(socket, to, &query, &mut buf, false).await,
                        None => {
                            let socket = tokio::net::UdpSocket::bind(bind_to).await?;
                            socket.connect(to).await?;
                            dns_exchange(&socket, to, &query, &mut buf, true).await
                        }
                    };
                    match answered {
                        Ok(true) => samples_ns.push(t.elapsed().as_nanos() as u64),
                        _ => failed += 1,
                    }
                }
                io::Result::Ok((samples_ns, failed))
            })
        })
        .collect();
    let (mut samples_ns, mut failed) = (Vec::new(), 0);
    for w in workers {
        let (s, f) = w.await.map_err(io::Error::other)??;
        samples_ns.extend(s);
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    samples_ns.sort_unstable();
    report(ev::DnsLoad {
        ok: samples_ns.len() as u64,
        failed,
        elapsed_s: elapsed,
        per_second: samples_ns.len() as f64 / elapsed,
        p50_us: percentile_us(&samples_ns, 0.50),
        p99_us: percentile_us(&samples_ns, 0.99),
    });
    Ok(())
}

async fn rr(to: SocketAddr, size: usize, duration: Duration) -> io::Result<()> {
    let mut s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    let mut buf = vec![7u8; size];
    let mut samples_ns: Vec<u64> = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        s.write_all(&buf).await?;
        s.read_exact(&mut buf).await?;
        samples_ns.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    samples_ns.sort_unstable();
    let pct = |p: f64| percentile_us(&samples_ns, p);
    // A coarse distribution for the chart: the latency at every percentile.
    let cdf: Vec<f64> = (0..=100).map(|i| pct(f64::from(i) / 100.0)).collect();
    report(ev::Rr {
        count: samples_ns.len() as u64,
        elapsed_s: elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        cdf_us: cdf,
    });
    Ok(())
}

async fn bulk(to: SocketAddr, bytes: usize) -> io::Result<()> {
    let s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await?;
            left -= n;
        }
        w.shutdown().await
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    writer.await.map_err(io::Error::other)??;
    let elapsed = start.elapsed().as_secs_f64();
    report(ev::Bulk {
        bytes: got as u64,
        elapsed_s: elapsed,
        gbit_per_s: got as f64 * 8.0 / elapsed / 1e9,
    });
    Ok(())
}
