//! Issue 5, the Kubernetes feed against a local API server speaking
//! list/watch with real JSON objects: pods added, relabelled, their
//! namespace relabelled, deleted, and watches restarted (410 Gone), each
//! reaching the real datapath.

use std::time::Duration;

use ambridge_conformance::{Daemon, Node, Pod, eventually, kubeapi::KubeApi, ztunnel_stand_in};
use serde_json::{Value, json};

const NODE: &str = "node-1";

fn pod_json(pod: &Pod, uid: &str, ns: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}],
                 "serviceAccountName": "default"},
        "status": {"phase": "Running", "podIP": pod.ip4.to_string(),
                   "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}]}
    })
}

fn namespace_json(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn daemonset_json(namespace: &str, name: &str, uid: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
           "metadata": {"name": name, "namespace": namespace, "uid": uid}})
}

/// A pod in ztunnel's namespace with ztunnel's service account, owned by
/// `owner` (an owner reference).
fn ztunnel_pod_json(name: &str, uid: &str, owner: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "istio-system", "uid": uid,
                     "ownerReferences": [owner]},
        "spec": {"nodeName": NODE, "containers": [{"name": "ztunnel", "image": "ztunnel"}],
                 "serviceAccountName": "ztunnel"},
        "status": {"phase": "Running"}
    })
}

fn daemonset_owner(uid: &str, controller: bool) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ztunnel", "uid": uid,
           "controller": controller})
}

#[test]
fn the_kubernetes_feed_drives_the_datapath_through_pod_and_namespace_changes_and_watch_restarts() {
    let mut node = Node::new();
    let (client_uid, ztunnel_uid) = (
        ambridge_conformance::kubelet_pod_uid(),
        ambridge_conformance::kubelet_pod_uid(),
    );
    for dir in ["kubepods", "kubepods/besteffort", "kubepods/burstable"] {
        node.add_cgroup(dir);
    }
    let client = node.add_pod_in("client", &format!("kubepods/besteffort/pod{client_uid}"));
    let zpod = node.add_pod_in("ztunnel", &format!("kubepods/burstable/pod{ztunnel_uid}"));
    let server = node.add_pod("server");

    let api = KubeApi::start();
    api.put_namespace(namespace_json("default", json!({})));
    api.put_namespace(namespace_json("istio-system", json!({})));
    api.put_daemonset(daemonset_json("istio-system", "ztunnel", "ds-1"));
    api.put_pod(ztunnel_pod_json(
        "ztunnel-x",
        &ztunnel_uid,
        daemonset_owner("ds-1", true),
    ));
    api.put_pod(pod_json(&client, &client_uid, "default", json!({})));

    let kubepods_parent = node.cgroup.display().to_string();
    let daemon = Daemon::start_with(
        &node,
        &[
            "--source",
            "kubernetes",
            "--node-name",
            NODE,
            "--kube-api",
            &api.url(),
            "--kubepods-parent",
            &kubepods_parent,
        ],
    );
    let _app = server.echo_server("[::]:8080");
    // ztunnel runs in its pod's container cgroup, proven by Kubernetes.
    let ztunnel = ztunnel_stand_in(&node, &zpod.container, &[&client], 15001);
    let to = format!("{}:8080", server.ip4);
    let redirected =
        |expect: bool| ambridge_conformance::assert_redirected(&ztunnel, &client, &to, expect);

    // Listed, not labelled: in the datapath as `none`, not redirected.
    daemon.wait_for_mode(&client_uid, Some("none"));
    redirected(false);

    // The pod is labelled ambient.
    api.put_pod(pod_json(
        &client,
        &client_uid,
        "default",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    daemon.wait_for_mode(&client_uid, Some("ambient"));
    redirected(true);

    // The pod label goes; the namespace takes it over.
    api.put_namespace(namespace_json(
        "default",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    api.put_pod(pod_json(&client, &client_uid, "default", json!({})));
    daemon.wait_for_mode(&client_uid, Some("ambient"));
    redirected(true);

    // Watches end and their resource versions expire (410 Gone): the feed
    // lists again and keeps the state, then follows new changes.
    api.end_watches(true);
    std::thread::sleep(Duration::from_millis(500));
    daemon.wait_for_mode(&client_uid, Some("ambient"));
    api.put_namespace(namespace_json("default", json!({})));
    daemon.wait_for_mode(&client_uid, Some("none"));
    redirected(false);

    // The pod is deleted.
    api.delete_pod(&client_uid);
    daemon.wait_for_mode(&client_uid, None);
    assert_eq!(daemon.api_json("status")["ztunnels"], 1);
}

#[test]
fn only_a_pod_controlled_by_the_ztunnel_daemonset_object_itself_is_trusted_as_ztunnel() {
    let mut node = Node::new();
    for dir in ["kubepods", "kubepods/burstable"] {
        node.add_cgroup(dir);
    }
    let [real, not_controller, other_uid] =
        std::array::from_fn(|_| ambridge_conformance::kubelet_pod_uid());
    for uid in [&real, &not_controller, &other_uid] {
        node.add_cgroup(&format!("kubepods/burstable/pod{uid}"));
    }
    let api = KubeApi::start();
    api.put_namespace(namespace_json("istio-system", json!({})));
    api.put_namespace(namespace_json("default", json!({})));
    api.put_daemonset(daemonset_json("istio-system", "ztunnel", "ds-real"));
    // A DaemonSet of the same name elsewhere is not ztunnel's.
    api.put_daemonset(daemonset_json("default", "ztunnel", "ds-other"));
    api.put_pod(ztunnel_pod_json(
        "ztunnel-real",
        &real,
        daemonset_owner("ds-real", true),
    ));
    // Names ztunnel's DaemonSet, but not as its controller.
    api.put_pod(ztunnel_pod_json(
        "ztunnel-not-controller",
        &not_controller,
        daemonset_owner("ds-real", false),
    ));
    // Controlled by a DaemonSet named ztunnel, but another object.
    api.put_pod(ztunnel_pod_json(
        "ztunnel-other-uid",
        &other_uid,
        daemonset_owner("ds-other", true),
    ));
    let kubepods_parent = node.cgroup.display().to_string();
    let daemon = Daemon::start_with(
        &node,
        &[
            "--source",
            "kubernetes",
            "--node-name",
            NODE,
            "--kube-api",
            &api.url(),
            "--kubepods-parent",
            &kubepods_parent,
        ],
    );
    // The impostors are plain pods, out of the mesh, in the datapath as
    // such; only the real one is a ztunnel.
    daemon.wait_for_mode(&not_controller, Some("none"));
    daemon.wait_for_mode(&other_uid, Some("none"));
    let pods = daemon.api_json("pods");
    assert!(
        !pods
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["uid"] == real.as_str()),
        "{pods}"
    );
    assert_eq!(daemon.api_json("status")["ztunnels"], 1);
    assert!(
        daemon
            .wait_log("uid=ds-real", Duration::from_secs(5))
            .is_some_and(|l| l.contains("ztunnel's DaemonSet"))
    );
}

#[test]
fn serving_zds_the_daemon_marks_pods_pending_then_enabled_and_unmarks_them_on_opt_out() {
    // As istio-cni does through pods/status: istiod reads `enabled` to
    // mark the workload HBONE.
    let mut node = Node::new();
    let uid = ambridge_conformance::kubelet_pod_uid();
    for dir in ["kubepods", "kubepods/besteffort"] {
        node.add_cgroup(dir);
    }
    let client = node.add_pod_in("client", &format!("kubepods/besteffort/pod{uid}"));
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    node.write_workloads(&[], Some(&ztunnel_cgroup));
    let api = KubeApi::start();
    api.put_namespace(namespace_json("default", json!({})));
    api.put_pod(pod_json(
        &client,
        &uid,
        "default",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    let kubepods_parent = node.cgroup.display().to_string();
    let socket = ambridge_conformance::zds_socket(&node);
    let daemon = Daemon::start_with(
        &node,
        &[
            "--source",
            "file",
            "--source",
            "kubernetes",
            "--node-name",
            NODE,
            "--kube-api",
            &api.url(),
            "--kubepods-parent",
            &kubepods_parent,
            "--zds",
            "serve",
            "--zds-socket",
            &socket.display().to_string(),
        ],
    );
    let annotation = |want: Option<&str>| {
        let reached = eventually(Duration::from_secs(15), || {
            (api.pod_annotation(&uid, "ambient.istio.io/redirection")
                .as_deref()
                == want)
                .then_some(())
        });
        assert!(
            reached.is_some(),
            "annotation never became {want:?}: {:?}",
            api.pod_annotation(&uid, "ambient.istio.io/redirection")
        );
    };
    // Enrolled, no ztunnel yet.
    annotation(Some("pending"));
    // ztunnel acknowledges it over ZDS.
    let _ztunnel = ambridge_conformance::ztunnel_stand_in_zds(
        &node,
        &ztunnel_cgroup,
        &socket,
        &["--port", "15001"],
    );
    annotation(Some("enabled"));
    // The pod opts out (its annotations as they were): the mark goes, the
    // rest stays.
    let mut opted_out = pod_json(
        &client,
        &uid,
        "default",
        json!({"istio.io/dataplane-mode": "none"}),
    );
    opted_out["metadata"]["annotations"] =
        json!({"ambient.istio.io/redirection": "enabled", "unrelated": "kept"});
    api.put_pod(opted_out);
    annotation(None);
    assert_eq!(
        api.pod_annotation(&uid, "unrelated").as_deref(),
        Some("kept")
    );
    assert!(
        daemon
            .wait_log("redirection annotation written", Duration::from_secs(5))
            .is_some()
    );
}
