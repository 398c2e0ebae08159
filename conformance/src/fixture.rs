//! The node most tests start from, and what runs on it: three pods, the
//! daemon, echo servers and a ztunnel stand-in, built in one place and torn
//! down in the right order.

use std::path::PathBuf;

use crate::{Background, Daemon, Node, Pod, zds_socket, ztunnel_stand_in_with};

/// The node most tests start from: `client` enrolled, `server` and `plain`
/// not, a `ztunnel` cgroup, and the workloads file saying so.
pub struct ThreePods {
    pub client: Pod,
    pub server: Pod,
    pub plain: Pod,
    pub ztunnel_cgroup: PathBuf,
    /// Last, so it is dropped after the pods' processes.
    pub node: Node,
}

/// Builds a [`ThreePods`] node (no daemon yet).
pub fn three_pods() -> ThreePods {
    let mut node = Node::new();
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    let plain = node.add_pod("plain");
    let ztunnel_cgroup = node.add_cgroup("ztunnel");
    node.write_workloads(
        &[(&client, "ambient"), (&server, "none"), (&plain, "none")],
        Some(&ztunnel_cgroup),
    );
    ThreePods {
        client,
        server,
        plain,
        ztunnel_cgroup,
        node,
    }
}

/// One of a [`ThreePods`] node's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodRole {
    Client,
    Server,
    Plain,
}

impl ThreePods {
    /// The pod playing `role`.
    pub fn pod(&self, role: PodRole) -> &Pod {
        match role {
            PodRole::Client => &self.client,
            PodRole::Server => &self.server,
            PodRole::Plain => &self.plain,
        }
    }
}

/// What to run on a [`ThreePods`] node; [`FixtureBuilder::start`] starts
/// it. The node is built first, so a test can change it (its workloads
/// file, a failing map) before the daemon sees it.
pub struct FixtureBuilder {
    pods: ThreePods,
    zds_serve: bool,
    app: bool,
    echoes: Vec<(PodRole, String)>,
    ztunnel: Option<(Vec<PodRole>, Vec<String>)>,
    wait_enrolled: bool,
    capabilities: Option<Vec<String>>,
}

impl FixtureBuilder {
    /// The node, before anything runs on it.
    pub fn pods(&self) -> &ThreePods {
        &self.pods
    }

    /// The daemon serves ZDS at the node's [`zds_socket`], whatever
    /// `AMBRIDGE_TEST_ZDS` says.
    pub fn zds_serve(mut self) -> Self {
        self.zds_serve = true;
        self
    }

    /// The application: an echo server on the server's `[::]:8080`
    /// ([`Fixture::app`]).
    pub fn app(mut self) -> Self {
        self.app = true;
        self
    }

    /// Another echo server, on `addr` in the pod playing `role`, kept
    /// running for the test.
    pub fn echo(mut self, role: PodRole, addr: &str) -> Self {
        self.echoes.push((role, addr.to_string()));
        self
    }

    /// A ztunnel stand-in ([`ztunnel_stand_in_with`]) for the pods playing
    /// `roles`, with its own arguments `args` ([`Fixture::ztunnel`]).
    pub fn ztunnel(mut self, roles: &[PodRole], args: &[&str]) -> Self {
        self.ztunnel = Some((roles.to_vec(), args.iter().map(|a| a.to_string()).collect()));
        self
    }

    /// The daemon runs as root with only `caps` (names without `CAP_`) in
    /// every set ([`crate::capabilities`]).
    pub fn capabilities(mut self, caps: &[String]) -> Self {
        self.capabilities = Some(caps.to_vec());
        self
    }

    /// Once everything runs, waits until the daemon has the client in the
    /// datapath as ambient (in replacement mode, acknowledged by ztunnel).
    pub fn wait_enrolled(mut self) -> Self {
        self.wait_enrolled = true;
        self
    }

    /// Starts the daemon (ready), then the application and echo servers
    /// (listening), then the stand-in (listening; in replacement mode,
    /// handed its pods), in that order.
    pub fn start(self) -> Fixture {
        let t = &self.pods;
        let socket = zds_socket(&t.node).display().to_string();
        let extra: &[&str] = if self.zds_serve {
            &["--zds", "serve", "--zds-socket", &socket]
        } else {
            &[]
        };
        let daemon = match &self.capabilities {
            Some(caps) => Daemon::start_limited(&t.node, extra, caps),
            None => Daemon::start_with(&t.node, extra),
        };
        let app = self.app.then(|| t.server.echo_server("[::]:8080"));
        let echoes = self
            .echoes
            .iter()
            .map(|(role, addr)| t.pod(*role).echo_server(addr))
            .collect();
        let ztunnel = self.ztunnel.map(|(roles, args)| {
            let pods: Vec<&Pod> = roles.into_iter().map(|role| t.pod(role)).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ztunnel_stand_in_with(&t.node, &t.ztunnel_cgroup, &pods, &args)
        });
        if self.wait_enrolled {
            daemon.wait_for_mode(&t.client.uid, Some("ambient"));
        }
        let ThreePods {
            client,
            server,
            plain,
            ztunnel_cgroup,
            node,
        } = self.pods;
        Fixture {
            ztunnel,
            app,
            _echoes: echoes,
            daemon,
            client,
            server,
            plain,
            ztunnel_cgroup,
            node,
        }
    }
}

/// A [`ThreePods`] node with the daemon and what [`FixtureBuilder`] asked
/// for running on it. Field order is drop order: the probes, then the
/// daemon, then the node.
pub struct Fixture {
    ztunnel: Option<Background>,
    app: Option<Background>,
    _echoes: Vec<Background>,
    pub daemon: Daemon,
    pub client: Pod,
    pub server: Pod,
    pub plain: Pod,
    pub ztunnel_cgroup: PathBuf,
    pub node: Node,
}

impl Fixture {
    /// A [`three_pods`] node, built now, to run what the builder is told.
    pub fn three_pods() -> FixtureBuilder {
        FixtureBuilder {
            pods: three_pods(),
            zds_serve: false,
            app: false,
            echoes: Vec::new(),
            ztunnel: None,
            wait_enrolled: false,
            capabilities: None,
        }
    }

    /// The ztunnel stand-in.
    pub fn ztunnel(&self) -> &Background {
        self.ztunnel
            .as_ref()
            .expect("the fixture was built without .ztunnel()")
    }

    /// The application: the echo server on the server's `[::]:8080`.
    pub fn app(&self) -> &Background {
        self.app
            .as_ref()
            .expect("the fixture was built without .app()")
    }
}
