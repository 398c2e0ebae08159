//! `ambridge-demo`: builds a sandbox node on the real kernel, starts the
//! daemon, sends traffic from an enrolled and a non-enrolled pod, and prints
//! what was redirected. Everything it builds is removed when it exits.

use std::time::Duration;

use ambridge_conformance::{Daemon, Node, canon, event, ztunnel_stand_in};

fn main() {
    let mut node = Node::new();
    let sleep = node.add_pod("sleep");
    let legacy = node.add_pod("legacy");
    let httpbin = node.add_pod("httpbin");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    node.write_workloads(
        &[(&sleep, "ambient"), (&legacy, "none"), (&httpbin, "none")],
        Some(&ztunnel_cgroup),
    );
    println!("sandbox node {}:", node.id);
    println!("  cgroup   {}", node.cgroup.display());
    for pod in &node.pods {
        println!(
            "  pod {:<8} {:<14} {:<12} {}",
            pod.name,
            pod.ip4,
            pod.ip6,
            if pod.name == "sleep" {
                "ambient (enrolled)"
            } else {
                "none"
            }
        );
    }
    println!("  workloads file {}\n", node.workloads_path().display());

    let daemon = Daemon::start(&node);
    let _server = httpbin.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in(&node, &ztunnel_cgroup, &[&sleep, &legacy], 15001);

    println!(
        "{:<7} {:<27} {:<10} {:<27} {:<20} bytes echoed",
        "from", "connect() to", "redirected", "accepted by", "SO_ORIGINAL_DST"
    );
    let targets = [
        format!("{}:8080", httpbin.ip4),
        format!("[{}]:8080", httpbin.ip6),
        format!("[::ffff:{}]:8080", httpbin.ip4),
    ];
    for pod in [&sleep, &legacy] {
        for to in &targets {
            let accepted_before = ztunnel.events().len();
            let result = pod.connect(to, 4096);
            let accepted =
                event::first::<event::OutboundAccepted>(&ztunnel.events()[accepted_before..]);
            let (redirected, landed, orig) = match &accepted {
                Some(a) => (
                    "yes",
                    format!("ztunnel {}", canon(a.local)),
                    a.orig_dst
                        .map_or_else(|| "(none)".to_string(), |o| o.to_string()),
                ),
                None => (
                    "no",
                    result.peer.map_or_else(
                        || "httpbin ?".to_string(),
                        |p| format!("httpbin {}", canon(p)),
                    ),
                    "-".to_string(),
                ),
            };
            println!(
                "{:<7} {:<27} {:<10} {:<27} {:<20} {}/{}",
                pod.name, to, redirected, landed, orig, result.received, result.sent
            );
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    println!("\ndatapath counters (ambridge stats):");
    for (name, value) in daemon.stats() {
        println!("  {name:<28} {value}");
    }
    println!("\ntearing the sandbox down (ambridge uninstall, netns and cgroups removed)");
}
