//! The chained CNI plugin `ambridge-cni`, run as a container runtime runs
//! it (CNI environment, network configuration with `prevResult` on stdin),
//! against a real daemon on the real kernel: an ADD returns only once the
//! pod is in the datapath, so a container connecting the instant its
//! sandbox is up is captured; with the daemon down the ADD fails; a DEL
//! makes the daemon forget the sandbox.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use ambridge_conformance::{
    Background, Daemon, Node, Pod, assert_landed,
    cni::{self, config_for},
    event::{Connect, OutboundAccepted, Released},
    eventually, ip_of, parse_addr, workspace_bin, ztunnel_stand_in_with,
};
use serde_json::json;

/// The workloads file as Kubernetes would have it before the sandboxes
/// exist: every pod enrolled, no address yet, `server` out of the mesh.
fn enroll_without_addresses(
    node: &Node,
    enrolled: &[&Pod],
    server: &Pod,
    ztunnel: &std::path::Path,
) {
    let mut text = String::from("workloads:\n");
    for pod in enrolled {
        text += &format!(
            "  - uid: {}\n    name: {}\n    namespace: default\n    cgroup: {}\n    ips: []\n    mode: ambient\n",
            pod.uid,
            pod.name,
            pod.cgroup.display()
        );
    }
    text += &format!(
        "  - uid: {}\n    name: {}\n    namespace: default\n    cgroup: {}\n    ips: [{}, \"{}\"]\n    mode: none\n",
        server.uid,
        server.name,
        server.cgroup.display(),
        server.ip4,
        server.ip6
    );
    text += &format!("ztunnel:\n  cgroup: {}\n", ztunnel.display());
    node.write_workloads_text(&text);
}

fn config(daemon_api: &std::path::Path, pod: &Pod, extra: serde_json::Value) -> serde_json::Value {
    let mut keys = json!({"socket": daemon_api.display().to_string(), "timeoutSeconds": 30});
    if let (Some(keys), serde_json::Value::Object(extra)) = (keys.as_object_mut(), extra) {
        keys.extend(extra);
    }
    config_for(pod, keys)
}

/// A container process waiting, outside the pod, to be released: then it
/// joins the pod's cgroup and netns and connects at once.
fn waiting_container(pod: &Pod, to: &str) -> (Background, std::process::ChildStdin) {
    let mut cmd = Command::new(workspace_bin("ambridge-probe"));
    cmd.arg("--start-on-stdin")
        .arg("--cgroup")
        .arg(&pod.container)
        .arg("--netns")
        .arg(&pod.netns)
        .args(["connect", "--to", to, "--bytes", "16"])
        .stdin(Stdio::piped());
    let mut probe = Background::spawn(cmd);
    let stdin = probe.take_stdin();
    (probe, stdin)
}

#[test]
fn two_hundred_pods_connecting_the_instant_their_add_returns_are_all_captured() {
    const PODS: usize = 200;
    let mut node = Node::new();
    let server = node.add_pod("server");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    // Every sandbox's network is set up first (the main plugin's work);
    // cgroups and processes come pod by pod, as the kubelet makes them.
    let pods: Vec<Pod> = (0..PODS)
        .map(|i| node.add_pod_network(&format!("p{i}"), &format!("pod-p{i}")))
        .collect();
    let enrolled: Vec<&Pod> = pods.iter().collect();
    enroll_without_addresses(&node, &enrolled, &server, &ztunnel_cgroup);
    // A daemon that looks for new cgroups only every 30 s: without the
    // plugin, each pod's first connect would come long before.
    let daemon = Daemon::start_with(&node, &["--resync-seconds", "30"]);
    let _app = server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in_with(&node, &ztunnel_cgroup, &enrolled, &[]);
    let to = format!("{}:8080", server.ip4);
    let mut gaps_us = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        node.add_pod_cgroups(pod);
        let (container, mut release) = waiting_container(pod, &to);
        let add = cni::call(
            "ADD",
            pod,
            "default",
            &format!("sandbox-{i}"),
            &config(daemon.api_socket(), pod, json!({})),
        );
        release.write_all(b"go\n").expect("releasing the container");
        assert!(
            add.success,
            "ADD of {} failed: {} {}",
            pod.name, add.output, add.stderr
        );
        assert_eq!(
            add.output["ips"][0]["address"],
            format!("{}/24", pod.ip4),
            "prevResult passed through"
        );
        let connected = container.wait_first::<Connect>(Duration::from_secs(15));
        assert!(connected.ok, "{} connect: {connected}", pod.name);
        let released = container
            .all::<Released>()
            .into_iter()
            .next()
            .expect("released event");
        let at = released.monotonic_ns;
        gaps_us.push(at.saturating_sub(add.returned_ns) as f64 / 1000.0);
    }
    // Every one of them went through ztunnel, from its own address.
    let accepted = eventually(Duration::from_secs(10), || {
        let accepted = ztunnel.all::<OutboundAccepted>();
        (accepted.len() >= PODS).then_some(accepted)
    })
    .unwrap_or_else(|| {
        panic!(
            "not every first connect reached ztunnel: {:?}",
            ztunnel.events()
        )
    });
    assert_eq!(accepted.len(), PODS);
    for pod in &pods {
        let own = accepted
            .iter()
            .find(|a| ip_of(a.peer) == pod.ip4)
            .unwrap_or_else(|| panic!("{}'s first connect did not reach ztunnel", pod.name));
        assert_landed(own, pod.ip4.into(), pod.ip4.into(), parse_addr(&to));
    }
    gaps_us.sort_by(f64::total_cmp);
    eprintln!(
        "ADD returned -> container connecting: median {:.0} us, max {:.0} us over {PODS} pods",
        gaps_us[PODS / 2],
        gaps_us[PODS - 1]
    );
}

#[test]
fn with_the_daemon_down_add_fails_so_no_pod_starts_uncaptured() {
    let mut node = Node::new();
    let pod = node.add_pod_network("late", "pod-late");
    node.add_pod_cgroups(&pod);
    let api = node.dir.join("api.sock");
    let add = cni::call(
        "ADD",
        &pod,
        "default",
        "sandbox-1",
        &config(&api, &pod, json!({})),
    );
    assert!(!add.success, "ADD succeeded with no daemon: {}", add.output);
    assert_eq!(add.output["code"], 11, "try again later: {}", add.output);
    assert_eq!(add.output["cniVersion"], "1.0.0");
    let msg = format!("{} {}", add.output["msg"], add.output["details"]);
    assert!(
        msg.contains("cannot be reached") && msg.contains("default/late"),
        "{msg}"
    );
    // Pods of excluded namespaces, and with `allow`, start without it.
    let excluded = cni::call(
        "ADD",
        &pod,
        "kube-system",
        "sandbox-1",
        &config(&api, &pod, json!({})),
    );
    assert!(excluded.success, "{}", excluded.stderr);
    let allowed = cni::call(
        "ADD",
        &pod,
        "default",
        "sandbox-1",
        &config(&api, &pod, json!({"onDaemonUnreachable": "allow"})),
    );
    assert!(allowed.success, "{}", allowed.stderr);
    assert_eq!(
        allowed.output["ips"][0]["address"],
        format!("{}/24", pod.ip4)
    );
    // A DEL must not fail because the daemon is gone.
    let del = cni::call(
        "DEL",
        &pod,
        "default",
        "sandbox-1",
        &config(&api, &pod, json!({})),
    );
    assert!(del.success, "{}", del.stderr);
}

#[test]
fn an_add_fails_naming_what_it_waits_for_when_an_enrolled_pod_cannot_be_placed() {
    let mut node = Node::new();
    let server = node.add_pod("server");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    // Its cgroup never appears: the pod cannot be placed.
    let pod = node.add_pod_network("lost", "pod-lost");
    enroll_without_addresses(&node, &[&pod], &server, &ztunnel_cgroup);
    let daemon = Daemon::start(&node);
    let add = cni::call(
        "ADD",
        &pod,
        "default",
        "sandbox-1",
        &config(daemon.api_socket(), &pod, json!({"timeoutSeconds": 2})),
    );
    assert!(!add.success, "{}", add.output);
    assert_eq!(add.output["code"], 11, "{}", add.output);
    let details = add.output["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("not in the datapath yet") && details.contains("pod-lost"),
        "{details}"
    );
}

/// One enrolled pod `web` whose cgroups exist but whose sandbox has no
/// process yet, a daemon and ztunnel: where a runtime calls the plugin.
struct WebPod {
    pod: Pod,
    daemon: Daemon,
    /// The network configuration for `pod`'s ADD.
    good: serde_json::Value,
    _ztunnel: Background,
    /// Last, so it is dropped after the processes.
    _node: Node,
}

impl WebPod {
    fn new() -> Self {
        let mut node = Node::new();
        let server = node.add_pod("server");
        let ztunnel_cgroup = node.add_cgroup("ztunnel");
        let pod = node.add_pod_network("web", "pod-web");
        node.add_pod_cgroups(&pod);
        enroll_without_addresses(&node, &[&pod], &server, &ztunnel_cgroup);
        let daemon = Daemon::start(&node);
        let ztunnel = ztunnel_stand_in_with(&node, &ztunnel_cgroup, &[&pod], &[]);
        let good = config(daemon.api_socket(), &pod, json!({}));
        WebPod {
            pod,
            daemon,
            good,
            _ztunnel: ztunnel,
            _node: node,
        }
    }
}

#[test]
fn version_check_and_bad_configurations_answer_as_the_cni_spec_says() {
    let web = WebPod::new();
    let (pod, daemon, good) = (&web.pod, &web.daemon, &web.good);
    let version = cni::call("VERSION", pod, "default", "sandbox-1", &json!({}));
    assert!(version.success);
    assert!(
        version.output["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.0.0"))),
        "{}",
        version.output
    );
    // Before its ADD, the pod's namespace is not known: CHECK says so.
    let early = cni::call("CHECK", pod, "default", "sandbox-1", good);
    assert!(!early.success);
    assert!(
        early.output["details"]
            .as_str()
            .is_some_and(|d| d.contains("default/web")),
        "{}",
        early.output
    );
    assert!(cni::call("ADD", pod, "default", "sandbox-1", good).success);
    let check = cni::call("CHECK", pod, "default", "sandbox-1", good);
    assert!(check.success, "{} {}", check.output, check.stderr);
    for (bad, code, needle) in [
        (
            json!({"cniVersion": "0.2.0", "name": "n", "type": "ambridge-cni"}),
            1,
            "0.2.0",
        ),
        (
            config(
                daemon.api_socket(),
                pod,
                json!({"prevResult": {"ips": [{"address": "10.0.0.1"}]}}),
            ),
            6,
            "prevResult.ips[0].address",
        ),
    ] {
        let call = cni::call("ADD", pod, "default", "sandbox-2", &bad);
        assert!(!call.success);
        assert_eq!(call.output["code"], code, "{}", call.output);
        assert!(
            call.output.to_string().contains(needle),
            "{needle}: {}",
            call.output
        );
    }
    // The failed ADDs changed nothing: the first sandbox stands.
    assert!(cni::call("CHECK", pod, "default", "sandbox-1", good).success);
}

#[test]
fn del_forgets_the_sandbox_but_a_late_del_of_an_older_sandbox_does_not() {
    let web = WebPod::new();
    let (pod, daemon, good) = (&web.pod, &web.daemon, &web.good);
    let inbound = || {
        daemon.api_json("pods").as_array().and_then(|pods| {
            pods.iter()
                .find(|p| p["uid"] == pod.uid.as_str())
                .map(|p| p["inbound"].as_str().unwrap_or_default().to_string())
        })
    };
    assert!(cni::call("ADD", pod, "default", "sandbox-2", good).success);
    assert_eq!(inbound().as_deref(), Some("captured"));
    // The kubelet garbage-collects an older sandbox of the pod.
    assert!(cni::call("DEL", pod, "default", "sandbox-1", good).success);
    assert_eq!(
        inbound().as_deref(),
        Some("captured"),
        "a stale DEL took the live sandbox"
    );
    // The live one goes: its namespace is no longer known (no process
    // runs in the pod to find it through), so nothing holds it any more.
    assert!(cni::call("DEL", pod, "default", "sandbox-2", good).success);
    assert_eq!(inbound().as_deref(), Some("waiting"));
    let check = cni::call("CHECK", pod, "default", "sandbox-2", good);
    assert!(!check.success, "CHECK after DEL: {}", check.output);
}
