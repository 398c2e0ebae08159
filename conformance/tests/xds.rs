//! Issue 5, istiod's workload discovery: the daemon follows a fake istiod
//! over TLS (delta ADS, `istio.workload.Address`) and the real datapath
//! follows it: HBONE workloads of this node are redirected, others not; a
//! malformed resource is NACKed naming it and changes nothing; a restarted
//! stream resumes from `initial_resource_versions`; a removed workload
//! leaves the datapath. Pods are found by the addresses of their
//! network namespaces (istiod does not know Kubernetes pod UIDs).

use std::{net::IpAddr, time::Duration};

use ambridge::pb::istio::workload::{Address, Service, TunnelProtocol, Workload, address};
use ambridge_conformance::{
    Daemon, Node, Pod, eventually,
    istiod::{self, FakeIstiod, TOKEN},
    ztunnel_stand_in,
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
    let daemon = x.daemon();
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
