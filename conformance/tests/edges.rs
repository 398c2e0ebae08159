//! The edges of connection tracking: no byte lost and no record leaked
//! where a connection's two ends do not line up in time.

use std::time::Duration;

use ambridge_conformance::{
    Fixture, PodRole, ThreePods, canon,
    event::{
        self, Accepted, AwaitingSocket, Connect, ConnectSummary, Exchange, InboundAccepted,
        OutboundAccepted, OutboundRelayed, ProbeEvent,
    },
    eventually,
    fixture::FixtureBuilder,
    parse_addr,
};

/// The daemon, the server's echo server on 8080 and a ztunnel stand-in
/// (`stand_in_args`) for the client, once the client is enrolled.
fn serving(node: FixtureBuilder, stand_in_args: &[&str]) -> Fixture {
    node.app()
        .ztunnel(&[PodRole::Client], stand_in_args)
        .wait_enrolled()
        .start()
}

#[test]
fn clients_that_write_and_close_before_ztunnel_accepts_keep_their_original_destination_and_every_byte()
 {
    // syslog, statsd or `nc -q0`: the client's FIN is acknowledged and its
    // socket closed long before a busy ztunnel calls accept(). Here 1,000
    // at once per family, and ztunnel waits 2 ms before every accept: the
    // last are accepted seconds after their clients closed.
    let f = serving(Fixture::three_pods(), &["--accept-delay-ms", "2"]);
    let clients = 1000;
    let bytes = 4096;
    for to in [
        format!("{}:8080", f.server.ip4),
        format!("[{}]:8080", f.server.ip6),
    ] {
        let summary: ConnectSummary = event::first(&f.client.run(&[
            "connect",
            "--to",
            &to,
            "--bytes",
            &bytes.to_string(),
            "--count",
            &clients.to_string(),
            "--write-only",
        ]))
        .expect("summary");
        assert_eq!(summary.ok, clients as u64, "{summary}");
        let accepted_to = || {
            f.ztunnel()
                .all::<OutboundAccepted>()
                .into_iter()
                .filter(|e| e.orig_dst.map(canon) == Some(parse_addr(&to)))
                .collect::<Vec<_>>()
        };
        let accepted = eventually(Duration::from_secs(60), || {
            let accepted = accepted_to();
            (accepted.len() == clients).then_some(accepted)
        })
        .unwrap_or_else(|| {
            panic!(
                "{} of {clients} accepted with their original destination {to}; errors: {:?}",
                accepted_to().len(),
                f.ztunnel()
                    .all::<OutboundAccepted>()
                    .iter()
                    .filter(|e| e.orig_dst_error.is_some())
                    .take(3)
                    .collect::<Vec<_>>()
            )
        });
        assert!(accepted.iter().all(|a| a.orig_dst_error.is_none()));
        // Every byte of every client reached the server.
        let relayed = eventually(Duration::from_secs(60), || {
            let relayed: Vec<_> = f
                .ztunnel()
                .all::<OutboundRelayed>()
                .into_iter()
                .filter(|r| canon(r.orig_dst) == parse_addr(&to))
                .collect();
            (relayed.len() == clients).then_some(relayed)
        })
        .unwrap_or_else(|| panic!("not all {clients} to {to} relayed"));
        for r in relayed {
            assert_eq!(r.bytes_up, bytes as u64, "{r}");
        }
        // And the records go once both ends have closed.
        let drained = eventually(Duration::from_secs(30), || {
            let maps = f.daemon.map_entries();
            (maps["tracked_connections"] == 0 && maps["pending_connects"] == 0).then_some(())
        });
        assert!(drained.is_some(), "to {to}: {:?}", f.daemon.map_entries());
    }
}

#[test]
fn connects_that_fail_before_their_syn_leave_no_pending_record() {
    // With no local port left, a redirected connect fails in the kernel
    // after the connect program recorded it and before any SYN.
    let f = serving(Fixture::three_pods(), &[]);
    ambridge_conformance::sandbox::ip(&[
        "netns",
        "exec",
        &f.client.netns_name,
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=40000 40001",
    ]);
    let to = format!("{}:8080", f.server.ip4);
    // Two sessions hold both ports towards the redirect target.
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let s = f.client.spawn(&[
                "session",
                "--to",
                &to,
                "--messages",
                "1",
                "--interval-ms",
                "30000",
            ]);
            s.wait_first::<Exchange>(Duration::from_secs(10));
            s
        })
        .collect();
    let summary: ConnectSummary =
        event::first(&f.client.run(&["connect", "--to", &to, "--count", "50"])).expect("summary");
    assert_eq!(summary.ok, 0, "{summary}");
    assert!(
        summary
            .failures
            .first()
            .is_some_and(|e| e.contains("os error 99")),
        "{summary}"
    );
    assert!(f.daemon.stats()["connect_redirected_ipv4"] >= 52);
    let maps = f.daemon.map_entries();
    assert_eq!(maps["pending_connects"], 0, "{maps:?}");
    drop(holders);
}

/// `three_pods` with the client's addresses in the workloads file replaced
/// by `ips` (YAML flow list).
fn client_listed_with(t: &ThreePods, ips: &str) {
    let text = std::fs::read_to_string(t.node.workloads_path()).unwrap();
    let listed = format!("ips: [{}, \"{}\"]", t.client.ip4, t.client.ip6);
    assert!(text.contains(&listed), "{text}");
    t.node
        .write_workloads_text(&text.replacen(&listed, &format!("ips: [{ips}]"), 1));
}

#[test]
fn an_enrolled_pod_the_feed_gives_no_address_is_redirected_by_its_netns_addresses() {
    let b = Fixture::three_pods();
    client_listed_with(b.pods(), "");
    let f = serving(b, &[]);
    for to in [
        format!("{}:8080", f.server.ip4),
        format!("[{}]:8080", f.server.ip6),
    ] {
        ambridge_conformance::assert_redirected(f.ztunnel(), &f.client, &to, true);
    }
}

#[test]
fn an_enrolled_pods_connect_in_a_family_it_has_no_target_in_is_refused_not_let_through() {
    // The feed knows the client's IPv4 address only; its netns has IPv6
    // too, but there is no redirect target for it.
    let b = Fixture::three_pods();
    client_listed_with(b.pods(), &b.pods().client.ip4.to_string());
    let f = serving(b, &[]);
    ambridge_conformance::assert_redirected(
        f.ztunnel(),
        &f.client,
        &format!("{}:8080", f.server.ip4),
        true,
    );
    assert_refused(&f.client.connect(&format!("[{}]:8080", f.server.ip6), 16));
    assert!(f.daemon.stats()["connect_no_target"] >= 1);
    // The server saw the IPv4 connection through ztunnel only.
    let direct = eventually(Duration::from_secs(3), || {
        f.app()
            .all::<Accepted>()
            .into_iter()
            .find(|e| e.peer.to_string().contains(&f.client.ip6.to_string()))
    });
    assert!(direct.is_none(), "{direct:?}");
}

#[test]
fn a_handed_over_socket_is_captured_by_the_cgroup_of_the_task_that_connects_it() {
    let f = serving(Fixture::three_pods(), &[]);
    let to = format!("{}:8080", f.server.ip4);
    // A connection redirected to 15001: the handed-over socket may live in
    // another pod's netns, and then arrives at ztunnel from outside.
    let accepted = || {
        f.ztunnel()
            .events()
            .iter()
            .filter(|e| match e {
                ProbeEvent::OutboundAccepted(OutboundAccepted { local, .. })
                | ProbeEvent::InboundAccepted(InboundAccepted { local, .. }) => {
                    local.port() == 15001
                }
                _ => false,
            })
            .count()
    };
    let hand_over = |from: &ambridge_conformance::Pod, to_pod: &ambridge_conformance::Pod| {
        let via = f.node.dir.join(format!("handover-{}.sock", from.name));
        let via = via.display().to_string();
        let receiver = to_pod.spawn(&["fd-connect", "--at", &via, "--to", &to]);
        receiver.wait_first::<AwaitingSocket>(Duration::from_secs(10));
        from.run(&["fd-send", "--via", &via, "--to", &to]);
        receiver
    };
    // Created in the enrolled client, connected by a task of the plain pod:
    // the plain pod's connect, not captured.
    let before = accepted();
    let receiver = hand_over(&f.client, &f.plain);
    let r = receiver.wait_first::<Connect>(Duration::from_secs(10));
    assert!(r.ok, "{r}");
    let captured = eventually(Duration::from_secs(3), || {
        (accepted() > before).then_some(())
    });
    assert!(captured.is_none(), "{:?}", f.ztunnel().events());
    // Created in the plain pod, connected by a task of the enrolled client:
    // the client's connect, redirected to ztunnel.
    let before = accepted();
    let _receiver = hand_over(&f.plain, &f.client);
    let captured = eventually(Duration::from_secs(3), || {
        (accepted() > before).then_some(())
    });
    assert!(captured.is_some(), "{:?}", f.ztunnel().events());
}

#[test]
fn one_fixed_source_port_reaches_two_destinations_through_ztunnel_each_on_its_own_tuple() {
    // A client with a fixed source port (and its pod's address) holds a
    // connection to B:8080 open and connects to B:8081 from the same port.
    // Without capture, and under iptables, the two have different
    // 4-tuples; landed both on `pod_ip:15001` they would have the same one,
    // and the second connect would fail with EADDRNOTAVAIL.
    let f = serving(Fixture::three_pods(), &[]);
    let _second_app = f.server.echo_server("[::]:8081");
    let bind = format!("{}:40001", f.client.ip4);
    let [first, second] = [8080, 8081].map(|port| format!("{}:{port}", f.server.ip4));
    let landed = |to: &str| {
        eventually(Duration::from_secs(5), || {
            f.ztunnel()
                .all::<OutboundAccepted>()
                .into_iter()
                .find(|e| e.orig_dst.map(canon) == Some(parse_addr(to)))
        })
        .unwrap_or_else(|| {
            panic!(
                "the connect to {to} did not go through ztunnel: {:?}",
                f.ztunnel().events()
            )
        })
    };
    let held = f.client.spawn(&[
        "connect",
        "--to",
        &first,
        "--bytes",
        "16",
        "--bind",
        &bind,
        "--hold-ms",
        "3000",
    ]);
    let first_landed = landed(&first);
    let r = f.client.connect_with(&second, 16, &["--bind", &bind]);
    assert!(r.ok, "to {second} from {bind} while {first} is open: {r}");
    let r = held.wait_first::<Connect>(Duration::from_secs(15));
    assert!(r.ok, "to {first} from {bind}: {r}");
    for (to, accepted) in [(&first, first_landed), (&second, landed(&second))] {
        ambridge_conformance::assert_landed(
            &accepted,
            f.client.ip4.into(),
            f.client.ip4.into(),
            parse_addr(to),
        );
        assert_eq!(canon(accepted.peer), parse_addr(&bind), "{accepted}");
    }
    assert_eq!(
        f.daemon.stats()["connect_unspread"],
        0,
        "{:?}",
        f.daemon.stats()
    );
}

#[test]
fn a_connection_whose_record_was_evicted_is_refused_by_ztunnel_never_sent_around_it_and_counted() {
    // A connect storm filling the least-recently-used connection map
    // evicts the records of live connections: ztunnel, asking for the
    // original destination of one accepted late, finds none.
    let f = serving(Fixture::three_pods(), &["--accept-delay-ms", "1500"]);
    let to = format!("{}:8080", f.server.ip4);
    let client = f.client.spawn(&["connect", "--to", &to, "--bytes", "16"]);
    let evicted = eventually(Duration::from_secs(5), || {
        let n = f.node.evict_connection_records();
        (n > 0).then_some(n)
    })
    .expect("the connection was never recorded");
    assert_eq!(evicted, 1);
    let accepted = f
        .ztunnel()
        .wait_first::<OutboundAccepted>(Duration::from_secs(10));
    assert!(accepted.orig_dst.is_none(), "{accepted}");
    let r = client.wait_first::<Connect>(Duration::from_secs(15));
    assert!(!r.ok, "the connection went through without its record: {r}");
    assert_eq!(
        f.daemon.stats()["orig_dst_missing"],
        1,
        "{:?}",
        f.daemon.stats()
    );
    // And it never reached the server some other way.
    assert!(
        f.app().all::<Accepted>().is_empty(),
        "{:?}",
        f.app().events()
    );
}

/// Asserts `r` is a connect refused at once by the datapath (`EPERM`).
fn assert_refused(r: &Connect) {
    assert!(!r.ok, "{r}");
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("not permitted")),
        "{r}"
    );
}

#[test]
fn a_connect_whose_original_destination_cannot_be_recorded_is_refused_never_sent_around_ztunnel_and_counted()
 {
    // Every insert into the pending-record map fails: the client's connects
    // must fail at once, not leave for the server unredirected.
    let b = Fixture::three_pods();
    b.pods()
        .node
        .fail_record_inserts(ambridge_common::map_names::PENDING);
    // Its inbound listener could not be recorded either (see below).
    let f = serving(b, &["--no-inbound"]);
    for to in [
        format!("{}:8080", f.server.ip4),
        format!("[{}]:8080", f.server.ip6),
    ] {
        assert_refused(&f.client.connect(&to, 16));
    }
    assert_eq!(f.daemon.stats()["connect_record_failed"], 2);
    // A refused connect sends no SYN: nothing is on its way to either end.
    let ztunnel_accepted = f.ztunnel().all::<OutboundAccepted>();
    assert!(
        ztunnel_accepted.is_empty(),
        "the ztunnel accepted a connection: {ztunnel_accepted:?}"
    );
    let server_accepted = f.app().all::<Accepted>();
    assert!(
        server_accepted.is_empty(),
        "the server accepted a connection: {server_accepted:?}"
    );
}

#[test]
fn a_ztunnel_original_source_bind_that_cannot_be_recorded_is_refused_not_rewritten_unrecorded() {
    // ztunnel's inbound leg in the client's netns binds the address of the
    // peer it relays for (here the server's). Undone without its record,
    // the application would see the pod's own address as its peer. And its
    // inbound listener, unrecorded, would never be found by the capture.
    let b = Fixture::three_pods();
    b.pods()
        .node
        .fail_record_inserts(ambridge_common::map_names::PENDING);
    let f = serving(b, &["--no-inbound"]);
    let known = eventually(Duration::from_secs(10), || {
        (f.daemon.map_entries()["netns"] >= 1).then_some(())
    });
    assert!(known.is_some(), "{:?}", f.daemon.map_entries());
    for (bind, to) in [
        (
            format!("{}:0", f.server.ip4),
            format!("{}:8080", f.server.ip4),
        ),
        (
            format!("[{}]:0", f.server.ip6),
            format!("[{}]:8080", f.server.ip6),
        ),
        ("[::]:15006".to_string(), format!("{}:8080", f.server.ip4)),
    ] {
        let events = ambridge_conformance::probe::run_in(
            Some(&f.ztunnel_cgroup),
            &f.client.netns,
            &["connect", "--bind", &bind, "--to", &to, "--bytes", "16"],
        );
        let r: Connect = event::first(&events).expect("connect event");
        assert_refused(&r);
    }
    let stats = f.daemon.stats();
    assert_eq!(stats["bind_record_failed"], 3, "{stats:?}");
    assert_eq!(stats["bind_rewritten"], 0, "{stats:?}");
}
