//! Issue 6, replacement mode (`--zds serve`): ambridge is the ZDS server
//! and the only capture, with no iptables rule anywhere. The ztunnel
//! stand-in connects over ZDS, receives the enrolled pods' netns and opens
//! its listeners there; a pod's connects are redirected only once ztunnel
//! acknowledged it, and refused (never let past ztunnel) before that.

use std::{path::PathBuf, time::Duration};

use ambridge_conformance::{
    Background, Daemon, Fixture, Pod, ProbeEvent,
    event::{
        Connect, OutboundAccepted, ZdsAdd, ZdsDel, ZdsNack, ZdsPeerClosed, ZdsPeerReceived,
        ZdsReconnected, ZdsSnapshotSent,
    },
    eventually, zds_peer, zds_socket, ztunnel_stand_in_zds,
};

const WAIT: Duration = Duration::from_secs(15);

/// What these tests do on a [`Fixture`] whose daemon serves ZDS.
trait Replacement {
    fn socket(&self) -> PathBuf;
    fn stand_in(&self, args: &[&str]) -> Background;
    fn to(&self) -> String;
    fn enroll(&self, plain: &str);
}

impl Replacement for Fixture {
    fn socket(&self) -> PathBuf {
        zds_socket(&self.node)
    }

    fn stand_in(&self, args: &[&str]) -> Background {
        let mut all = vec!["--port", "15001"];
        all.extend_from_slice(args);
        ztunnel_stand_in_zds(&self.node, &self.ztunnel_cgroup, &self.socket(), &all)
    }

    fn to(&self) -> String {
        format!("{}:8080", self.server.ip4)
    }

    /// Writes the workloads file: the client and `plain` as given, the
    /// server out of the mesh.
    fn enroll(&self, plain: &str) {
        self.node.write_workloads(
            &[
                (&self.client, "ambient"),
                (&self.server, "none"),
                (&self.plain, plain),
            ],
            Some(&self.ztunnel_cgroup),
        );
    }
}

/// The three pods, the daemon serving ZDS and the server's echo server on
/// 8080; each test starts its own stand-ins.
fn setup() -> Fixture {
    Fixture::three_pods().zds_serve().app().start()
}

fn accepted(ztunnel: &Background, pod: &Pod) -> usize {
    ztunnel
        .all::<OutboundAccepted>()
        .iter()
        .filter(|e| e.pod == pod.uid)
        .count()
}

/// How many ZDS Adds of `pod` the stand-in applied.
fn adds(ztunnel: &Background, pod: &Pod) -> usize {
    ztunnel
        .all::<ZdsAdd>()
        .iter()
        .filter(|e| e.uid == pod.uid)
        .count()
}

/// How many ZDS Adds of `pod` the stand-in refused.
fn nacks(ztunnel: &Background, pod: &Pod) -> usize {
    ztunnel
        .all::<ZdsNack>()
        .iter()
        .filter(|e| e.uid == pod.uid)
        .count()
}

/// Waits until `pod`'s connect to `to` lands on `ztunnel` (the pod was
/// acknowledged and its hold lifted).
fn wait_redirected(ztunnel: &Background, pod: &Pod, to: &str) -> Connect {
    let landed = eventually(WAIT, || {
        let before = accepted(ztunnel, pod);
        let r = pod.connect(to, 16);
        (r.ok && accepted(ztunnel, pod) > before).then_some(r)
    });
    landed.unwrap_or_else(|| panic!("{} was never redirected: {:?}", pod.name, ztunnel.events()))
}

/// Asserts `pod`'s connect is refused by the hold (EPERM), not let through.
fn assert_held(pod: &Pod, to: &str) {
    let r = pod.connect(to, 16);
    assert!(!r.ok, "{r}");
    let error = r.error.as_deref().unwrap_or_default();
    assert!(error.contains("Operation not permitted"), "{r}");
}

fn index_of(events: &[ProbeEvent], pred: impl Fn(&ProbeEvent) -> bool) -> usize {
    events
        .iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no such event in {events:?}"))
}

#[test]
fn ztunnel_gets_each_enrolled_pods_netns_over_zds_and_their_traffic_flows_through_it() {
    let s = setup();
    s.enroll("ambient");
    // No ztunnel yet: enrolled pods are held, never let past ztunnel.
    eventually(WAIT, || {
        (s.daemon.api_json("pods").as_array()?.len() == 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_held(&s.client, &s.to());
    assert!(
        s.daemon.stats()["connect_held"] >= 1,
        "{:?}",
        s.daemon.stats()
    );

    let ztunnel = s.stand_in(&[]);
    ztunnel.wait_first::<ZdsSnapshotSent>(WAIT);
    assert_eq!(adds(&ztunnel, &s.client), 1);
    assert_eq!(adds(&ztunnel, &s.plain), 1);
    let added = ztunnel
        .all::<ZdsAdd>()
        .into_iter()
        .find(|e| e.uid == s.client.uid)
        .unwrap_or_else(|| panic!("no such event in {:?}", ztunnel.events()));
    assert_eq!(
        (
            added.name.as_str(),
            added.namespace.as_str(),
            added.service_account.as_str()
        ),
        ("client", "default", "default"),
        "{added}"
    );
    assert_eq!(adds(&ztunnel, &s.server), 0);
    let landed = wait_redirected(&ztunnel, &s.client, &s.to());
    assert!(landed.ok);
    let to6 = format!("[{}]:8080", s.server.ip6);
    wait_redirected(&ztunnel, &s.plain, &to6);
    let accepted_event = ztunnel
        .all::<OutboundAccepted>()
        .into_iter()
        .rev()
        .find(|e| e.pod == s.plain.uid)
        .unwrap();
    ambridge_conformance::assert_landed(
        &accepted_event,
        s.plain.ip6.into(),
        s.plain.ip6.into(),
        to6.parse().unwrap(),
    );
    // Not a single iptables rule was needed.
    for pod in [&s.client, &s.server, &s.plain] {
        let rules = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns_name, "iptables-save"])
            .output()
            .expect("iptables-save");
        let text = String::from_utf8_lossy(&rules.stdout);
        assert!(
            !text.lines().any(|l| l.starts_with("-A")),
            "iptables rules in {}: {text}",
            pod.name
        );
    }
}

#[test]
fn a_pod_added_and_removed_while_running_gets_add_then_del_in_order() {
    let s = setup();
    let ztunnel = s.stand_in(&[]);
    wait_redirected(&ztunnel, &s.client, &s.to());
    assert_eq!(adds(&ztunnel, &s.plain), 0);

    s.enroll("ambient");
    ztunnel.wait_for(|e: &ZdsAdd| e.uid == s.plain.uid, WAIT);
    wait_redirected(&ztunnel, &s.plain, &s.to());

    s.enroll("none");
    ztunnel.wait_for(|e: &ZdsDel| e.uid == s.plain.uid, WAIT);
    let events = ztunnel.events();
    let added = index_of(
        &events,
        |e| matches!(e, ProbeEvent::ZdsAdd(a) if a.uid == s.plain.uid),
    );
    let deleted = index_of(
        &events,
        |e| matches!(e, ProbeEvent::ZdsDel(d) if d.uid == s.plain.uid),
    );
    assert!(added < deleted);
    // Out of the mesh: its connects go straight to the server again.
    let before = accepted(&ztunnel, &s.plain);
    assert!(s.plain.connect(&s.to(), 16).ok);
    assert_eq!(accepted(&ztunnel, &s.plain), before);
    assert!(
        s.daemon
            .wait_log("ztunnel acknowledged DelWorkload", WAIT)
            .is_some()
    );
}

#[test]
fn a_second_ztunnel_gets_the_new_adds_while_the_first_keeps_serving_its_pods() {
    let s = setup();
    let first = s.stand_in(&[]);
    wait_redirected(&first, &s.client, &s.to());

    // The upgrade: a second ztunnel connects and is handed the snapshot.
    let second = s.stand_in(&[]);
    second.wait_first::<ZdsSnapshotSent>(WAIT);
    assert_eq!(adds(&second, &s.client), 1);

    // A pod enrolled now goes to the newest ztunnel only.
    s.enroll("ambient");
    second.wait_for(|e: &ZdsAdd| e.uid == s.plain.uid, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(adds(&first, &s.plain), 0);
    wait_redirected(&second, &s.plain, &s.to());

    // The new ztunnel goes away: the first still serves the pods it has.
    drop(second);
    wait_redirected(&first, &s.client, &s.to());
}

#[test]
fn a_pod_whose_add_was_nacked_is_refused_not_bypassed_until_a_retry_succeeds() {
    let s = setup();
    let ztunnel = s.stand_in(&["--zds-nack", &s.client.uid, "--zds-nack-count", "3"]);
    ztunnel.wait_for(|e: &ZdsNack| e.uid == s.client.uid, WAIT);
    assert!(
        s.daemon
            .wait_log("ztunnel refused AddWorkload", WAIT)
            .is_some_and(|l| l.contains(&s.client.uid))
    );
    // Refused while ztunnel does not have it, never sent past ztunnel.
    if adds(&ztunnel, &s.client) == 0 {
        assert_held(&s.client, &s.to());
    }
    wait_redirected(&ztunnel, &s.client, &s.to());
    assert_eq!(nacks(&ztunnel, &s.client), 3);
    assert_eq!(adds(&ztunnel, &s.client), 1);
}

#[test]
fn malformed_and_oversized_datagrams_close_that_connection_and_the_daemon_keeps_serving() {
    // Misbehaving peers in ztunnel's cgroup: past the peer check, judged on
    // what they send.
    let s = setup();
    let peer = |steps: &[&str]| zds_peer(&s.ztunnel_cgroup, &s.socket(), steps);
    let garbage = peer(&["send:ffffff"]);
    assert!(
        s.daemon
            .wait_log("closing the ZDS connection: malformed ZDS ZdsHello", WAIT)
            .is_some()
    );
    garbage.wait_first::<ZdsPeerClosed>(WAIT);
    let huge = peer(&["send:08x4096"]);
    assert!(
        s.daemon
            .wait_log("larger than the 1024-byte limit", WAIT)
            .is_some()
    );
    huge.wait_first::<ZdsPeerClosed>(WAIT);
    // A valid hello, the daemon's first request, then nonsense where an
    // ack belongs.
    let liar = peer(&["hello", "recv", "send:0a050a"]);
    assert!(
        s.daemon
            .wait_log(
                "closing the ZDS connection: malformed ZDS WorkloadResponse",
                WAIT
            )
            .is_some()
    );
    liar.wait_first::<ZdsPeerClosed>(WAIT);
    // The daemon still serves a well-behaved ztunnel.
    let ztunnel = s.stand_in(&[]);
    wait_redirected(&ztunnel, &s.client, &s.to());
    assert_eq!(s.daemon.api_json("status")["state_loaded"], true);
}

#[test]
fn a_zds_peer_outside_every_ztunnel_cgroup_is_refused_unread_and_new_pods_still_go_to_ztunnel() {
    let mut s = setup();
    let ztunnel = s.stand_in(&[]);
    wait_redirected(&ztunnel, &s.client, &s.to());
    // Root, saying hello as ztunnel does and waiting for its pods, but from
    // a cgroup that is not ztunnel's.
    let rogue_cgroup = s.node.add_cgroup("rogue");
    let rogue = zds_peer(&rogue_cgroup, &s.socket(), &["hello"]);
    rogue.wait_first::<ZdsPeerClosed>(WAIT);
    let refused = s
        .daemon
        .wait_log("refused a ZDS peer", WAIT)
        .expect("the refusal is logged");
    let cgroup = rogue_cgroup
        .strip_prefix(s.node.cgroup.parent().unwrap())
        .unwrap();
    assert!(
        refused.contains(&format!("pid {}", rogue.pid()))
            && refused.contains(&format!("cgroup /{}", cgroup.display())),
        "{refused}"
    );
    let zds = &s.daemon.api_json("status")["zds"];
    assert!(zds["peers_refused"].as_u64() >= Some(1), "{zds}");
    assert_eq!(zds["connections"], 1, "{zds}");
    // A pod enrolled now goes to the real ztunnel: the rogue never became
    // the newest connection, and was handed nothing at all.
    s.enroll("ambient");
    ztunnel.wait_for(|e: &ZdsAdd| e.uid == s.plain.uid, WAIT);
    wait_redirected(&ztunnel, &s.plain, &s.to());
    let handed = rogue.all::<ZdsPeerReceived>();
    assert!(handed.is_empty(), "the rogue was handed {handed:?}");
}

#[test]
fn a_daemon_restart_in_replacement_mode_refuses_or_bypasses_no_connect() {
    // ztunnel keeps serving while ambridge restarts, then reconnects and
    // takes a new snapshot; pods it had stay unheld meanwhile.
    let mut s = setup();
    let ztunnel = s.stand_in(&[]);
    wait_redirected(&ztunnel, &s.client, &s.to());
    let before = accepted(&ztunnel, &s.client);
    let looped = s.client.connect_until_stopped(&s.to(), &s.node.dir);
    let socket = s.socket().display().to_string();
    looped.assert_through_across(
        || accepted(&ztunnel, &s.client) - before,
        || {
            s.daemon.crash();
            s.daemon = Daemon::start_with(&s.node, &["--zds", "serve", "--zds-socket", &socket]);
            ztunnel.wait_first::<ZdsReconnected>(WAIT);
        },
    );
    assert!(
        s.daemon
            .wait_log("stay unheld until its next snapshot", WAIT)
            .is_some()
    );
    // The new snapshot kept the client: still redirected, nothing held.
    ztunnel.wait_for(|e: &ZdsSnapshotSent| e.dropped.is_empty(), WAIT);
    wait_redirected(&ztunnel, &s.client, &s.to());
}

#[test]
fn a_recreated_sandbox_is_handed_to_ztunnel_again_with_its_new_netns() {
    let mut s = setup();
    let ztunnel = s.stand_in(&[]);
    wait_redirected(&ztunnel, &s.client, &s.to());
    let client = s.client.clone();
    s.node.recreate_sandbox(&client);
    // Noticed from the pod cgroup's processes: a new Add, new listeners.
    ztunnel.wait_for(|e: &ZdsAdd| e.uid == client.uid && e.replaced, WAIT);
    wait_redirected(&ztunnel, &client, &s.to());
}

#[test]
fn a_ztunnel_reconnecting_over_zds_keeps_its_pods_redirected_meanwhile() {
    // ztunnel keeps serving its pods while its ZDS connection is down; the
    // daemon must not hold them in the gap.
    let s = setup();
    // Its third answer (after the snapshot's Add and SnapshotSent) drops
    // the connection; it connects again 300 ms later.
    let ztunnel = s.stand_in(&["--zds-drop-after", "3"]);
    wait_redirected(&ztunnel, &s.client, &s.to());
    let before = accepted(&ztunnel, &s.client);
    let looped = s.client.connect_until_stopped(&s.to(), &s.node.dir);
    looped.assert_through_across(
        || accepted(&ztunnel, &s.client) - before,
        || {
            // A new pod: its Add is the third answer.
            s.enroll("ambient");
            ztunnel.wait_first::<ZdsReconnected>(WAIT);
        },
    );
}
