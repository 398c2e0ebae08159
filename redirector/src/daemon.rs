//! `ambridge run`: install the datapath, then keep the maps equal to the
//! node state its sources describe (the workloads file, Kubernetes,
//! istiod's workload discovery, pushes through the local API), on every
//! change and on a periodic resync (which also picks up pod cgroups created
//! after a source named them).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    api, cgroup,
    cni::source as cni,
    datapath::{Datapath, Pins},
    enroll,
    netns::{AddressCache, CookieCache, NetnsAt},
    reconcile::{self, Resolve, Unresolved},
    state::{CgroupRef, Mode, NodeSpec, PodCgroup, PodSpec, Settings, ZtunnelSpec},
    supervise::{Backoff, Component, Health, Policy, supervise},
    types::{CgroupId, NetnsCookie, PodUid},
    workloads, xds, zds,
};

/// How long a daemon replacing a running datapath with new maps waits for
/// ztunnel's snapshot before attaching anyway.
const ZDS_SNAPSHOT_WAIT: Duration = Duration::from_secs(30);

/// Settings of `ambridge run`.
#[derive(Clone, Debug)]
pub struct Options {
    pub cgroup_root: PathBuf,
    /// Where the kubelet's `kubepods` cgroups live (for pods named only by
    /// UID).
    pub kubepods_parent: PathBuf,
    pub pins: Pins,
    pub workloads: PathBuf,
    pub settings: Settings,
    pub resync: Duration,
    /// Where the local API listens.
    pub api_socket: PathBuf,
    /// Whether the workloads file is a source.
    pub file_source: bool,
    /// The Kubernetes source, if any.
    pub kubernetes: Option<KubernetesSource>,
    /// istiod's workload discovery, if any: the pods' membership, or a
    /// cross-check of Kubernetes's when both are sources.
    pub xds: Option<xds::XdsSource>,
    /// Where to serve ZDS to ztunnel (`--zds serve`); `None`: istio-cni
    /// does.
    pub zds_socket: Option<PathBuf>,
    /// The node's own network namespace, whose addresses are exempt from
    /// inbound capture (kubelet probes); `None`: no node address is.
    pub node_netns: Option<PathBuf>,
}

/// Where and how to watch Kubernetes.
#[derive(Clone, Debug)]
pub struct KubernetesSource {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The API server URL; `None`: kubeconfig or the in-cluster config.
    pub api_url: Option<String>,
    pub mesh: crate::membership::MeshSettings,
}

async fn kube_client(source: &KubernetesSource) -> anyhow::Result<kube::Client> {
    let config = match &source.api_url {
        Some(url) => kube::Config::new(url.parse().with_context(|| format!("--kube-api {url}"))?),
        None => kube::Config::infer()
            .await
            .context("finding a Kubernetes config (kubeconfig or in-cluster)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// How the sources are named in logs.
const FILE_SOURCE: &str = "workloads file";
const KUBERNETES_SOURCE: &str = "Kubernetes";
const XDS_SOURCE: &str = "istiod";

/// The supervised component of a source named in logs as `source`.
fn source_component(source: &str) -> Component {
    match source {
        FILE_SOURCE => Component::WorkloadsFile,
        KUBERNETES_SOURCE => Component::Kubernetes,
        _ => Component::Istiod,
    }
}

/// Runs until SIGTERM or SIGINT. The datapath stays installed afterwards.
/// Only a datapath that cannot be loaded or attached, or pins that cannot
/// be taken, end it: every other part is supervised, and retried with
/// backoff when it fails (see [`crate::supervise`]).
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let pins = opts.pins.clone();
    let _owner = tokio::task::spawn_blocking(move || {
        pins.own(|| {
            warn!(pins = %pins.root().display(), "another daemon holds these pins; waiting for it to exit");
        })
    })
    .await
    .context("waiting for the pins")??;
    let mut datapath = Datapath::load(&opts.pins)?;
    // The flags alone set the redirect port; a node state adds the rest.
    datapath.set_node_config(enroll::node_config(None, &opts.settings))?;
    // Maps of a new layout start empty: the programs attach once the first
    // node state is in them.
    let mut attached = false;
    // Replacing a running datapath with new maps in replacement mode: the
    // new maps learn which pods ztunnel has only from its snapshot, so the
    // old programs keep serving until then (or for at most
    // `ZDS_SNAPSHOT_WAIT`).
    let await_zds = datapath.needs_state_before_attach()
        && datapath.replaces_running()
        && opts.zds_socket.is_some();
    let loaded_at = std::time::Instant::now();
    let health = Health::default();
    if !datapath.needs_state_before_attach() {
        datapath.attach(&opts.cgroup_root, &opts.pins)?;
        attached = true;
        health.set_attached();
    }
    let (tx, mut changed) = mpsc::channel(1);
    let _watcher = if opts.file_source {
        Some(watch(&opts.workloads, tx)?)
    } else {
        None
    };
    // The Kubernetes feed publishes snapshots; without it the sender just
    // stays here, silent.
    let (kube_tx, mut kube_rx) = tokio::sync::watch::channel(None);
    let mut annotator = None;
    let _idle_kube_sender = match &opts.kubernetes {
        Some(source) => {
            let client = kube_client(source).await?;
            // Serving ZDS, ambridge is the node agent istiod listens to.
            if opts.zds_socket.is_some() {
                annotator = Some(Annotator {
                    client: client.clone(),
                    requested: BTreeMap::new(),
                });
            }
            info!(node = %source.node_name, "watching Kubernetes");
            let (node_name, mesh, health) = (
                source.node_name.clone(),
                source.mesh.clone(),
                health.clone(),
            );
            tokio::spawn(supervise(
                Component::Kubernetes,
                health.clone(),
                move || {
                    let run = crate::kubernetes::run(
                        client.clone(),
                        node_name.clone(),
                        mesh.clone(),
                        kube_tx.clone(),
                        health.clone(),
                    );
                    async move {
                        run.await;
                        Ok(())
                    }
                },
            ));
            None
        }
        None => Some(kube_tx),
    };
    let (xds_tx, mut xds_rx) = tokio::sync::watch::channel(None);
    let _idle_xds_sender = match &opts.xds {
        Some(source) => {
            info!(address = %source.address, node = %source.node_name, "following istiod's workload discovery");
            let (source, health) = (source.clone(), health.clone());
            tokio::spawn(supervise(Component::Istiod, health.clone(), move || {
                let run = xds::run(source.clone(), xds_tx.clone(), health.clone());
                async move {
                    run.await;
                    Ok(())
                }
            }));
            None
        }
        None => Some(xds_tx),
    };
    // ZDS: the pods to hand ztunnel go out, the pods it acknowledged come
    // back.
    let (zds_pods, zds_pods_rx) = tokio::sync::watch::channel(zds::server::Pods::new());
    let (zds_pods_complete, zds_pods_complete_rx) = tokio::sync::watch::channel(false);
    let (zds_ztunnels, zds_ztunnels_rx) = tokio::sync::watch::channel(None);
    let (zds_ready_tx, mut zds_ready) =
        tokio::sync::watch::channel(zds::server::Acknowledged::default());
    let zds_stats = opts
        .zds_socket
        .as_ref()
        .map(|_| std::sync::Arc::new(zds::server::Stats::default()));
    let _idle_zds_sender = match (&opts.zds_socket, &zds_stats) {
        (Some(path), Some(stats)) => {
            let links = zds::server::Links {
                pods: zds_pods_rx,
                pods_complete: zds_pods_complete_rx,
                ztunnels: zds_ztunnels_rx,
                ready: zds_ready_tx,
                stats: stats.clone(),
            };
            let cgroup2 = cgroup::cgroup2_mount()
                .context("finding the cgroup2 mount, where ZDS peers' cgroups are looked up")?;
            let server = zds::server::Server::new(links, cgroup2, health.clone());
            // Listening before the daemon says it is ready when it can; if
            // it cannot (its directory missing, say), the supervisor
            // retries.
            let mut first = zds::server::listen(path)
                .inspect_err(|e| warn!("listening for ZDS, retrying: {e}"))
                .ok();
            let path = path.clone();
            tokio::spawn(supervise(Component::ZdsServer, health.clone(), move || {
                let (server, path, listener) = (server.clone(), path.clone(), first.take());
                async move {
                    let listener = match listener {
                        Some(listener) => listener,
                        None => zds::server::listen(&path)?,
                    };
                    Ok(server.serve(listener).await?)
                }
            }));
            None
        }
        _ => Some(zds_ready_tx),
    };
    let view = api::SharedView::default();
    let (push, mut pushes) = mpsc::channel(64);
    let (cni_calls, mut cni_rx) = mpsc::channel(64);
    let (changes, _) = tokio::sync::broadcast::channel(1024);
    {
        let reports = api::Reports {
            zds: zds_stats,
            health: health.clone(),
        };
        let (socket, view, changes) = (opts.api_socket.clone(), view.clone(), changes.clone());
        let (settings, cgroup_root, pins) = (
            opts.settings.clone(),
            opts.cgroup_root.clone(),
            opts.pins.clone(),
        );
        // Bound before the daemon says it is ready when it can be.
        let mut first = api::bind(&socket)
            .inspect_err(|e| warn!("binding the API socket, retrying: {e:#}"))
            .ok();
        tokio::spawn(supervise(Component::Api, health.clone(), move || {
            let listener = first.take();
            let serve = (
                socket.clone(),
                view.clone(),
                api::Channels {
                    push: push.clone(),
                    cni: cni_calls.clone(),
                    changes: changes.clone(),
                },
                settings.clone(),
                cgroup_root.clone(),
                pins.clone(),
                reports.clone(),
            );
            async move {
                let (socket, view, channels, settings, cgroup_root, pins, reports) = serve;
                let listener = match listener {
                    Some(listener) => listener,
                    None => api::bind(&socket)?,
                };
                api::serve(
                    listener,
                    view,
                    channels,
                    settings,
                    cgroup_root,
                    pins,
                    reports,
                )
                .await
            }
        }));
    }
    let mut node = Node {
        kube: None,
        kube_is_source: opts.kubernetes.is_some(),
        xds: None,
        disagreements: BTreeSet::new(),
        addresses: AddressCache::default(),
        annotator,
        zds: match &opts.zds_socket {
            Some(_) => Some(ZdsState {
                acked: zds::server::Acknowledged::default(),
                pinned: Some(datapath.cgroup_entries()?),
                inherited: BTreeSet::new(),
                pods: zds_pods,
                pods_complete: zds_pods_complete,
                ztunnels: zds_ztunnels,
            }),
            None => None,
        },
        spec: None,
        unsynced: [
            (opts.file_source, FILE_SOURCE),
            (opts.kubernetes.is_some(), KUBERNETES_SOURCE),
            (opts.xds.is_some(), XDS_SOURCE),
        ]
        .into_iter()
        .filter_map(|(configured, name)| configured.then_some(name))
        .collect(),
        rejected: None,
        pushed_pods: BTreeMap::new(),
        pushed_ztunnels: BTreeMap::new(),
        sandboxes: cni::Sandboxes::default(),
        cni_waiters: Vec::new(),
        placed: Vec::new(),
        unresolved: Vec::new(),
        cookies: CookieCache::default(),
        node_netns: opts.node_netns.clone(),
        node_addresses: Vec::new(),
        view,
        changes,
        apply: ApplyRetry::new(health.clone()),
    };
    if node.unsynced.is_empty() {
        health.set_sources_synced();
    }
    for source in &node.unsynced {
        health.register(source_component(source));
    }
    node.refresh_node_addresses();
    if opts.file_source {
        node.load(&opts.workloads);
    }
    node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
    let ready_to_attach = |node: &Node| {
        node.has_state()
            && (!await_zds
                || node.zds.as_ref().is_some_and(|z| z.acked.snapshot_taken)
                || loaded_at.elapsed() > ZDS_SNAPSHOT_WAIT)
    };
    if !attached {
        if ready_to_attach(&node) {
            datapath.attach(&opts.cgroup_root, &opts.pins)?;
            attached = true;
            health.set_attached();
        } else {
            info!(
                await_zds,
                "new map layout: the programs attach once the node state is in the new maps"
            );
        }
    }
    info!(workloads = %opts.workloads.display(), "ready");

    let pod_parents = api::pod_parents(&opts.cgroup_root, &opts.kubepods_parent);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut resync = tokio::time::interval(opts.resync);
    resync.reset();
    loop {
        tokio::select! {
            Some(()) = changed.recv() => {
                // Editors write in several steps; let them finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changed.try_recv().is_ok() {}
                if node.load(&opts.workloads) {
                    node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
                }
            }
            Ok(()) = kube_rx.changed() => {
                node.kube = kube_rx.borrow_and_update().clone();
                if node.kube.is_some() {
                    node.synced(KUBERNETES_SOURCE);
                }
                node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
            }
            Ok(()) = zds_ready.changed() => {
                let ready = zds_ready.borrow_and_update().clone();
                if let Some(zds) = &mut node.zds {
                    zds.acked = ready;
                }
                node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
            }
            Ok(()) = xds_rx.changed() => {
                node.xds = xds_rx.borrow_and_update().clone();
                if node.xds.is_some() {
                    node.synced(XDS_SOURCE);
                }
                node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
            }
            Some(api::PushRequest { entry, reply }) = pushes.recv() => {
                let checked = api::refuse_containing(&entry, &node.placed, &pod_parents, &mut |path| {
                    cgroup::cgroup_id(path).ok()
                });
                match checked {
                    Ok(()) => {
                        info!(?entry, "pushed through the API");
                        node.apply_push(entry);
                        node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
                    }
                    Err(ref e) => {
                        warn!(?entry, "push through the API refused, nothing changed: {}", e.message());
                    }
                }
                // The caller may have gone; the push stands (or not) anyway.
                let _ = reply.send(checked);
            }
            Some(call) = cni_rx.recv() => {
                match call {
                    cni::Request::Add { uid, sandbox, deadline, reply } => {
                        info!(pod = %uid, namespace = %sandbox.namespace, name = %sandbox.name, netns = %sandbox.netns.display(), "CNI ADD");
                        node.sandboxes.add(uid.clone(), sandbox);
                        node.cni_waiters.push(cni::Waiter { uid, deadline, reply });
                        node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
                    }
                    cni::Request::Del { uid, container_id, reply } => {
                        if node.sandboxes.delete(&uid, &container_id) {
                            info!(pod = %uid, container = %container_id, "CNI DEL");
                            node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
                        }
                        let _ = reply.send(());
                    }
                    cni::Request::Check { uid, reply } => {
                        let _ = reply.send(node.cni_verdict(&uid, attached).response());
                    }
                }
            }
            _ = sleep_until(node.cni_waiters.iter().map(|w| w.deadline).min()) => {}
            _ = resync.tick() => {
                node.refresh_node_addresses();
                // A failed apply is tried again on its backoff, not at
                // every resync.
                if node.apply.at.is_none() {
                    node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
                }
            }
            _ = sleep_until(node.apply.at) => {
                node.reconcile(&mut datapath, &opts.settings, &opts.kubepods_parent);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if !attached && ready_to_attach(&node) {
            datapath.attach(&opts.cgroup_root, &opts.pins)?;
            attached = true;
            health.set_attached();
        }
        node.answer_cni(attached);
    }
    info!("stopping; the datapath stays installed (`ambridge uninstall` removes it)");
    Ok(())
}

/// The daemon's view of the node: the last good spec, what it last
/// reported as unresolved (so a persisting problem is logged once), and the
/// netns cookies it has already looked up.
struct Node {
    /// The workloads file's last good state.
    spec: Option<NodeSpec>,
    /// The configured sources that have not delivered a state since the
    /// daemon started: nothing is deleted on their behalf meanwhile (their
    /// pods are simply not known yet), and the pinned state carries them.
    unsynced: BTreeSet<&'static str>,
    /// Why the workloads file was last rejected and which version of it
    /// (modification time), while it still is: a bad file is logged once
    /// per change, not at every look.
    rejected: Option<(String, Option<std::time::SystemTime>)>,
    /// The Kubernetes feed's last snapshot.
    kube: Option<crate::kubernetes::Snapshot>,
    /// Whether Kubernetes is a source: istiod's view is then only a
    /// cross-check.
    kube_is_source: bool,
    /// istiod's last view of this node's workloads.
    xds: Option<xds::Snapshot>,
    /// Where Kubernetes and istiod disagree, as last logged.
    disagreements: BTreeSet<String>,
    addresses: AddressCache,
    /// With `--zds serve`: which pods ztunnel has.
    zds: Option<ZdsState>,
    /// With `--zds serve` and Kubernetes: writes each pod's redirection
    /// annotation.
    annotator: Option<Annotator>,
    /// Entries pushed through the API.
    pushed_pods: BTreeMap<PodUid, PodSpec>,
    /// Pushed ztunnel cgroups, with their zero-copy flag.
    pushed_ztunnels: BTreeMap<PathBuf, bool>,
    /// The pod sandboxes the CNI plugin reported.
    sandboxes: cni::Sandboxes,
    /// CNI ADDs waiting for their pod to be in the datapath.
    cni_waiters: Vec<cni::Waiter>,
    /// The pods of the last reconcile on their cgroups, which a pushed
    /// cgroup must not contain.
    placed: Vec<api::PlacedPod>,
    unresolved: Vec<Unresolved>,
    cookies: CookieCache,
    /// Where the node's own addresses are read (`--node-netns`).
    node_netns: Option<PathBuf>,
    /// The node's own addresses, as last read (every resync: they may
    /// change, as with DHCP).
    node_addresses: Vec<IpAddr>,
    view: api::SharedView,
    changes: tokio::sync::broadcast::Sender<api::pb::Change>,
    /// When a failed datapath apply is tried again.
    apply: ApplyRetry,
}

/// The datapath apply's supervision: a failed apply (a full or failing
/// map) leaves what the maps hold in force and is tried again with
/// backoff, until one succeeds.
struct ApplyRetry {
    health: Health,
    backoff: Backoff,
    /// When to try again; `None` while the last apply succeeded.
    at: Option<tokio::time::Instant>,
    /// Since when applies have succeeded.
    healthy_since: Option<std::time::Instant>,
}

impl ApplyRetry {
    fn new(health: Health) -> Self {
        health.register(Component::Datapath);
        Self {
            health,
            backoff: Backoff::new(Policy::TASKS),
            at: None,
            healthy_since: None,
        }
    }

    fn succeeded(&mut self) {
        self.at = None;
        self.healthy_since
            .get_or_insert_with(std::time::Instant::now);
        self.health.running(Component::Datapath);
    }

    fn failed(&mut self, e: &anyhow::Error) {
        let healthy_for = self
            .healthy_since
            .take()
            .map_or(Duration::ZERO, |since| since.elapsed());
        let wait = self.backoff.failed(healthy_for);
        error!(
            retry_in_ms = wait.as_millis() as u64,
            "applying the node state to the datapath failed, keeping what the maps hold and retrying: {e:#}"
        );
        self.at = Some(tokio::time::Instant::now() + wait);
        self.health.failed(Component::Datapath, format!("{e:#}"));
    }
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The daemon's side of ZDS.
struct ZdsState {
    /// The pods ztunnel acknowledged, and whether a snapshot has ended
    /// since this daemon started (before, ztunnel may serve more).
    acked: zds::server::Acknowledged,
    /// The cgroup entries pinned when the daemon started, until ztunnel's
    /// first snapshot: each reconcile meanwhile adds the pods they show
    /// acknowledged to `inherited`.
    pinned: Option<BTreeMap<CgroupId, ambridge_common::CgroupInfo>>,
    /// Pods an earlier daemon had seen acknowledged (pinned enrolled and
    /// not held). ztunnel keeps serving them across a restart of ours, so
    /// they stay unheld until its next snapshot says otherwise.
    inherited: BTreeSet<PodUid>,
    /// Where the pods to hand ztunnel are published.
    pods: tokio::sync::watch::Sender<zds::server::Pods>,
    /// Whether the published pods are every source's (each has delivered
    /// since the daemon started): until then a ztunnel's snapshot stays
    /// open, so it drops none of the pods an unsynced source may hold.
    pods_complete: tokio::sync::watch::Sender<bool>,
    /// Where the ztunnel cgroups, the only ones allowed to speak ZDS, are
    /// published.
    ztunnels: tokio::sync::watch::Sender<zds::server::ZtunnelCgroups>,
}

impl ZdsState {
    /// The pods ztunnel serves: until its snapshot has ended, those this
    /// daemon handed over and those an earlier daemon had.
    fn ready(&self) -> BTreeSet<PodUid> {
        if self.acked.snapshot_taken {
            self.acked.pods.clone()
        } else {
            self.acked.pods.union(&self.inherited).cloned().collect()
        }
    }
}

/// Writes `ambient.istio.io/redirection` on pods, as istio-cni does.
struct Annotator {
    client: kube::Client,
    /// The last value asked for, by pod, and when: asked again only when it
    /// changes, or when the pod still does not show it 10 s later (a
    /// failed patch).
    requested: BTreeMap<PodUid, (Option<&'static str>, std::time::Instant)>,
}

impl Annotator {
    const RETRY: Duration = Duration::from_secs(10);

    fn update(&mut self, kube: &crate::kubernetes::Snapshot, ready: &BTreeSet<PodUid>) {
        for patch in crate::kubernetes::redirection_patches(kube, ready) {
            if self
                .requested
                .get(&patch.uid)
                .is_some_and(|(value, at)| *value == patch.value && at.elapsed() < Self::RETRY)
            {
                continue;
            }
            self.requested
                .insert(patch.uid.clone(), (patch.value, std::time::Instant::now()));
            let client = self.client.clone();
            tokio::spawn(async move {
                match crate::kubernetes::patch_redirection(client, &patch).await {
                    Ok(()) => {
                        info!(pod = %patch.uid, namespace = %patch.namespace, name = %patch.name, value = ?patch.value, "redirection annotation written")
                    }
                    Err(e) => {
                        warn!(pod = %patch.uid, namespace = %patch.namespace, name = %patch.name, "writing the redirection annotation failed, retrying: {e}")
                    }
                }
            });
        }
        let listed: BTreeSet<&PodUid> = kube.pods.iter().map(|p| &p.uid).collect();
        self.requested.retain(|uid, _| listed.contains(uid));
    }
}

/// Resolves against the live system: cgroupfs and the pods' processes.
struct SystemResolver<'a> {
    kubepods_parent: &'a Path,
    node_addresses: &'a [IpAddr],
    cookies: &'a mut CookieCache,
    addresses: &'a mut AddressCache,
    /// Pod cgroups by the addresses of their netns, listed at the first
    /// lookup of a reconcile.
    by_address: Option<crate::netns::AddressIndex>,
    /// Where the last reconcile placed each pod: a pod found by address
    /// stays there while another cgroup claims its address.
    placed_before: &'a [api::PlacedPod],
}

impl SystemResolver<'_> {
    fn address_index(&mut self) -> std::io::Result<&crate::netns::AddressIndex> {
        if self.by_address.is_none() {
            let mut index = crate::netns::AddressIndex::new();
            for (_, pod_cgroup) in cgroup::list_pod_cgroups(self.kubepods_parent)? {
                // A pod without processes (or just gone) has no netns to
                // look at; it is found at a later reconcile.
                if let Ok(Some(ips)) = self.addresses.of(NetnsAt::SandboxOf(&pod_cgroup)) {
                    for ip in ips {
                        index.entry(ip).or_default().insert(pod_cgroup.clone());
                    }
                }
            }
            self.by_address = Some(index);
        }
        Ok(self.by_address.as_ref().expect("filled above"))
    }
}

impl Resolve for SystemResolver<'_> {
    fn pod_cgroup(&mut self, uid: &PodUid) -> std::io::Result<PathBuf> {
        cgroup::find_pod_cgroup(self.kubepods_parent, &uid.0)
    }

    fn pod_cgroup_by_address(
        &mut self,
        uid: &PodUid,
        ips: &[IpAddr],
    ) -> std::io::Result<crate::netns::Claim> {
        let before = self
            .placed_before
            .iter()
            .find(|p| &p.uid == uid)
            .map(|p| p.cgroup.clone());
        crate::netns::claimant(self.address_index()?, ips, before.as_deref())
    }

    fn cgroup_id(&mut self, cgroup: &Path) -> std::io::Result<CgroupId> {
        cgroup::cgroup_id(cgroup)
    }

    fn netns_cookie(&mut self, at: NetnsAt) -> std::io::Result<Option<NetnsCookie>> {
        Ok(self.cookies.of(at)?.map(NetnsCookie))
    }

    fn netns_addresses(&mut self, at: NetnsAt) -> std::io::Result<Option<Vec<IpAddr>>> {
        self.addresses.of(at)
    }

    fn node_addresses(&mut self) -> Vec<IpAddr> {
        self.node_addresses.to_vec()
    }
}

impl Node {
    /// Re-reads the node's own addresses; on failure the last ones stay.
    fn refresh_node_addresses(&mut self) {
        let Some(path) = &self.node_netns else {
            return;
        };
        match crate::netns::addresses(path) {
            Ok(ips) => {
                if ips != self.node_addresses {
                    info!(netns = %path.display(), addresses = ?ips, "node addresses (exempt from inbound capture)");
                    self.node_addresses = ips;
                }
            }
            Err(e) => {
                warn!(netns = %path.display(), "reading the node's addresses, keeping the last ones: {e}")
            }
        }
    }

    fn apply_push(&mut self, entry: api::Pushed) {
        match entry {
            api::Pushed::Pod(pod) => {
                self.pushed_pods.insert(pod.uid.clone(), pod);
            }
            api::Pushed::RemovePod(uid) => {
                self.pushed_pods.remove(&uid);
            }
            api::Pushed::Ztunnel { cgroup, zero_copy } => {
                self.pushed_ztunnels.insert(cgroup, zero_copy);
            }
            api::Pushed::RemoveZtunnel(cgroup) => {
                self.pushed_ztunnels.remove(&cgroup);
            }
        }
    }

    /// Whether some source has delivered a node state.
    fn has_state(&self) -> bool {
        self.spec.is_some()
            || self.kube.is_some()
            || self.xds.is_some()
            || !self.pushed_pods.is_empty()
            || !self.pushed_ztunnels.is_empty()
    }

    /// The node state from every source, later ones replacing pods of the
    /// same UID: the file, then Kubernetes (or istiod's workloads when
    /// Kubernetes is not a source), then pushes. `None` until some source
    /// has delivered.
    fn merged(&self) -> Option<NodeSpec> {
        if !self.has_state() {
            return None;
        }
        let mut spec = self.spec.clone().unwrap_or_default();
        if let Some(kube) = &self.kube {
            overlay(&mut spec.pods, kube.pods.iter().cloned());
            spec.ztunnels
                .extend(kube.ztunnels.iter().map(|uid| ZtunnelSpec {
                    cgroup: CgroupRef::Pod(uid.clone()),
                    zero_copy: false,
                }));
        }
        if let Some(xds) = self.xds.as_ref().filter(|_| !self.kube_is_source) {
            overlay(
                &mut spec.pods,
                xds.workloads.iter().map(|w| PodSpec {
                    uid: PodUid(w.uid.clone()),
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    cgroup: PodCgroup::Address,
                    netns: None,
                    ips: w.ips.clone(),
                    mode: if w.captured {
                        Mode::Ambient
                    } else {
                        Mode::None
                    },
                    accelerate: None,
                    capture: Default::default(),
                }),
            );
        }
        overlay(&mut spec.pods, self.pushed_pods.values().cloned());
        // The plugin knows a new sandbox's namespace before any process runs
        // in it, and its addresses before the API publishes them.
        for pod in &mut spec.pods {
            if let Some(sandbox) = self.sandboxes.get(&pod.uid) {
                pod.netns = Some(sandbox.netns.clone());
                if pod.ips.is_empty() {
                    pod.ips = sandbox.ips.clone();
                }
            }
        }
        // ZDS gates the in-pod model only; a shared ztunnel takes no pods.
        if spec.redirect.is_none() {
            spec.ready = self.zds.as_ref().map(ZdsState::ready);
        }
        for (path, zero_copy) in &self.pushed_ztunnels {
            let cgroup = CgroupRef::Path(path.clone());
            if !spec.ztunnels.iter().any(|f| f.cgroup == cgroup) {
                spec.ztunnels.push(ZtunnelSpec {
                    cgroup,
                    zero_copy: *zero_copy,
                });
            }
        }
        Some(spec)
    }

    /// Re-reads the workloads file; returns whether the spec changed. A bad
    /// file is logged and the last good spec stays in force.
    fn load(&mut self, path: &Path) -> bool {
        match workloads::load(path) {
            Ok(spec) => {
                self.rejected = None;
                self.synced(FILE_SOURCE);
                self.apply.health.running(Component::WorkloadsFile);
                if self.spec.as_ref() == Some(&spec) {
                    return false;
                }
                info!(
                    pods = spec.pods.len(),
                    ztunnels = spec.ztunnels.len(),
                    "workloads file loaded"
                );
                self.spec = Some(spec);
                true
            }
            Err(e) => {
                // The same error of the same file version is reported once.
                let version = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                let why = (e.to_string(), version);
                if self.rejected.as_ref() != Some(&why) {
                    error!(file = %path.display(), "workloads file rejected, keeping the last good state: {e}");
                    self.apply
                        .health
                        .failed(Component::WorkloadsFile, format!("{}: {e}", path.display()));
                    self.rejected = Some(why);
                }
                false
            }
        }
    }

    /// Where `uid` stands for a CNI ADD, as of the last reconcile.
    fn cni_verdict(&self, uid: &PodUid, attached: bool) -> cni::Verdict {
        if !attached {
            return cni::Verdict::Waiting("the programs are not attached yet".into());
        }
        // The view shows what the last reconcile wanted, which a failed
        // apply did not write.
        if self.apply.at.is_some() {
            return cni::Verdict::Waiting(
                "the last datapath apply failed and is being retried".into(),
            );
        }
        let view = self.view.read().expect("view lock");
        let ztunnels = self
            .kube
            .as_ref()
            .map(|k| k.ztunnels.iter().cloned().collect())
            .unwrap_or_default();
        cni::verdict(
            uid,
            &cni::Standing {
                pod: view.pods.iter().find(|p| p.uid == uid.0),
                ztunnels: &ztunnels,
                listed_by_kubernetes: self.kube_is_source.then(|| {
                    self.kube.as_ref().is_some_and(|k| {
                        k.pods.iter().any(|p| &p.uid == uid) || k.ztunnels.contains(uid)
                    })
                }),
            },
        )
    }

    /// Answers each waiting ADD whose pod is now in the datapath (or whose
    /// time is up).
    fn answer_cni(&mut self, attached: bool) {
        let now = tokio::time::Instant::now();
        let waiters = std::mem::take(&mut self.cni_waiters);
        self.cni_waiters = waiters
            .into_iter()
            .filter_map(|w| {
                let verdict = self.cni_verdict(&w.uid, attached);
                w.answer(verdict, now)
            })
            .collect();
    }

    /// Notes that `source` has delivered a state.
    fn synced(&mut self, source: &'static str) {
        if self.unsynced.remove(source) && self.unsynced.is_empty() {
            info!(source, "every source has delivered: removals resume");
            self.apply.health.set_sources_synced();
        }
    }

    /// With both Kubernetes and istiod as sources, logs each pod on which
    /// they start or stop disagreeing (Kubernetes decides).
    fn cross_check(&mut self) {
        let (Some(kube), Some(xds)) = (&self.kube, &self.xds) else {
            return;
        };
        let now = xds::disagreements(&kube.pods, &xds.workloads);
        for d in now.difference(&self.disagreements) {
            info!("Kubernetes and istiod disagree (Kubernetes decides): {d}");
        }
        for d in self.disagreements.difference(&now) {
            info!("Kubernetes and istiod agree again: {d}");
        }
        self.disagreements = now;
    }

    /// Brings the datapath to the merged node state; a failure is retried
    /// (see [`ApplyRetry`]).
    fn reconcile(&mut self, datapath: &mut Datapath, settings: &Settings, kubepods_parent: &Path) {
        match self.try_reconcile(datapath, settings, kubepods_parent) {
            Ok(()) => self.apply.succeeded(),
            Err(e) => self.apply.failed(&e),
        }
    }

    fn try_reconcile(
        &mut self,
        datapath: &mut Datapath,
        settings: &Settings,
        kubepods_parent: &Path,
    ) -> anyhow::Result<()> {
        // Until some source has delivered a state, whatever is pinned stays.
        let Some(mut spec) = self.merged() else {
            return Ok(());
        };
        self.cross_check();
        let started = std::time::Instant::now();
        let mut resolver = SystemResolver {
            kubepods_parent,
            node_addresses: &self.node_addresses,
            cookies: &mut self.cookies,
            addresses: &mut self.addresses,
            by_address: None,
            placed_before: &self.placed,
        };
        let mut desired = reconcile::desired(&spec, settings, &mut resolver);
        // Each reconcile until ztunnel's snapshot learns which of its pods
        // an earlier daemon had seen acknowledged, before any is held: those
        // of a source that delivers late too.
        if let Some(zds) = self.zds.as_mut() {
            if zds.acked.snapshot_taken {
                zds.pinned = None;
            }
            let learned = zds.pinned.as_ref().map_or_else(BTreeSet::new, |pinned| {
                reconcile::acknowledged_before(&desired, pinned)
            });
            let new: Vec<PodUid> = learned.difference(&zds.inherited).cloned().collect();
            if !new.is_empty() {
                zds.inherited.extend(new.iter().cloned());
                if spec.ready.is_some() {
                    info!(
                        pods = new.len(),
                        "pods ztunnel acknowledged before this daemon started stay unheld until its next snapshot"
                    );
                    spec.ready = Some(zds.ready());
                    desired = reconcile::desired(&spec, settings, &mut resolver);
                }
            }
        }
        // Every pod was looked at: namespaces not asked for are gone (after
        // the inbound links, which attach to the namespaces the pass held).
        if desired.unresolved != self.unresolved {
            // Name the first few; a node starting many pods at once would
            // otherwise log one line per pod.
            const NAMED: usize = 10;
            for u in desired.unresolved.iter().take(NAMED) {
                warn!(owner = %u.owner, cgroup = %u.cgroup.display(), "not (fully) in the datapath, retrying: {}", u.error);
            }
            if desired.unresolved.len() > NAMED {
                warn!(
                    more = desired.unresolved.len() - NAMED,
                    "more workloads not in the datapath yet, retrying"
                );
            }
            self.unresolved = desired.unresolved.clone();
        }
        self.placed = spec
            .pods
            .iter()
            .filter_map(|pod| {
                let (cgroup, _) = desired.placed.get(&pod.uid)?;
                Some(api::PlacedPod {
                    uid: pod.uid.clone(),
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    cgroup: cgroup.clone(),
                })
            })
            .collect();
        if !self.unsynced.is_empty() {
            reconcile::retain_current(
                &mut desired,
                reconcile::Current {
                    cgroups: datapath.cgroup_entries()?,
                    netns: datapath.netns_entries()?,
                    inbound: datapath.inbound_entries()?,
                    inbound_netns: datapath.netns_links().clone(),
                },
            );
        }
        let view = api::view(&spec, &desired);
        let changes = api::changes(&self.view.read().expect("view lock"), &view);
        *self.view.write().expect("view lock") = view;
        for change in changes {
            // No watcher is not an error.
            let _ = self.changes.send(change);
        }
        let cgroup_ops = reconcile::diff(&datapath.cgroup_entries()?, &desired.cgroups);
        let netns_ops = reconcile::diff(&datapath.netns_entries()?, &desired.netns);
        // Namespaces first: a pod's binds are judged against its netns entry
        // as soon as its cgroup entry makes it known.
        datapath.apply_netns(&netns_ops)?;
        // Before the cgroups: a newly enrolled pod's first connect may ask
        // getpeername at once.
        if datapath.set_node_config(desired.node)? {
            info!(config = ?desired.node, "node settings written");
        }
        datapath.apply_cgroups(&cgroup_ops)?;
        let inbound_changes = self.apply_inbound(datapath, &desired)?;
        self.cookies.retain_seen();
        self.addresses.retain_seen();
        // After the maps: a pod leaving the mesh is handed its Del only once
        // its redirect entries are gone.
        if let Some(zds) = &self.zds {
            let ztunnels = Some(desired.ztunnel_cgroups.clone());
            zds.ztunnels.send_if_modified(|current| {
                let changed = *current != ztunnels;
                *current = ztunnels;
                changed
            });
            let mut want = zds_pods(&spec, &desired);
            if !self.unsynced.is_empty() {
                // ztunnel keeps the pods an unsynced source may still hold.
                for (uid, pod) in zds.pods.borrow().iter() {
                    want.entry(uid.clone()).or_insert_with(|| pod.clone());
                }
            }
            zds.pods.send_if_modified(|current| {
                let changed = *current != want;
                *current = want;
                changed
            });
            // After the pods: a snapshot ends with them all.
            zds.pods_complete.send_if_modified(|complete| {
                let now = self.unsynced.is_empty();
                let changed = *complete != now;
                *complete = now;
                changed
            });
            if let (Some(annotator), Some(kube)) = (&mut self.annotator, &self.kube) {
                annotator.update(kube, &zds.ready());
            }
        }
        if !cgroup_ops.is_empty() || !netns_ops.is_empty() || inbound_changes > 0 {
            info!(
                cgroup_changes = cgroup_ops.len(),
                netns_changes = netns_ops.len(),
                inbound_changes,
                cgroups = desired.cgroups.len(),
                netns = desired.netns.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reconciled"
            );
        }
        Ok(())
    }
}

impl Node {
    /// Brings inbound capture to `desired`: exempt sources first (so a
    /// probe is never refused on the way), then each new address's entry
    /// before its netns's link, and a leaving netns's link before its
    /// entries go. Returns how many changes were made.
    fn apply_inbound(
        &mut self,
        datapath: &mut Datapath,
        desired: &reconcile::Desired,
    ) -> anyhow::Result<usize> {
        let exempt_ops = reconcile::diff(&datapath.exempt_entries()?, &desired.exempt);
        datapath.apply_exempt(&exempt_ops)?;
        let (deletes, puts): (Vec<_>, Vec<_>) =
            reconcile::diff(&datapath.inbound_entries()?, &desired.inbound)
                .into_iter()
                .partition(|op| matches!(op, reconcile::Op::Delete(_)));
        datapath.apply_inbound(&puts)?;
        let attached = datapath.netns_links().clone();
        let mut changes = exempt_ops.len() + puts.len() + deletes.len();
        for cookie in desired.inbound_netns.difference(&attached) {
            let Some(ns) = self.cookies.namespace(cookie.0) else {
                continue;
            };
            match datapath.attach_inbound(*cookie, std::os::fd::AsFd::as_fd(ns)) {
                Ok(()) => changes += 1,
                // One pod's namespace failing must not stall the node: it
                // is retried at the next reconcile.
                Err(e) => warn!(netns = %cookie, "attaching inbound capture, retrying: {e}"),
            }
        }
        for cookie in attached.difference(&desired.inbound_netns) {
            datapath.detach_inbound(*cookie)?;
            changes += 1;
        }
        datapath.apply_inbound(&deletes)?;
        Ok(changes)
    }
}

/// Adds `later` to `pods`, each replacing the pod of the same UID.
fn overlay(pods: &mut Vec<PodSpec>, later: impl Iterator<Item = PodSpec>) {
    let later: Vec<PodSpec> = later.collect();
    let uids: BTreeSet<&PodUid> = later.iter().map(|p| &p.uid).collect();
    pods.retain(|p| !uids.contains(&p.uid));
    pods.extend(later);
}

/// The pods to hand ztunnel over ZDS: enrolled pods of the in-pod model
/// whose cgroups are known.
fn zds_pods(spec: &NodeSpec, desired: &reconcile::Desired) -> zds::server::Pods {
    if spec.redirect.is_some() {
        return zds::server::Pods::new();
    }
    spec.pods
        .iter()
        .filter(|p| p.mode == Mode::Ambient)
        .filter_map(|p| {
            let (cgroup, _) = desired.placed.get(&p.uid)?;
            Some((
                p.uid.clone(),
                zds::server::ZdsPod {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    cgroup: cgroup.clone(),
                    netns_file: p.netns.clone(),
                    netns: desired.pod_netns.get(&p.uid).copied(),
                },
            ))
        })
        .collect()
}

/// Watches the directory holding `file` (editors and ConfigMap mounts replace
/// files by rename) and signals `tx` when the file may have changed: a
/// write, create, rename or removal of the file itself or of a ConfigMap
/// mount's `..`-named entries. Reads (the daemon's own included) and other
/// files of the directory are not changes.
fn watch(file: &Path, tx: mpsc::Sender<()>) -> anyhow::Result<notify::RecommendedWatcher> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            return;
        };
        if changes_the_file(&event, name.as_deref()) {
            // A full channel already holds a pending reload.
            let _ = tx.try_send(());
        }
    })
    .context("creating the file watcher (inotify)")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

/// Whether a watch event in the file's directory may have changed the file
/// named `name`.
fn changes_the_file(event: &notify::Event, name: Option<&std::ffi::OsStr>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let kind = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    kind && event.paths.iter().any(|p| {
        let entry = p.file_name();
        entry == name || entry.is_some_and(|e| e.as_encoded_bytes().starts_with(b".."))
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};

    use super::changes_the_file;

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(path.into())
    }

    #[test]
    fn reading_the_file_is_not_a_change_but_writing_renaming_or_a_configmap_swap_is() {
        let name = Some(OsStr::new("workloads.yaml"));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let read_done = EventKind::Access(AccessKind::Close(AccessMode::Read));
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let renamed = EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::To));
        for (kind, path, change) in [
            (open, "/d/workloads.yaml", false),
            (read_done, "/d/workloads.yaml", false),
            (written, "/d/workloads.yaml", true),
            (renamed, "/d/workloads.yaml", true),
            (
                EventKind::Create(CreateKind::File),
                "/d/workloads.yaml",
                true,
            ),
            // Another file of the directory (the API socket, say).
            (EventKind::Create(CreateKind::File), "/d/api.sock", false),
            // A ConfigMap mount swaps its `..data` link.
            (renamed, "/d/..data", true),
        ] {
            assert_eq!(
                changes_the_file(&event(kind, path), name),
                change,
                "{kind:?} {path}"
            );
        }
    }
}
