//! Issue 5, the local API: `ambridge status` and `ambridge pods` against a
//! running daemon, and a socket that refuses non-root callers.

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use ambridge::api::{self, pb};
use ambridge_conformance::{Daemon, ThreePods, three_pods, workspace_bin, ztunnel_stand_in};
use tokio_stream::StreamExt;

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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The next change on a watch, within a few seconds.
async fn next_change(watch: &mut tonic::Streaming<pb::Change>) -> pb::Change {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a change within 10 s")
        .expect("the stream goes on")
        .expect("no stream error")
}

fn push_pod(pod: &ambridge_conformance::Pod, mode: &str, remove: bool) -> pb::PushCgroupRequest {
    pb::PushCgroupRequest {
        entry: Some(pb::push_cgroup_request::Entry::Pod(pb::PushedPod {
            uid: pod.uid.clone(),
            namespace: "default".into(),
            name: pod.name.clone(),
            cgroup: pod.cgroup.display().to_string(),
            ips: vec![pod.ip4.to_string(), pod.ip6.to_string()],
            mode: mode.into(),
            service_account: String::new(),
        })),
        remove,
    }
}

#[test]
fn a_pushed_pod_joins_the_node_state_and_watchers_see_every_change() {
    let ThreePods {
        client: _client,
        server,
        plain,
        ztunnel_cgroup,
        node,
    } = three_pods();
    let daemon = Daemon::start(&node);
    let _app = server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in(&node, &ztunnel_cgroup, &[&plain], 15001);
    let to = format!("{}:8080", server.ip4);
    runtime().block_on(async {
        let mut api = api::connect(daemon.api_socket()).await.unwrap();
        let mut watch = api.watch(pb::WatchRequest {}).await.unwrap().into_inner();
        // The snapshot: every pod of the file, as ADDED.
        for _ in 0..3 {
            assert_eq!(
                next_change(&mut watch).await.kind,
                pb::change::Kind::Added as i32
            );
        }
        // `plain` is `none` in the file; an agent pushes it as ambient.
        api.push_cgroup(push_pod(&plain, "ambient", false))
            .await
            .unwrap();
        let change = next_change(&mut watch).await;
        assert_eq!(change.kind, pb::change::Kind::Updated as i32, "{change:?}");
        let pod = change.pod.unwrap();
        assert_eq!(
            (pod.uid.as_str(), pod.mode.as_str()),
            (plain.uid.as_str(), "ambient")
        );
        // It is redirected now (in replacement mode, once ztunnel
        // acknowledged it).
        let redirected = ambridge_conformance::eventually(Duration::from_secs(10), || {
            (plain.connect(&to, 16)["ok"] == true).then_some(())
        });
        assert!(redirected.is_some(), "{:?}", ztunnel.events());
        ztunnel.wait_for(|e| e["event"] == "accepted", Duration::from_secs(5));
        // Taking the push back restores the file's word for it.
        api.push_cgroup(push_pod(&plain, "ambient", true))
            .await
            .unwrap();
        // (In replacement mode an update for the lifted hold may come
        // first.)
        let mut change = next_change(&mut watch).await;
        if change.pod.as_ref().is_some_and(|p| p.mode == "ambient") {
            change = next_change(&mut watch).await;
        }
        assert_eq!(change.kind, pb::change::Kind::Updated as i32);
        assert_eq!(change.pod.unwrap().mode, "none");
        // A malformed push is refused, naming the field.
        let err = api
            .push_cgroup(push_pod(&plain, "sideways", false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("pod.mode"), "{}", err.message());
    });
}
