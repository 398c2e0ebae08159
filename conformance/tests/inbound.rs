//! Inbound capture inside the pod netns: TCP arriving at an enrolled pod
//! goes to ztunnel's inbound plaintext listener (15006) there, with the
//! original destination as the accepted socket's local address; what
//! istio-cni exempts is left alone; with no listener, connects fail.

use std::time::Duration;

use ambridge_conformance::{
    Background, Daemon, Node, Pod, canon,
    event::{self, Accepted, Connect, InboundAccepted, OutboundAccepted},
    eventually, ip_of, listening_ztunnel_stand_in, parse_addr,
    sandbox::iptables,
    zds_socket, ztunnel_stand_in_with, ztunnel_stand_in_zds,
};

/// A node with a non-enrolled `client` and an enrolled `server` running an
/// echo server on 8080, and a ztunnel cgroup.
struct Inbound {
    client: Pod,
    server: Pod,
    ztunnel: std::path::PathBuf,
    node: Node,
}

fn inbound_node(server_extra: &str) -> Inbound {
    let mut node = Node::new();
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    let ztunnel = node.add_cgroup("ztunnel");
    let tail = format!("ztunnel:\n  cgroup: {}\n", ztunnel.display());
    node.write_workloads_yaml(&[(&client, "none"), (&server, "ambient")], &tail);
    if !server_extra.is_empty() {
        let text = std::fs::read_to_string(node.workloads_path()).unwrap();
        let marker = "    mode: ambient\n";
        node.write_workloads_text(&text.replacen(marker, &format!("{marker}{server_extra}"), 1));
    }
    Inbound {
        client,
        server,
        ztunnel,
        node,
    }
}

fn stat(daemon: &Daemon, name: &str) -> u64 {
    daemon.stats()[name]
}

#[test]
fn a_non_enrolled_pods_connect_lands_on_ztunnels_15006_with_the_original_destination() {
    let t = inbound_node("");
    let daemon = Daemon::start(&t.node);
    let app = t.server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in_with(&t.node, &t.ztunnel, &[&t.server], &[]);
    daemon.wait_for_mode(&t.server.uid, Some("ambient"));
    for (to, client_ip) in [
        (format!("{}:8080", t.server.ip4), t.client.ip4.to_string()),
        (format!("[{}]:8080", t.server.ip6), t.client.ip6.to_string()),
    ] {
        let r = t.client.connect(&to, 64);
        assert!(
            r.ok,
            "{r} {:?} {:?}",
            daemon.stats(),
            ztunnel.events().iter().take(8).collect::<Vec<_>>()
        );
        // ztunnel saw the real client as peer and the original ip:port as
        // its local address, with no SO_ORIGINAL_DST answer.
        let accepted = ztunnel.wait_for(
            |e: &InboundAccepted| canon(e.local) == parse_addr(&to),
            Duration::from_secs(5),
        );
        assert_eq!(ip_of(accepted.peer).to_string(), client_ip, "{accepted}");
        assert!(accepted.orig_dst.is_none(), "{accepted}");
        // The application sees the client's IP.
        let seen = app.wait_for(
            |e: &Accepted| canon(e.local) == parse_addr(&to),
            Duration::from_secs(5),
        );
        assert_eq!(ip_of(seen.peer).to_string(), client_ip, "{seen}");
    }
    assert!(stat(&daemon, "inbound_captured") >= 2);
    assert_eq!(pod_field(&daemon, &t.server, "inbound"), "captured");
    assert_eq!(pod_field(&daemon, &t.server, "dns_captured"), true);
    assert_eq!(pod_field(&daemon, &t.client, "inbound"), "none");
}

/// A field of `pod` as `ambridge pods --json` shows it.
fn pod_field(daemon: &Daemon, pod: &Pod, field: &str) -> serde_json::Value {
    let pods = daemon.api_json("pods");
    let found = pods
        .as_array()
        .and_then(|all| all.iter().find(|p| p["uid"] == pod.uid.as_str()))
        .unwrap_or_else(|| panic!("{} not listed: {pods}", pod.uid));
    found[field].clone()
}

/// Starts the daemon, the server's echo server on 8080 and 15008-less
/// ztunnel stand-in (`args`), and waits until the server is enrolled.
fn serving(t: &Inbound, args: &[&str]) -> (Daemon, Background, Background) {
    let daemon = Daemon::start(&t.node);
    let app = t.server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in_with(&t.node, &t.ztunnel, &[&t.server], args);
    daemon.wait_for_mode(&t.server.uid, Some("ambient"));
    (daemon, app, ztunnel)
}

/// Whether the application accepted a connection from `peer_ip` within
/// 3 s (the same wait as a positive check).
fn app_saw(app: &Background, peer_ip: &str) -> bool {
    eventually(Duration::from_secs(3), || {
        app.all::<Accepted>()
            .iter()
            .any(|e| ip_of(e.peer).to_string() == peer_ip)
            .then_some(())
    })
    .is_some()
}

#[test]
fn hbone_and_a_pod_calling_its_own_ip_are_not_captured() {
    let t = inbound_node("");
    let (daemon, _app, ztunnel) = serving(&t, &[]);
    let hbone = t.server.echo_server("[::]:15008");
    // 15008 from another pod reaches the listener there, not 15006.
    let r = t.client.connect(&format!("{}:15008", t.server.ip4), 16);
    assert!(r.ok, "{r}");
    hbone.wait_first::<Accepted>(Duration::from_secs(5));
    // The server calling itself reaches its application directly.
    let own = ztunnel_conformance_self_call(&t);
    assert!(own.ok, "{own}");
    let captured_before = daemon.stats()["inbound_captured"];
    assert_eq!(
        ztunnel.all::<InboundAccepted>().len(),
        0,
        "{:?}",
        ztunnel.events()
    );
    assert_eq!(captured_before, 0);
}

/// The server pod connecting to its own IP on the application's port (a
/// probe in its app container, outside ztunnel).
fn ztunnel_conformance_self_call(t: &Inbound) -> Connect {
    // The server's outbound connect to its own IP is not redirected
    // either (istio-cni lets a pod call itself directly).
    t.server.connect(&format!("{}:8080", t.server.ip4), 16)
}

#[test]
fn a_pod_with_bypass_inbound_capture_is_reached_directly_and_still_captured_outbound() {
    let t = inbound_node("    bypass_inbound_capture: true\n");
    let (daemon, app, ztunnel) = serving(&t, &[]);
    let r = t.client.connect(&format!("{}:8080", t.server.ip4), 16);
    assert!(r.ok, "{r}");
    assert!(app_saw(&app, &t.client.ip4.to_string()));
    assert!(ztunnel.all::<InboundAccepted>().is_empty());
    assert_eq!(daemon.stats()["inbound_captured"], 0);
    assert_eq!(pod_field(&daemon, &t.server, "inbound"), "bypassed");
    // Outbound from the bypassing pod still goes through ztunnel.
    let far = t.client.echo_server("[::]:9090");
    let out = t.server.connect(&format!("{}:9090", t.client.ip4), 16);
    assert!(out.ok, "{out}");
    ztunnel.wait_for(
        |e: &OutboundAccepted| {
            e.orig_dst.map(canon) == Some(parse_addr(&format!("{}:9090", t.client.ip4)))
        },
        Duration::from_secs(5),
    );
    far.wait_first::<Accepted>(Duration::from_secs(5));
}

#[test]
fn a_connection_from_the_node_reaches_the_application_directly_without_nat_or_conntrack() {
    let t = inbound_node("");
    let (daemon, app, ztunnel) = serving(&t, &[]);
    for to in [
        format!("{}:8080", t.server.ip4),
        format!("[{}]:8080", t.server.ip6),
    ] {
        // A kubelet-like prober: the node's own netns, outside every pod.
        let events = t
            .node
            .run_on_node(&["connect", "--to", &to, "--bytes", "16"]);
        let r: Connect = event::first(&events).expect("connect event");
        assert!(r.ok, "{r}");
        let local = canon(r.local.expect("a connected socket's local address"));
        // The application sees the node's own address: no SNAT.
        let seen = app.wait_for(
            |e: &Accepted| canon(e.peer) == local,
            Duration::from_secs(5),
        );
        assert_eq!(canon(seen.local), parse_addr(&to), "{seen}");
    }
    assert!(ztunnel.all::<InboundAccepted>().is_empty());
    assert_eq!(daemon.stats()["inbound_exempt"], 2);
    for ns in [&t.node.netns_name, &t.server.netns_name] {
        assert_eq!(conntrack_entries(ns), 0, "conntrack entries in {ns}");
    }
}

/// How many conntrack entries network namespace `ns` holds.
fn conntrack_entries(ns: &str) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "conntrack", "-L"])
        .output()
        .expect("running conntrack (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "conntrack -L in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn without_a_15006_listener_an_inbound_connect_fails_and_never_reaches_the_application() {
    // Replacement mode in both passes: ambridge is the only capture there,
    // so it must refuse what ztunnel cannot take (in companion mode
    // istio-cni's rules are the fallback).
    let t = inbound_node("");
    let socket = zds_socket(&t.node);
    let socket_arg = socket.display().to_string();
    let daemon = Daemon::start_with(&t.node, &["--zds", "serve", "--zds-socket", &socket_arg]);
    let app = t.server.echo_server("[::]:8080");
    let _ztunnel = ztunnel_stand_in_zds(&t.node, &t.ztunnel, &socket, &["--no-inbound"]);
    daemon.wait_for_mode(&t.server.uid, Some("ambient"));
    for to in [
        format!("{}:8080", t.server.ip4),
        format!("[{}]:8080", t.server.ip6),
    ] {
        let r = t.client.connect(&to, 16);
        assert!(!r.ok, "{r}");
        // The kernel refused it at once (a reset), not after a timeout.
        assert!(r.error.as_deref().unwrap_or("").contains("refused"), "{r}");
    }
    assert!(!app_saw(&app, &t.client.ip4.to_string()));
    assert!(!app_saw(&app, &t.client.ip6.to_string()));
    assert_eq!(daemon.stats()["inbound_refused"], 2);
}

#[test]
fn with_istio_cni_rules_in_place_inbound_capture_cooperates() {
    // Companion mode in every pass: istio-cni's in-pod rules redirect the
    // connection to 15006 before the socket lookup; the program selects the
    // same listener, and SO_ORIGINAL_DST still comes from conntrack.
    let t = inbound_node("");
    let daemon = Daemon::start_with(&t.node, &["--zds", "off"]);
    daemon.wait_for_mode(&t.server.uid, Some("ambient"));
    iptables(
        &t.server.netns_name,
        "-t nat -A PREROUTING ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
    );
    let app = t.server.echo_server("[::]:8080");
    let ztunnel = listening_ztunnel_stand_in(&t.node, &t.ztunnel, &[&t.server], &[]);
    let to = format!("{}:8080", t.server.ip4);
    let r = t.client.connect(&to, 64);
    assert!(r.ok, "{r}");
    let accepted = ztunnel.wait_first::<InboundAccepted>(Duration::from_secs(5));
    assert_eq!(
        canon(accepted.local),
        parse_addr(&format!("{}:15006", t.server.ip4)),
        "{accepted}"
    );
    assert_eq!(
        accepted.orig_dst.map(canon),
        Some(parse_addr(&to)),
        "{accepted}"
    );
    assert!(app_saw(&app, &t.client.ip4.to_string()));
    assert!(daemon.stats()["inbound_captured"] >= 1);
}

#[test]
fn inbound_capture_holds_while_the_daemon_is_down_and_its_successor_keeps_it_with_no_connect_failed_or_bypassed()
 {
    // The netns links, ztunnel's listener registration and the node flags
    // are pinned: a daemon killed mid-traffic leaves inbound capture in
    // force, and the next one takes it over without ztunnel listening anew.
    let t = inbound_node("");
    let (mut daemon, _app, ztunnel) = serving(&t, &[]);
    let registered = stat(&daemon, "listener_registered");
    assert!(registered >= 1, "{:?}", daemon.stats());
    let captured = || ztunnel.all::<InboundAccepted>().len();
    let looped = t
        .client
        .connect_until_stopped(&format!("{}:8080", t.server.ip4), &t.node.dir);
    let mut restarted = None;
    looped.assert_through_across(captured, || {
        daemon.crash();
        // The loop goes on, through ztunnel, while no daemon runs.
        let down = captured();
        eventually(Duration::from_secs(10), || {
            (captured() > down).then_some(())
        })
        .expect("no connect captured while no daemon ran");
        let daemon = Daemon::start(&t.node);
        daemon.wait_for_mode(&t.server.uid, Some("ambient"));
        restarted = Some(daemon);
    });
    let daemon = restarted.expect("restarted");
    let before = captured();
    let r = t.client.connect(&format!("{}:8080", t.server.ip4), 16);
    assert!(r.ok, "{r}");
    eventually(Duration::from_secs(10), || {
        (captured() > before).then_some(())
    })
    .expect("no connect captured after the restart");
    assert_eq!(stat(&daemon, "listener_registered"), registered);
    assert_eq!(pod_field(&daemon, &t.server, "inbound"), "captured");
}
