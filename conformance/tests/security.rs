//! What a tenant cannot do to another pod's connections: every record the
//! datapath keeps is scoped to the connection's network namespace, so a
//! process holding a victim pod's address in a namespace of its own finds
//! none of them.

use std::time::Duration;

use ambridge_conformance::{
    Daemon, Node, canon,
    event::{self, Exchange, Hijack, Session},
    eventually, parse_addr,
    sandbox::ip,
    ztunnel_stand_in_with,
};

#[test]
fn a_loop_connection_with_a_victims_tuple_in_another_netns_neither_receives_nor_injects_nor_reads_its_destination()
 {
    let mut node = Node::new();
    let victim = node.add_pod("victim");
    let server = node.add_pod("server");
    let attacker = node.add_pod("attacker");
    let ztunnel = node.add_cgroup("ztunnel");
    node.write_workloads_yaml(
        &[(&victim, "ambient"), (&server, "none"), (&attacker, "none")],
        &format!("ztunnel:\n  cgroup: {}\n", ztunnel.display()),
    );
    let daemon = Daemon::start_with(&node, &["--sockmap", "on"]);
    let _app = server.echo_server("[::]:8080");
    let _ztunnel = ztunnel_stand_in_with(&node, &ztunnel, &[&victim], &[]);
    daemon.wait_for_mode(&victim.uid, Some("ambient"));

    // The victim's accelerated connection, through ztunnel, to the server.
    let to = format!("{}:8080", server.ip4);
    let messages = 30;
    let session = victim.spawn(&[
        "session",
        "--to",
        &to,
        "--messages",
        &messages.to_string(),
        "--interval-ms",
        "100",
    ]);
    let opened = session.wait_first::<Session>(Duration::from_secs(10));
    session.wait_first::<Exchange>(Duration::from_secs(10));
    let inserted = eventually(Duration::from_secs(5), || {
        (daemon.stats()["sockhash_inserted"] >= 2).then_some(())
    });
    assert!(inserted.is_some(), "not accelerated: {:?}", daemon.stats());
    let local = canon(opened.local);

    // The attacker's own pod netns gets the victim's address, and opens a
    // loop connection with the victim's 4-tuple (to the loopback address
    // the victim's connect landed on, port 15001) while the victim's
    // messages flow.
    ip(&[
        "-n",
        &attacker.netns_name,
        "addr",
        "add",
        &format!("{}/32", victim.ip4),
        "dev",
        "lo",
    ]);
    let hijack: Hijack = event::first(&attacker.run(&[
        "hijack",
        "--addr",
        &victim.ip4.to_string(),
        "--source-port",
        &local.port().to_string(),
        "--landed",
        &ambridge_conformance::in_pod_landing(victim.ip4.into(), parse_addr(&to)).to_string(),
        "--duration-ms",
        "1000",
    ]))
    .expect("hijack event");
    assert_eq!(hijack.received_by_accepted, "", "{hijack}");
    assert_eq!(hijack.foreign_to_client, "", "{hijack}");
    assert!(hijack.injected > 0, "{hijack}");
    assert!(hijack.orig_dst.is_none(), "{hijack}");

    // Every one of the victim's exchanges, before, during and after, came
    // back exactly as sent.
    let all = eventually(Duration::from_secs(10), || {
        let exchanges = session.all::<Exchange>();
        (exchanges.len() == messages).then_some(exchanges)
    })
    .unwrap_or_else(|| panic!("the session did not finish: {:?}", session.events()));
    for e in &all {
        assert!(e.intact, "{e}");
    }
}
