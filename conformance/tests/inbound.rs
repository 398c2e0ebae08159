//! Inbound capture inside the pod netns: TCP arriving at an enrolled pod
//! goes to ztunnel's inbound plaintext listener (15006) there, with the
//! original destination as the accepted socket's local address; what
//! istio-cni exempts is left alone; with no listener, connects fail.

use std::time::Duration;

use ambridge_conformance::{
    Daemon, Event, Node, Pod, canon, eventually, ip_of, replacement_mode, ztunnel_stand_in_with,
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
        let marker = format!("    mode: ambient\n");
        node.write_workloads_text(&text.replacen(&marker, &format!("{marker}{server_extra}"), 1));
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

fn events_named(b: &ambridge_conformance::Background, name: &str) -> Vec<Event> {
    b.events()
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
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
        assert_eq!(r["ok"], true, "{r} {:?} {:?}", daemon.stats(), ztunnel.events().iter().take(8).collect::<Vec<_>>());
        // ztunnel saw the real client as peer and the original ip:port as
        // its local address, with no SO_ORIGINAL_DST answer.
        let accepted = ztunnel.wait_for(
            |e| e["event"] == "inbound-accepted" && e["local"].as_str().map(canon) == Some(canon(&to)),
            Duration::from_secs(5),
        );
        assert_eq!(ip_of(accepted["peer"].as_str().unwrap()).to_string(), client_ip, "{accepted}");
        assert!(accepted["orig_dst"].is_null(), "{accepted}");
        // The application sees the client's IP.
        let seen = app.wait_for(
            |e| e["event"] == "accepted" && e["local"].as_str().map(canon) == Some(canon(&to)),
            Duration::from_secs(5),
        );
        assert_eq!(ip_of(seen["peer"].as_str().unwrap()).to_string(), client_ip, "{seen}");
    }
    assert!(stat(&daemon, "inbound_captured") >= 2);
}
