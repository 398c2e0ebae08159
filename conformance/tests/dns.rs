//! DNS capture inside the pod netns: a captured pod's queries (UDP,
//! connected or not, and TCP; IPv4 and IPv6) to `<server>:53` are answered
//! by ztunnel's DNS proxy on the pod's loopback (15053), the application
//! sees the reply come from the server it asked, and ztunnel's own
//! upstream queries reach the real server.

use std::time::Duration;

use ambridge_conformance::{
    Background, Daemon, Node, Pod, canon,
    event::{self, Dns as DnsAnswer, DnsQuery, DnsTransport, Listening},
    eventually, listening_ztunnel_stand_in, parse_addr,
    sandbox::iptables,
    ztunnel_stand_in_with,
};

/// `client` (enrolled, its own workloads-file lines in `client_extra`),
/// `resolver` (not enrolled) running the real DNS server on port 53, and a
/// ztunnel cgroup.
struct Dns {
    client: Pod,
    resolver: Pod,
    ztunnel: std::path::PathBuf,
    node: Node,
}

fn dns_node(client_extra: &str) -> Dns {
    let mut node = Node::new();
    let client = node.add_pod("client");
    let resolver = node.add_pod("resolver");
    let ztunnel = node.add_cgroup("ztunnel");
    let tail = format!("ztunnel:\n  cgroup: {}\n", ztunnel.display());
    node.write_workloads_yaml(&[(&client, "ambient"), (&resolver, "none")], &tail);
    if !client_extra.is_empty() {
        let text = std::fs::read_to_string(node.workloads_path()).unwrap();
        let marker = "    mode: ambient\n";
        node.write_workloads_text(&text.replacen(marker, &format!("{marker}{client_extra}"), 1));
    }
    Dns {
        client,
        resolver,
        ztunnel,
        node,
    }
}

/// The daemon (with `daemon_args`), the real server, and a ztunnel
/// stand-in whose DNS proxy forwards to the real server over IPv4.
fn serving(t: &Dns, daemon_args: &[&str]) -> (Daemon, Background, Background) {
    let daemon = Daemon::start_with(&t.node, daemon_args);
    let server = t.resolver.spawn(&["dns-server", "--listen", "[::]:53"]);
    server.wait_first::<Listening>(Duration::from_secs(10));
    let upstream = format!("{}:53", t.resolver.ip4);
    let ztunnel = ztunnel_stand_in_with(
        &t.node,
        &t.ztunnel,
        &[&t.client],
        &["--dns-upstream", &upstream],
    );
    daemon.wait_for_mode(&t.client.uid, Some("ambient"));
    (daemon, server, ztunnel)
}

fn query(pod: &Pod, to: &str, transport: &str, text: &str) -> DnsAnswer {
    event::first(&pod.run(&["dns", "--to", to, "--transport", transport, "--query", text]))
        .expect("dns event")
}

const TRANSPORTS: [&str; 3] = ["udp", "udp-connected", "tcp"];

fn servers(t: &Dns) -> [String; 2] {
    [
        format!("{}:53", t.resolver.ip4),
        format!("[{}]:53", t.resolver.ip6),
    ]
}

/// Asserts the client sees `to` as the source (`from`, for UDP) and peer
/// (`getpeername`, for connected sockets) of the answer.
fn assert_seen_from(answer: &DnsAnswer, to: &str) {
    if answer.transport != DnsTransport::Tcp {
        assert_eq!(answer.from.map(canon), Some(parse_addr(to)), "{answer}");
    }
    if answer.transport != DnsTransport::Udp {
        assert_eq!(answer.peer.map(canon), Some(parse_addr(to)), "{answer}");
    }
}

#[test]
fn a_captured_pods_queries_are_answered_by_ztunnel_and_seem_to_come_from_the_server_asked() {
    let t = dns_node("");
    let (daemon, server, ztunnel) = serving(&t, &[]);
    let mut asked = 0;
    for to in servers(&t) {
        for transport in TRANSPORTS {
            let text = format!("q{asked}");
            let answer = query(&t.client, &to, transport, &text);
            assert!(answer.ok, "{answer}");
            // ztunnel answered, with what the real server told it.
            assert_eq!(
                answer.reply,
                Some(format!("ztunnel:server:{text}")),
                "{answer}"
            );
            assert_seen_from(&answer, &to);
            asked += 1;
            // ztunnel's own upstream query reached the real server, from
            // the client pod's address (its socket lives in the pod).
            let seen = server.wait_for(|e: &DnsQuery| e.query == text, Duration::from_secs(5));
            assert_eq!(
                canon(seen.peer).ip(),
                std::net::IpAddr::from(t.client.ip4),
                "{seen}"
            );
        }
    }
    let proxied = || ztunnel.all::<DnsQuery>().len();
    // The stand-in may report a query just after answering it.
    eventually(Duration::from_secs(5), || {
        (proxied() == asked).then_some(())
    });
    assert_eq!(proxied(), asked);
    let stats = daemon.stats();
    assert_eq!(stats["dns_redirected"], asked as u64, "{stats:?}");
    // Every UDP answer's source, and every connected socket's peer.
    assert_eq!(stats["dns_restored"], 8, "{stats:?}");
    // Each record went with its socket.
    let drained = eventually(Duration::from_secs(5), || {
        (daemon.map_entries()["dns_sockets"] == 0).then_some(())
    });
    assert!(drained.is_some(), "{:?}", daemon.map_entries());
}

/// Asserts every query of `client` is answered by the real server itself.
fn assert_answered_by_the_server(t: &Dns, daemon: &Daemon, ztunnel: &Background) {
    for to in servers(t) {
        for transport in TRANSPORTS {
            let answer = query(&t.client, &to, transport, "direct");
            assert!(answer.ok, "{answer}");
            assert_eq!(answer.reply.as_deref(), Some("server:direct"), "{answer}");
            assert_seen_from(&answer, &to);
        }
    }
    assert!(
        ztunnel.all::<DnsQuery>().is_empty(),
        "{:?}",
        ztunnel.events()
    );
    assert_eq!(daemon.stats()["dns_redirected"], 0);
}

#[test]
fn with_dns_capture_off_on_the_node_the_real_server_answers() {
    let t = dns_node("");
    let (daemon, _server, ztunnel) = serving(&t, &["--dns-capture", "off"]);
    assert_answered_by_the_server(&t, &daemon, &ztunnel);
}

#[test]
fn a_pod_that_turns_dns_capture_off_is_answered_by_the_real_server() {
    let t = dns_node("    dns_capture: false\n");
    let (daemon, _server, ztunnel) = serving(&t, &[]);
    assert_answered_by_the_server(&t, &daemon, &ztunnel);
}

#[test]
fn a_pod_can_turn_dns_capture_on_when_the_node_leaves_it_off() {
    let t = dns_node("    dns_capture: true\n");
    let (_daemon, _server, _ztunnel) = serving(&t, &["--dns-capture", "off"]);
    let to = format!("{}:53", t.resolver.ip4);
    let answer = query(&t.client, &to, "udp", "on");
    assert_eq!(
        answer.reply.as_deref(),
        Some("ztunnel:server:on"),
        "{answer}"
    );
    assert_seen_from(&answer, &to);
}

#[test]
fn with_istio_cni_rules_in_place_dns_capture_cooperates() {
    // Companion mode in every pass: the query already goes to 15053 through
    // `lo`, so istio-cni's REDIRECT finds nothing left to do.
    let t = dns_node("");
    let daemon = Daemon::start_with(&t.node, &["--zds", "off"]);
    daemon.wait_for_mode(&t.client.uid, Some("ambient"));
    iptables(
        &t.client.netns_name,
        "-t nat -A OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053",
    );
    iptables(
        &t.client.netns_name,
        "-t nat -A OUTPUT ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
    );
    let server = t.resolver.spawn(&["dns-server", "--listen", "[::]:53"]);
    server.wait_first::<Listening>(Duration::from_secs(10));
    let upstream = format!("{}:53", t.resolver.ip4);
    let _ztunnel = listening_ztunnel_stand_in(
        &t.node,
        &t.ztunnel,
        &[&t.client],
        &["--dns-upstream", &upstream],
    );
    let to = format!("{}:53", t.resolver.ip4);
    for transport in TRANSPORTS {
        let answer = query(&t.client, &to, transport, "cni");
        assert_eq!(
            answer.reply.as_deref(),
            Some("ztunnel:server:cni"),
            "{answer}"
        );
        assert_seen_from(&answer, &to);
    }
    assert_eq!(daemon.stats()["dns_redirected"], 3);
}

#[test]
fn a_query_that_cannot_be_recorded_is_refused_never_sent_to_the_server_unanswered_by_ztunnel() {
    // Every insert into the DNS record map fails: without its record the
    // answer could not seem to come from the server asked, and the query
    // must not go around ztunnel's proxy either.
    let t = dns_node("");
    t.node.fail_record_inserts(ambridge_common::map_names::DNS);
    let (daemon, server, ztunnel) = serving(&t, &[]);
    for to in servers(&t) {
        for transport in TRANSPORTS {
            let answer = query(&t.client, &to, transport, "unrecorded");
            assert!(!answer.ok, "{answer}");
            assert!(
                answer
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("not permitted")),
                "{answer}"
            );
        }
    }
    assert_eq!(daemon.stats()["connect_record_failed"], 6);
    // Refused before a datagram or a SYN left: neither end saw anything.
    for (end, events) in [("ztunnel", ztunnel.events()), ("server", server.events())] {
        assert!(
            event::all::<DnsQuery>(&events).is_empty(),
            "the {end} saw a query: {events:?}"
        );
    }
}
