//! Issue 5, istiod's workload discovery: the daemon follows a fake istiod
//! over TLS (delta ADS, `istio.workload.Address`) and the real datapath
//! follows it: HBONE workloads of this node are redirected, others not; a
//! malformed resource is NACKed naming it and changes nothing; a restarted
//! stream resumes from `initial_resource_versions`; a removed workload
//! leaves the datapath. Pods are found by the addresses of their
//! network namespaces (istiod does not know Kubernetes pod UIDs).

use std::{net::IpAddr, os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use ambridge::pb::istio::workload::{Address, Service, TunnelProtocol, Workload, address};
use ambridge_conformance::{
    Background, Daemon, Node, Pod,
    event::{ZdsAdd, ZdsDel},
    eventually,
    istiod::{self, FakeIstiod, TOKEN},
    replacement_mode, workspace_bin, ztunnel_stand_in,
};
use prost::Message as _;

const NODE: &str = "node-1";

/// A node whose `client` sits in the kubelet's cgroup layout (found by its
/// address, as istiod knows no pod UIDs) beside a `_bystander`, a `server`,
/// a ztunnel cgroup named by the workloads file, and a fake istiod; `args`
/// start a daemon on istiod and the file. Field order is drop order.
struct XdsNode {
    client: Pod,
    server: Pod,
    zcgroup: std::path::PathBuf,
    istiod: FakeIstiod,
    args: Vec<String>,
    node: Node,
}

fn xds_node() -> XdsNode {
    let mut node = Node::new();
    for dir in ["kubepods", "kubepods/besteffort", "kubepods/burstable"] {
        node.add_cgroup(dir);
    }
    let client = node.add_pod_in(
        "client",
        &format!(
            "kubepods/besteffort/pod{}",
            ambridge_conformance::kubelet_pod_uid()
        ),
    );
    // Another pod in the kubelet's layout: the address lookup must not
    // mistake it for the client.
    node.add_pod_in(
        "bystander",
        &format!(
            "kubepods/burstable/pod{}",
            ambridge_conformance::kubelet_pod_uid()
        ),
    );
    let server = node.add_pod("server");
    let zcgroup = node.add_cgroup("ztunnel");
    // istiod does not describe ztunnel; the file names its cgroup.
    node.write_workloads(&[], Some(&zcgroup));
    let istiod = FakeIstiod::start(&node.dir);
    let kubepods_parent = node.cgroup.display().to_string();
    let mut args = istiod.daemon_args(NODE);
    args.extend(["--source", "file", "--kubepods-parent", &kubepods_parent].map(String::from));
    XdsNode {
        client,
        server,
        zcgroup,
        istiod,
        args,
        node,
    }
}

impl XdsNode {
    /// A daemon whose API answers; not ready yet, since istiod has not
    /// said anything to it.
    fn daemon(&self) -> Daemon {
        let mut daemon = Daemon::spawn_with(
            &self.node,
            &self.args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        daemon.wait_serving();
        daemon
    }
}

#[test]
fn the_xds_feed_drives_the_datapath_nacks_malformed_resources_and_resumes_after_reconnect() {
    let x = xds_node();
    let (node, client, server, zcgroup, istiod) =
        (&x.node, &x.client, &x.server, &x.zcgroup, &x.istiod);
    let daemon = x.daemon();

    let _app = server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in(node, zcgroup, &[client], 15001);
    let to = format!("{}:8080", server.ip4);
    let redirected =
        |expect: bool| ambridge_conformance::assert_redirected(&ztunnel, client, &to, expect);
    let client_ips: [IpAddr; 2] = [client.ip4.into(), client.ip6.into()];
    let uid = istiod::workload_uid("default", "client");
    let service = istiod::resource(
        "default/server.default.svc.cluster.local",
        "1",
        Address {
            r#type: Some(address::Type::Service(Service {
                name: "server".into(),
                namespace: "default".into(),
                hostname: "server.default.svc.cluster.local".into(),
            })),
        }
        .encode_to_vec(),
    );

    // The first response: the client without HBONE, a workload of another
    // node that carries the client's IP (never ours), and a service.
    let first = istiod.send(
        vec![
            istiod::workload(
                "default",
                "client",
                NODE,
                &client_ips,
                TunnelProtocol::None,
                "1",
            ),
            istiod::workload(
                "default",
                "elsewhere",
                "node-2",
                &client_ips,
                TunnelProtocol::Hbone,
                "1",
            ),
            service,
        ],
        &[],
    );
    assert_eq!(istiod.reply(&first), Ok(()));
    daemon.wait_for_mode(&uid, Some("none"));
    redirected(false);
    let opened = &istiod.seen()[0];
    assert_eq!(
        opened.node_id.as_deref(),
        Some("ztunnel~10.0.0.7~ambridge-test.istio-system~istio-system.svc.cluster.local")
    );
    assert_eq!(
        opened.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert!(opened.initial_versions.is_empty());

    // istiod marks the client HBONE: captured.
    let hbone = istiod.send(
        vec![istiod::workload(
            "default",
            "client",
            NODE,
            &client_ips,
            TunnelProtocol::Hbone,
            "2",
        )],
        &[],
    );
    assert_eq!(istiod.reply(&hbone), Ok(()));
    daemon.wait_for_mode(&uid, Some("ambient"));
    redirected(true);

    // A response with one malformed resource is NACKed naming it, and none
    // of it applies (the client's change to NONE in the same response
    // included).
    let bad = istiod::resource(
        &istiod::workload_uid("default", "bad"),
        "3",
        Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: istiod::workload_uid("default", "bad"),
                addresses: vec![vec![1, 2, 3]],
                node: NODE.into(),
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    );
    let nacked = istiod.send(
        vec![
            istiod::workload(
                "default",
                "client",
                NODE,
                &client_ips,
                TunnelProtocol::None,
                "3",
            ),
            bad,
        ],
        &[],
    );
    let error = istiod.reply(&nacked).expect_err("a NACK");
    assert!(
        error.contains("Kubernetes//Pod/default/bad") && error.contains("3 bytes"),
        "{error}"
    );
    assert!(
        daemon
            .wait_log("NACK to istiod", Duration::from_secs(5))
            .is_some()
    );
    std::thread::sleep(Duration::from_millis(1500));
    daemon.wait_for_mode(&uid, Some("ambient"));
    redirected(true);

    // istiod restarts: the daemon reconnects, offers what it holds, and
    // keeps redirecting meanwhile.
    istiod.end_stream();
    let resumed = eventually(Duration::from_secs(15), || {
        istiod.seen().into_iter().find(|s| s.stream == 2)
    })
    .expect("the daemon reconnected");
    assert_eq!(
        resumed.initial_versions.get(&uid).map(String::as_str),
        Some("2"),
        "{resumed:?}"
    );
    assert!(
        resumed
            .initial_versions
            .contains_key("default/server.default.svc.cluster.local")
    );
    redirected(true);

    // The workload is removed.
    let removed = istiod.send(Vec::new(), &[&uid]);
    assert_eq!(istiod.reply(&removed), Ok(()));
    daemon.wait_for_mode(&uid, None);
    redirected(false);
}

#[test]
fn a_daemon_restarted_while_istiod_is_silent_keeps_its_pods_until_istiod_delivers() {
    let x = xds_node();
    let (node, client, server, zcgroup, istiod) =
        (&x.node, &x.client, &x.server, &x.zcgroup, &x.istiod);
    let mut daemon = x.daemon();
    let _app = server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in(node, zcgroup, &[client], 15001);
    let to = format!("{}:8080", server.ip4);
    let client_ips: [IpAddr; 2] = [client.ip4.into(), client.ip6.into()];
    let uid = istiod::workload_uid("default", "client");
    let state = || {
        vec![istiod::workload(
            "default",
            "client",
            NODE,
            &client_ips,
            TunnelProtocol::Hbone,
            "1",
        )]
    };
    assert_eq!(istiod.reply(&istiod.send(state(), &[])), Ok(()));
    daemon.wait_for_mode(&uid, Some("ambient"));
    ambridge_conformance::assert_redirected(&ztunnel, client, &to, true);

    // A node reboot, say: the new daemon has the file at once, and istiod
    // opens its stream but says nothing yet.
    let streams = istiod.seen().len();
    daemon.crash();
    let daemon = x.daemon();
    eventually(Duration::from_secs(15), || {
        (istiod.seen().len() > streams).then_some(())
    })
    .expect("the new daemon never asked istiod");
    // The file alone does not remove istiod's pod: it is still captured.
    ambridge_conformance::assert_redirected(&ztunnel, client, &to, true);
    assert_eq!(istiod.reply(&istiod.send(state(), &[])), Ok(()));
    daemon.wait_for_mode(&uid, Some("ambient"));
    ambridge_conformance::assert_redirected(&ztunnel, client, &to, true);
    // Once every source has delivered, removals resume.
    assert_eq!(istiod.reply(&istiod.send(vec![], &[uid.as_str()])), Ok(()));
    daemon.wait_for_mode(&uid, None);
    ambridge_conformance::assert_redirected(&ztunnel, client, &to, false);
}

/// The nsfs inode of the network namespace at `path` (a `/run/netns` or
/// `/proc/<pid>/ns/net` file): what the ztunnel stand-in reports as a ZDS
/// Add's `netns_ino`.
fn netns_ino(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// A long-running process (`ambridge-probe pause`) in `cgroup` and the
/// network namespace `netns`; returns once it has entered both. Killed on
/// drop (and with the node's cgroups).
fn process_in(cgroup: &Path, netns: &Path) -> Background {
    let mut cmd = std::process::Command::new(workspace_bin("ambridge-probe"));
    cmd.arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(netns)
        .arg("pause");
    let process = Background::spawn(cmd);
    let pid = process.pid().to_string();
    let want = netns_ino(netns);
    let entered = eventually(Duration::from_secs(5), || {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
        (procs.lines().any(|l| l == pid) && ns.ino() == want).then_some(())
    });
    assert!(
        entered.is_some(),
        "process {pid} never entered {} and {}",
        cgroup.display(),
        netns.display()
    );
    process
}

/// The ZDS Adds the stand-in was handed for `uid`, as the inodes of the
/// network namespaces they carried.
fn zds_adds(ztunnel: &Background, uid: &str) -> Vec<u64> {
    ztunnel
        .all::<ZdsAdd>()
        .into_iter()
        .filter(|e| e.uid == uid)
        .map(|e| e.netns_ino)
        .collect()
}

/// `ambridge pods` entry of `uid`, if it lists one.
fn pod_entry(daemon: &Daemon, uid: &str) -> Option<serde_json::Value> {
    daemon
        .api_json("pods")
        .as_array()?
        .iter()
        .find(|p| p["uid"] == uid)
        .cloned()
}

/// How long a negative check watches: as long as the daemon takes, at
/// `--resync-seconds 1`, to notice a change and act on it in the positive
/// cases here (a few resyncs).
const NOTICE: Duration = Duration::from_secs(5);

/// Issue 11 item 5, `--source xds` alone (the file names ztunnel only):
/// pods are found by the addresses their netns holds. A pod that holds
/// another pod's address in its own netns must not be given that pod's
/// workload, and a container that moved into a netns of its own must not
/// make its pod's netns that one.
#[test]
fn an_address_claimed_by_a_second_pod_cgroup_is_refused_to_it_the_pod_stays_captured_and_a_moved_container_is_not_the_sandbox()
 {
    let mut x = xds_node();
    let daemon = x.daemon();
    let victim = x.client.clone();
    let _app = x.server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in(&x.node, &x.zcgroup, &[&victim], 15001);
    let to = format!("{}:8080", x.server.ip4);
    let victim_ips: [IpAddr; 2] = [victim.ip4.into(), victim.ip6.into()];
    let uid = istiod::workload_uid("default", "client");
    let victim_ino = netns_ino(&victim.netns);

    // 1. The victim is an HBONE workload in istiod's view: captured, and in
    // replacement mode handed to ztunnel with its own netns.
    let hbone = istiod::workload(
        "default",
        "client",
        NODE,
        &victim_ips,
        TunnelProtocol::Hbone,
        "1",
    );
    assert_eq!(x.istiod.reply(&x.istiod.send(vec![hbone], &[])), Ok(()));
    daemon.wait_for_mode(&uid, Some("ambient"));
    ambridge_conformance::assert_redirected(&ztunnel, &victim, &to, true);
    if replacement_mode() {
        assert_eq!(zds_adds(&ztunnel, &uid), [victim_ino]);
    }

    // 2. An attacker pod in the kubelet's layout starts with the victim's
    // IPv4 address on its loopback, beside its own.
    let attacker = x.node.add_pod_network(
        "attacker",
        &format!(
            "kubepods/besteffort/pod{}",
            ambridge_conformance::kubelet_pod_uid()
        ),
    );
    ambridge_conformance::sandbox::ip(&[
        "-n",
        &attacker.netns_name,
        "addr",
        "add",
        &format!("{}/32", victim.ip4),
        "dev",
        "lo",
    ]);
    x.node.add_pod_cgroups(&attacker);
    let attacker_sandbox = process_in(&attacker.cgroup.join("pause"), &attacker.netns);
    let attacker_ino = netns_ino(&attacker.netns);

    // 3. The daemon refuses the attacker the identity, naming both cgroups,
    // in `ambridge pods` and in its log.
    let names_both = |text: &str| {
        text.contains("several pod cgroups")
            && text.contains(&victim.cgroup.display().to_string())
            && text.contains(&attacker.cgroup.display().to_string())
    };
    let disputed = eventually(NOTICE, || {
        let pod = pod_entry(&daemon, &uid)?;
        names_both(pod["problem"].as_str()?).then_some(pod)
    })
    .unwrap_or_else(|| {
        panic!(
            "the claimed address was not reported: {}",
            daemon.api_json("pods")
        )
    });
    let logged = daemon
        .wait_log("several pod cgroups", NOTICE)
        .expect("the dispute is logged");
    assert!(names_both(&logged), "{logged}");
    // The victim stays where it was, captured: a tenant claiming its
    // address must not switch its capture off. No pod is placed on the
    // attacker's cgroup.
    assert_eq!(disputed["in_datapath"], true, "{disputed}");
    assert_eq!(
        disputed["cgroup"],
        victim.cgroup.display().to_string(),
        "{disputed}"
    );
    ambridge_conformance::assert_redirected(&ztunnel, &victim, &to, true);
    let placed_on_attacker = |pods: &serde_json::Value| {
        pods.as_array().is_some_and(|all| {
            all.iter()
                .any(|p| p["cgroup"] == attacker.cgroup.display().to_string())
        })
    };
    // ztunnel keeps the victim, and is never handed the attacker's netns
    // under the victim's UID.
    let handed = eventually(NOTICE, || {
        let pods = daemon.api_json("pods");
        let dropped = ztunnel.all::<ZdsDel>().iter().any(|e| e.uid == uid);
        (dropped || zds_adds(&ztunnel, &uid).contains(&attacker_ino) || placed_on_attacker(&pods))
            .then_some(pods)
    });
    assert!(
        handed.is_none(),
        "the victim was dropped or the attacker got the workload: {handed:?} {:?}",
        ztunnel.events()
    );

    // The attacker pod goes: the victim, sole holder again, is no longer
    // disputed, and still captured in its own netns.
    // Its netns is left without the address too, so it answers no more
    // ARP for it.
    drop(attacker_sandbox);
    ambridge_conformance::sandbox::ip(&[
        "-n",
        &attacker.netns_name,
        "addr",
        "del",
        &format!("{}/32", victim.ip4),
        "dev",
        "lo",
    ]);
    let pod = eventually(NOTICE, || {
        let pod = pod_entry(&daemon, &uid)?;
        (pod["problem"] == "").then_some(pod)
    })
    .unwrap_or_else(|| panic!("the dispute never cleared: {:?}", pod_entry(&daemon, &uid)));
    assert_eq!(pod["in_datapath"], true, "{pod}");
    assert_eq!(pod["cgroup"], victim.cgroup.display().to_string(), "{pod}");
    if replacement_mode() {
        let adds = zds_adds(&ztunnel, &uid);
        assert!(adds.iter().all(|&ino| ino == victim_ino), "{adds:?}");
    }

    // 4. A container of the victim moves into a netns of its own, holding
    // an address no pod has: the pod's netns stays its sandbox's. Taken
    // for the pod's, that netns would leave the victim's addresses held by
    // no pod (a problem in `ambridge pods`), and ztunnel would be handed it.
    let loose = x.node.add_loose_netns("moved");
    let loose_name = loose.file_name().unwrap().to_string_lossy().into_owned();
    ambridge_conformance::sandbox::ip(&[
        "-n",
        &loose_name,
        "addr",
        "add",
        "198.18.0.250/32",
        "dev",
        "lo",
    ]);
    let loose_ino = netns_ino(&loose);
    let _moved = process_in(&victim.container, &loose);
    let taken = eventually(NOTICE, || {
        let pod = pod_entry(&daemon, &uid)?;
        (pod["in_datapath"] != true
            || pod["problem"] != ""
            || zds_adds(&ztunnel, &uid).contains(&loose_ino))
        .then_some(pod)
    });
    assert!(
        taken.is_none(),
        "the moved container's netns was taken for the pod's: {taken:?}"
    );
    ambridge_conformance::assert_redirected(&ztunnel, &victim, &to, true);
}
