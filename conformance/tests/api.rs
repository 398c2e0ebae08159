//! Issue 5, the local API: `ambridge status` and `ambridge pods` against a
//! running daemon, and a socket that refuses non-root callers. Issue 11:
//! the API and ZDS sockets are mode 0600 from the moment they exist, one
//! connection holds a bounded number of streams, and a push of a cgroup
//! that holds a pod is refused.

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use ambridge::api::{self, pb};
use ambridge_conformance::{
    Fixture, PodRole, assert_redirected, event::OutboundAccepted, workspace_bin, zds_socket,
};
use tokio_stream::StreamExt;

#[test]
fn status_and_pods_report_the_node_and_the_datapath() {
    let f = Fixture::three_pods().start();
    let status = f.daemon.api_json("status");
    assert_eq!(status["state_loaded"], true, "{status}");
    assert_eq!(status["pods"], 3, "{status}");
    assert_eq!(status["enrolled"], 1, "{status}");
    assert_eq!(status["ztunnels"], 1, "{status}");
    assert_eq!(status["original_src"], "undo", "{status}");
    assert!(
        status["counters"]["connect_redirected_ipv4"].is_u64(),
        "{status}"
    );

    let pods = f.daemon.api_json("pods");
    let pods = pods.as_array().expect("a list of pods");
    assert_eq!(pods.len(), 3);
    let c = pods
        .iter()
        .find(|p| p["name"] == "client")
        .expect("client listed");
    assert_eq!(c["mode"], "ambient");
    assert_eq!(c["in_datapath"], true, "{c}");
    assert_eq!(c["cgroup"], f.client.cgroup.display().to_string());
    assert!(c["cgroup_id"].as_u64() > Some(0), "{c}");
    assert_eq!(c["problem"], "", "{c}");
    assert_eq!(c["ips"][0], f.client.ip4.to_string());
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
    let f = Fixture::three_pods().start();
    let socket = f.daemon.api_socket().to_path_buf();
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

fn push_pod(
    pod: &ambridge_conformance::Pod,
    mode: impl Into<i32>,
    remove: bool,
) -> pb::PushCgroupRequest {
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
    let f = Fixture::three_pods()
        .app()
        .ztunnel(&[PodRole::Plain], &[])
        .start();
    let to = format!("{}:8080", f.server.ip4);
    runtime().block_on(async {
        let mut api = api::connect(f.daemon.api_socket()).await.unwrap();
        let mut watch = api.watch(pb::WatchRequest {}).await.unwrap().into_inner();
        // The snapshot: every pod of the file, as ADDED.
        for _ in 0..3 {
            assert_eq!(
                next_change(&mut watch).await.kind,
                pb::change::Kind::Added as i32
            );
        }
        // `plain` is `none` in the file; an agent pushes it as ambient.
        api.push_cgroup(push_pod(&f.plain, pb::Mode::Ambient, false))
            .await
            .unwrap();
        let change = next_change(&mut watch).await;
        assert_eq!(change.kind, pb::change::Kind::Updated as i32, "{change:?}");
        let pod = change.pod.unwrap();
        assert_eq!(
            (pod.uid.as_str(), pod.mode()),
            (f.plain.uid.as_str(), pb::Mode::Ambient)
        );
        // It is redirected now (in replacement mode, once ztunnel
        // acknowledged it).
        let redirected = ambridge_conformance::eventually(Duration::from_secs(10), || {
            f.plain.connect(&to, 16).ok.then_some(())
        });
        assert!(redirected.is_some(), "{:?}", f.ztunnel().events());
        f.ztunnel()
            .wait_first::<OutboundAccepted>(Duration::from_secs(5));
        // Taking the push back restores the file's word for it.
        api.push_cgroup(push_pod(&f.plain, pb::Mode::Ambient, true))
            .await
            .unwrap();
        // (In replacement mode an update for the lifted hold may come
        // first.)
        let mut change = next_change(&mut watch).await;
        if change
            .pod
            .as_ref()
            .is_some_and(|p| p.mode() == pb::Mode::Ambient)
        {
            change = next_change(&mut watch).await;
        }
        assert_eq!(change.kind, pb::change::Kind::Updated as i32);
        assert_eq!(change.pod.unwrap().mode(), pb::Mode::None);
        // A malformed push is refused, naming the field.
        let err = api
            .push_cgroup(push_pod(&f.plain, 7, false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("pod.mode"), "{}", err.message());
    });
}

#[test]
fn the_api_and_zds_sockets_appear_at_their_paths_already_0600_never_created_or_chmod_there() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let node = Fixture::three_pods().zds_serve();
    let dir = node.pods().node.dir.clone();
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    inotify
        .add_watch(
            &dir,
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ATTRIB,
        )
        .unwrap();
    let f = node.start();
    let sockets = [f.daemon.api_socket().to_path_buf(), zds_socket(&f.node)];
    let bound = ambridge_conformance::eventually(Duration::from_secs(10), || {
        sockets.iter().all(|s| s.exists()).then_some(())
    });
    assert!(bound.is_some(), "{sockets:?} never appeared");
    let mut events = Vec::new();
    while let Ok(batch) = inotify.read_events() {
        events.extend(batch);
    }
    for socket in sockets {
        let name = socket.file_name().unwrap();
        let about: Vec<AddWatchFlags> = events
            .iter()
            .filter(|e| e.name.as_deref() == Some(name))
            .map(|e| e.mask)
            .collect();
        // Renamed into place whole: no moment where it exists there with
        // the umask's mode, waiting for a chmod.
        assert_eq!(
            about,
            vec![AddWatchFlags::IN_MOVED_TO],
            "{}: {about:?}",
            socket.display()
        );
        let mode = std::fs::metadata(&socket).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{}",
            socket.display()
        );
    }
    // The private directories they were bound in are gone.
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn one_api_connection_is_allowed_a_bounded_number_of_concurrent_streams() {
    let f = Fixture::three_pods().start();
    runtime().block_on(async {
        let io = tokio::net::UnixStream::connect(f.daemon.api_socket())
            .await
            .unwrap();
        let (send, mut conn) = h2::client::handshake(io).await.unwrap();
        let mut ping = conn.ping_pong().expect("a ping handle");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // The server's SETTINGS frame comes first on the connection, so
        // once our ping is answered the client has applied it.
        ping.ping(h2::Ping::opaque()).await.unwrap();
        assert_eq!(
            send.current_max_send_streams(),
            api::MAX_STREAMS_PER_CONNECTION as usize
        );
    });
}

#[test]
fn a_pushed_cgroup_holding_an_enrolled_pod_is_refused_naming_both_and_nothing_changes() {
    let f = Fixture::three_pods()
        .app()
        .ztunnel(&[PodRole::Client], &[])
        .start();
    let to = format!("{}:8080", f.server.ip4);
    assert_redirected(f.ztunnel(), &f.client, &to, true);
    let cgroups = f.daemon.map_entries()["cgroups"];
    let parent = f.node.cgroup.display().to_string();
    runtime().block_on(async {
        let mut api = api::connect(f.daemon.api_socket()).await.unwrap();
        // As ztunnel: every pod below would be exempt from capture.
        let as_ztunnel = pb::PushCgroupRequest {
            entry: Some(pb::push_cgroup_request::Entry::Ztunnel(pb::PushedZtunnel {
                cgroup: parent.clone(),
                zero_copy: false,
            })),
            remove: false,
        };
        // As a pod: its entry would be every unlisted pod's below.
        let mut as_pod = push_pod(&f.plain, pb::Mode::None, false);
        if let Some(pb::push_cgroup_request::Entry::Pod(p)) = &mut as_pod.entry {
            p.uid = ambridge_conformance::kubelet_pod_uid();
            p.cgroup = parent.clone();
        }
        for (push, field) in [(as_ztunnel, "ztunnel.cgroup"), (as_pod, "pod.cgroup")] {
            let err = api.push_cgroup(push).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            let message = err.message();
            assert!(
                message.starts_with(&format!(
                    "{field}: {parent} contains the cgroup of pod default/client ({}",
                    f.client.uid
                )),
                "{message}"
            );
        }
    });
    // Nothing changed: no new entry, the same ztunnel, still redirected.
    assert_eq!(f.daemon.map_entries()["cgroups"], cgroups);
    let status = f.daemon.api_json("status");
    assert_eq!(
        (status["ztunnels"].as_u64(), status["pods"].as_u64()),
        (Some(1), Some(3))
    );
    assert_redirected(f.ztunnel(), &f.client, &to, true);
    assert!(
        f.daemon
            .wait_log("push through the API refused", Duration::from_secs(5))
            .is_some()
    );
}
