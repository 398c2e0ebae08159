//! Issue 14: the daemon runs the whole capture path with exactly the
//! capabilities `deploy/`'s DaemonSet grants it, root with every set cut to
//! that list (`setpriv`), as the container runtime starts it.
//!

use ambridge_conformance::{
    Daemon, Fixture, Node, PodRole, capabilities, cni::CniDirs, deploy, workspace_bin,
};
use serde_json::Value;

/// The capabilities the rendered DaemonSet adds (it drops all others).
fn daemonset_capabilities() -> Vec<String> {
    let spec = pod_spec("overlays/replacement", "ambridge");
    added(&spec["containers"][0])
}

/// The capabilities a container adds (none if it adds none), having
/// dropped all.
fn added(container: &Value) -> Vec<String> {
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "{container}");
    caps["add"]
        .as_array()
        .map(|added| {
            added
                .iter()
                .map(|c| c.as_str().unwrap().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default()
}

/// The pod spec of the DaemonSet `name` of `deploy/<dir>`, rendered.
fn pod_spec(dir: &str, name: &str) -> Value {
    let (_, objects) = deploy::render(dir);
    deploy::object(&objects, "DaemonSet", name)["spec"]["template"]["spec"].clone()
}

/// The bit of a capability in `/proc/PID/status` masks.
fn bit(cap: &str) -> u64 {
    let number = match cap {
        "net_admin" => 12,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("no bit known for {other}"),
    };
    1 << number
}

/// A capability mask line of `/proc/PID/status`.
fn mask(pid: u32, line: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(":"))
        .unwrap_or_else(|| panic!("no {line} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

#[test]
fn with_only_the_daemonsets_capabilities_the_daemon_captures_outbound_and_inbound() {
    let caps = daemonset_capabilities();
    let f = Fixture::three_pods()
        .capabilities(&caps)
        .app()
        .ztunnel(&[PodRole::Client], &[])
        .wait_enrolled()
        .start();
    let pid = f.daemon.pid().expect("the daemon runs");
    let want: u64 = caps.iter().map(|c| bit(c)).fold(0, |a, b| a | b);
    for set in ["CapBnd", "CapPrm", "CapEff", "CapInh", "CapAmb"] {
        assert_eq!(mask(pid, set), want, "{set} of the daemon, for {caps:?}");
    }
    // Outbound: through ztunnel's 15001 in the client's netns.
    let result = f.client.connect(&format!("{}:8080", f.server.ip4), 4096);
    assert!(result.ok && result.intact, "{result}");
    assert_eq!(f.daemon.stats()["connect_redirected_ipv4"], 1);
    // Every pod found on the node (cgroup, netns through /proc, its
    // addresses through setns), the enrolled one captured inbound.
    let pods = f.daemon.api_json("pods");
    for pod in pods.as_array().unwrap() {
        assert_eq!(pod["problem"], "", "{pod}");
        assert_eq!(pod["in_datapath"], true, "{pod}");
    }
    let client = pods
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "client")
        .unwrap();
    assert_eq!(client["inbound"], "captured", "{client}");
}

#[test]
fn the_daemonset_grants_exactly_the_capabilities_the_daemon_asks_for() {
    assert_eq!(daemonset_capabilities(), capabilities::asked_for(false));
}

#[test]
fn the_sidecar_component_turns_the_fallback_on_and_grants_exactly_what_it_asks_for_more() {
    for overlay in ["overlays/companion", "overlays/replacement"] {
        let (_, objects) = deploy::render_with(overlay, &["components/sidecar"]);
        let config = deploy::object(&objects, "ConfigMap", "ambridge-config");
        assert_eq!(config["data"]["SIDECAR"], "on", "{overlay}: {config}");
        let spec = &deploy::object(&objects, "DaemonSet", "ambridge")["spec"]["template"]["spec"];
        assert_eq!(
            added(&spec["containers"][0]),
            capabilities::asked_for(true),
            "{overlay}"
        );
        let args = spec["containers"][0]["args"].as_array().unwrap();
        assert!(args.contains(&"--sidecar=$(SIDECAR)".into()), "{args:?}");
    }
    // Without it, the fallback is off and NET_ADMIN not granted.
    let (_, objects) = deploy::render("overlays/companion");
    let config = deploy::object(&objects, "ConfigMap", "ambridge-config");
    assert_eq!(config["data"]["SIDECAR"], "off", "{config}");
}

#[test]
fn under_sidecar_on_without_net_admin_the_daemon_stops_at_start_naming_it_and_what_for() {
    let node = Node::new();
    node.write_workloads_text("workloads: []\n");
    let needed = ambridge::capabilities::SIDECAR_NEEDED;
    let out = capabilities::with_only(&workspace_bin("ambridge"), &daemonset_capabilities())
        .args(Daemon::run_args(&node))
        .args(["--node-netns", "none", "--monitoring-address", "off"])
        .args(["--sidecar", "on"])
        .output()
        .expect("running setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran without NET_ADMIN: {stderr}");
    assert!(
        stderr.contains(&format!("{} for {}", needed.capability, needed.for_what)),
        "{stderr}"
    );
    let pinned = std::fs::read_dir(node.bpffs()).map_or(0, |d| d.count());
    assert_eq!(pinned, 0, "without NET_ADMIN, something was pinned");
}

#[test]
fn without_any_one_of_them_the_daemon_stops_at_start_naming_it_and_what_for() {
    let all = daemonset_capabilities();
    for needed in ambridge::capabilities::NEEDED {
        let name = needed.capability.to_string();
        let short = name.trim_start_matches("CAP_").to_ascii_lowercase();
        let fewer: Vec<String> = all.iter().filter(|c| **c != short).cloned().collect();
        let node = Node::new();
        node.write_workloads_text("workloads: []\n");
        let out = capabilities::with_only(&workspace_bin("ambridge"), &fewer)
            .args(Daemon::run_args(&node))
            .args(["--node-netns", "none", "--monitoring-address", "off"])
            .output()
            .expect("running setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ran without {name}: {stderr}");
        assert!(
            stderr.contains(&format!("{name} for {}", needed.for_what)),
            "without {name}: {stderr}"
        );
        // Stopped before anything: nothing pinned, no API socket.
        let pinned = std::fs::read_dir(node.bpffs()).map_or(0, |d| d.count());
        assert_eq!(pinned, 0, "without {name}, something was pinned");
        assert!(!node.dir.join("api.sock").exists());
    }
}

#[test]
fn the_uninstallers_capabilities_take_the_plugin_and_the_datapath_away() {
    let spec = pod_spec("uninstall", "ambridge-uninstall");
    let caps = added(&spec["initContainers"][0]);
    let node = Node::new();
    node.write_workloads_text("workloads: []\n");
    let main = serde_json::json!({"cniVersion": "1.0.0", "name": "net",
                                  "plugins": [{"type": "bridge"}]});
    let cni = CniDirs::new(Some(&main));
    let args = cni.args();
    let mut daemon =
        Daemon::start_with(&node, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(cni.bin.join("ambridge-cni").exists());
    daemon.stop();
    let pins = std::fs::read_dir(node.bpffs()).unwrap().count();
    assert!(pins > 0, "the stopped daemon left its datapath pinned");

    let out = capabilities::with_only(&workspace_bin("ambridge"), &caps)
        .arg("uninstall")
        .arg("--bpffs")
        .arg(node.bpffs())
        .args(&args)
        .output()
        .expect("running setpriv (util-linux)");
    assert!(
        out.status.success(),
        "uninstall with {caps:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(node.bpffs())
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "still pinned: {left:?}");
    let config: Value = serde_json::from_slice(&std::fs::read(cni.conflist()).unwrap()).unwrap();
    assert_eq!(config, main);
    assert!(!cni.bin.join("ambridge-cni").exists());
}
