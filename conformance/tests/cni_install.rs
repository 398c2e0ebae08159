//! Issue 14: the daemon puts the chained CNI plugin on the node and keeps
//! it there (`--cni-bin-dir`, `--cni-conf-dir`), readiness waits for it,
//! and `ambridge uninstall` takes it away, leaving the main plugin's
//! configuration as it was.

use std::{path::Path, process::Command, time::Duration};

use ambridge_conformance::{Daemon, Node, cni::CniDirs, eventually, workspace_bin};
use serde_json::{Value, json};

fn main_plugin() -> Value {
    json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
           "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]})
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn plugin_types(config: &Value) -> Vec<String> {
    config["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_daemon_installs_the_plugin_keeps_it_through_a_rewrite_and_uninstall_removes_it() {
    let node = Node::new();
    node.write_workloads_text("workloads: []\n");
    let cni = CniDirs::new(None);
    let args = cni.args();
    let mut daemon =
        Daemon::spawn_with(&node, &args.iter().map(String::as_str).collect::<Vec<_>>());
    // No configuration yet (the main plugin not installed): serving, not
    // ready, and saying why.
    daemon.wait_serving();
    let status = eventually(Duration::from_secs(10), || {
        let s = daemon.status()?;
        let plugin = s["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "cni-plugin")?
            .clone();
        (plugin["state"] == "failed").then_some((s, plugin))
    });
    let (status, plugin) = status.expect("the cni-plugin component never failed");
    assert_eq!(status["ready"], false, "{status}");
    assert!(
        plugin["last_error"]
            .as_str()
            .unwrap()
            .contains("no network configuration"),
        "{plugin}"
    );

    // The main plugin arrives: the entry goes last, the binary beside it.
    let conflist = cni.conflist();
    std::fs::write(&conflist, main_plugin().to_string()).unwrap();
    daemon.wait_ready();
    let installed = read_json(&conflist);
    assert_eq!(
        plugin_types(&installed),
        ["bridge", "portmap", "ambridge-cni"]
    );
    assert_eq!(
        installed["plugins"][2]["socket"],
        daemon.api_socket().display().to_string()
    );
    assert_eq!(
        std::fs::read(cni.bin.join("ambridge-cni")).unwrap(),
        std::fs::read(workspace_bin("ambridge-cni")).unwrap()
    );

    // The main plugin rewrites its file without the entry: it comes back.
    std::fs::write(&conflist, main_plugin().to_string()).unwrap();
    let back = eventually(Duration::from_secs(10), || {
        let types = plugin_types(&read_json(&conflist));
        (types.last().map(String::as_str) == Some("ambridge-cni")).then_some(())
    });
    assert!(back.is_some(), "{}", read_json(&conflist));
    drop(daemon);

    let out = Command::new(workspace_bin("ambridge"))
        .arg("uninstall")
        .arg("--bpffs")
        .arg(node.bpffs())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read_json(&conflist), main_plugin());
    assert!(!cni.bin.join("ambridge-cni").exists());
}
