//! Issue 3 on the real kernel: ztunnel's own sockets, its original-source
//! binds (undo / preserve), same-node acceleration with the zero-copy
//! fallback, and the shared-ztunnel model.

use std::{net::IpAddr, path::PathBuf, process::Command, time::Duration};

use ambridge_conformance::{
    Background, Daemon, Event, Node, Pod, canon, eventually, probe::run_in, ztunnel_stand_in_with,
};

fn ip_of(addr: &str) -> IpAddr {
    canon(addr).ip()
}

/// An in-pod mesh: client and server both enrolled, a ztunnel stand-in
/// listening in both pods (15001, and 15008 with `--hbone`), and an echo
/// application on the server's 8080. Field order is drop order.
struct Mesh {
    ztunnel: Background,
    app: Background,
    daemon: Daemon,
    client: Pod,
    server: Pod,
    ztunnel_cgroup: PathBuf,
    node: Node,
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
    let ztunnel = ztunnel_stand_in_with(&node, &ztunnel_cgroup, &[&client, &server], stand_in_args);
    let mesh = Mesh {
        ztunnel,
        app,
        daemon,
        client,
        server,
        ztunnel_cgroup,
        node,
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

    fn event(&self, of: &Background, kind: &str) -> Event {
        of.wait_for(|e| e["event"] == kind, Duration::from_secs(10))
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
        let inbound_before = m
            .ztunnel
            .events()
            .iter()
            .filter(|e| e["event"] == "inbound")
            .count();
        let app_before = m.app.events().len();
        let result = m.client.connect(&to, 32 * 1024);
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["intact"], true, "{result}");
        let inbound = m
            .ztunnel
            .events()
            .into_iter()
            .filter(|e| e["event"] == "inbound")
            .nth(inbound_before)
            .expect("an inbound leg");
        // ztunnel asked for the client's address and the bind succeeded ...
        assert_eq!(inbound["client"], client_ip.to_string(), "{inbound}");
        assert_eq!(inbound["bind_error"], serde_json::Value::Null, "{inbound}");
        // ... but the leg really left from the server pod's own address.
        assert_eq!(
            ip_of(inbound["source"].as_str().unwrap()),
            server_ip,
            "{inbound}"
        );
        // The application sees the client, from accept() and getpeername().
        let accepted = m
            .app
            .events()
            .into_iter()
            .skip(app_before)
            .find(|e| e["event"] == "accepted")
            .expect("app accepted");
        assert_eq!(
            ip_of(accepted["accept_addr"].as_str().unwrap()),
            client_ip,
            "{accepted}"
        );
        assert_eq!(
            ip_of(accepted["peer"].as_str().unwrap()),
            client_ip,
            "{accepted}"
        );
    }
    assert_eq!(m.stat("bind_rewritten"), 2);
}

#[test]
fn preserve_with_istio_cni_routing_leaves_the_bind_alone_and_the_connection_works() {
    let m = mesh(&["--original-src", "preserve"], &["--hbone"], "");
    // istio-cni's return path inside the server pod (see the reference):
    // ztunnel's packets (mark 0x539) mark their connection 0x111, replies
    // restore it and are routed to the local transparent socket.
    let ns = &m.server.netns_name;
    for rule in [
        "-t mangle -A OUTPUT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "-t mangle -A OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
    ] {
        let mut args = vec!["netns", "exec", ns, "iptables"];
        args.extend(rule.split(' '));
        let out = Command::new("ip")
            .args(&args)
            .output()
            .expect("iptables (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "iptables {rule}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["intact"], true, "{result}");
    let inbound = m.event(&m.ztunnel, "inbound");
    assert_eq!(
        ip_of(inbound["source"].as_str().unwrap()),
        IpAddr::from(m.client.ip4),
        "{inbound}"
    );
    let accepted = m.event(&m.app, "accepted");
    assert_eq!(
        ip_of(accepted["accept_addr"].as_str().unwrap()),
        IpAddr::from(m.client.ip4)
    );
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
    assert_eq!(result[0]["intact"], false, "{:?}", result);
    assert!(
        m.app.events().iter().all(|e| e["event"] != "accepted"),
        "{:?}",
        m.app.events()
    );
}
