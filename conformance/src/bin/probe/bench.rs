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

use serde_json::json;
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

/// Echo server: every byte back, until EOF.
pub fn echo(addr: SocketAddr) -> io::Result<()> {
    let l = listener(addr)?;
    l.set_nonblocking(true)?;
    runtime()?.block_on(async move {
        let l = TcpListener::from_std(l)?;
        report(json!({"event": "listening", "addr": addr.to_string()}));
        loop {
            let (mut conn, _) = l.accept().await?;
            conn.set_nodelay(true)?;
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// The relay every proxied path goes through: listens on `port` inside each
/// pod netns, reads `SO_ORIGINAL_DST` as ztunnel does (or relays to
/// `default_upstream`, the explicit-proxy path), and copies both ways with
/// buffered reads. Upstream legs leave from the relay's own netns.
pub fn relay(pods: &[PathBuf], port: u16, default_upstream: Option<SocketAddr>) -> io::Result<()> {
    let mut listeners = Vec::new();
    for pod in pods {
        let pod = pod.clone();
        let l = std::thread::spawn(move || -> io::Result<std::net::TcpListener> {
            enter_netns(&pod)?;
            let l = listener(SocketAddr::from(([0u16; 8], port)))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| io::Error::other("listener thread panicked"))??;
        listeners.push(l);
    }
    runtime()?.block_on(async move {
        for l in listeners {
            let l = TcpListener::from_std(l)?;
            tokio::spawn(async move {
                while let Ok((conn, _)) = l.accept().await {
                    tokio::spawn(relay_one(conn, default_upstream));
                }
            });
        }
        report(json!({"event": "listening", "pods": pods.len(), "port": port}));
        std::future::pending::<io::Result<()>>().await
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
}

pub fn load(to: SocketAddr, what: Load) -> io::Result<()> {
    runtime()?.block_on(async move {
        match what {
            Load::Cps {
                concurrency,
                duration_ms,
                size,
            } => cps(to, concurrency, Duration::from_millis(duration_ms), size).await,
            Load::Rr { size, duration_ms } => {
                rr(to, size, Duration::from_millis(duration_ms)).await
            }
            Load::Bulk { bytes } => bulk(to, bytes).await,
        }
    })
}

async fn one_exchange(to: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let mut s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    s.write_all(&buf[..]).await?;
    s.read_exact(buf).await?;
    Ok(())
}

async fn cps(
    to: SocketAddr,
    concurrency: usize,
    duration: Duration,
    size: usize,
) -> io::Result<()> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let mut buf = vec![7u8; size];
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match one_exchange(to, &mut buf).await {
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
    report(
        json!({"event": "cps", "ok": ok, "failed": failed, "elapsed_s": elapsed, "per_second": ok as f64 / elapsed}),
    );
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
    let pct = |p: f64| {
        samples_ns[((samples_ns.len() as f64 * p) as usize).min(samples_ns.len() - 1)] as f64
            / 1000.0
    };
    // A coarse distribution for the chart: the latency at every percentile.
    let cdf: Vec<f64> = (0..=100).map(|i| pct(f64::from(i) / 100.0)).collect();
    report(json!({
        "event": "rr", "count": samples_ns.len(), "elapsed_s": elapsed,
        "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "cdf_us": cdf,
    }));
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
    report(
        json!({"event": "bulk", "bytes": got, "elapsed_s": elapsed, "gbit_per_s": got as f64 * 8.0 / elapsed / 1e9}),
    );
    Ok(())
}
