//! Sidecar-mode fallback, inbound and DNS (`--sidecar on`): TCP arriving
//! at a sidecar pod (`mode: sidecar`) goes, by the `sk_lookup` program in
//! its netns, to its own proxy's 15006 listener there with the original
//! `ip:port` as the accepted socket's local address, as istio-iptables'
//! `PREROUTING` rules send it; Istio's own ports (15008, 15020, 15021,
//! 15090), `excludeInboundPorts`, ports `includeInboundPorts` does not
//! list, and loopback sources (the proxy's passthrough to the application
//! from 127.0.0.6) reach the application directly; with no proxy listener
//! registered, a captured connection is refused. The pod's DNS goes to
//! istio-agent's proxy on 127.0.0.1/::1:15053 when DNS capture is on for
//! it, and the proxy's own queries (uid 1337) go out. A pod switched
//! between sidecar and ambient in the workloads file moves between the two
//! captures, and with istio-iptables' rules in the pod as well, both agree.
//!
//! Each node: `client` (198.18.0.11, fd00:18::b, not enrolled), the
//! sidecar pod `app` (198.18.0.12, fd00:18::c) with its application (echo
//! servers) in its `app` container, and `far` (198.18.0.13, fd00:18::d,
//! not enrolled: an outbound destination, and the DNS server). The proxy
//! is the ztunnel stand-in run as uid and gid 1337 in an `istio-proxy`
//! container of the app pod, listening in the app pod's netns only
//! (`--in-place`: its sockets are made and bound as 1337, as the daemon
//! requires of the 15006 listener it registers) on `[::]:15001`,
//! `[::]:15006` and, where a test wants DNS, istio-agent's 15053. Where a
//! test looks at where inbound connections land, the proxy answers them
//! itself (`--inbound-echo`); otherwise its inbound leg connects to the
//! application from Envoy's passthrough sources, 127.0.0.6 and `::6` (which
//! istio-init puts on the pod's `lo`: the layout does the same), as Envoy
//! does. Where a connection went is told by its client's own address: the
//! proxy saw it as the peer of a connection it accepted (captured), or the
//! application's echo server did (direct).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ambridge_conformance::{
    Background, Daemon, Node, Pod, canon,
    event::{
        self, Accepted, Connect, ConnectSummary, Dns as DnsAnswer, DnsQuery, DnsTransport,
        InboundAccepted, InboundConnected, InboundRelayed, Listening, OutboundAccepted, RelayError,
        ZtunnelListening,
    },
    eventually, ip_of,
    probe::run_in,
    replacement_mode,
    sandbox::iptables,
    stand_in_id, workspace_bin, ztunnel_stand_in_with,
};

/// Istio's proxy identity (`--sidecar-proxy-uid` / `-gid` default).
const PROXY: &str = "1337:1337";
/// How long a connection or query has to show up where it went, and how
/// long one that must not show up somewhere is watched for all the same.
const SEEN_WITHIN: Duration = Duration::from_secs(5);
/// How long the daemon has to put a pod's new state in the datapath.
const STATE_WITHIN: Duration = Duration::from_secs(15);
/// The application's port.
const APP_PORT: u16 = 8080;
/// Another port of the application.
const OTHER_PORT: u16 = 9090;
/// Istio's own ports in a sidecar pod: HBONE, the agent's status and
/// merged metrics, readiness, Envoy's metrics.
const ISTIO_PORTS: [u16; 4] = [15008, 15020, 15021, 15090];
/// Where Envoy's inbound passthrough connects to the application from.
const PASSTHROUGH4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const PASSTHROUGH6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

const INCLUDE_INBOUND_PORTS: &str = "includeInboundPorts";
const EXCLUDE_INBOUND_PORTS: &str = "excludeInboundPorts";

/// A sandbox node with the sidecar pod, its client and `far`, before
/// anything runs on it.
struct Layout {
    client: Pod,
    app: Pod,
    far: Pod,
    /// The app pod's `istio-proxy` container cgroup.
    proxy_cgroup: PathBuf,
    /// The ztunnel's cgroup (named in the workloads file).
    ztunnel_cgroup: PathBuf,
    node: Node,
}

fn layout() -> Layout {
    let mut node = Node::new();
    let client = node.add_pod("client");
    let app = node.add_pod("app");
    let far = node.add_pod("far");
    let proxy_cgroup = node.add_container(&app, "istio-proxy");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    // No `::6` on the app pod's loopback: istio-init adds it, and the
    // daemon does in its place.
    Layout {
        client,
        app,
        far,
        proxy_cgroup,
        ztunnel_cgroup,
        node,
    }
}

/// The `sidecar:` block of a pod's entry with the annotations `rules`
/// (`traffic.sidecar.istio.io/<key>` by key).
fn sidecar_block(rules: &[(&str, &str)]) -> String {
    let mut block = String::from("    sidecar:\n");
    for (key, value) in rules {
        block += &format!("      {key}: \"{value}\"\n");
    }
    block
}

/// The workloads file's text: `client` and `far` not enrolled, `app` in
/// `mode` with its entry's further lines `extra` (raw YAML: a
/// [`sidecar_block`], `dns_capture`), then `more` entries, and the
/// ztunnel's cgroup.
fn workloads(
    [client, app, far]: [&Pod; 3],
    ztunnel: &Path,
    mode: &str,
    extra: &str,
    more: &[(&Pod, &str)],
) -> String {
    let mut pods = vec![(client, "none"), (app, mode), (far, "none")];
    pods.extend_from_slice(more);
    let tail = format!("ztunnel:\n  cgroup: {}\n", ztunnel.display());
    let text = Node::workloads_yaml(&pods, &tail);
    let entry = format!(
        "    ips: [{}, \"{}\"]\n    mode: {mode}\n",
        app.ip4, app.ip6
    );
    assert_eq!(text.matches(&entry).count(), 1, "{text}");
    text.replacen(&entry, &format!("{entry}{extra}"), 1)
}

impl Layout {
    /// The workloads file's text ([`workloads`]).
    fn workloads(&self, mode: &str, extra: &str, more: &[(&Pod, &str)]) -> String {
        let pods = [&self.client, &self.app, &self.far];
        workloads(pods, &self.ztunnel_cgroup, mode, extra, more)
    }

    /// Writes the workloads file ([`workloads`]).
    fn write(&self, mode: &str, extra: &str) {
        self.node
            .write_workloads_text(&self.workloads(mode, extra, &[]));
    }

    /// Starts the daemon with `daemon_args` (ready) and the application
    /// (an echo server on `[::]:port` for each of `app_ports`, listening);
    /// with `--sidecar on`, waits until the daemon has the app pod in the
    /// datapath as a sidecar pod with its inbound capture in place. No
    /// proxy yet.
    fn start(self, daemon_args: &[&str], app_ports: &[u16]) -> Sidecar {
        let daemon = Daemon::start_with(&self.node, daemon_args);
        self.serve(daemon, daemon_args, app_ports)
    }

    /// As [`Layout::start`], the daemon root with only the capabilities
    /// `caps` (as a DaemonSet lists them).
    fn start_limited(self, caps: &[String], daemon_args: &[&str], app_ports: &[u16]) -> Sidecar {
        let daemon = Daemon::start_limited(&self.node, daemon_args, caps);
        self.serve(daemon, daemon_args, app_ports)
    }

    /// The rest of [`Layout::start`], around `daemon`, started with
    /// `daemon_args`.
    fn serve(self, daemon: Daemon, daemon_args: &[&str], app_ports: &[u16]) -> Sidecar {
        let servers = app_ports
            .iter()
            .map(|port| (*port, self.app.echo_server(&format!("[::]:{port}"))))
            .collect();
        let Layout {
            client,
            app,
            far,
            proxy_cgroup,
            ztunnel_cgroup,
            node,
        } = self;
        let t = Sidecar {
            proxy: None,
            others: Vec::new(),
            servers,
            daemon,
            client,
            app,
            far,
            proxy_cgroup,
            ztunnel_cgroup,
            node,
        };
        if daemon_args.windows(2).any(|w| w == ["--sidecar", "on"]) {
            t.wait_sidecar();
        }
        t
    }
}

/// What runs on a [`Layout`]. Field order is drop order: the probes, then
/// the daemon, then the node.
struct Sidecar {
    proxy: Option<Background>,
    /// Other probes kept running for the test (a ztunnel, a DNS server,
    /// echo servers elsewhere).
    others: Vec<Background>,
    /// The application's echo servers in the app pod, by port.
    servers: Vec<(u16, Background)>,
    daemon: Daemon,
    client: Pod,
    app: Pod,
    far: Pod,
    proxy_cgroup: PathBuf,
    ztunnel_cgroup: PathBuf,
    node: Node,
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `pod`'s addresses on `port`, IPv4 then IPv6.
fn both(pod: &Pod, port: u16) -> [SocketAddr; 2] {
    [at(pod.ip4, port), at(pod.ip6, port)]
}

/// `pod`'s address in `to`'s family.
fn ip_towards(pod: &Pod, to: SocketAddr) -> IpAddr {
    match to {
        SocketAddr::V4(_) => pod.ip4.into(),
        SocketAddr::V6(_) => pod.ip6.into(),
    }
}

/// Envoy's passthrough source in `to`'s family.
fn passthrough_towards(to: SocketAddr) -> IpAddr {
    match to {
        SocketAddr::V4(_) => PASSTHROUGH4.into(),
        SocketAddr::V6(_) => PASSTHROUGH6.into(),
    }
}

/// The ztunnel stand-in as a proxy in the app pod's netns, in `cgroup`:
/// `--in-place` (as `user`, if any, from the start), its inbound leg from
/// Envoy's passthrough sources, with `args` of its own.
fn proxy_command(cgroup: &Path, app: &Pod, user: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_bin("ambridge-probe"));
    cmd.arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(&app.netns);
    if let Some(user) = user {
        cmd.args(["--user", user]);
    }
    cmd.args([
        "ztunnel",
        "--in-place",
        "--inbound-source",
        &PASSTHROUGH4.to_string(),
        "--inbound-source",
        &PASSTHROUGH6.to_string(),
    ])
    .args(args);
    cmd
}

/// Asserts that process `pid` runs as the proxy does: uid and gid 1337
/// (real, effective, saved, filesystem) in `cgroup`.
fn assert_runs_as_the_proxy(pid: u32, cgroup: &Path) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the proxy's status");
    for id in ["Uid:", "Gid:"] {
        let line = status.lines().find(|l| l.starts_with(id)).unwrap_or("");
        let ids: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(ids, ["1337"; 4], "the proxy's {line}");
    }
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).expect("the proxy's cgroup");
    assert!(
        procs.lines().any(|p| p == pid.to_string()),
        "the proxy ({pid}) is not in {}: {procs}",
        cgroup.display()
    );
}

/// Where an inbound connection went.
#[derive(Debug)]
enum Went {
    /// The proxy accepted it.
    Proxy(InboundAccepted),
    /// The application accepted it from the client itself.
    Direct(Accepted),
}

impl Sidecar {
    /// Writes the workloads file ([`workloads`]).
    fn write(&self, mode: &str, extra: &str) {
        let pods = [&self.client, &self.app, &self.far];
        let text = workloads(pods, &self.ztunnel_cgroup, mode, extra, &[]);
        self.node.write_workloads_text(&text);
    }

    /// The value of counter `name` (`ambridge stats`).
    fn counter(&self, name: &str) -> u64 {
        let stats = self.daemon.stats();
        *stats
            .get(name)
            .unwrap_or_else(|| panic!("no {name} counter in `ambridge stats`: {stats:?}"))
    }

    /// A field of `pod` as `ambridge pods --json` shows it.
    fn pod_field(&self, pod: &Pod, field: &str) -> serde_json::Value {
        let pods = self.daemon.api_json("pods");
        let found = pods
            .as_array()
            .and_then(|all| all.iter().find(|p| p["uid"] == pod.uid.as_str()))
            .unwrap_or_else(|| panic!("{} not listed: {pods}", pod.uid));
        found[field].clone()
    }

    /// Waits until `ambridge pods` shows `field` of the app pod as `value`.
    fn wait_app_field(&self, field: &str, value: serde_json::Value) {
        let reached = eventually(STATE_WITHIN, || {
            (self.pod_field(&self.app, field) == value).then_some(())
        });
        assert!(
            reached.is_some(),
            "the app pod's {field} never became {value}: {}",
            self.state()
        );
    }

    /// Waits until the daemon has the app pod in the datapath as a
    /// sidecar pod, its inbound capture in place.
    fn wait_sidecar(&self) {
        self.daemon.wait_for_mode(&self.app.uid, Some("sidecar"));
        self.wait_app_field("inbound", "captured".into());
    }

    /// What the daemon and the probes show, for a failure message.
    fn state(&self) -> String {
        format!(
            "pods: {}; counters: {:?}; proxy: {:?}; application: {:?}",
            self.daemon.api_json("pods"),
            self.daemon.stats(),
            self.proxy.as_ref().map(Background::events),
            self.servers
                .iter()
                .map(|(port, s)| (port, s.events()))
                .collect::<Vec<_>>()
        )
    }

    /// Starts the proxy as [`PROXY`] with `args` of its own and waits
    /// until it listens (not until the daemon registered it).
    fn spawn_proxy(&mut self, args: &[&str]) {
        let proxy = Background::spawn(proxy_command(
            &self.proxy_cgroup,
            &self.app,
            Some(PROXY),
            args,
        ));
        proxy.wait_first::<ZtunnelListening>(Duration::from_secs(10));
        assert_runs_as_the_proxy(proxy.pid(), &self.proxy_cgroup);
        self.proxy = Some(proxy);
    }

    /// As [`Sidecar::spawn_proxy`], and waits until the daemon registered
    /// its 15006 listener.
    fn start_proxy(&mut self, args: &[&str]) {
        let registered = self.counter("listener_registered");
        self.spawn_proxy(args);
        let seen = eventually(STATE_WITHIN, || {
            (self.counter("listener_registered") > registered).then_some(())
        });
        assert!(
            seen.is_some(),
            "the proxy's 15006 listener was never registered: {}",
            self.state()
        );
    }

    fn proxy(&self) -> &Background {
        self.proxy.as_ref().expect("the proxy runs")
    }

    /// The application's echo server on `port`.
    fn server(&self, port: u16) -> &Background {
        &self
            .servers
            .iter()
            .find(|(p, _)| *p == port)
            .unwrap_or_else(|| panic!("no application server on {port}"))
            .1
    }

    /// The proxy's inbound connection from `peer`, if it accepted one.
    fn proxy_accepted(&self, peer: SocketAddr) -> Option<InboundAccepted> {
        self.proxy
            .as_ref()?
            .all::<InboundAccepted>()
            .into_iter()
            .find(|a| canon(a.peer) == peer)
    }

    /// The application's connection from `peer` on `port`, if it accepted
    /// one.
    fn app_accepted(&self, port: u16, peer: SocketAddr) -> Option<Accepted> {
        self.server(port)
            .all::<Accepted>()
            .into_iter()
            .find(|a| canon(a.peer) == peer)
    }

    /// One connect from `client` to `to`, 64 bytes echoed, and where it
    /// went (once seen, within [`SEEN_WITHIN`]).
    fn inbound(&self, to: SocketAddr) -> (Connect, Option<Went>) {
        let r = self.client.connect(&to.to_string(), 64);
        let Some(local) = r.local.map(canon) else {
            return (r, None);
        };
        let went = eventually(SEEN_WITHIN, || {
            if let Some(accepted) = self.proxy_accepted(local) {
                return Some(Went::Proxy(accepted));
            }
            self.app_accepted(to.port(), local).map(Went::Direct)
        });
        (r, went)
    }

    /// Asserts that a connect from `client` to `to` lands on the proxy's
    /// 15006 with `to` as its local address and the client as its peer (its
    /// bytes echoed, by a proxy run with `--inbound-echo`, or through the
    /// application); then watches the application for as long as that may
    /// take: it never sees the client's own connection. (Where the proxy's
    /// leg goes from there is [`Sidecar::assert_relayed`]'s.)
    fn assert_captured(&self, to: SocketAddr) -> InboundAccepted {
        let (r, went) = self.inbound(to);
        let accepted = match went {
            Some(Went::Proxy(accepted)) => accepted,
            other => panic!("{to} was not captured ({r}): {other:?}: {}", self.state()),
        };
        let local = canon(r.local.expect("connected"));
        assert_eq!(canon(accepted.local), to, "{accepted}");
        assert_eq!(canon(accepted.peer), local, "{accepted}");
        assert!(r.ok && r.intact, "{to}: {r}: {}", self.state());
        let direct = eventually(SEEN_WITHIN, || self.app_accepted(to.port(), local));
        assert!(
            direct.is_none(),
            "{to} reached the application directly too: {direct:?}"
        );
        accepted
    }

    /// Asserts that a connect from `client` to `to` lands on the proxy and
    /// its bytes go through the proxy's leg to the application (from
    /// Envoy's passthrough source in `to`'s family, to `to`) and back.
    fn assert_relayed(&self, to: SocketAddr) {
        let accepted = self.assert_captured(to);
        let client = canon(accepted.peer);
        let leg = eventually(SEEN_WITHIN, || {
            self.proxy()
                .all::<InboundConnected>()
                .into_iter()
                .find(|c| canon(c.target) == to && c.client == client.ip())
        })
        .unwrap_or_else(|| {
            panic!(
                "the proxy's leg for {accepted} never connected: {}",
                self.state()
            )
        });
        assert_eq!(leg.bind_error, None, "{leg}");
        let source = canon(leg.source);
        assert_eq!(source.ip(), passthrough_towards(to), "{leg}");
        let seen = eventually(SEEN_WITHIN, || self.app_accepted(to.port(), source))
            .unwrap_or_else(|| panic!("the application never saw {leg}: {}", self.state()));
        assert_eq!(canon(seen.local), to, "{seen}");
        let relayed = eventually(SEEN_WITHIN, || {
            self.proxy()
                .all::<InboundRelayed>()
                .into_iter()
                .find(|r| canon(r.target) == to && r.bytes_up == 64 && r.bytes_down == 64)
        });
        assert!(
            relayed.is_some(),
            "the proxy did not relay {accepted} both ways: {}",
            self.state()
        );
    }

    /// Asserts that a connect from `client` to `to` reaches the
    /// application's server on `to`'s port directly, with the client's own
    /// address, and that the proxy accepts nothing from it in as long as a
    /// captured connection has to show up there.
    fn assert_direct(&self, to: SocketAddr) {
        let (r, went) = self.inbound(to);
        match &went {
            Some(Went::Direct(seen)) => assert_eq!(canon(seen.local), to, "{seen}"),
            other => panic!("{to} did not go direct ({r}): {other:?}: {}", self.state()),
        }
        assert!(r.ok && r.intact, "{to}: {r}: {}", self.state());
        let local = canon(r.local.expect("connected"));
        let late = eventually(SEEN_WITHIN, || self.proxy_accepted(local));
        assert!(late.is_none(), "{to} went to the proxy too: {late:?}");
    }

    /// Asserts that a connect from `client` to `to` is refused at once (a
    /// reset), and that the application does not see it in as long as a
    /// connection has to show up there.
    fn assert_refused(&self, to: SocketAddr) {
        let client_ip = ip_towards(&self.client, to);
        let r = self.client.connect(&to.to_string(), 16);
        assert!(!r.ok, "{to}: {r}: {}", self.state());
        assert!(
            r.error.as_deref().unwrap_or("").contains("refused"),
            "{to}: {r}"
        );
        let reached = eventually(SEEN_WITHIN, || {
            self.server(to.port())
                .all::<Accepted>()
                .into_iter()
                .find(|a| ip_of(a.peer) == client_ip)
        });
        assert!(
            reached.is_none(),
            "{to} reached the application: {reached:?}"
        );
    }

    /// Starts an echo server in `far` on `[::]:port`, kept for the test.
    fn echo_in_far(&mut self, port: u16) {
        let server = self.far.echo_server(&format!("[::]:{port}"));
        self.others.push(server);
    }

    /// Asserts that a connect from the app pod's application to `to` goes
    /// to the proxy's 15001, with `to` as `SO_ORIGINAL_DST`.
    fn assert_outbound_captured(&self, to: SocketAddr) -> OutboundAccepted {
        let r = self.app.connect(&to.to_string(), 64);
        assert!(r.ok && r.intact, "{to}: {r}: {}", self.state());
        let local = canon(r.local.expect("connected"));
        let accepted = eventually(SEEN_WITHIN, || {
            self.proxy()
                .all::<OutboundAccepted>()
                .into_iter()
                .find(|a| canon(a.peer) == local)
        })
        .unwrap_or_else(|| panic!("{to} ({r}) never reached the proxy: {}", self.state()));
        assert_eq!(accepted.local.port(), 15001, "{accepted}");
        assert_eq!(accepted.orig_dst.map(canon), Some(to), "{accepted}");
        accepted
    }
}

/// The proxy's arguments where a test looks at where connections land: it
/// answers inbound connections itself, so that its own legs to the
/// application (the passthrough tests') play no part; no DNS proxy.
const ECHOING: &[&str] = &["--no-dns", "--inbound-echo"];

/// A node whose app pod is a sidecar pod with `extra` on its entry, the
/// daemon run with `--sidecar on`, the application on `app_ports`, and the
/// proxy (with `proxy_args`) listening and registered.
fn sidecar_on(extra: &str, app_ports: &[u16], proxy_args: &[&str]) -> Sidecar {
    let l = layout();
    l.write("sidecar", extra);
    let mut t = l.start(&["--sidecar", "on"], app_ports);
    t.start_proxy(proxy_args);
    t
}

#[test]
fn inbound_to_a_sidecar_pod_lands_on_its_proxys_15006_with_the_original_destination_as_local_address()
 {
    let t = sidecar_on("", &[APP_PORT], ECHOING);
    let captured = t.counter("inbound_captured");
    for to in both(&t.app, APP_PORT) {
        let accepted = t.assert_captured(to);
        // Nothing recorded: SO_ORIGINAL_DST has no answer, and the proxy
        // takes the local address, as under TPROXY.
        assert_eq!(accepted.orig_dst, None, "{accepted}");
    }
    assert_eq!(t.counter("inbound_captured") - captured, 2, "{}", t.state());
    assert_eq!(t.counter("inbound_refused"), 0, "{}", t.state());
    assert_eq!(t.pod_field(&t.app, "inbound"), "captured");
}

#[test]
fn istios_own_ports_reach_the_application_uncaptured() {
    let mut ports = vec![APP_PORT];
    ports.extend(ISTIO_PORTS);
    let t = sidecar_on("", &ports, ECHOING);
    let (captured, passed) = (t.counter("inbound_captured"), t.counter("sidecar_passed"));
    t.assert_captured(at(t.app.ip4, APP_PORT));
    for port in ISTIO_PORTS {
        for to in both(&t.app, port) {
            t.assert_direct(to);
        }
    }
    // Passed before the pod's rules: counted neither way.
    assert_eq!(
        (
            t.counter("inbound_captured") - captured,
            t.counter("sidecar_passed") - passed
        ),
        (1, 0),
        "(inbound_captured, sidecar_passed): {}",
        t.state()
    );
}

#[test]
fn exclude_inbound_ports_reach_the_application_uncaptured() {
    let rules = sidecar_block(&[(EXCLUDE_INBOUND_PORTS, &OTHER_PORT.to_string())]);
    let t = sidecar_on(&rules, &[APP_PORT, OTHER_PORT], ECHOING);
    let (captured, passed) = (t.counter("inbound_captured"), t.counter("sidecar_passed"));
    for to in both(&t.app, APP_PORT) {
        t.assert_captured(to);
    }
    for to in both(&t.app, OTHER_PORT) {
        t.assert_direct(to);
    }
    assert_eq!(
        (
            t.counter("inbound_captured") - captured,
            t.counter("sidecar_passed") - passed
        ),
        (2, 2),
        "(inbound_captured, sidecar_passed): {}",
        t.state()
    );
}

#[test]
fn include_inbound_ports_capture_the_ports_they_list_and_no_other() {
    let rules = sidecar_block(&[(INCLUDE_INBOUND_PORTS, &OTHER_PORT.to_string())]);
    let t = sidecar_on(&rules, &[APP_PORT, OTHER_PORT], ECHOING);
    let (captured, passed) = (t.counter("inbound_captured"), t.counter("sidecar_passed"));
    for to in both(&t.app, OTHER_PORT) {
        t.assert_captured(to);
    }
    for to in both(&t.app, APP_PORT) {
        t.assert_direct(to);
    }
    assert_eq!(
        (
            t.counter("inbound_captured") - captured,
            t.counter("sidecar_passed") - passed
        ),
        (2, 2),
        "(inbound_captured, sidecar_passed): {}",
        t.state()
    );
}

#[test]
fn include_inbound_ports_empty_captures_no_inbound_port_while_outbound_is_still_captured() {
    let rules = sidecar_block(&[(INCLUDE_INBOUND_PORTS, "")]);
    let mut t = sidecar_on(&rules, &[APP_PORT, OTHER_PORT], ECHOING);
    t.echo_in_far(APP_PORT);
    // The pod is captured, by its rules: its own outbound goes to the
    // proxy.
    t.assert_outbound_captured(at(t.far.ip4, APP_PORT));
    let (captured, passed) = (t.counter("inbound_captured"), t.counter("sidecar_passed"));
    for port in [APP_PORT, OTHER_PORT] {
        for to in both(&t.app, port) {
            t.assert_direct(to);
        }
    }
    assert_eq!(
        (
            t.counter("inbound_captured") - captured,
            t.counter("sidecar_passed") - passed
        ),
        (0, 4),
        "(inbound_captured, sidecar_passed): {}",
        t.state()
    );
}

#[test]
fn without_a_registered_proxy_listener_inbound_is_refused_and_never_reaches_the_application() {
    let l = layout();
    l.write("sidecar", "");
    let mut t = l.start(&["--sidecar", "on"], &[APP_PORT]);
    let refused = t.counter("inbound_refused");
    // No listener on 15006 at all.
    for to in both(&t.app, APP_PORT) {
        t.assert_refused(to);
    }
    // A 15006 listener bound by another uid (root, in the app container)
    // is not the proxy's: not registered, and not handed a connection.
    let registered = t.counter("listener_registered");
    let root = Background::spawn(proxy_command(&t.app.container, &t.app, None, &["--no-dns"]));
    root.wait_first::<ZtunnelListening>(Duration::from_secs(10));
    for to in both(&t.app, APP_PORT) {
        t.assert_refused(to);
    }
    assert!(
        root.all::<InboundAccepted>().is_empty(),
        "{:?}",
        root.events()
    );
    assert_eq!(
        t.counter("listener_registered"),
        registered,
        "{}",
        t.state()
    );
    assert_eq!(t.counter("inbound_refused") - refused, 4, "{}", t.state());
    // Killed: its ports are free again once it is reaped.
    drop(root);
    // The proxy's own listener is registered and takes them.
    t.start_proxy(ECHOING);
    for to in both(&t.app, APP_PORT) {
        t.assert_captured(to);
    }
    assert_eq!(t.counter("inbound_refused") - refused, 4, "{}", t.state());
}

/// The proxy's connects, as uid 1337 from its container, to the app pod's
/// own address `to`: one with no source of its own goes to the proxy's
/// 15006 with `to` as SO_ORIGINAL_DST, as istio-iptables sends it
/// (`ISTIO_OUTPUT`: `-o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j
/// ISTIO_IN_REDIRECT`); one from Envoy's passthrough source reaches the
/// application, as the first rule of `ISTIO_OUTPUT` returns it (`-o lo -s
/// 127.0.0.6/32 -j RETURN`, `::6/128` for IPv6); and a client's connection
/// through the proxy reaches the application that way.
fn assert_passthrough(t: &Sidecar, to: SocketAddr) {
    let as_proxy = |extra: &[&str]| -> Connect {
        let to = to.to_string();
        let mut args = vec!["--user", PROXY, "connect", "--to", &to, "--bytes", "64"];
        args.extend_from_slice(extra);
        let events = run_in(Some(&t.proxy_cgroup), &t.app.netns, &args);
        event::first(&events).unwrap_or_else(|| panic!("no connect event: {events:?}"))
    };
    let called = as_proxy(&[]);
    let local = canon(called.local.expect("connected"));
    let accepted = eventually(SEEN_WITHIN, || t.proxy_accepted(local))
        .unwrap_or_else(|| panic!("{called} never reached the proxy: {}", t.state()));
    assert_eq!(accepted.local.port(), 15006, "{accepted}");
    assert_eq!(accepted.orig_dst.map(canon), Some(to), "{accepted}");
    let bind = at(passthrough_towards(to), 0).to_string();
    let passthrough = as_proxy(&["--bind", &bind]);
    let local = canon(passthrough.local.expect("connected"));
    assert_eq!(local.ip(), passthrough_towards(to), "{passthrough}");
    let seen = eventually(SEEN_WITHIN, || {
        if let Some(accepted) = t.proxy_accepted(local) {
            panic!(
                "the passthrough {passthrough} went to the proxy: {accepted}: {}",
                t.state()
            );
        }
        t.app_accepted(APP_PORT, local)
    })
    .unwrap_or_else(|| panic!("the application never saw {passthrough}: {}", t.state()));
    assert_eq!(canon(seen.local), to, "{seen}");
    assert!(passthrough.ok && passthrough.intact, "{passthrough}");
    let late = eventually(SEEN_WITHIN, || t.proxy_accepted(local));
    assert!(
        late.is_none(),
        "the passthrough went to the proxy: {late:?}"
    );
    // A client's connection: to the proxy, and on to the application.
    t.assert_relayed(to);
}

#[test]
fn the_proxys_passthrough_from_127_0_0_6_to_the_pod_ip_reaches_the_application() {
    let t = sidecar_on("", &[APP_PORT], &["--no-dns"]);
    assert_passthrough(&t, at(t.app.ip4, APP_PORT));
}

/// The host addresses on `lo` in `pod`'s netns, as `ip` lists them.
fn loopback_addresses(pod: &Pod) -> Vec<IpAddr> {
    let out = Command::new("ip")
        .args(["-n", &pod.netns_name, "-o", "addr", "show", "dev", "lo"])
        .output()
        .expect("running `ip`");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn the_daemon_gives_a_sidecar_pods_loopback_the_ipv6_passthrough_source_and_the_proxy_binds_it() {
    let l = layout();
    assert!(
        !loopback_addresses(&l.app).contains(&PASSTHROUGH6.into()),
        "the test pod has ::6 before the daemon runs"
    );
    l.write("sidecar", "");
    // With only the capabilities the daemon asks for under --sidecar on
    // (deploy's sidecar component grants exactly these).
    let caps = ambridge_conformance::capabilities::asked_for(true);
    let mut t = l.start_limited(&caps, &["--sidecar", "on"], &[APP_PORT]);
    assert!(
        loopback_addresses(&t.app).contains(&PASSTHROUGH6.into()),
        "no ::6 on the sidecar pod's lo once it is captured: {:?}",
        loopback_addresses(&t.app)
    );
    assert!(
        !loopback_addresses(&t.client).contains(&PASSTHROUGH6.into()),
        "::6 was added to a pod that is not a sidecar pod"
    );
    t.start_proxy(&["--no-dns"]);
    assert_passthrough(&t, at(t.app.ip6, APP_PORT));
}

#[test]
fn a_dual_stack_proxys_ipv4_and_ipv6_only_listeners_each_take_their_own_familys_inbound() {
    let l = layout();
    l.write("sidecar", "");
    let mut t = l.start(&["--sidecar", "on"], &[APP_PORT]);
    let registered = t.counter("listener_registered");
    t.spawn_proxy(&["--no-dns", "--inbound-echo", "--split-stack"]);
    let both_registered = eventually(STATE_WITHIN, || {
        (t.counter("listener_registered") >= registered + 2).then_some(())
    });
    assert!(
        both_registered.is_some(),
        "the proxy's two 15006 listeners were not both registered: {}",
        t.state()
    );
    for to in both(&t.app, APP_PORT) {
        let accepted = t.assert_captured(to);
        assert_eq!(accepted.local.is_ipv4(), to.is_ipv4(), "{accepted}");
    }
}

// DNS.

const TRANSPORTS: [&str; 3] = ["udp", "udp-connected", "tcp"];

/// Asserts the client sees `to` as the source (`from`, for UDP) and peer
/// (`getpeername`, for connected sockets) of the answer.
fn assert_seen_from(answer: &DnsAnswer, to: SocketAddr) {
    if answer.transport != DnsTransport::Tcp {
        assert_eq!(answer.from.map(canon), Some(to), "{answer}");
    }
    if answer.transport != DnsTransport::Udp {
        assert_eq!(answer.peer.map(canon), Some(to), "{answer}");
    }
}

impl Sidecar {
    /// Starts the DNS server in `far` on `[::]:53`; returns its index in
    /// `others`.
    fn dns_server(&mut self) -> usize {
        let server = self.far.spawn(&["dns-server", "--listen", "[::]:53"]);
        server.wait_first::<Listening>(Duration::from_secs(10));
        self.others.push(server);
        self.others.len() - 1
    }

    /// One query from the app pod's application, or as `user` from the
    /// proxy's container.
    fn query(&self, user: Option<&str>, to: SocketAddr, transport: &str, text: &str) -> DnsAnswer {
        let to = to.to_string();
        let mut args = Vec::new();
        let cgroup = match user {
            Some(user) => {
                args.extend(["--user", user]);
                &self.proxy_cgroup
            }
            None => &self.app.container,
        };
        args.extend([
            "dns",
            "--to",
            &to,
            "--transport",
            transport,
            "--query",
            text,
        ]);
        let events = run_in(Some(cgroup), &self.app.netns, &args);
        event::first(&events).unwrap_or_else(|| panic!("no dns event: {events:?}"))
    }

    /// The proxy's DNS queries with `text`.
    fn proxied(&self, text: &str) -> Vec<DnsQuery> {
        self.proxy()
            .all::<DnsQuery>()
            .into_iter()
            .filter(|q| q.query == text)
            .collect()
    }

    /// Asserts that a query from the application to `to` over `transport`
    /// is answered by the proxy (with what the real server told it), and
    /// seems to come from `to`.
    fn assert_dns_captured(&self, to: SocketAddr, transport: &str, text: &str) {
        let answer = self.query(None, to, transport, text);
        assert!(answer.ok, "{answer}: {}", self.state());
        assert_eq!(
            answer.reply,
            Some(format!("ztunnel:server:{text}")),
            "{answer}: {}",
            self.state()
        );
        assert_seen_from(&answer, to);
        let proxied = eventually(SEEN_WITHIN, || {
            (!self.proxied(text).is_empty()).then_some(())
        });
        assert!(proxied.is_some(), "{}", self.state());
    }

    /// Asserts that a query from the application (or as `user` from the
    /// proxy's container) to `to` over `transport` is answered by the real
    /// server itself, and that the proxy sees nothing of it in as long as
    /// a captured query has to show up there.
    fn assert_dns_direct(&self, user: Option<&str>, to: SocketAddr, transport: &str, text: &str) {
        let answer = self.query(user, to, transport, text);
        assert!(answer.ok, "{answer}: {}", self.state());
        assert_eq!(
            answer.reply,
            Some(format!("server:{text}")),
            "{answer}: {}",
            self.state()
        );
        assert_seen_from(&answer, to);
        let proxied = eventually(SEEN_WITHIN, || {
            let seen = self.proxied(text);
            (!seen.is_empty()).then_some(seen)
        });
        assert!(proxied.is_none(), "the proxy saw {proxied:?}");
    }

    /// Waits until a UDP query from the application to `to` is answered by
    /// the proxy (`captured`) or by the server itself, once the daemon has
    /// the state the test wrote.
    fn wait_dns(&self, to: SocketAddr, captured: bool) {
        let want = if captured {
            "ztunnel:server:"
        } else {
            "server:"
        };
        let mut n = 0;
        let reached = eventually(STATE_WITHIN, || {
            n += 1;
            let text = format!("wait{n}");
            let answer = self.query(None, to, "udp", &text);
            (answer.reply == Some(format!("{want}{text}"))).then_some(())
        });
        assert!(
            reached.is_some(),
            "queries to {to} never answered by {want}: {}",
            self.state()
        );
    }
}

/// The proxy's arguments for the DNS tests: its DNS proxy forwards to the
/// real server in `far` over IPv4.
fn dns_proxy_args(t: &Layout) -> Vec<String> {
    vec!["--dns-upstream".into(), at(t.far.ip4, 53).to_string()]
}

/// A sidecar node for the DNS tests: the entry's `extra`, the daemon's
/// `daemon_args`, the real server in `far`, the proxy with its DNS proxy.
fn dns_node(extra: &str, daemon_args: &[&str]) -> (Sidecar, usize) {
    let l = layout();
    l.write("sidecar", extra);
    let proxy_args = dns_proxy_args(&l);
    let mut args = vec!["--sidecar", "on"];
    args.extend_from_slice(daemon_args);
    let mut t = l.start(&args, &[]);
    let server = t.dns_server();
    let proxy_args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
    t.start_proxy(&proxy_args);
    (t, server)
}

#[test]
fn a_sidecar_pods_queries_go_to_its_agents_dns_proxy_and_seem_to_come_from_the_server_asked() {
    let (t, server) = dns_node("", &["--sidecar-dns-capture", "on"]);
    t.wait_app_field("dns_captured", true.into());
    let (redirected, restored) = (t.counter("dns_redirected"), t.counter("dns_restored"));
    let mut asked = 0;
    for to in both(&t.far, 53) {
        for transport in TRANSPORTS {
            let text = format!("q{asked}");
            t.assert_dns_captured(to, transport, &text);
            asked += 1;
            // The agent's own upstream query, as 1337 from the pod, reached
            // the real server: it was not captured back to the agent.
            let seen = t.others[server].wait_for(|e: &DnsQuery| e.query == text, SEEN_WITHIN);
            assert_eq!(ip_of(seen.peer), IpAddr::from(t.app.ip4), "{seen}");
        }
    }
    // Each query proxied once.
    for n in 0..asked {
        assert_eq!(t.proxied(&format!("q{n}")).len(), 1, "{}", t.state());
    }
    assert_eq!(
        (
            t.counter("dns_redirected") - redirected,
            t.counter("dns_restored") - restored
        ),
        // Every UDP answer's source, and every connected socket's peer.
        (asked, 8),
        "(dns_redirected, dns_restored): {}",
        t.state()
    );
}

#[test]
fn the_proxys_own_queries_as_uid_1337_reach_the_real_server() {
    let (t, _server) = dns_node("", &["--sidecar-dns-capture", "on"]);
    let redirected = t.counter("dns_redirected");
    t.assert_dns_captured(at(t.far.ip4, 53), "udp", "app");
    for to in both(&t.far, 53) {
        for transport in TRANSPORTS {
            t.assert_dns_direct(Some(PROXY), to, transport, &format!("own-{transport}"));
        }
    }
    assert_eq!(t.counter("dns_redirected") - redirected, 1, "{}", t.state());
}

#[test]
fn with_dns_capture_off_for_a_sidecar_pod_its_queries_reach_the_real_server() {
    // Off on the node (the default), no override: direct.
    let (t, _server) = dns_node("", &[]);
    assert_eq!(t.pod_field(&t.app, "dns_captured"), false);
    let redirected = t.counter("dns_redirected");
    for to in both(&t.far, 53) {
        for transport in TRANSPORTS {
            t.assert_dns_direct(None, to, transport, &format!("off-{transport}"));
        }
    }
    assert_eq!(t.counter("dns_redirected"), redirected, "{}", t.state());
    // The pod turns it on: captured...
    t.write("sidecar", "    dns_capture: true\n");
    t.wait_dns(at(t.far.ip4, 53), true);
    t.assert_dns_captured(at(t.far.ip6, 53), "tcp", "on");
    // ...and off again.
    t.write("sidecar", "    dns_capture: false\n");
    t.wait_app_field("dns_captured", false.into());
    for to in both(&t.far, 53) {
        for transport in TRANSPORTS {
            t.assert_dns_direct(None, to, transport, &format!("off-again-{transport}"));
        }
    }
}

#[test]
fn a_sidecar_pod_that_turns_dns_capture_off_is_answered_by_the_real_server() {
    let (t, _server) = dns_node("    dns_capture: false\n", &["--sidecar-dns-capture", "on"]);
    assert_eq!(t.pod_field(&t.app, "dns_captured"), false);
    let redirected = t.counter("dns_redirected");
    for to in both(&t.far, 53) {
        for transport in TRANSPORTS {
            t.assert_dns_direct(None, to, transport, &format!("off-{transport}"));
        }
    }
    assert_eq!(t.counter("dns_redirected"), redirected, "{}", t.state());
    // Without the override the node's default takes it to the proxy.
    t.write("sidecar", "");
    t.wait_dns(at(t.far.ip4, 53), true);
    t.assert_dns_captured(at(t.far.ip6, 53), "udp-connected", "on");
}

#[test]
fn with_sidecar_off_a_sidecar_pods_inbound_and_dns_are_left_alone() {
    let mut l = layout();
    // An ambient pod beside it, whose capture shows the datapath attached
    // and the file in force.
    let mesh = l.node.add_pod("mesh");
    let text = l.workloads("sidecar", "    dns_capture: true\n", &[(&mesh, "ambient")]);
    l.node.write_workloads_text(&text);
    let upstream = at(l.far.ip4, 53).to_string();
    let mut t = l.start(
        &["--sidecar", "off", "--sidecar-dns-capture", "on"],
        &[APP_PORT],
    );
    let server = t.dns_server();
    let mesh_app = mesh.echo_server(&format!("[::]:{APP_PORT}"));
    let ztunnel = ztunnel_stand_in_with(
        &t.node,
        &t.ztunnel_cgroup,
        &[&mesh],
        &["--dns-upstream", &upstream],
    );
    t.daemon.wait_for_mode(&mesh.uid, Some("ambient"));
    t.daemon.wait_for_mode(&t.app.uid, Some("sidecar"));
    let registered = t.counter("listener_registered");
    t.spawn_proxy(&["--dns-upstream", &upstream]);
    // The ambient pod: inbound to ztunnel, DNS to ztunnel's proxy.
    let to = at(mesh.ip4, APP_PORT);
    let r = t.client.connect(&to.to_string(), 16);
    assert!(r.ok, "{r}");
    ztunnel.wait_for(|a: &InboundAccepted| canon(a.local) == to, SEEN_WITHIN);
    mesh_app.wait_first::<Accepted>(SEEN_WITHIN);
    let dns = at(t.far.ip4, 53).to_string();
    let answer: DnsAnswer =
        event::first(&mesh.run(&["dns", "--to", &dns, "--transport", "udp", "--query", "mesh"]))
            .expect("dns event");
    assert_eq!(
        answer.reply.as_deref(),
        Some("ztunnel:server:mesh"),
        "{answer}"
    );
    // The sidecar pod: nothing.
    for to in both(&t.app, APP_PORT) {
        t.assert_direct(to);
    }
    for to in both(&t.far, 53) {
        for transport in TRANSPORTS {
            t.assert_dns_direct(None, to, transport, &format!("off-{transport}"));
        }
    }
    assert_eq!(
        t.counter("listener_registered"),
        registered,
        "the proxy's listener was registered: {}",
        t.state()
    );
    assert_eq!(t.pod_field(&t.app, "inbound"), "none");
    assert_eq!(t.pod_field(&t.app, "dns_captured"), false);
    assert!(
        t.others[server]
            .all::<DnsQuery>()
            .iter()
            .any(|q| q.query == "mesh"),
        "{:?}",
        t.others[server].events()
    );
    drop((ztunnel, mesh_app));
}

// Switching modes, and istio-iptables beside the daemon.

/// The port the ambient ztunnel stand-in takes outbound connections on
/// (`--redirect-port`) in the switching tests: the sidecar proxy holds
/// 15001 in the same netns.
const ZTUNNEL_OUTBOUND: u16 = 15011;

/// What a connect loop from the app pod saw across its switches between
/// sidecar and ambient ([`switch_under_a_connect_loop`]).
struct Switched {
    summary: ConnectSummary,
    /// The loop's connects refused (EPERM) because the pod was held.
    held: u64,
    /// The `SO_ORIGINAL_DST` asks the datapath counted: one per connection
    /// a proxy accepted from the loop.
    asked: u64,
    /// The loop's connects redirected to a proxy that never accepted them:
    /// reset in ztunnel's accept queue when it let the pod go.
    unaccepted: u64,
    /// The connections the two proxies accepted from the loop.
    accepted: Vec<OutboundAccepted>,
    /// The connections the destination accepted: around both proxies.
    around: Vec<Accepted>,
    /// What the daemon and the proxies showed, for a failure message.
    state: String,
}

/// Runs a connect loop from the app pod (a sidecar pod) to `far`'s
/// 8080 while the pod is switched to ambient and back twice in the
/// workloads file, with the sidecar proxy (15001) and a ztunnel (on
/// [`ZTUNNEL_OUTBOUND`], no 15006, no DNS) both listening in its netns
/// throughout; both answer the connections they take themselves, once
/// they have their original destination, so that the destination sees
/// only connections that went around both. Asserts that once a switch is
/// in the datapath the new mode's proxy takes the loop's connects, the
/// old one's at most the one in flight at the switch.
fn switch_under_a_connect_loop() -> Switched {
    let l = layout();
    l.write("sidecar", "");
    let redirect = ZTUNNEL_OUTBOUND.to_string();
    let mut t = l.start(&["--sidecar", "on", "--redirect-port", &redirect], &[]);
    t.echo_in_far(APP_PORT);
    t.start_proxy(&["--no-dns", "--outbound-echo"]);
    let ztunnel = ztunnel_stand_in_with(
        &t.node,
        &t.ztunnel_cgroup,
        &[&t.app],
        &[
            "--port",
            &redirect,
            "--no-inbound",
            "--no-dns",
            "--outbound-echo",
        ],
    );
    let to = at(t.far.ip4, APP_PORT);
    t.assert_outbound_captured(to);
    let app_id = stand_in_id(&t.app);
    let by_proxy = || t.proxy().all::<OutboundAccepted>();
    let by_ztunnel = || {
        ztunnel
            .all::<OutboundAccepted>()
            .into_iter()
            .filter(|a| a.pod == app_id)
            .collect::<Vec<_>>()
    };
    let far = t.others.last().expect("far's echo server");
    let (proxy_start, ztunnel_start) = (by_proxy().len(), by_ztunnel().len());
    let held = t.counter("connect_held");
    let (redirected_before, asked_before) = (connects_redirected(&t), original_dsts_asked(&t));
    let stop = t.node.dir.join("stop-switch-loop");
    let stop_arg = stop.display().to_string();
    let to_arg = to.to_string();
    let looped = t.app.spawn(&[
        "connect", "--to", &to_arg, "--bytes", "16", "--until", &stop_arg,
    ]);
    const SEEN: usize = 20;
    // Once a switch is in the datapath: `to` (the new mode's proxy) takes
    // SEEN more of the loop's connects, while `from` (the old one's) takes
    // at most the one in flight at the switch (the loop makes one connect
    // at a time).
    let moved = |what: &str, to: &dyn Fn() -> usize, from: &dyn Fn() -> usize| {
        let (to_before, from_before) = (to(), from());
        let grown = eventually(Duration::from_secs(30), || {
            (to() >= to_before + SEEN).then_some(())
        });
        assert!(
            grown.is_some(),
            "no {SEEN} connects went to {what}: proxy {}, ztunnel {}: {:?}",
            by_proxy().len(),
            by_ztunnel().len(),
            looped.events()
        );
        assert!(
            from() <= from_before + 1,
            "connects went to the other proxy after the switch to {what}: {from_before} then {}",
            from()
        );
    };
    let proxies = || by_proxy().len();
    let ztunnels = || by_ztunnel().len();
    moved("the sidecar proxy", &proxies, &ztunnels);
    for _ in 0..2 {
        t.write("ambient", "");
        t.daemon.wait_for_mode(&t.app.uid, Some("ambient"));
        moved("ztunnel", &ztunnels, &proxies);
        t.write("sidecar", "");
        t.daemon.wait_for_mode(&t.app.uid, Some("sidecar"));
        moved("the sidecar proxy", &proxies, &ztunnels);
    }
    std::fs::write(&stop, b"").expect("writing the loop's stop file");
    let summary = looped.wait_first::<ConnectSummary>(Duration::from_secs(30));
    let held = t.counter("connect_held") - held;
    let asked = original_dsts_asked(&t) - asked_before;
    let redirected = connects_redirected(&t) - redirected_before;
    let unaccepted = redirected.saturating_sub(asked);
    // Each proxy reports a connection as soon as it has asked for its
    // original destination, before relaying a byte; the reports are read
    // apart from the loop's, so wait until as many are in as were asked.
    let landed = || {
        by_proxy()
            .split_off(proxy_start)
            .into_iter()
            .chain(by_ztunnel().split_off(ztunnel_start))
            .collect::<Vec<OutboundAccepted>>()
    };
    let accepted = eventually(SEEN_WITHIN, || {
        let accepted = landed();
        (accepted.len() as u64 >= asked).then_some(accepted)
    })
    .unwrap_or_else(landed);
    // A connection around both would have been accepted before its
    // connect returned; watched as long as one has to show up anyway.
    let around = eventually(SEEN_WITHIN, || {
        let seen = far.all::<Accepted>();
        (!seen.is_empty()).then_some(seen)
    })
    .unwrap_or_default();
    let state = format!(
        "{summary}; held: {held}; redirected: {redirected}; SO_ORIGINAL_DST asked: {asked}; redirected but never accepted: {unaccepted}; the proxies' connections with no original destination: {:?}; their errors: {:?} {:?}; counters: {:?}",
        accepted
            .iter()
            .filter(|a| a.orig_dst.is_none())
            .collect::<Vec<_>>(),
        t.proxy().all::<RelayError>(),
        ztunnel.all::<RelayError>(),
        t.daemon.stats()
    );
    Switched {
        summary,
        held,
        asked,
        unaccepted,
        accepted,
        around,
        state,
    }
}

#[test]
fn a_pod_switched_between_sidecar_and_ambient_moves_between_the_two_proxies_and_no_connect_goes_around_both()
 {
    let s = switch_under_a_connect_loop();
    assert!(
        s.around.is_empty(),
        "connections went around both proxies: {:?}: {}",
        s.around,
        s.state
    );
    // Every connect landed at one of the two proxies (whether or not it
    // went on from there), but those refused (EPERM) while the pod was
    // held (in replacement mode, from its switch to ambient until ztunnel
    // had it) and those reset unaccepted in ztunnel's queue.
    let landed_and_failed = s
        .summary
        .failed
        .checked_sub(s.held + s.unaccepted)
        .unwrap_or_else(|| panic!("more connects held or reset than failed: {}", s.state));
    assert_eq!(
        s.accepted.len() as u64,
        s.summary.ok + landed_and_failed,
        "connects that neither landed at a proxy nor were held or reset unaccepted: {}",
        s.state
    );
    assert_only_reset_in_flight_to_ztunnel(&s);
    if !replacement_mode() {
        assert_eq!(s.held, 0, "{}", s.state);
    }
}

#[test]
fn a_connection_the_sidecar_proxy_took_as_its_pod_switches_to_ambient_keeps_its_original_destination()
 {
    let s = switch_under_a_connect_loop();
    let unanswered: Vec<_> = s.accepted.iter().filter(|a| a.orig_dst.is_none()).collect();
    assert!(
        unanswered.is_empty(),
        "SO_ORIGINAL_DST unanswered to the proxy that accepted: {unanswered:?}: {}",
        s.state
    );
    assert_eq!(
        s.summary.failed,
        s.held + s.unaccepted,
        "connects that failed but for a hold or a reset in ztunnel's queue: {}",
        s.state
    );
    assert_only_reset_in_flight_to_ztunnel(&s);
}

/// A connect redirected to ztunnel just before its pod switched to sidecar
/// may still wait in ztunnel's accept queue when ztunnel, told to let the
/// pod go, closes its listener: the kernel resets it. That is ztunnel's
/// drain (istio-cni's order, rules out then `DelWorkload`, has the same
/// window), and fail-closed: at most the one connect in flight at each of
/// the loop's two switches to sidecar, and reset, never around.
fn assert_only_reset_in_flight_to_ztunnel(s: &Switched) {
    // Every connection a proxy reported asked once: what was redirected
    // and not asked is what no proxy took.
    assert_eq!(s.accepted.len() as u64, s.asked, "{}", s.state);
    assert!(s.unaccepted <= 2, "{}", s.state);
    // Reset in the queue (seen reading, or as no peer once connected), or
    // refused if its SYN came after the listener closed; EPERM while held.
    let expected = [
        "Operation not permitted (os error 1)",
        "Connection reset by peer (os error 104)",
        "Transport endpoint is not connected (os error 107)",
        "Connection refused (os error 111)",
    ];
    assert!(
        s.summary
            .failures
            .iter()
            .all(|f| expected.contains(&f.as_str())),
        "{}",
        s.state
    );
}

/// The connects the datapath redirected, either family, sidecar or ambient.
fn connects_redirected(t: &Sidecar) -> u64 {
    t.counter("connect_redirected_ipv4") + t.counter("connect_redirected_ipv6")
}

/// The `SO_ORIGINAL_DST` queries the datapath saw, answered or not: one per
/// connection a proxy accepted.
fn original_dsts_asked(t: &Sidecar) -> u64 {
    ["orig_dst_answered", "orig_dst_missing", "orig_dst_refused"]
        .iter()
        .map(|c| t.counter(c))
        .sum()
}

/// Runs `ip6tables <rule>` inside network namespace `ns`, panicking with
/// its stderr on failure.
fn ip6tables(ns: &str, rule: &str) {
    let mut args = vec!["netns", "exec", ns, "ip6tables"];
    args.extend(rule.split(' '));
    let out = Command::new("ip")
        .args(&args)
        .output()
        .expect("running ip6tables (scripts/setup.sh installs iptables)");
    assert!(
        out.status.success(),
        "ip6tables {rule} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// istio-iptables' nat rules for a sidecar pod in REDIRECT mode with
/// Istio's defaults (`-p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT -i '*'
/// -b '*' -d 15090,15021,15020`), for one family: `lo` and `passthrough`
/// are its loopback address and Envoy's passthrough source (CIDRs).
fn istio_iptables_rules(lo: &str, passthrough: &str) -> Vec<String> {
    let mut rules: Vec<String> = [
        "-N ISTIO_INBOUND",
        "-N ISTIO_REDIRECT",
        "-N ISTIO_IN_REDIRECT",
        "-N ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
    ]
    .iter()
    .map(|r| r.to_string())
    .collect();
    rules.extend([
        format!("-A ISTIO_OUTPUT -o lo -s {passthrough} -j RETURN"),
        format!(
            "-A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"
        ),
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN".into(),
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN".into(),
        format!("-A ISTIO_OUTPUT -o lo ! -d {lo} -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT"),
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN".into(),
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN".into(),
        format!("-A ISTIO_OUTPUT -d {lo} -j RETURN"),
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into(),
    ]);
    rules.into_iter().map(|r| format!("-t nat {r}")).collect()
}

#[test]
fn with_istio_iptables_rules_in_the_pod_outbound_and_inbound_still_reach_the_proxy_with_their_original_destination()
 {
    let l = layout();
    l.write("sidecar", "");
    // As istio-init writes them, before the proxy starts.
    for rule in istio_iptables_rules("127.0.0.1/32", "127.0.0.6/32") {
        iptables(&l.app.netns_name, &rule);
    }
    for rule in istio_iptables_rules("::1/128", "::6/128") {
        ip6tables(&l.app.netns_name, &rule);
    }
    let mut t = l.start(&["--sidecar", "on"], &[APP_PORT, ISTIO_PORTS[2]]);
    t.echo_in_far(APP_PORT);
    t.start_proxy(ECHOING);
    // Outbound: the proxy's 15001 (through `lo`, which the rules let
    // pass), SO_ORIGINAL_DST answered.
    for to in both(&t.far, APP_PORT) {
        let accepted = t.assert_outbound_captured(to);
        assert_eq!(ip_of(accepted.peer), ip_towards(&t.app, to), "{accepted}");
    }
    // Inbound: istio-iptables' PREROUTING redirect to 15006 comes first,
    // and the original destination is conntrack's.
    for to in both(&t.app, APP_PORT) {
        let (r, went) = t.inbound(to);
        let accepted = match went {
            Some(Went::Proxy(accepted)) => accepted,
            other => panic!("{to} was not captured ({r}): {other:?}: {}", t.state()),
        };
        assert_eq!(accepted.local.port(), 15006, "{accepted}");
        assert_eq!(accepted.orig_dst.map(canon), Some(to), "{accepted}");
        let local = canon(r.local.expect("connected"));
        let direct = eventually(SEEN_WITHIN, || t.app_accepted(APP_PORT, local));
        assert!(
            direct.is_none(),
            "{to} reached the application directly too: {direct:?}"
        );
    }
    // Istio's own ports stay the application's.
    for to in both(&t.app, ISTIO_PORTS[2]) {
        t.assert_direct(to);
    }
}
