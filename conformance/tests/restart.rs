//! Issue 5, restarts: the datapath is held by its pins, so a daemon that
//! crashes, restarts or is replaced by a newer one never leaves a connect
//! unredirected or failed, and a restarted daemon cleans up what changed
//! while it was down.

use std::{os::unix::fs::MetadataExt, path::PathBuf, time::Duration};

use ambridge_conformance::{
    Background, Daemon, Node, Pod, ThreePods, event::OutboundAccepted, eventually, ip_of,
    three_pods, ztunnel_stand_in,
};

/// Field order is drop order.
struct Setup {
    ztunnel: Background,
    _app: Background,
    client: Pod,
    server: Pod,
    plain: Pod,
    ztunnel_cgroup: PathBuf,
    node: Node,
}

fn setup() -> (Setup, Daemon) {
    let ThreePods {
        client,
        server,
        plain,
        ztunnel_cgroup,
        node,
    } = three_pods();
    let daemon = Daemon::start(&node);
    let app = server.echo_server("[::]:8080");
    let ztunnel = ztunnel_stand_in(&node, &ztunnel_cgroup, &[&client, &plain], 15001);
    (
        Setup {
            ztunnel,
            _app: app,
            client,
            server,
            plain,
            ztunnel_cgroup,
            node,
        },
        daemon,
    )
}

impl Setup {
    fn accepted(&self) -> usize {
        self.ztunnel.all::<OutboundAccepted>().len()
    }

    /// Runs `event` while the enrolled client connects in a loop, and
    /// asserts the loop ran across it with every connect through ztunnel
    /// and none failed.
    fn across_a_connect_loop(&self, event: impl FnOnce()) {
        let before = self.accepted();
        let looped = self
            .client
            .connect_until_stopped(&format!("{}:8080", self.server.ip4), &self.node.dir);
        looped.assert_through_across(|| self.accepted() - before, event);
    }

    /// Starts `count` sequential connects from the enrolled client.
    fn connect_loop(&self, count: usize) -> Background {
        self.client
            .connect_loop(&format!("{}:8080", self.server.ip4), count)
    }

    /// Waits for the loop's summary and checks every connect succeeded and
    /// went through ztunnel.
    fn assert_all_redirected(&self, looped: &Background, accepted_before: usize, count: usize) {
        ambridge_conformance::assert_loop_through(looped, count, || {
            self.accepted() - accepted_before
        });
    }
}

#[test]
fn a_daemon_killed_with_sigkill_and_restarted_leaves_no_connect_unredirected_or_failed() {
    let (s, mut daemon) = setup();
    let mut restarted = None;
    s.across_a_connect_loop(|| {
        daemon.crash();
        // While no daemon runs, connects still go through ztunnel.
        let down = s.accepted();
        assert!(
            eventually(Duration::from_secs(10), || (s.accepted() > down + 20)
                .then_some(()))
            .is_some(),
            "no connect went through ztunnel while no daemon ran"
        );
        restarted = Some(Daemon::start(&s.node));
    });
    drop(restarted);
}

#[test]
fn a_new_daemon_replacing_a_running_one_leaves_no_connect_unredirected_or_failed() {
    // An upgrade: the new daemon waits while the old one runs (one daemon
    // owns the pins at a time), the old one stops, and the new one loads
    // its programs and swaps every pinned link; the pinned programs serve
    // throughout.
    let (s, old) = setup();
    let mut new = Daemon::spawn(&s.node);
    s.across_a_connect_loop(|| {
        assert!(new.wait_log(WAITING, Duration::from_secs(10)).is_some());
        old.retire();
        new.wait_ready();
    });
    drop(new);
}

/// What a daemon logs while another holds its pins.
const WAITING: &str = "another daemon holds these pins";

#[test]
fn a_second_daemon_waits_for_the_first_and_touches_none_of_its_maps_or_sockets() {
    let (s, mut first) = setup();
    let before = s.accepted();
    let mut second = Daemon::spawn(&s.node);
    assert!(second.wait_log(WAITING, Duration::from_secs(10)).is_some());
    // For as long as a start takes, the first keeps its API socket (the
    // second has not unlinked and rebound it) and the node keeps working.
    let api = std::fs::metadata(first.api_socket()).unwrap().ino();
    let rebound = eventually(Duration::from_secs(3), || {
        (std::fs::metadata(first.api_socket()).unwrap().ino() != api).then_some(())
    });
    assert!(rebound.is_none(), "{:?}", second.log());
    assert_eq!(first.stats_json()["source"], "the daemon's API");
    let looped = s.connect_loop(20);
    s.assert_all_redirected(&looped, before, 20);
    // Once the first is gone, the second takes over.
    first.stop();
    second.wait_ready();
    assert_eq!(second.stats_json()["source"], "the daemon's API");
}

#[test]
fn a_restarted_daemon_removes_pods_deleted_while_it_was_down_and_gives_a_reused_ip_to_the_new_pod()
{
    let (mut s, mut daemon) = setup();
    let yaml = |pod: &Pod, ip4: std::net::Ipv4Addr, mode: &str| {
        format!(
            "  - uid: {}\n    name: {}\n    namespace: default\n    cgroup: {}\n    ips: [{ip4}, \"{}\"]\n    mode: {mode}\n",
            pod.uid,
            pod.name,
            pod.cgroup.display(),
            pod.ip6
        )
    };
    let ztunnel = format!("ztunnel:\n  cgroup: {}\n", s.ztunnel_cgroup.display());
    let to6 = format!("[{}]:8080", s.server.ip6);
    // `plain` is enrolled and redirected.
    s.node.write_workloads_text(&format!(
        "workloads:\n{}{}{}{ztunnel}",
        yaml(&s.client, s.client.ip4, "ambient"),
        yaml(&s.server, s.server.ip4, "none"),
        yaml(&s.plain, s.plain.ip4, "ambient"),
    ));
    // In replacement mode the pod's connects are refused until ztunnel
    // acknowledged it.
    let enrolled = eventually(Duration::from_secs(10), || {
        let before = s.accepted();
        let ok = s.plain.connect(&to6, 16).ok;
        (ok && s.accepted() > before).then_some(())
    });
    assert!(enrolled.is_some(), "plain was never redirected");
    daemon.crash();

    // While the daemon is down, `plain` is deleted and a new pod gets its
    // IPv4 address, enrolled.
    let reuser = s.node.add_pod("reuser");
    let reused = s.plain.ip4;
    ambridge_conformance::sandbox::ip(&[
        "-n",
        &s.plain.netns_name,
        "addr",
        "del",
        &format!("{reused}/24"),
        "dev",
        "eth0",
    ]);
    // The new pod has only the reused address, as a real pod would.
    ambridge_conformance::sandbox::ip(&[
        "-n",
        &reuser.netns_name,
        "addr",
        "del",
        &format!("{}/24", reuser.ip4),
        "dev",
        "eth0",
    ]);
    ambridge_conformance::sandbox::ip(&[
        "-n",
        &reuser.netns_name,
        "addr",
        "add",
        &format!("{reused}/24"),
        "dev",
        "eth0",
    ]);
    s.node.write_workloads_text(&format!(
        "workloads:\n{}{}{}{ztunnel}",
        yaml(&s.client, s.client.ip4, "ambient"),
        yaml(&s.server, s.server.ip4, "none"),
        yaml(&reuser, reused, "ambient"),
    ));
    let daemon = Daemon::start(&s.node);
    assert_eq!(
        daemon.map_entries()["cgroups"],
        4,
        "{:?}",
        daemon.map_entries()
    );

    // The deleted pod's entry is gone: its (IPv6) connects are no longer
    // redirected.
    let before = s.accepted();
    assert!(s.plain.connect(&to6, 16).ok);
    assert_eq!(s.accepted(), before, "the deleted pod is still redirected");
    // The new pod with the reused IP is redirected to its own 15001.
    let reuser_ztunnel = ztunnel_stand_in(&s.node, &s.ztunnel_cgroup, &[&reuser], 15001);
    let r = reuser.connect(&format!("{}:8080", s.server.ip4), 16);
    assert!(r.ok, "{r}");
    // In replacement mode the first stand-in also took the new pod in its
    // snapshot after the restart, so either may have accepted.
    let accepted = eventually(Duration::from_secs(5), || {
        [&reuser_ztunnel, &s.ztunnel].into_iter().find_map(|z| {
            z.all::<OutboundAccepted>()
                .into_iter()
                .find(|e| ip_of(e.peer) == std::net::IpAddr::from(reused))
        })
    })
    .expect("the new pod's connect reached a ztunnel");
    assert_eq!(
        ip_of(accepted.peer),
        std::net::IpAddr::from(reused),
        "{accepted}"
    );
    drop(daemon);
}

#[test]
fn a_new_daemon_with_another_map_layout_fills_its_maps_before_taking_over_and_no_connect_is_lost() {
    // An upgrade across a layout change. The running programs' cgroup map
    // is re-pinned under the name of an older layout; the new daemon then
    // cannot share it, creates its own, fills it from the node state,
    // attaches, and unpins the old one. The connection-tracking maps keep
    // their layout and stay shared, so connects in flight are answered.
    let (s, old) = setup();
    let pins = s.node.bpffs().join("maps");
    let current = pins.join("AMB_CGROUPS_V1");
    let older = pins.join("AMB_CGROUPS_V0");
    std::fs::rename(&current, &older).expect("re-pinning the cgroup map as an older layout");
    let mut new = Daemon::spawn(&s.node);
    s.across_a_connect_loop(|| {
        assert!(new.wait_log(WAITING, Duration::from_secs(10)).is_some());
        old.retire();
        new.wait_ready();
        assert!(
            new.wait_log(
                "unpinned the maps of an older layout",
                Duration::from_secs(10)
            )
            .is_some()
        );
    });
    assert!(current.exists());
    assert!(!older.exists());
    assert_eq!(new.map_entries()["cgroups"], 4, "{:?}", new.map_entries());
    drop(new);
}
