//! Issue 3 on the real kernel: ztunnel's own sockets, its original-source
//! binds (undo / preserve), same-node acceleration with the zero-copy
//! fallback, and the shared-ztunnel model.

use std::{net::IpAddr, time::Duration};

use ambridge_conformance::{
    Background, Daemon, Node, Pod, assert_landed, canon,
    event::{self, Accepted, Connect, InboundConnected, Kind, OutboundAccepted, OutboundRelayed},
    eventually, ip_of, parse_addr,
    probe::run_in,
    ztunnel_stand_in_with,
};

/// An in-pod mesh: client and server both enrolled, a ztunnel stand-in
/// listening in both pods (15001, and 15008 with `--hbone`), and an echo
/// application on the server's 8080. Field order is drop order.
struct Mesh {
    ztunnel: Background,
    app: Background,
    daemon: Daemon,
    client: Pod,
    server: Pod,
    _node: Node,
}

fn mesh(daemon_args: &[&str], stand_in_args: &[&str], ztunnel_yaml: &str) -> Mesh {
    let mut node = Node::new();
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    node.write_workloads_yaml(
        &[(&client, "ambient"), (&server, "ambient")],
        &format!(
            "ztunnel:\n  cgroup: {}\n{ztunnel_yaml}",
            ztunnel_cgroup.display()
        ),
    );
    let daemon = Daemon::start_with(&node, daemon_args);
    let app = server.echo_server("[::]:8080");
    // A test that runs beside istio-cni gets its pods from the test, as
    // istio-cni's ZDS would hand them over.
    let ztunnel = if daemon_args.windows(2).any(|w| w == ["--zds", "off"]) {
        ambridge_conformance::listening_ztunnel_stand_in(
            &node,
            &ztunnel_cgroup,
            &[&client, &server],
            stand_in_args,
        )
    } else {
        ztunnel_stand_in_with(&node, &ztunnel_cgroup, &[&client, &server], stand_in_args)
    };
    let mesh = Mesh {
        ztunnel,
        app,
        daemon,
        client,
        server,
        _node: node,
    };
    mesh.wait_for_netns(2);
    mesh
}

impl Mesh {
    /// Waits until the daemon knows `n` pod network namespaces (found from
    /// the pods' pause processes at a resync).
    fn wait_for_netns(&self, n: u64) {
        let known = eventually(Duration::from_secs(10), || {
            (self.daemon.map_entries()["netns"] >= n).then_some(())
        });
        assert!(
            known.is_some(),
            "netns entries: {:?}",
            self.daemon.map_entries()
        );
    }

    fn stat(&self, name: &str) -> u64 {
        self.daemon.stats()[name]
    }

    fn event<K: Kind>(&self, of: &Background) -> K {
        of.wait_first::<K>(Duration::from_secs(10))
    }
}

#[test]
fn undo_rewrites_ztunnels_original_source_bind_and_the_app_still_sees_the_client_ip() {
    let m = mesh(&[], &["--hbone"], "");
    for (to, client_ip, server_ip) in [
        (
            format!("{}:8080", m.server.ip4),
            IpAddr::from(m.client.ip4),
            IpAddr::from(m.server.ip4),
        ),
        (
            format!("[{}]:8080", m.server.ip6),
            IpAddr::from(m.client.ip6),
            IpAddr::from(m.server.ip6),
        ),
    ] {
        let inbound_before = m.ztunnel.all::<InboundConnected>().len();
        let app_before = m.app.events().len();
        let result = m.client.connect(&to, 32 * 1024);
        assert!(result.ok, "{result}");
        assert!(result.intact, "{result}");
        let inbound = eventually(Duration::from_secs(5), || {
            m.ztunnel
                .all::<InboundConnected>()
                .into_iter()
                .nth(inbound_before)
        })
        .expect("an inbound leg");
        // ztunnel asked for the client's address and the bind succeeded ...
        assert_eq!(inbound.client, client_ip, "{inbound}");
        assert_eq!(inbound.bind_error, None, "{inbound}");
        // ... but the leg really left from the server pod's own address.
        assert_eq!(ip_of(inbound.source), server_ip, "{inbound}");
        // The application sees the client, from accept() and getpeername().
        // The app's report may still be on its way through the pipe.
        let accepted = eventually(Duration::from_secs(5), || {
            event::first::<Accepted>(&m.app.events()[app_before..])
        })
        .expect("app accepted");
        assert_eq!(ip_of(accepted.accept_addr), client_ip, "{accepted}");
        assert_eq!(ip_of(accepted.peer), client_ip, "{accepted}");
    }
    assert_eq!(m.stat("bind_rewritten"), 2);
}

#[test]
fn preserve_with_istio_cni_routing_leaves_the_bind_alone_and_the_connection_works() {
    // Its subject is istio-cni's routing, so istio-cni is there: companion
    // mode in either run of the suite, the one test with iptables rules.
    let m = mesh(
        &["--original-src", "preserve", "--zds", "off"],
        &["--hbone"],
        "",
    );
    // istio-cni's return path inside the server pod (see the reference):
    // ztunnel's packets (mark 0x539) mark their connection 0x111, replies
    // restore it and are routed to the local transparent socket.
    let ns = &m.server.netns_name;
    for rule in [
        "-t mangle -A OUTPUT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "-t mangle -A OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
    ] {
        ambridge_conformance::sandbox::iptables(ns, rule);
    }
    ambridge_conformance::sandbox::ip(&[
        "-n",
        ns,
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ]);
    ambridge_conformance::sandbox::ip(&[
        "-n",
        ns,
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]);

    let to = format!("{}:8080", m.server.ip4);
    let result = m.client.connect(&to, 32 * 1024);
    assert!(result.ok, "{result}");
    assert!(result.intact, "{result}");
    let inbound: InboundConnected = m.event(&m.ztunnel);
    assert_eq!(
        ip_of(inbound.source),
        IpAddr::from(m.client.ip4),
        "{inbound}"
    );
    let accepted: Accepted = m.event(&m.app);
    assert_eq!(ip_of(accepted.accept_addr), IpAddr::from(m.client.ip4));
    assert_eq!(m.stat("bind_rewritten"), 0);
}

#[test]
fn without_undo_or_tproxy_routing_the_original_source_leg_fails() {
    // Why undo exists: the reply to the foreign source leaves the pod.
    let m = mesh(&["--original-src", "preserve"], &["--hbone"], "");
    let to = format!("{}:8080", m.server.ip4);
    let result = run_in(
        Some(&m.client.container),
        &m.client.netns,
        &[
            "--timeout-ms",
            "3000",
            "connect",
            "--to",
            &to,
            "--bytes",
            "100",
        ],
    );
    let connected: Connect = event::first(&result).expect("connect event");
    assert!(!connected.intact, "{:?}", result);
    assert!(m.app.all::<Accepted>().is_empty(), "{:?}", m.app.events());
}

#[test]
fn a_ztunnel_cgroup_nested_under_an_enrolled_pod_is_never_redirected() {
    let mut node = Node::new();
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    // A ztunnel whose cgroup sits below an enrolled pod's cgroup, calling
    // another enrolled pod.
    let nested = node.add_cgroup("pod-client/ztunnel");
    node.write_workloads(&[(&client, "ambient"), (&server, "ambient")], Some(&nested));
    let daemon = Daemon::start(&node);
    // ztunnel reaches an enrolled pod on its HBONE port: any other port of
    // an enrolled pod is captured inbound (and refused in replacement mode,
    // as no stand-in listens here).
    let _app = server.echo_server("[::]:15008");
    for to in [
        format!("{}:15008", server.ip4),
        format!("[{}]:15008", server.ip6),
    ] {
        let events = run_in(
            Some(&nested),
            &client.netns,
            &["connect", "--to", &to, "--bytes", "100"],
        );
        let connected: Connect = event::first(&events).expect("connect event");
        assert!(connected.ok, "{events:?}");
        assert_eq!(connected.peer.map(canon), Some(parse_addr(&to)));
    }
    let s = daemon.stats();
    assert_eq!(
        s["connect_redirected_ipv4"] + s["connect_redirected_ipv6"],
        0,
        "{s:?}"
    );
}

const MIB: usize = 1024 * 1024;

#[test]
fn with_sockmap_a_polling_relay_carries_1mib_each_way_through_msg_redirect() {
    let m = mesh(&["--sockmap", "on"], &[], "");
    let to = format!("{}:8080", m.server.ip4);
    let result = m.client.connect_with(&to, MIB, &["--io", "poll"]);
    assert!(result.intact, "{result}");
    assert_eq!(result.received, MIB as u64, "{result}");
    let relayed: OutboundRelayed = m.event(&m.ztunnel);
    assert_eq!(
        (relayed.bytes_up, relayed.bytes_down),
        (MIB as u64, MIB as u64)
    );
    assert!(m.stat("sockhash_inserted") >= 2);
    assert!(m.stat("msg_redirected") > 0);
    assert_eq!(m.stat("zerocopy_fallback"), 0);
}

#[test]
fn with_sockmap_a_blocking_reader_can_see_eagain_which_is_why_sockmap_is_off_by_default() {
    // tcp_bpf_recvmsg (Linux 6.18) returns EAGAIN to a reader blocked on an
    // accelerated socket when it is woken without data; the client's own
    // half-close does that. Event-loop readers just poll again.
    let m = mesh(&["--sockmap", "on"], &[], "");
    let to = format!("{}:8080", m.server.ip4);
    let results: Vec<Connect> = (0..5).map(|_| m.client.connect(&to, 100)).collect();
    assert!(
        results.iter().any(|r| !r.ok
            && r.error
                .as_deref()
                .is_some_and(|e| e.contains("os error 11"))),
        "no blocking read failed with EAGAIN: {results:?}"
    );
    // The same client with the default (sockmap off) never does.
    let m = mesh(&[], &[], "");
    for _ in 0..5 {
        let r = m.client.connect(&format!("{}:8080", m.server.ip4), 100);
        assert!(r.ok, "{r}");
    }
}

#[test]
fn a_splice_relay_flagged_zero_copy_falls_back_and_carries_1mib_each_way() {
    let m = mesh(
        &["--sockmap", "on"],
        &["--relay", "splice"],
        "  zero_copy: true\n",
    );
    let to = format!("{}:8080", m.server.ip4);
    let result = m.client.connect_with(&to, MIB, &["--io", "poll"]);
    assert!(result.intact, "{result}");
    let relayed: OutboundRelayed = m.event(&m.ztunnel);
    assert_eq!(
        (relayed.bytes_up, relayed.bytes_down),
        (MIB as u64, MIB as u64)
    );
    assert!(m.stat("zerocopy_fallback") >= 1);
    assert_eq!(m.stat("msg_redirected"), 0);
    assert_eq!(m.stat("sockhash_inserted"), 0);
}

#[test]
fn without_the_fallback_a_splice_relay_never_sees_redirected_bytes() {
    // The reason for the zero-copy flag: msg_redirect puts the client's
    // bytes in the proxy socket's BPF ingress queue, and splice(2) reads
    // only the normal receive queue.
    let m = mesh(&["--sockmap", "on"], &["--relay", "splice"], "");
    let to = format!("{}:8080", m.server.ip4);
    let result = run_in(
        Some(&m.client.container),
        &m.client.netns,
        &[
            "--timeout-ms",
            "2000",
            "connect",
            "--to",
            &to,
            "--bytes",
            "65536",
            "--io",
            "poll",
        ],
    );
    let connected: Connect = event::first(&result).expect("connect event");
    assert!(!connected.intact, "{result:?}");
    assert_eq!(connected.received, 0, "{result:?}");
    assert!(m.stat("msg_redirected") > 0);
    // When the client gives up and closes, splice sees the FIN and ends:
    // it moved none of the 64 KiB, which sat in the BPF ingress queue.
    let relayed: OutboundRelayed = m.event(&m.ztunnel);
    assert_eq!(relayed.bytes_up, 0, "{relayed}");
}

#[test]
fn the_shared_ztunnel_model_works_end_to_end_for_ipv4_and_ipv6() {
    let mut node = Node::new();
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    // ztunnel as its own pod with its own IPs; its pod cgroup is the
    // ztunnel cgroup.
    let zpod = node.add_pod("ztunnel");
    node.write_workloads_yaml(
        &[(&client, "ambient"), (&server, "none")],
        &format!(
            "ztunnel:\n  cgroup: {}\nredirect:\n  ips: [{}, \"{}\"]\n  port: 15001\n",
            zpod.cgroup.display(),
            zpod.ip4,
            zpod.ip6
        ),
    );
    let daemon = Daemon::start(&node);
    let app = server.echo_server("[::]:8080");
    // ztunnel relays the inbound leg itself (HBONE to its own 15008).
    let ztunnel = ambridge_conformance::listening_ztunnel_stand_in(
        &node,
        &zpod.container,
        &[&zpod],
        &["--hbone", "--hbone-via", &format!("{}:15008", zpod.ip4)],
    );
    let netns = eventually(Duration::from_secs(10), || {
        (daemon.map_entries()["netns"] >= 3).then_some(())
    });
    assert!(netns.is_some(), "{:?}", daemon.map_entries());
    for (to, client_ip, zt_ip) in [
        (
            format!("{}:8080", server.ip4),
            IpAddr::from(client.ip4),
            IpAddr::from(zpod.ip4),
        ),
        (
            format!("[{}]:8080", server.ip6),
            IpAddr::from(client.ip6),
            IpAddr::from(zpod.ip6),
        ),
    ] {
        let before = ztunnel.events().len();
        let app_before = app.events().len();
        let result = client.connect(&to, 16 * 1024);
        assert!(result.intact, "{result}");
        // The stand-in's reports may still be on their way through the pipe.
        let new = eventually(Duration::from_secs(5), || {
            let new = ztunnel.events().split_off(before);
            event::first::<InboundConnected>(&new).map(|_| new)
        })
        .expect("ztunnel's reports of the connection");
        let accepted: OutboundAccepted = event::first(&new).expect("ztunnel accepted");
        // Landed on ztunnel's own IP and port, from the client pod's IP.
        assert_landed(&accepted, zt_ip, client_ip, parse_addr(&to));
        // The original-source bind was rewritten to ztunnel's IP ...
        let inbound: InboundConnected = event::first(&new).expect("inbound leg");
        assert_eq!(ip_of(inbound.source), zt_ip, "{inbound}");
        // ... and the application still sees the client.
        let seen = eventually(Duration::from_secs(5), || {
            event::first::<Accepted>(&app.events()[app_before..])
        })
        .expect("app accepted");
        assert_eq!(ip_of(seen.peer), client_ip, "{seen}");
    }
    assert_eq!(daemon.stats()["bind_rewritten"], 2);
}
