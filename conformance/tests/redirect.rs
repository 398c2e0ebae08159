//! Issue 2 on the real kernel: connect-time redirect of an enrolled pod's
//! outbound TCP to its own 15001, `SO_ORIGINAL_DST` for the proxy, and
//! everything that must be left alone.

use std::{net::SocketAddr, process::Command, time::Duration};

use ambridge_conformance::{
    Daemon, Fixture, Node, PodRole, assert_landed, canon,
    event::{
        self, Accepted, Connect, ConnectSummary, Datagram, Listening, OutboundAccepted,
        OutboundRelayed, Sockopt, Udp,
    },
    eventually, ip_of, parse_addr,
    probe::run_in,
    ztunnel_stand_in,
};

/// client: enrolled; server and plain: mode none; echo servers on the
/// server's 8080 and the client's 9090. A ztunnel stand-in listens on 15001
/// in all three pods, so a wrong redirect shows up as an event rather than
/// as a refused connection.
fn fixture() -> Fixture {
    Fixture::three_pods()
        .app()
        .echo(PodRole::Client, "[::]:9090")
        .ztunnel(&[PodRole::Client, PodRole::Server, PodRole::Plain], &[])
        .start()
}

fn ztunnel_accepts(f: &Fixture) -> Vec<OutboundAccepted> {
    f.ztunnel().all()
}

fn redirected_total(f: &Fixture) -> u64 {
    let s = f.daemon.stats();
    s["connect_redirected_ipv4"] + s["connect_redirected_ipv6"]
}

/// Asserts that a connect through the probe went straight to `to` and
/// that neither ztunnel nor the redirect counter saw it.
fn assert_direct(
    f: &Fixture,
    result: &Connect,
    to: &str,
    before_accepts: usize,
    before_redirects: u64,
) {
    assert!(result.ok, "connect failed: {result}");
    assert_eq!(result.peer.map(canon), Some(parse_addr(to)), "{result}");
    assert_eq!(
        ztunnel_accepts(f).len(),
        before_accepts,
        "ztunnel saw it: {:?}",
        ztunnel_accepts(f)
    );
    assert_eq!(redirected_total(f), before_redirects);
}

fn assert_redirected(
    f: &Fixture,
    to: &str,
    expected_orig: SocketAddr,
    client_ip: std::net::IpAddr,
) {
    let before = ztunnel_accepts(f).len();
    let result = f.client.connect(to, 64 * 1024);
    assert!(result.ok, "connect through ztunnel failed: {result}");
    assert!(result.intact, "bytes were not relayed intact: {result}");
    let accepted = f.ztunnel().wait_for(
        |e: &OutboundAccepted| e.pod == ambridge_conformance::stand_in_id(&f.client),
        Duration::from_secs(5),
    );
    assert_eq!(ztunnel_accepts(f).len(), before + 1);
    // Landed on the client pod's own 15001, from its IP, with the
    // original destination.
    assert_landed(&accepted, client_ip, client_ip, expected_orig);
    let relayed = f
        .ztunnel()
        .wait_first::<OutboundRelayed>(Duration::from_secs(5));
    assert_eq!(relayed.bytes_up, 64 * 1024, "{relayed}");
    assert_eq!(relayed.bytes_down, 64 * 1024, "{relayed}");
}

#[test]
fn enrolled_pod_ipv4_connect_lands_on_its_own_15001_with_the_original_destination() {
    let f = fixture();
    let to = format!("{}:8080", f.server.ip4);
    assert_redirected(&f, &to, parse_addr(&to), f.client.ip4.into());
    assert_eq!(f.daemon.stats()["connect_redirected_ipv4"], 1);
    assert_eq!(f.daemon.stats()["orig_dst_answered"], 1);
}

#[test]
fn enrolled_pod_ipv6_connect_lands_on_its_own_15001_with_the_original_destination() {
    let f = fixture();
    let to = format!("[{}]:8080", f.server.ip6);
    assert_redirected(&f, &to, parse_addr(&to), f.client.ip6.into());
    assert_eq!(f.daemon.stats()["connect_redirected_ipv6"], 1);
}

#[test]
fn dual_stack_socket_to_an_ipv4_mapped_address_is_redirected_as_ipv4() {
    let f = fixture();
    let to = format!("[::ffff:{}]:8080", f.server.ip4);
    assert_redirected(
        &f,
        &to,
        parse_addr(&format!("{}:8080", f.server.ip4)),
        f.client.ip4.into(),
    );
    assert_eq!(f.daemon.stats()["connect_redirected_ipv4"], 1);
}

#[test]
fn the_server_sees_the_relayed_connection_from_the_client_pod_ip() {
    let f = fixture();
    let to = format!("{}:8080", f.server.ip4);
    assert!(f.client.connect(&to, 10).ok);
    let seen = f.app().wait_first::<Accepted>(Duration::from_secs(5));
    assert_eq!(ip_of(seen.peer), std::net::IpAddr::from(f.client.ip4));
}

#[test]
fn a_non_enrolled_pod_is_not_redirected() {
    let f = fixture();
    let (a, r) = (ztunnel_accepts(&f).len(), redirected_total(&f));
    for to in [
        format!("{}:8080", f.server.ip4),
        format!("[{}]:8080", f.server.ip6),
    ] {
        let result = f.plain.connect(&to, 1000);
        assert_direct(&f, &result, &to, a, r);
    }
}

#[test]
fn a_host_process_outside_the_node_cgroup_is_not_redirected() {
    let f = fixture();
    let (a, r) = (ztunnel_accepts(&f).len(), redirected_total(&f));
    // Same netns as the enrolled client, but the test runner's own cgroup.
    let to = format!("{}:8080", f.server.ip4);
    let events = run_in(
        None,
        &f.client.netns,
        &["connect", "--to", &to, "--bytes", "100"],
    );
    assert_direct(
        &f,
        &event::first(&events).expect("connect event"),
        &to,
        a,
        r,
    );
}

#[test]
fn loopback_destinations_are_not_redirected() {
    let f = fixture();
    let (a, r) = (ztunnel_accepts(&f).len(), redirected_total(&f));
    for to in ["127.0.0.1:9090", "[::1]:9090"] {
        let result = f.client.connect(to, 100);
        assert_direct(&f, &result, to, a, r);
    }
}

#[test]
fn connects_to_the_pods_own_ips_are_not_redirected() {
    let f = fixture();
    let (a, r) = (ztunnel_accepts(&f).len(), redirected_total(&f));
    for to in [
        format!("{}:9090", f.client.ip4),
        format!("[{}]:9090", f.client.ip6),
    ] {
        let result = f.client.connect(&to, 100);
        assert_direct(&f, &result, &to, a, r);
    }
}

#[test]
fn ztunnel_own_connects_are_not_redirected() {
    let f = fixture();
    // The stand-in's upstream legs to the server already prove it; here a
    // plain connect from the ztunnel cgroup inside the enrolled pod's netns.
    let (a, r) = (ztunnel_accepts(&f).len(), redirected_total(&f));
    let to = format!("{}:8080", f.server.ip4);
    let events = run_in(
        Some(&f.ztunnel_cgroup),
        &f.client.netns,
        &["connect", "--to", &to],
    );
    assert_direct(
        &f,
        &event::first(&events).expect("connect event"),
        &to,
        a,
        r,
    );
}

#[test]
fn getsockopt_calls_other_than_so_original_dst_read_as_without_the_program() {
    let f = fixture();
    let with_program = f.client.run(&["sockopts"]);
    let without = run_in(None, &f.client.netns, &["sockopts"]);
    assert_eq!(with_program.len(), 24, "{with_program:?}");
    assert_eq!(with_program, without);
    // TCP_INFO with an 8 KiB buffer (more than the page BPF sees) still
    // returns the kernel's full answer.
    let tcp_info = event::all::<Sockopt>(&with_program)
        .into_iter()
        .find(|e| e.name == "TCP_INFO_8K")
        .unwrap();
    assert_eq!(tcp_info.ret, 0, "{tcp_info}");
    assert!(tcp_info.optlen > 100, "{tcp_info}");
}

#[test]
fn editing_the_workloads_file_enrolls_and_unenrolls_a_pod_without_restart() {
    let f = fixture();
    let to = format!("{}:8080", f.server.ip4);
    let plain_netns = ambridge_conformance::stand_in_id(&f.plain);
    let accepts_from_plain = |f: &Fixture| {
        ztunnel_accepts(f)
            .iter()
            .filter(|e| e.pod == plain_netns)
            .count()
    };

    f.node.write_workloads(
        &[
            (&f.client, "ambient"),
            (&f.server, "none"),
            (&f.plain, "ambient"),
        ],
        Some(&f.ztunnel_cgroup),
    );
    // In replacement mode the pod's connects are refused until ztunnel
    // acknowledged it.
    let enrolled = eventually(Duration::from_secs(10), || {
        let before = accepts_from_plain(&f);
        let ok = f.plain.connect(&to, 100).ok;
        (ok && accepts_from_plain(&f) > before).then_some(())
    });
    assert!(
        enrolled.is_some(),
        "plain was never redirected after enrolling it"
    );

    f.node.write_workloads(
        &[
            (&f.client, "ambient"),
            (&f.server, "none"),
            (&f.plain, "none"),
        ],
        Some(&f.ztunnel_cgroup),
    );
    let unenrolled = eventually(Duration::from_secs(10), || {
        let before = accepts_from_plain(&f);
        let result = f.plain.connect(&to, 100);
        (result.ok && accepts_from_plain(&f) == before).then_some(())
    });
    assert!(
        unenrolled.is_some(),
        "plain was still redirected after unenrolling it"
    );
}

#[test]
fn a_malformed_workloads_file_is_rejected_and_the_last_good_state_stays() {
    let f = fixture();
    let lines_before = f.daemon.log().len();
    f.node.write_workloads_text("workloads:\n  - uid: x\n    name: x\n    namespace: d\n    cgroup: /x\n    mode: sideways\n");
    let err = f
        .daemon
        .wait_log_after(
            lines_before,
            "workloads file rejected",
            Duration::from_secs(10),
        )
        .expect("the daemon did not report the bad file");
    assert!(err.contains("line 6"), "{err}");
    assert!(err.contains("workloads[0].mode"), "{err}");
    // The client is still enrolled: the last good state is in force.
    let to = format!("{}:8080", f.server.ip4);
    assert_redirected(&f, &to, parse_addr(&to), f.client.ip4.into());
}

#[test]
fn a_bad_workloads_file_is_logged_once_per_change_not_at_every_look() {
    let f = fixture();
    let rejected = |since: usize| {
        f.daemon.log()[since..]
            .iter()
            .filter(|l| l.contains("workloads file rejected"))
            .count()
    };
    let before = f.daemon.log().len();
    f.node
        .write_workloads_text("workloads:\n  - uid: x\n    mode: sideways\n");
    f.daemon
        .wait_log_after(before, "workloads file rejected", Duration::from_secs(10))
        .expect("the daemon did not report the bad file");
    // The daemon's own reads of the file are no changes: two seconds on,
    // still one report (it was about 20 a second).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rejected(before), 1, "{:?}", &f.daemon.log()[before..]);
    // Another bad content is another report.
    f.node
        .write_workloads_text("workloads:\n  - uid: y\n    mode: sideways\n");
    let again = eventually(Duration::from_secs(10), || {
        (rejected(before) == 2).then_some(())
    });
    assert!(again.is_some(), "{:?}", &f.daemon.log()[before..]);
}

#[test]
fn redirection_survives_the_daemon_stopping() {
    let mut f = fixture();
    assert_eq!(f.daemon.stats_json()["source"], "the daemon's API");
    f.daemon.stop();
    // Counters stay readable, from the pinned maps.
    let stats = f.daemon.stats_json();
    assert!(
        stats["source"].as_str().unwrap().starts_with("pinned maps"),
        "{stats}"
    );
    let to = format!("{}:8080", f.server.ip4);
    assert_redirected(&f, &to, parse_addr(&to), f.client.ip4.into());
}

#[test]
fn after_uninstall_nothing_is_pinned_or_attached_and_connections_go_directly() {
    let mut f = fixture();
    f.daemon.stop();
    let out = f.daemon.uninstall();
    // 13 cgroup programs and the inbound link of the enrolled client's
    // netns.
    assert!(out.contains("detached 14"), "{out}");
    assert!(out.contains("inbound (netns "), "{out}");
    assert!(
        !f.node.bpffs().exists(),
        "pins remain under {}",
        f.node.bpffs().display()
    );
    let attached = Command::new("bpftool")
        .args(["cgroup", "show", "-j"])
        .arg(&f.node.cgroup)
        .output()
        .expect("running bpftool (scripts/setup.sh installs it)");
    let attached: serde_json::Value = serde_json::from_slice(&attached.stdout).unwrap_or_default();
    assert_eq!(
        attached.as_array().map(Vec::len).unwrap_or(0),
        0,
        "still attached: {attached}"
    );

    let before = ztunnel_accepts(&f).len();
    let to = format!("{}:8080", f.server.ip4);
    let result = f.client.connect(&to, 100);
    assert!(result.ok, "{result}");
    assert_eq!(result.peer.map(canon), Some(parse_addr(&to)));
    assert_eq!(ztunnel_accepts(&f).len(), before);
}

#[test]
fn tracking_entries_are_removed_when_connections_close_so_churn_never_fills_the_maps() {
    let f = fixture();
    let to = format!("{}:8080", f.server.ip4);
    let to6 = format!("[{}]:8080", f.server.ip6);
    for target in [&to, &to6] {
        let events = f
            .client
            .run(&["connect", "--to", target, "--bytes", "16", "--count", "250"]);
        let summary: ConnectSummary = event::first(&events).unwrap();
        assert_eq!(summary.ok, 250, "{summary}");
    }
    let stats = f.daemon.stats();
    assert_eq!(
        stats["connect_redirected_ipv4"] + stats["connect_redirected_ipv6"],
        500
    );
    assert_eq!(stats["orig_dst_answered"], 500);
    // Every client socket has closed (the client end reaches TCP_CLOSE as it
    // enters TIME_WAIT), so nothing stays tracked.
    let drained = eventually(Duration::from_secs(10), || {
        let maps = f.daemon.map_entries();
        (maps["tracked_connections"] == 0 && maps["pending_connects"] == 0).then_some(maps)
    });
    assert!(
        drained.is_some(),
        "entries left behind: {:?}",
        f.daemon.map_entries()
    );
    assert_eq!(f.daemon.map_entries()["cgroups"], 4);
}

#[test]
fn udp_from_an_enrolled_pod_is_not_redirected() {
    let f = fixture();
    let udp = f.server.spawn(&["udp-echo", "--listen", "[::]:5353"]);
    udp.wait_first::<Listening>(Duration::from_secs(10));
    let r = redirected_total(&f);
    for to in [
        format!("{}:5353", f.server.ip4),
        format!("[{}]:5353", f.server.ip6),
    ] {
        let events = f.client.run(&["udp", "--to", &to]);
        let answer: Udp = event::first(&events).expect("udp event");
        assert!(answer.ok, "{events:?}");
        assert_eq!(canon(answer.peer), parse_addr(&to));
    }
    // The echo server reports each datagram as it answers it; wait for
    // both reports rather than racing the reader of its output.
    let from_client = eventually(Duration::from_secs(5), || {
        let sources: Vec<_> = udp
            .all::<Datagram>()
            .iter()
            .map(|e| ip_of(e.from))
            .collect();
        (sources.len() == 2).then_some(sources)
    })
    .expect("two datagrams reported");
    assert_eq!(
        from_client,
        vec![f.client.ip4.into(), std::net::IpAddr::from(f.client.ip6)]
    );
    assert_eq!(redirected_total(&f), r);
}

#[test]
fn a_workload_named_only_by_pod_uid_is_found_in_the_kubelets_cgroup_layout() {
    let mut node = Node::new();
    // The systemd driver's layout for a burstable pod.
    let uid = "9f2c0d7e-5b1a-4c6e-9a53-2f0b8e1d4c11";
    node.add_cgroup("kubepods.slice");
    node.add_cgroup("kubepods.slice/kubepods-burstable.slice");
    let client = node.add_pod_in(
        "client",
        &format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ),
    );
    let server = node.add_pod("server");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    node.write_workloads_text(&format!(
        "workloads:\n  - uid: {uid}\n    name: client\n    namespace: default\n    ips: [{}]\n    mode: ambient\nztunnel:\n  cgroup: {}\n",
        client.ip4,
        ztunnel_cgroup.display()
    ));
    let kubepods_parent = node.cgroup.display().to_string();
    let daemon = Daemon::start_with(&node, &["--kubepods-parent", &kubepods_parent]);
    let _app = server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in(&node, &ztunnel_cgroup, &[&client], 15001);
    let to = format!("{}:8080", server.ip4);
    let result = client.connect(&to, 100);
    assert!(result.intact, "{result}");
    let accepted = ztunnel.wait_first::<OutboundAccepted>(Duration::from_secs(5));
    assert_landed(
        &accepted,
        client.ip4.into(),
        client.ip4.into(),
        parse_addr(&to),
    );
    assert_eq!(daemon.stats()["connect_redirected_ipv4"], 1);
}
