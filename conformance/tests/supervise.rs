//! Issue 12 item 7: a part of the daemon that fails at runtime is retried
//! with backoff and reported in `ambridge status`; the daemon survives it
//! and the datapath keeps capturing meanwhile.

use std::time::Duration;

use ambridge_conformance::{Fixture, PodRole, assert_redirected, eventually, sandbox::ip};

/// More addresses than the exempt map holds (1,024 entries), as a node
/// whose kube-proxy runs in IPVS mode has: every ClusterIP of the cluster
/// is an address of its `kube-ipvs0` interface.
const NODE_ADDRESSES: u32 = 1_100;

/// `ip -batch` lines that add (`add`) or delete (`del`) the node
/// addresses 10.200.x.y/32 on the node netns's loopback.
fn node_addresses(verb: &str) -> String {
    (0..NODE_ADDRESSES)
        .map(|i| format!("addr {verb} 10.200.{}.{}/32 dev lo\n", i / 250, i % 250 + 1))
        .collect()
}

fn batch(node: &ambridge_conformance::Node, lines: &str) {
    let file = node.dir.join("ip-batch");
    std::fs::write(&file, lines).expect("writing the ip batch");
    ip(&[
        "-n",
        &node.netns_name,
        "-batch",
        &file.display().to_string(),
    ]);
}

#[test]
fn a_full_map_fails_the_datapath_apply_which_is_retried_reported_and_recovers_while_connects_stay_captured()
 {
    let f = Fixture::three_pods()
        .app()
        .ztunnel(&[PodRole::Client], &[])
        .start();
    let to = format!("{}:8080", f.server.ip4);
    assert_redirected(f.ztunnel(), &f.client, &to, true);
    let datapath = || {
        f.daemon
            .component("datapath")
            .expect("a datapath component")
    };
    assert_eq!(datapath()["state"], "running", "{}", datapath());

    // The node's addresses are exempt from inbound capture: at the next
    // resync they no longer fit in the exempt map.
    batch(&f.node, &node_addresses("add"));
    let failed = eventually(Duration::from_secs(15), || {
        let d = datapath();
        (d["state"] == "failed").then_some(d)
    })
    .unwrap_or_else(|| panic!("the datapath apply never failed: {}", datapath()));
    assert!(
        failed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("AMB_EXEMPT_V1")),
        "the error names the map: {failed}"
    );

    // The daemon stays up and keeps retrying, with backoff (100 ms, then
    // 200, 400, 800: four retries take 1.5 s, not a spin), and what the
    // maps held stays in force: the enrolled pod is still captured, the
    // others are not.
    let retried = eventually(Duration::from_secs(15), || {
        let d = datapath();
        (d["restarts"].as_u64() >= Some(4)).then_some(d)
    })
    .unwrap_or_else(|| panic!("the apply was not retried: {}", datapath()));
    assert_eq!(retried["state"], "failed", "{retried}");
    let status = f.daemon.status().expect("the daemon still answers");
    assert_eq!(status["ready"], true, "{status}");
    for _ in 0..5 {
        assert_redirected(f.ztunnel(), &f.client, &to, true);
    }
    assert_redirected(f.ztunnel(), &f.plain, &to, false);
    // Retries are spaced out: the count grows by the backoff, not by a
    // busy loop (the wait is at most 15 s; a few seconds give 1 or 2).
    let before = datapath()["restarts"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = datapath()["restarts"].as_u64().unwrap();
    assert!(after - before <= 3, "{before} -> {after} retries in 3 s");

    // Once the addresses fit again, the next attempt succeeds; the last
    // error and the count stay for the operator.
    batch(&f.node, &node_addresses("del"));
    let recovered = eventually(Duration::from_secs(20), || {
        let d = datapath();
        (d["state"] == "running").then_some(d)
    })
    .unwrap_or_else(|| panic!("the datapath never recovered: {}", datapath()));
    assert!(
        recovered["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("AMB_EXEMPT_V1")),
        "{recovered}"
    );
    assert!(recovered["restarts"].as_u64() >= Some(after), "{recovered}");
    assert_redirected(f.ztunnel(), &f.client, &to, true);
    // And the node state moves again: enrolling `plain` takes effect.
    f.node.write_workloads(
        &[
            (&f.client, "ambient"),
            (&f.server, "none"),
            (&f.plain, "ambient"),
        ],
        Some(&f.ztunnel_cgroup),
    );
    f.daemon.wait_for_mode(&f.plain.uid, Some("ambient"));
}
