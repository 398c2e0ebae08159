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
    api.put_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ztunnel-x", "namespace": "istio-system", "uid": ztunnel_uid,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                          "name": "ztunnel", "uid": "ds-1", "controller": true}]},
        "spec": {"nodeName": NODE, "containers": [{"name": "ztunnel", "image": "ztunnel"}],
                 "serviceAccountName": "ztunnel"},
        "status": {"phase": "Running"}
    }));
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
