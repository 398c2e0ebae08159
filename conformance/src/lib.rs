//! Real-kernel sandbox for ambridge's conformance suite, demo and benchmarks.
//!
//! A [`Node`] is a cgroup under the cgroup2 mount plus a node network
//! namespace; each [`Pod`] is a network namespace with an `eth0` on the
//! node's pod network (IPv4 198.18.0.0/24 and IPv6 fd00:18::/64, no other
//! route; the node itself is 198.18.0.1 and fd00:18::1) and a pod-level
//! cgroup whose processes run in an `app` container cgroup below it. The
//! pod network has two [`Topology`]s, picked for a run with
//! `AMBRIDGE_TEST_TOPOLOGY` (`veth`, the default, or `macvlan`):
//!
//! - `veth`: a bridge in the node netns holding the node's addresses, and a
//!   veth pair per pod from the bridge to the pod's `eth0`;
//! - `macvlan`: as macvlan CNI clusters are wired, each pod's `eth0` is a
//!   macvlan child (bridge mode) of one parent interface in the node netns,
//!   with no per-pod veth and no host-side peer, and the node reaches its
//!   pods through a macvlan host shim on the same parent holding the node's
//!   addresses.
//!
//! [`Node::run_on_node`] runs a probe in the node netns from outside the
//! node's cgroup, as a kubelet on the host would. Every node is private to its test (unique names, its own netns), so
//! tests run in parallel, and everything is torn down on drop, panics
//! included. Nothing here touches the machine's own interfaces or its root
//! cgroup's programs.

pub mod capabilities;
pub mod cni;
pub mod daemon;
pub mod deploy;
pub mod event;
pub mod fixture;
pub mod istiod;
pub mod kubeapi;
pub mod probe;
pub mod sandbox;

pub use daemon::Daemon;
pub use event::ProbeEvent;
pub use fixture::{Fixture, PodRole, ThreePods, three_pods};
pub use probe::{Background, ConnectLoop};
pub use sandbox::{Node, Pod, Topology};

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// Path of a binary built from this workspace (`ambridge`,
/// `ambridge-probe`), found next to the running executable: tests run from
/// `target/<profile>/deps`, binaries from `target/<profile>`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable has a directory");
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{name} is not built next to {}: run `cargo build --workspace --bins` first (README's test command does)",
        exe.display()
    );
}

/// How many times slower than a machine like CI's the tests run, from
/// `AMBRIDGE_TEST_TIME_SCALE` (default 1): the kernel matrix's VMs under
/// software emulation set it, and every wait of [`eventually`] (the
/// positive ones and the negative ones alike) is that much longer.
pub fn time_scale() -> u32 {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("AMBRIDGE_TEST_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|scale| *scale >= 1)
            .unwrap_or(1)
    })
}

/// Polls `check` until it returns `Some` or `timeout` (times
/// [`time_scale`]) passes.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout * time_scale();
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A socket address with IPv4-mapped IPv6 (what a dual-stack listener
/// reports) made plain IPv4.
pub fn canon(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// Parses a socket address a test wrote (`to` of a connect), made
/// [`canon`].
pub fn parse_addr(text: &str) -> std::net::SocketAddr {
    canon(
        text.parse()
            .unwrap_or_else(|e| panic!("{text:?} is not a socket address: {e}")),
    )
}

/// The IP of an address (IPv4-mapped made plain).
pub fn ip_of(addr: std::net::SocketAddr) -> std::net::IpAddr {
    canon(addr).ip()
}

/// Where the in-pod model lands a connect from `client` to `original`: the
/// loopback address of its own that `ambridge_common::landing4` picks for
/// an IPv4 destination, the client pod's own address for an IPv6 one.
pub fn in_pod_landing(
    client: std::net::IpAddr,
    original: std::net::SocketAddr,
) -> std::net::IpAddr {
    match original.ip() {
        std::net::IpAddr::V4(ip) => std::net::Ipv4Addr::from(u32::from_be(
            ambridge_common::landing4(u32::from(ip).to_be(), original.port()),
        ))
        .into(),
        std::net::IpAddr::V6(_) => client,
    }
}

/// Asserts that a ztunnel stand-in `outbound-accepted` event shows a
/// redirected connection: it landed on port 15001 of `ztunnel_ip` (in the
/// shared model) or, where `ztunnel_ip` is the client's own (in-pod), of
/// the [`in_pod_landing`] address of the original destination; it came
/// from the client pod's IP (ztunnel's view of the client), and
/// `SO_ORIGINAL_DST` said where it was going.
pub fn assert_landed(
    accepted: &event::OutboundAccepted,
    ztunnel_ip: std::net::IpAddr,
    client_ip: std::net::IpAddr,
    original: std::net::SocketAddr,
) {
    let local = canon(accepted.local);
    let landing = if ztunnel_ip == client_ip {
        in_pod_landing(client_ip, original)
    } else {
        ztunnel_ip
    };
    assert_eq!((local.ip(), local.port()), (landing, 15001), "{accepted}");
    assert_eq!(ip_of(accepted.peer), client_ip, "{accepted}");
    assert_eq!(accepted.orig_dst.map(canon), Some(original), "{accepted}");
}

/// Waits for a [`Pod::connect_loop`] of `count` connects to end and asserts
/// that none failed and that every one went through ztunnel: `through()`
/// (ztunnel's accepted connections since the loop started) reaches `count`.
pub fn assert_loop_through(looped: &Background, count: usize, through: impl Fn() -> usize) {
    let summary = looped.wait_first::<event::ConnectSummary>(Duration::from_secs(120));
    assert_eq!(summary.failed, 0, "failed connects: {summary}");
    assert_eq!(summary.ok, count as u64, "{summary}");
    let all = eventually(Duration::from_secs(5), || {
        (through() == count).then_some(())
    });
    assert!(
        all.is_some(),
        "connects that bypassed ztunnel: {}",
        count - through()
    );
}

/// Asserts whether one connect from `client` to `to` succeeds through
/// `ztunnel` (`expect`) or goes past it: it must succeed either way, and
/// the stand-in must (or must not) accept a connection within 3 s.
pub fn assert_redirected(ztunnel: &Background, client: &Pod, to: &str, expect: bool) {
    let accepted = || ztunnel.all::<event::OutboundAccepted>().len();
    let before = accepted();
    let r = client.connect(to, 16);
    assert!(r.ok, "{r}");
    let got = eventually(Duration::from_secs(3), || {
        (accepted() > before).then_some(())
    });
    assert_eq!(got.is_some(), expect, "redirected: {}", got.is_some());
}

/// Starts the ztunnel stand-in in `cgroup`, listening on `port` inside each
/// of `pods`' network namespaces; its own thread of control lives in the
/// node netns, never the machine's.
pub fn ztunnel_stand_in(
    node: &Node,
    cgroup: &std::path::Path,
    pods: &[&Pod],
    port: u16,
) -> Background {
    ztunnel_stand_in_with(node, cgroup, pods, &["--port", &port.to_string()])
}

/// A fresh UUID-shaped pod UID, as the kubelet names pod cgroups by.
pub fn kubelet_pod_uid() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n)
}

/// Whether the suite runs in replacement mode (`AMBRIDGE_TEST_ZDS=serve`):
/// every daemon serves ZDS (unless a test chooses), and every ztunnel
/// stand-in takes its pods over ZDS rather than from the test, so it
/// listens only in the pods the daemon enrolls, with no iptables anywhere.
pub fn replacement_mode() -> bool {
    std::env::var("AMBRIDGE_TEST_ZDS").is_ok_and(|v| v == "serve")
}

/// Where a node's daemon serves ZDS.
pub fn zds_socket(node: &Node) -> PathBuf {
    node.dir.join("ztunnel.sock")
}

/// As [`ztunnel_stand_in`], with the stand-in's own arguments (`--port`,
/// `--relay splice`, `--hbone`). In [`replacement_mode`] the stand-in takes
/// its pods over ZDS instead of from `pods`, and this returns once the
/// daemon has lifted the hold on every pod it handed over.
pub fn ztunnel_stand_in_with(
    node: &Node,
    cgroup: &std::path::Path,
    pods: &[&Pod],
    args: &[&str],
) -> Background {
    if replacement_mode() {
        let z = ztunnel_stand_in_zds(node, cgroup, &zds_socket(node), args);
        wait_unheld(node, &z);
        return z;
    }
    stand_in_listening_in(node, cgroup, pods, args)
}

/// A ztunnel stand-in given its pods' netns by the test, in either mode:
/// for the shared model (ztunnel listens in its own pod; ZDS hands over no
/// pods there) and for tests whose daemon runs with istio-cni
/// (`--zds off`).
pub fn listening_ztunnel_stand_in(
    node: &Node,
    cgroup: &std::path::Path,
    pods: &[&Pod],
    args: &[&str],
) -> Background {
    stand_in_listening_in(node, cgroup, pods, args)
}

/// How the stand-in names `pod` in its events: the netns path it was given,
/// or in [`replacement_mode`] the pod UID ZDS handed it under.
pub fn stand_in_id(pod: &Pod) -> String {
    if replacement_mode() {
        pod.uid.clone()
    } else {
        pod.netns.display().to_string()
    }
}

fn stand_in_listening_in(
    node: &Node,
    cgroup: &std::path::Path,
    pods: &[&Pod],
    args: &[&str],
) -> Background {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    for pod in pods {
        all.push("--pod-netns".into());
        all.push(pod.netns.clone().into());
    }
    start_stand_in(node, cgroup, &all)
}

/// Runs `ambridge-probe ztunnel <args>` in `cgroup`, its own thread of
/// control in the node netns, and waits until it is listening.
fn start_stand_in(
    node: &Node,
    cgroup: &std::path::Path,
    args: &[std::ffi::OsString],
) -> Background {
    let mut cmd = std::process::Command::new(workspace_bin("ambridge-probe"));
    cmd.arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(format!("/run/netns/{}", node.netns_name))
        .arg("ztunnel")
        .args(args);
    let z = Background::spawn(cmd);
    z.wait_first::<event::ZtunnelListening>(Duration::from_secs(10));
    z
}

/// Waits until a ZDS stand-in took its snapshot from the node's daemon and
/// the daemon shows no pod held any more (when a daemon runs). A daemon
/// that is not ready (a source has not delivered) keeps the snapshot open,
/// handing over the pods it knows all the same: then only those count.
fn wait_unheld(node: &Node, ztunnel: &Background) {
    let api = node.dir.join("api.sock");
    if !api.exists() {
        return;
    }
    let ask = |command: &str| -> Option<serde_json::Value> {
        let out = std::process::Command::new(workspace_bin("ambridge"))
            .args([command, "--json", "--api"])
            .arg(&api)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let snapshot_sent = || !ztunnel.all::<event::ZdsSnapshotSent>().is_empty();
    let settled = eventually(Duration::from_secs(10), || {
        if ask("status")?["ready"] == true && !snapshot_sent() {
            return None;
        }
        let held = ask("pods")?.as_array()?.iter().any(|p| p["held"] == true);
        (!held).then_some(())
    });
    assert!(
        settled.is_some(),
        "pods still held after ztunnel's snapshot: {:?}",
        ztunnel.events()
    );
}

/// Starts the ztunnel stand-in in `cgroup` taking its pods over ZDS, as
/// in-pod ztunnel does: it connects to the node agent's `zds_socket`, says
/// hello, and opens its listeners in the netns of each pod added there. Its
/// own thread of control lives in the node netns. `args` are the stand-in's
/// own (`--port`, `--hbone`, `--zds-nack UID`). Returns once the hello is
/// sent, so the socket must be listening by then (the stand-in retries it
/// for 15 s, the wait here is 10 s).
pub fn ztunnel_stand_in_zds(
    node: &Node,
    cgroup: &std::path::Path,
    zds_socket: &std::path::Path,
    args: &[&str],
) -> Background {
    let mut all: Vec<std::ffi::OsString> = vec!["--zds".into(), zds_socket.into()];
    all.extend(args.iter().map(Into::into));
    start_stand_in(node, cgroup, &all)
}

/// Starts a scripted ZDS peer (`ambridge-probe zds-peer`) in `cgroup`: it
/// connects to `zds_socket`, plays `steps` (`hello`, `send:<hex>`,
/// `send:<hex byte>x<count>`, `recv`) and reports `zds-peer-closed` once
/// the node agent closes the connection. Returns once it is connected.
pub fn zds_peer(
    cgroup: &std::path::Path,
    zds_socket: &std::path::Path,
    steps: &[&str],
) -> Background {
    let mut cmd = std::process::Command::new(workspace_bin("ambridge-probe"));
    cmd.arg("--cgroup")
        .arg(cgroup)
        .arg("zds-peer")
        .arg("--zds")
        .arg(zds_socket)
        .args(steps);
    let peer = Background::spawn(cmd);
    peer.wait_first::<event::ZdsPeerConnected>(Duration::from_secs(10));
    peer
}
