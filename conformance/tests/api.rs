//! Issue 5, the local API: `ambridge status` and `ambridge pods` against a
//! running daemon, and a socket that refuses non-root callers.

use std::{os::unix::process::CommandExt, process::Command};

use ambridge_conformance::{Daemon, ThreePods, three_pods, workspace_bin};

#[test]
fn status_and_pods_report_the_node_and_the_datapath() {
    let ThreePods {
        client,
        server: _server,
        plain: _plain,
        ztunnel_cgroup: _z,
        node,
    } = three_pods();
    let daemon = Daemon::start(&node);
    let status = daemon.api_json("status");
    assert_eq!(status["state_loaded"], true, "{status}");
    assert_eq!(status["pods"], 3, "{status}");
    assert_eq!(status["enrolled"], 1, "{status}");
    assert_eq!(status["ztunnels"], 1, "{status}");
    assert_eq!(status["original_src"], "undo", "{status}");
    assert!(
        status["counters"]["connect_redirected_ipv4"].is_u64(),
        "{status}"
    );

    let pods = daemon.api_json("pods");
    let pods = pods.as_array().expect("a list of pods");
    assert_eq!(pods.len(), 3);
    let c = pods
        .iter()
        .find(|p| p["name"] == "client")
        .expect("client listed");
    assert_eq!(c["mode"], "ambient");
    assert_eq!(c["in_datapath"], true, "{c}");
    assert_eq!(c["cgroup"], client.cgroup.display().to_string());
    assert!(c["cgroup_id"].as_u64() > Some(0), "{c}");
    assert_eq!(c["problem"], "", "{c}");
    assert_eq!(c["ips"][0], client.ip4.to_string());
}

/// Runs `ambridge status --api <socket>` as `nobody`.
fn status_as_nobody(socket: &std::path::Path) -> std::process::Output {
    Command::new(workspace_bin("ambridge"))
        .args(["status", "--api"])
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running ambridge status as nobody")
}

#[test]
fn the_api_refuses_callers_that_are_not_root() {
    let pods = three_pods();
    let daemon = Daemon::start(&pods.node);
    let socket = daemon.api_socket().to_path_buf();
    // The test's scratch directory must be reachable for the check to be
    // about the socket itself.
    let mut dir = socket.parent().map(std::path::Path::to_path_buf);
    while let Some(d) = dir {
        let _ = std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        dir = d.parent().map(std::path::Path::to_path_buf);
        if d == std::env::temp_dir() {
            break;
        }
    }
    let mode = std::fs::metadata(&socket)
        .expect("socket exists")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Refused by the socket's mode ...
    let out = status_as_nobody(&socket);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("connecting"),
        "{err}"
    );
    // ... and, were the mode ever opened, by the caller's credentials.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = status_as_nobody(&socket);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root only"), "{err}");
}
