//! Sidecar-mode fallback, outbound (`--sidecar on`): a sidecar-injected pod
//! (`mode: sidecar` in the workloads file) has its outbound TCP connects
//! sent to its own proxy's 15001 in its own netns, as istio-iptables' nat
//! `OUTPUT` rules would `REDIRECT` them, and its Istio annotations
//! (`sidecar:` block, `traffic.sidecar.istio.io/<key>` by key) are honoured
//! in istio-iptables' order: `excludeOutboundPorts`; the proxy's own
//! sockets (uid or gid 1337, or, where the pod names it, its container's
//! cgroup, whatever the uid); loopback and the pod's own IPs;
//! `excludeOutboundIPRanges`; `includeOutboundPorts`;
//! `includeOutboundIPRanges` (default `*`). The proxy reads each captured
//! connection's original destination with `SO_ORIGINAL_DST` and sees the
//! pod's IP as its peer. With `--sidecar off` nothing is captured, and a
//! malformed annotation rejects the whole file.
//!
//! Each node: `near` (198.18.0.11, fd00:18::b), the sidecar pod `app`
//! (198.18.0.12, fd00:18::c) and `far` (198.18.0.13, fd00:18::d); `near`
//! and `far` run echo servers on 8080 and 9090. The proxy is the ztunnel
//! stand-in (it relays each connection to its `SO_ORIGINAL_DST`) run as
//! uid and gid 1337 in an `istio-proxy` container of the app pod,
//! listening on `[::]:15001` in the app pod's netns only. Where a connect
//! went is told by its client's own address: the proxy saw it as the peer
//! of a connection it accepted (captured), or the destination's echo server
//! did (direct).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use ambridge_conformance::{
    Background, Daemon, Node, Pod, assert_redirected, canon,
    event::{self, Accepted, Connect, OutboundAccepted, OutboundRelayed, ZtunnelListening},
    eventually, ip_of, workspace_bin, ztunnel_stand_in,
};

/// Istio's proxy identity (`--sidecar-proxy-uid` / `-gid` default).
const PROXY: &str = "1337:1337";
/// How long a connect has to show up at the proxy or at its destination,
/// and how long a connect left alone is watched for showing up at the
/// proxy all the same.
const SEEN_WITHIN: Duration = Duration::from_secs(5);
/// How long the daemon has to put the sidecar pod in the datapath.
const CAPTURE_WITHIN: Duration = Duration::from_secs(15);

const INCLUDE_RANGES: &str = "includeOutboundIPRanges";
const EXCLUDE_RANGES: &str = "excludeOutboundIPRanges";
const INCLUDE_PORTS: &str = "includeOutboundPorts";
const EXCLUDE_PORTS: &str = "excludeOutboundPorts";

/// A sandbox node with the sidecar pod and its destinations, before
/// anything runs on it.
struct Layout {
    near: Pod,
    app: Pod,
    far: Pod,
    /// The app pod's `istio-proxy` container cgroup.
    proxy_cgroup: PathBuf,
    node: Node,
}

fn layout() -> Layout {
    let mut node = Node::new();
    let near = node.add_pod("near");
    let app = node.add_pod("app");
    let far = node.add_pod("far");
    let proxy_cgroup = node.add_container(&app, "istio-proxy");
    Layout {
        near,
        app,
        far,
        proxy_cgroup,
        node,
    }
}

impl Layout {
    /// Writes the workloads file: `near` and `far` not enrolled, `app` a
    /// sidecar pod with the annotations `rules` (none: no `sidecar:`
    /// block), then `more` entries and `tail` (raw YAML).
    fn write(&self, rules: &[(&str, &str)], more: &[(&Pod, &str)], tail: &str) {
        self.node
            .write_workloads_text(&workloads(self, rules, more, tail));
    }

    /// Starts the daemon with `daemon_args` (ready), the echo servers
    /// (listening) and the proxy (listening, as 1337 in the pod).
    fn start(self, daemon_args: &[&str]) -> Sidecar {
        self.start_as(daemon_args, PROXY)
    }

    /// As [`Layout::start`], with the proxy running as `proxy_user`
    /// (`UID:GID`).
    fn start_as(self, daemon_args: &[&str], proxy_user: &str) -> Sidecar {
        let daemon = Daemon::start_with(&self.node, daemon_args);
        let mut echoes = Vec::new();
        for pod in [&self.near, &self.far] {
            for port in [8080, 9090] {
                echoes.push(Echo::start(pod, &[pod.ip4.into(), pod.ip6.into()], port));
            }
        }
        let mut cmd = Command::new(workspace_bin("ambridge-probe"));
        cmd.arg("--cgroup")
            .arg(&self.proxy_cgroup)
            .arg("--netns")
            .arg(&self.app.netns)
            .args(["--user", proxy_user, "ztunnel", "--pod-netns"])
            .arg(&self.app.netns)
            .args(["--no-inbound", "--no-dns"]);
        let proxy = Background::spawn(cmd);
        proxy.wait_first::<ZtunnelListening>(Duration::from_secs(10));
        assert_is_the_proxy(proxy.pid(), &self.proxy_cgroup, proxy_user);
        let Layout {
            near,
            app,
            far,
            node,
            ..
        } = self;
        Sidecar {
            proxy,
            echoes,
            daemon,
            sidecar_on: daemon_args.windows(2).any(|w| w == ["--sidecar", "on"]),
            near,
            app,
            far,
            node,
        }
    }
}

/// The workloads file's text for `t` (see [`Layout::write`]).
fn workloads(t: &Layout, rules: &[(&str, &str)], more: &[(&Pod, &str)], tail: &str) -> String {
    let mut pods = vec![(&t.near, "none"), (&t.app, "sidecar"), (&t.far, "none")];
    pods.extend_from_slice(more);
    let text = Node::workloads_yaml(&pods, tail);
    if rules.is_empty() {
        return text;
    }
    let mut block = String::from("    sidecar:\n");
    for (key, value) in rules {
        block += &format!("      {key}: \"{value}\"\n");
    }
    let marker = "    mode: sidecar\n";
    text.replacen(marker, &format!("{marker}{block}"), 1)
}

/// Asserts that process `pid` runs as the proxy does: as `user`
/// (`UID:GID`: real, effective, saved, filesystem) in `cgroup`.
fn assert_is_the_proxy(pid: u32, cgroup: &std::path::Path, user: &str) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the proxy's status");
    let (uid, gid) = user.split_once(':').expect("UID:GID");
    for (id, want) in [("Uid:", uid), ("Gid:", gid)] {
        let line = status.lines().find(|l| l.starts_with(id)).unwrap_or("");
        let ids: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(ids, [want; 4], "the proxy's {line}");
    }
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).expect("the proxy's cgroup");
    assert!(
        procs.lines().any(|p| p == pid.to_string()),
        "the proxy ({pid}) is not in {}: {procs}",
        cgroup.display()
    );
}

/// An echo server in a pod, on `[::]:port`, answering at `ips`.
struct Echo {
    ips: Vec<IpAddr>,
    port: u16,
    server: Background,
}

impl Echo {
    fn start(pod: &Pod, ips: &[IpAddr], port: u16) -> Self {
        Echo {
            ips: ips.to_vec(),
            port,
            server: pod.echo_server(&format!("[::]:{port}")),
        }
    }
}

/// What runs on a [`Layout`]. Field order is drop order: the probes, then
/// the daemon, then the node.
struct Sidecar {
    proxy: Background,
    echoes: Vec<Echo>,
    daemon: Daemon,
    /// The daemon runs with `--sidecar on`.
    sidecar_on: bool,
    near: Pod,
    app: Pod,
    far: Pod,
    node: Node,
}

/// Which way a connect from the app pod must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// To the proxy (counted `sidecar_redirected`).
    Captured,
    /// Straight to its destination, by the pod's rules: an excluded port
    /// or range, or no included one (counted `sidecar_passed`).
    Passed,
    /// Straight to its destination before the pod's rules are read: the
    /// proxy's own sockets, loopback, the pod's own IPs (counted neither).
    Exempt,
}

/// One connect from the app pod: where to, who makes it (`--user`, or
/// root), and which way it must go.
#[derive(Clone, Copy, Debug)]
struct Case {
    to: SocketAddr,
    user: Option<&'static str>,
    way: Way,
}

fn captured(to: SocketAddr) -> Case {
    Case {
        to,
        user: None,
        way: Way::Captured,
    }
}

fn passed(to: SocketAddr) -> Case {
    Case {
        to,
        user: None,
        way: Way::Passed,
    }
}

fn exempt(to: SocketAddr) -> Case {
    Case {
        to,
        user: None,
        way: Way::Exempt,
    }
}

fn exempt_as(user: &'static str, to: SocketAddr) -> Case {
    Case {
        to,
        user: Some(user),
        way: Way::Exempt,
    }
}

/// Where a connect was seen.
#[derive(Clone, Debug)]
enum Seen {
    /// The proxy accepted it; the destination then saw the proxy's leg.
    Proxy {
        accepted: OutboundAccepted,
        relayed: Accepted,
    },
    /// The destination accepted it from the client itself.
    Destination(Accepted),
}

/// A connect made, and where it was seen.
struct Made {
    case: Case,
    /// The client's own address.
    local: SocketAddr,
    seen: Seen,
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn v4(pod: &Pod, port: u16) -> SocketAddr {
    at(pod.ip4, port)
}

fn v6(pod: &Pod, port: u16) -> SocketAddr {
    at(pod.ip6, port)
}

impl Sidecar {
    /// The app pod's address in `to`'s family.
    fn app_ip_towards(&self, to: SocketAddr) -> IpAddr {
        match to {
            SocketAddr::V4(_) => self.app.ip4.into(),
            SocketAddr::V6(_) => self.app.ip6.into(),
        }
    }

    /// The echo server answering at `to`.
    fn echo(&self, to: SocketAddr) -> &Background {
        &self
            .echoes
            .iter()
            .find(|e| e.port == to.port() && e.ips.contains(&to.ip()))
            .unwrap_or_else(|| panic!("no echo server answers at {to}"))
            .server
    }

    /// Starts an echo server in the app pod itself, on `[::]:port`, for
    /// connects to loopback and to the pod's own IPs.
    fn echo_in_app(&mut self, port: u16) {
        let ips = [
            self.app.ip4.into(),
            self.app.ip6.into(),
            Ipv4Addr::LOCALHOST.into(),
            Ipv6Addr::LOCALHOST.into(),
        ];
        self.echoes.push(Echo::start(&self.app, &ips, port));
    }

    /// One connect from the app pod's app container to `to` (as `user`,
    /// or root), 1 KiB echoed.
    fn connect(&self, user: Option<&str>, to: SocketAddr) -> Connect {
        let to = to.to_string();
        let mut args = Vec::new();
        if let Some(user) = user {
            args.extend(["--user", user]);
        }
        args.extend(["connect", "--to", &to, "--bytes", "1024"]);
        let events = self.app.run(&args);
        event::first(&events).unwrap_or_else(|| panic!("no connect event: {events:?}"))
    }

    /// The proxy's accepted connection from `local`, among those from the
    /// `from`th on.
    fn proxy_saw(&self, local: SocketAddr, from: usize) -> Option<OutboundAccepted> {
        self.proxy
            .all::<OutboundAccepted>()
            .into_iter()
            .skip(from)
            .find(|a| canon(a.peer) == local)
    }

    /// Where the connect from `local` to `to` was seen, if it was yet:
    /// the proxy's accepted connections are searched from the
    /// `proxy_from`th on, the destination's from the `echo_from`th on.
    fn seen(
        &self,
        to: SocketAddr,
        local: SocketAddr,
        proxy_from: usize,
        echo_from: usize,
    ) -> Option<Seen> {
        let at_destination = self.echo(to).all::<Accepted>().split_off(echo_from);
        if let Some(accepted) = self.proxy_saw(local, proxy_from) {
            // The proxy's own leg, opened in the pod: from the pod's IP.
            let app_ip = self.app_ip_towards(to);
            let relayed = at_destination
                .into_iter()
                .find(|a| ip_of(a.peer) == app_ip)?;
            return Some(Seen::Proxy { accepted, relayed });
        }
        at_destination
            .into_iter()
            .find(|a| canon(a.peer) == local)
            .map(Seen::Destination)
    }

    /// Makes the connect of `case` and waits until the proxy or its
    /// destination saw it; `None` if the connect failed or neither saw it
    /// within [`SEEN_WITHIN`].
    fn connect_seen(&self, case: Case) -> (Connect, Option<Made>) {
        let proxy_from = self.proxy.all::<OutboundAccepted>().len();
        let echo_from = self.echo(case.to).all::<Accepted>().len();
        let r = self.connect(case.user, case.to);
        let Some(local) = r.local.filter(|_| r.ok).map(canon) else {
            return (r, None);
        };
        let seen = eventually(SEEN_WITHIN, || {
            self.seen(case.to, local, proxy_from, echo_from)
        });
        let made = seen.map(|seen| Made { case, local, seen });
        (r, made)
    }

    /// The value of counter `name` (`ambridge stats`).
    fn counter(&self, name: &str) -> u64 {
        let stats = self.daemon.stats();
        *stats
            .get(name)
            .unwrap_or_else(|| panic!("no {name} counter in `ambridge stats`: {stats:?}"))
    }

    /// What the daemon and the proxy show, for a failure message.
    fn state(&self) -> String {
        format!(
            "pods: {}; counters: {:?}; proxy: {:?}",
            self.daemon.api_json("pods"),
            self.daemon.stats(),
            self.proxy.events()
        )
    }

    /// Waits until a connect to `to` goes to the proxy (`captured`) or
    /// straight to `to`: the daemon has the state the test wrote.
    fn wait_until(&self, to: SocketAddr, captured: bool) {
        let reached = eventually(CAPTURE_WITHIN, || {
            let way = if captured { Way::Captured } else { Way::Passed };
            let case = Case {
                to,
                user: None,
                way,
            };
            let (_, made) = self.connect_seen(case);
            (matches!(made?.seen, Seen::Proxy { .. }) == captured).then_some(())
        });
        let way = if captured { "to the proxy" } else { "direct" };
        assert!(
            reached.is_some(),
            "connects to {to} never went {way}: {}",
            self.state()
        );
    }

    /// Makes each connect of `cases` in turn, each seen (by the proxy or
    /// by its destination) before the next, and asserts it went the way
    /// its case says and what the proxy and the destination saw of it;
    /// then watches the proxy for as long again, so that a connect seen at
    /// its destination is not seen at the proxy too and the proxy accepted
    /// nothing else (its own legs were not captured back to it); then
    /// asserts the counters. Returns the connects made.
    fn assert_ways(&self, cases: &[Case]) -> Vec<Made> {
        let redirected = self.counter("sidecar_redirected");
        let passed = self.counter("sidecar_passed");
        let proxy_start = self.proxy.all::<OutboundAccepted>().len();
        let mut made = Vec::new();
        for case in cases {
            let (r, one) = self.connect_seen(*case);
            assert!(r.ok && r.intact, "{case:?}: {r}");
            let one = one.unwrap_or_else(|| {
                panic!(
                    "{case:?}: neither the proxy nor the destination saw the connection ({r}): {}",
                    self.state()
                )
            });
            self.assert_seen(&one);
            made.push(one);
        }
        // Any other connection the proxy accepts is a connect that went
        // direct and to the proxy too, or a leg of the proxy's own that was
        // captured back to it.
        let to_proxy: Vec<SocketAddr> = made
            .iter()
            .filter(|m| matches!(m.seen, Seen::Proxy { .. }))
            .map(|m| m.local)
            .collect();
        let stray = eventually(SEEN_WITHIN, || {
            let stray: Vec<OutboundAccepted> = self
                .proxy
                .all::<OutboundAccepted>()
                .into_iter()
                .skip(proxy_start)
                .filter(|a| !to_proxy.contains(&canon(a.peer)))
                .collect();
            (!stray.is_empty()).then_some(stray)
        });
        if let Some(stray) = stray {
            panic!(
                "the proxy accepted connections no captured connect made: {stray:?}; connects made: {:?}; {}",
                made.iter().map(|m| (m.case, m.local)).collect::<Vec<_>>(),
                self.state()
            );
        }
        let count = |way: Way| cases.iter().filter(|c| c.way == way).count();
        let (want_redirected, want_passed) = if self.sidecar_on {
            (count(Way::Captured), count(Way::Passed))
        } else {
            (0, 0)
        };
        assert_eq!(
            (
                self.counter("sidecar_redirected") - redirected,
                self.counter("sidecar_passed") - passed
            ),
            (want_redirected as u64, want_passed as u64),
            "(sidecar_redirected, sidecar_passed) counted: {}",
            self.state()
        );
        made
    }

    /// Asserts that `m` went the way its case says, and what the proxy and
    /// the destination saw of it.
    fn assert_seen(&self, m: &Made) {
        let (case, app_ip) = (m.case, self.app_ip_towards(m.case.to));
        match &m.seen {
            Seen::Proxy { accepted, relayed } => {
                assert_eq!(
                    case.way,
                    Way::Captured,
                    "{case:?} went to the proxy: {accepted}"
                );
                // The pod's own 15001, from the pod's IP (the client's
                // address), with the original destination.
                assert_eq!(accepted.local.port(), 15001, "{accepted}");
                assert_eq!(ip_of(accepted.peer), app_ip, "{accepted}");
                assert_eq!(
                    accepted.orig_dst.map(canon),
                    Some(case.to),
                    "SO_ORIGINAL_DST: {accepted}"
                );
                assert_eq!(canon(relayed.local), case.to, "{relayed}");
            }
            Seen::Destination(accepted) => {
                assert_ne!(case.way, Way::Captured, "{case:?} went direct: {accepted}");
                // From the client itself: the pod's IP, or loopback.
                if !case.to.ip().is_loopback() {
                    assert_eq!(ip_of(accepted.peer), app_ip, "{accepted}");
                }
                assert_eq!(canon(accepted.local), case.to, "{accepted}");
            }
        }
    }
}

/// CIDRs holding `near`'s addresses and one other address each (a /31 and
/// a /127, not host routes), but neither the app pod's nor `far`'s.
fn near_ranges(t: &Layout) -> String {
    let v4 = Ipv4Addr::from(u32::from(t.near.ip4) & !1);
    let v6 = Ipv6Addr::from(u128::from(t.near.ip6) & !1);
    for pod in [&t.app, &t.far] {
        assert_ne!(u32::from(pod.ip4) & !1, u32::from(v4), "{pod:?}");
        assert_ne!(u128::from(pod.ip6) & !1, u128::from(v6), "{pod:?}");
    }
    format!("{v4}/31,{v6}/127")
}

/// A node whose sidecar pod has the annotations `rules(layout)`, run
/// with `--sidecar on`.
fn sidecar_on(rules: impl FnOnce(&Layout) -> Vec<(&'static str, String)>) -> Sidecar {
    let t = layout();
    let rules = rules(&t);
    let rules: Vec<(&str, &str)> = rules.iter().map(|(k, v)| (*k, v.as_str())).collect();
    t.write(&rules, &[], "");
    t.start(&["--sidecar", "on"])
}

/// Istio's defaults: no annotation.
fn defaults(_: &Layout) -> Vec<(&'static str, String)> {
    Vec::new()
}

#[test]
fn a_sidecar_pods_connects_reach_its_proxy_with_the_original_destination() {
    let t = sidecar_on(defaults);
    t.wait_until(v4(&t.far, 8080), true);
    let made = t.assert_ways(&[
        captured(v4(&t.far, 8080)),
        captured(v6(&t.far, 8080)),
        captured(v4(&t.near, 9090)),
        captured(v6(&t.near, 9090)),
    ]);
    // Every byte went through the proxy to the real destination and back.
    let relayed = eventually(SEEN_WITHIN, || {
        let relayed = t.proxy.all::<OutboundRelayed>();
        made.iter()
            .all(|m| {
                relayed.iter().any(|r| {
                    canon(r.orig_dst) == m.case.to && r.bytes_up == 1024 && r.bytes_down == 1024
                })
            })
            .then_some(())
    });
    assert!(relayed.is_some(), "{}", t.state());
}

#[test]
fn the_proxys_own_connects_as_uid_or_gid_1337_reach_the_real_destination() {
    let t = sidecar_on(defaults);
    t.wait_until(v4(&t.far, 8080), true);
    // The proxy's legs for the captured ones are its own connects too:
    // [`Sidecar::assert_ways`] checks the destination saw each leg and the
    // proxy accepted nothing more.
    let mut cases = vec![captured(v4(&t.far, 8080)), captured(v6(&t.far, 8080))];
    for user in [PROXY, "1337:0", "0:1337"] {
        cases.push(exempt_as(user, v4(&t.far, 8080)));
        cases.push(exempt_as(user, v6(&t.far, 8080)));
    }
    t.assert_ways(&cases);
}

#[test]
fn a_proxy_container_the_pod_names_is_the_proxy_whatever_its_uid_and_1337_elsewhere_is_captured() {
    let t = layout();
    let named = workloads(&t, &[], &[], "").replacen(
        "    mode: sidecar\n",
        "    mode: sidecar\n    proxy_container: istio-proxy\n",
        1,
    );
    t.node.write_workloads_text(&named);
    // As root: only its container's cgroup tells the proxy apart, and its
    // own legs must not be captured back to it.
    let t = t.start_as(&["--sidecar", "on"], "0:0");
    t.wait_until(v4(&t.far, 8080), true);
    let as_1337 = |to| Case {
        to,
        user: Some(PROXY),
        way: Way::Captured,
    };
    t.assert_ways(&[
        captured(v4(&t.far, 8080)),
        as_1337(v4(&t.far, 8080)),
        as_1337(v6(&t.near, 9090)),
    ]);
}

#[test]
fn include_outbound_ip_ranges_capture_only_the_destinations_they_name() {
    let t = sidecar_on(|l| vec![(INCLUDE_RANGES, near_ranges(l))]);
    t.wait_until(v4(&t.near, 8080), true);
    t.assert_ways(&[
        captured(v4(&t.near, 8080)),
        captured(v6(&t.near, 8080)),
        passed(v4(&t.far, 8080)),
        passed(v6(&t.far, 8080)),
    ]);
}

#[test]
fn an_included_ipv4_range_captures_no_ipv6_destination() {
    let t = sidecar_on(|_| vec![(INCLUDE_RANGES, "198.18.0.0/24".into())]);
    t.wait_until(v4(&t.far, 8080), true);
    t.assert_ways(&[captured(v4(&t.far, 8080)), passed(v6(&t.far, 8080))]);
}

#[test]
fn exclude_outbound_ip_ranges_leave_the_destinations_they_name_alone() {
    let t = sidecar_on(|l| vec![(EXCLUDE_RANGES, near_ranges(l))]);
    t.wait_until(v4(&t.far, 8080), true);
    t.assert_ways(&[
        passed(v4(&t.near, 8080)),
        passed(v6(&t.near, 8080)),
        captured(v4(&t.far, 8080)),
        captured(v6(&t.far, 8080)),
    ]);
}

#[test]
fn include_outbound_ports_capture_their_port_with_no_ip_range_included() {
    let t = sidecar_on(|_| {
        vec![
            (INCLUDE_RANGES, String::new()),
            (INCLUDE_PORTS, "9090".into()),
        ]
    });
    t.wait_until(v4(&t.far, 9090), true);
    t.assert_ways(&[
        captured(v4(&t.far, 9090)),
        captured(v6(&t.far, 9090)),
        captured(v4(&t.near, 9090)),
        passed(v4(&t.far, 8080)),
        passed(v6(&t.far, 8080)),
    ]);
}

/// istio-iptables returns for `excludeOutboundIPRanges` before it
/// redirects `includeOutboundPorts` (`ISTIO_OUTPUT`: `-d <excluded> -j
/// RETURN`, then `-p tcp --dport <included> -j ISTIO_REDIRECT`; istio/istio
/// `tools/istio-iptables/pkg/capture/run.go`).
#[test]
fn an_excluded_range_is_left_alone_even_on_an_included_port() {
    let t = sidecar_on(|l| {
        vec![
            (INCLUDE_RANGES, String::new()),
            (INCLUDE_PORTS, "9090".into()),
            (EXCLUDE_RANGES, near_ranges(l)),
        ]
    });
    t.wait_until(v4(&t.far, 9090), true);
    t.assert_ways(&[
        captured(v4(&t.far, 9090)),
        captured(v6(&t.far, 9090)),
        passed(v4(&t.near, 9090)),
        passed(v6(&t.near, 9090)),
    ]);
}

#[test]
fn exclude_outbound_ports_leave_their_port_alone() {
    let t = sidecar_on(|_| vec![(EXCLUDE_PORTS, "9090".into())]);
    t.wait_until(v4(&t.far, 8080), true);
    t.assert_ways(&[
        captured(v4(&t.far, 8080)),
        captured(v6(&t.far, 8080)),
        passed(v4(&t.far, 9090)),
        passed(v6(&t.far, 9090)),
        passed(v4(&t.near, 9090)),
    ]);
}

#[test]
fn loopback_and_the_pods_own_ips_are_left_alone_even_on_an_included_port() {
    let mut t = sidecar_on(|_| vec![(INCLUDE_PORTS, "9090".into())]);
    t.echo_in_app(9090);
    t.wait_until(v4(&t.far, 9090), true);
    let app = t.app.clone();
    t.assert_ways(&[
        captured(v4(&t.far, 9090)),
        exempt(at(Ipv4Addr::LOCALHOST, 9090)),
        exempt(at(Ipv6Addr::LOCALHOST, 9090)),
        exempt(v4(&app, 9090)),
        exempt(v6(&app, 9090)),
    ]);
}

#[test]
fn with_sidecar_off_a_sidecar_pod_is_captured_by_nothing() {
    let mut l = layout();
    // An ambient pod beside it, whose capture shows the datapath attached
    // and the file in force.
    let mesh = l.node.add_pod("mesh");
    let ztunnel_cgroup = l.node.add_cgroup("ztunnel");
    let tail = format!("ztunnel:\n  cgroup: {}\n", ztunnel_cgroup.display());
    l.write(&[], &[(&mesh, "ambient")], &tail);
    let t = l.start(&["--sidecar", "off"]);
    let ztunnel = ztunnel_stand_in(&t.node, &ztunnel_cgroup, &[&mesh], 15001);
    t.daemon.wait_for_mode(&mesh.uid, Some("ambient"));
    assert_redirected(&ztunnel, &mesh, &v4(&t.far, 8080).to_string(), true);
    // Counted neither way ([`Sidecar::assert_ways`] with `--sidecar off`).
    t.assert_ways(&[
        passed(v4(&t.far, 8080)),
        passed(v6(&t.far, 8080)),
        passed(v4(&t.near, 9090)),
        passed(v6(&t.near, 9090)),
    ]);
    assert_eq!(t.counter("sidecar_redirected"), 0, "{}", t.state());
    // Nor did ztunnel take any of them: only the ambient pod's connect.
    assert_eq!(
        ztunnel.all::<OutboundAccepted>().len(),
        1,
        "{:?}",
        ztunnel.events()
    );
}

#[test]
fn a_malformed_annotation_rejects_the_whole_file_and_the_last_good_state_stays() {
    let l = layout();
    // What the bad files would change were they taken even in part: the
    // IPv6 destinations (only an IPv4 range included), port 8080
    // (excluded).
    let bad = [
        (
            workloads(
                &l,
                &[
                    (INCLUDE_RANGES, "198.18.0.0/24,10.0.0.0/33"),
                    (EXCLUDE_PORTS, "8080"),
                ],
                &[],
                "",
            ),
            INCLUDE_RANGES,
            "10.0.0.0/33",
        ),
        (
            workloads(&l, &[(EXCLUDE_PORTS, "8080,70000")], &[], ""),
            EXCLUDE_PORTS,
            "70000",
        ),
    ];
    let good = workloads(&l, &[(EXCLUDE_PORTS, "8080")], &[], "");
    l.write(&[], &[], "");
    let t = l.start(&["--sidecar", "on"]);
    t.wait_until(v4(&t.far, 8080), true);
    for (text, key, value) in &bad {
        let lines = t.daemon.log().len();
        t.node.write_workloads_text(text);
        let err = t
            .daemon
            .wait_log_after(lines, "workloads file rejected", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the daemon did not reject the file with {key}: {value:?}"));
        // Placed on its line, named by its path, with the value.
        let line = 1 + text
            .lines()
            .position(|l| l.trim_start().starts_with(&format!("{key}:")))
            .expect("the key is in the file");
        for part in [
            format!("line {line},"),
            format!("workloads[1].sidecar.{key}"),
            value.to_string(),
        ] {
            assert!(err.contains(&part), "{part:?} not in {err}");
        }
        t.assert_ways(&[captured(v4(&t.far, 8080)), captured(v6(&t.far, 8080))]);
    }
    // The same change in a good file is taken.
    t.node.write_workloads_text(&good);
    t.wait_until(v4(&t.far, 8080), false);
    t.assert_ways(&[
        passed(v4(&t.far, 8080)),
        passed(v6(&t.far, 8080)),
        captured(v6(&t.far, 9090)),
    ]);
}
