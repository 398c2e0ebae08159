//! Issue 5, the Kubernetes feed against a local API server speaking
//! list/watch with real JSON objects: pods added, relabelled, their
//! namespace relabelled, deleted, and watches restarted (410 Gone), each
//! reaching the real datapath; and a daemon restarted while the API server
//! is down.

use std::time::{Duration, Instant};

use ambridge_conformance::{
    Background, Daemon, Node, Pod, event::OutboundAccepted, eventually, ip_of, kubeapi::KubeApi,
    ztunnel_stand_in, ztunnel_stand_in_with,
};
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

/// The daemon with Kubernetes as its only source, `api` its API server and
/// `node`'s cgroup the kubelet's pod parent.
fn kubernetes_daemon(node: &Node, api: &KubeApi) -> Daemon {
    let args = api.source_args(node, NODE);
    Daemon::start_with(node, &args.iter().map(String::as_str).collect::<Vec<_>>())
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

    let daemon = kubernetes_daemon(&node, &api);
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
    let daemon = kubernetes_daemon(&node, &api);
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

/// How long the API server stays down after the restart (issue 12 item 3).
const OUTAGE: Duration = Duration::from_secs(10);

/// ztunnel's connections from `pod` so far.
fn accepted_from(ztunnel: &Background, pod: &Pod) -> usize {
    ztunnel
        .all::<OutboundAccepted>()
        .iter()
        .filter(|e| ip_of(e.peer) == pod.ip4)
        .count()
}

/// Asserts that one connect from `pod` to `to` succeeds through ztunnel.
fn assert_captured(ztunnel: &Background, pod: &Pod, to: &str) {
    let before = accepted_from(ztunnel, pod);
    let r = pod.connect(to, 16);
    assert!(r.ok, "{} could not connect: {r}", pod.name);
    let through = eventually(Duration::from_secs(3), || {
        (accepted_from(ztunnel, pod) > before).then_some(())
    });
    assert!(through.is_some(), "{}'s connect bypassed ztunnel", pod.name);
}

#[test]
fn a_daemon_restarted_while_the_api_server_is_down_keeps_kubernetes_pods_captured_until_it_answers()
{
    let mut node = Node::new();
    for dir in ["kubepods", "kubepods/besteffort"] {
        node.add_cgroup(dir);
    }
    let (kube_uid, deleted_uid) = (
        ambridge_conformance::kubelet_pod_uid(),
        ambridge_conformance::kubelet_pod_uid(),
    );
    // Enrolled by their namespace's label, in Kubernetes.
    let kube_client = node.add_pod_in("kube-client", &format!("kubepods/besteffort/pod{kube_uid}"));
    let deleted = node.add_pod_in("deleted", &format!("kubepods/besteffort/pod{deleted_uid}"));
    // Enrolled by the workloads file, which names ztunnel too.
    let file_client = node.add_pod("file-client");
    let server = node.add_pod("server");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    node.write_workloads(&[(&file_client, "ambient")], Some(&ztunnel_cgroup));

    let api = KubeApi::start();
    api.put_namespace(namespace_json(
        "default",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    api.put_pod(pod_json(&kube_client, &kube_uid, "default", json!({})));
    api.put_pod(pod_json(&deleted, &deleted_uid, "default", json!({})));
    let kubernetes = api.source_args(&node, NODE);
    let mut args = vec!["--source", "file"];
    args.extend(kubernetes.iter().map(String::as_str));
    let mut daemon = Daemon::start_with(&node, &args);
    let _app = server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in_with(
        &node,
        &ztunnel_cgroup,
        &[&kube_client, &deleted, &file_client],
        &["--port", "15001"],
    );
    for uid in [&kube_uid, &deleted_uid, &file_client.uid] {
        daemon.wait_for_mode(uid, Some("ambient"));
    }
    let to = format!("{}:8080", server.ip4);
    for pod in [&kube_client, &deleted, &file_client] {
        assert_captured(&ztunnel, pod, &to);
    }
    let cgroup_entries = daemon.map_entries()["cgroups"];

    let before = accepted_from(&ztunnel, &kube_client);
    let looped = kube_client.connect_until_stopped(&to, &node.dir);
    let mut restarted = None;
    let mut during_outage = 0;
    looped.assert_through_across(
        || accepted_from(&ztunnel, &kube_client) - before,
        || {
            // A node reboot, say: the daemon dies, and the API server is
            // not back when the new one starts.
            daemon.crash();
            api.go_down();
            let went_down = Instant::now();
            let at_outage_start = accepted_from(&ztunnel, &kube_client);
            let mut daemon = Daemon::spawn_with(&node, &args);
            daemon.wait_serving();
            // The file has delivered and been reconciled; Kubernetes has
            // not, so the daemon is not ready.
            daemon.wait_for_mode(&file_client.uid, Some("ambient"));
            let status = daemon.api_json("status");
            assert_eq!(status["ready"], false, "{status}");
            let kubernetes = daemon
                .component("kubernetes")
                .expect("a kubernetes component");
            assert_ne!(kubernetes["state"], "running", "{kubernetes}");
            // Nothing of Kubernetes' was deleted on the strength of the
            // file alone: its pods are still captured, the one about to be
            // deleted included.
            assert_eq!(daemon.map_entries()["cgroups"], cgroup_entries);
            assert_captured(&ztunnel, &deleted, &to);
            // The pod goes while the API server is down.
            api.delete_pod(&deleted_uid);
            std::thread::sleep(OUTAGE.saturating_sub(went_down.elapsed()));
            assert_eq!(daemon.map_entries()["cgroups"], cgroup_entries);
            assert_captured(&ztunnel, &deleted, &to);
            assert_eq!(daemon.api_json("status")["ready"], false);
            during_outage = accepted_from(&ztunnel, &kube_client) - at_outage_start;
            api.come_back();
            daemon.wait_ready();
            restarted = Some(daemon);
        },
    );
    eprintln!(
        "connects from the Kubernetes-enrolled pod through ztunnel: {} in the loop, {during_outage} during the {OUTAGE:?} outage",
        accepted_from(&ztunnel, &kube_client) - before
    );
    assert!(during_outage > 0, "no connect was made during the outage");
    // Once Kubernetes has delivered, removals resume: the pod deleted
    // meanwhile goes, the other stays.
    let daemon = restarted.expect("the daemon was restarted");
    daemon.wait_for_mode(&deleted_uid, None);
    daemon.wait_for_mode(&kube_uid, Some("ambient"));
    assert_captured(&ztunnel, &kube_client, &to);
}

#[test]
fn only_pods_scheduled_on_this_node_are_taken_from_the_api_server() {
    // The API server filters by `spec.nodeName` as the daemon asks it to
    // (a fieldSelector): a pod of another node never reaches this node's
    // datapath, even one whose UID names a cgroup here.
    let mut node = Node::new();
    let (here_uid, elsewhere_uid) = (
        ambridge_conformance::kubelet_pod_uid(),
        ambridge_conformance::kubelet_pod_uid(),
    );
    for dir in ["kubepods", "kubepods/besteffort"] {
        node.add_cgroup(dir);
    }
    let here = node.add_pod_in("here", &format!("kubepods/besteffort/pod{here_uid}"));
    let elsewhere = node.add_pod_in(
        "elsewhere",
        &format!("kubepods/besteffort/pod{elsewhere_uid}"),
    );
    let api = KubeApi::start();
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    api.put_namespace(namespace_json("default", json!({})));
    api.put_pod(pod_json(&here, &here_uid, "default", ambient.clone()));
    let mut other = pod_json(&elsewhere, &elsewhere_uid, "default", ambient.clone());
    other["spec"]["nodeName"] = json!("node-2");
    api.put_pod(other.clone());
    let daemon = kubernetes_daemon(&node, &api);
    // Enrolled and in the datapath (held in replacement mode, as no
    // ztunnel takes it here: the node filter is what is tested).
    let listed = |uid: &str| {
        daemon.api_json("pods").as_array().is_some_and(|pods| {
            pods.iter()
                .any(|p| p["uid"] == uid && p["mode"] == "ambient" && p["in_datapath"] == true)
        })
    };
    let wait_listed = |uid: &str, want: bool| {
        let reached = eventually(Duration::from_secs(15), || {
            (listed(uid) == want).then_some(())
        });
        assert!(
            reached.is_some(),
            "{uid} listed: {want}? {}",
            daemon.api_json("pods")
        );
    };
    wait_listed(&here_uid, true);
    assert!(!listed(&elsewhere_uid), "{}", daemon.api_json("pods"));
    // Rescheduled here, it arrives as the watch's ADDED; moved away again,
    // as its DELETED.
    other["spec"]["nodeName"] = json!(NODE);
    api.put_pod(other.clone());
    wait_listed(&elsewhere_uid, true);
    other["spec"]["nodeName"] = json!("node-2");
    api.put_pod(other);
    wait_listed(&elsewhere_uid, false);
    assert!(listed(&here_uid));
}
