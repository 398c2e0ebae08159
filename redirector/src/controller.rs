//! The one loop's state and step: the sources' last views and the observed
//! ZDS readiness in; the desired datapath computed ([`crate::node`]),
//! diffed against the kernel and applied ([`crate::datapath`]); then what
//! was reconciled published (the API's view and watch stream, the pods
//! handed to ztunnel over ZDS, the redirection annotation). Only the
//! controller calls the datapath; [`crate::daemon`] feeds it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ambridge_common::InboundTarget;
use tokio::sync::broadcast;
use tonic::Status;
use tracing::{error, info, warn};

use crate::{
    api::{self, pb},
    datapath::Datapath,
    host::{
        cgroup,
        netns::Pass,
        resolver::{HostCache, SystemResolver},
    },
    node::{
        desired::{self, DesiredMaps, Touched},
        merge,
        spec::{NodeSpec, PodCgroup, PodMap, PodSpec, Readiness, Settings, keep_shared},
    },
    publish::{Publish, Reconciled, annotator::Annotator, zds},
    sources::{
        cni, file, kubernetes,
        push::{self, PlacedPod, PodParent, Pushed},
        xds,
    },
    supervise::{Backoff, Component, Health, Policy},
    types::{CgroupId, NetnsCookie, PodUid, WorkloadId},
};

/// How many pods of a retry pass one reconcile looks at again (about 2 ms
/// of cgroupfs reads at 100); the rest wait for the next turns of the loop,
/// so a source's change waits at most that long behind a retry pass.
const RETRY_SLICE: usize = 100;

/// How the sources are named in logs.
pub const FILE_SOURCE: &str = "workloads file";
pub const KUBERNETES_SOURCE: &str = "Kubernetes";
pub const XDS_SOURCE: &str = "istiod";

/// The health component of a source named as in [`FILE_SOURCE`] and the
/// others.
fn source_component(source: &str) -> Component {
    match source {
        FILE_SOURCE => Component::WorkloadsFile,
        KUBERNETES_SOURCE => Component::Kubernetes,
        _ => Component::Istiod,
    }
}

/// What the controller is built from.
pub struct Config {
    pub settings: Settings,
    /// Where the kubelet's `kubepods` cgroups live.
    pub kubepods_parent: PathBuf,
    /// The directories a pushed cgroup must not be or contain.
    pub pod_parents: Vec<PodParent>,
    /// Which sources are configured: nothing is deleted on behalf of one
    /// until it has delivered.
    pub file_source: bool,
    pub kubernetes_source: bool,
    pub xds_source: bool,
    /// Where the node's own addresses are read (`--node-netns`).
    pub node_netns: Option<PathBuf>,
    /// How often everything is looked up on the live system again (and the
    /// kernel's maps read again), rather than taken as found before.
    pub full_resync: Duration,
    /// With `--zds serve`: where the pods for ztunnel are published.
    pub zds: Option<ZdsLinks>,
    /// With `--zds serve` and Kubernetes: the redirection annotation.
    pub annotator: Option<Annotator>,
    /// Where the API's view and its changes are published.
    pub view: api::SharedView,
    pub changes: broadcast::Sender<pb::Change>,
    /// What the reconciles add to the metrics.
    pub recorder: api::monitoring::Recorder,
    pub health: Health,
}

/// With `--zds serve`: what the controller starts from, and where it
/// publishes the pods for ztunnel.
pub struct ZdsLinks {
    /// The cgroup entries pinned when the daemon started.
    pub pinned: BTreeMap<CgroupId, ambridge_common::CgroupInfo>,
    pub publisher: zds::Publisher,
}

/// The node as the controller knows it: each source's last view, the
/// observed ZDS readiness, the caches of what it looked up, and where it
/// publishes.
pub struct Controller {
    settings: Settings,
    kubepods_parent: PathBuf,
    pod_parents: Vec<PodParent>,
    /// The workloads file's last good state, read again entry by entry.
    file: file::Loader,
    /// The configured sources that have not delivered a state since the
    /// daemon started: nothing is deleted on their behalf meanwhile (their
    /// pods are simply not known yet), and the pinned state carries them.
    unsynced: BTreeSet<&'static str>,
    /// Why the workloads file was last rejected and which version of it
    /// (modification time), while it still is: a bad file is logged once
    /// per change, not at every look.
    rejected: Option<(String, Option<std::time::SystemTime>)>,
    /// The Kubernetes feed's view, as its updates built it.
    kube: Option<kubernetes::Snapshot>,
    /// Whether Kubernetes is a source: istiod's view is then only a
    /// cross-check.
    kube_is_source: bool,
    /// istiod's last view of this node's workloads.
    xds: Option<xds::Snapshot>,
    /// Those workloads as pods, when istiod decides membership.
    istiod_pods: Option<PodMap>,
    /// The pods some input changed since the last reconcile.
    pending: Touched,
    /// The pods of the last retry pass not looked at again yet.
    retry_backlog: Vec<WorkloadId>,
    /// Where Kubernetes and istiod disagree, as last logged.
    disagreements: BTreeSet<String>,
    /// What the passes found on the live system.
    host: HostCache,
    /// What the next reconcile looks up again on the live system (a full
    /// pass also reads the kernel's maps again); a reconcile a source's
    /// change starts takes what was found before but for its changed pods.
    pass_due: Pass,
    /// Each pod as the last reconcile saw it: a pod that differs now has
    /// changed, and what was found about it is looked up again.
    last_pods: PodMap,
    /// The desired maps, brought up to date pod by pod.
    maps: DesiredMaps,
    /// The next diff against the kernel compares whole maps (at start, after
    /// a failed apply, while a source has not delivered).
    diff_all: bool,
    /// How often a full pass is due, and when the last one was.
    full_resync: Duration,
    last_full_pass: std::time::Instant,
    /// With `--zds serve`: which pods ztunnel has.
    zds: Option<ZdsState>,
    /// Where every reconcile is published, in order: ZDS, the annotation,
    /// the API's view.
    publishers: Vec<Box<dyn Publish + Send>>,
    /// Entries pushed through the API.
    pushed_pods: PodMap,
    /// Pushed ztunnel cgroups, with their zero-copy flag.
    pushed_ztunnels: BTreeMap<PathBuf, bool>,
    /// The pod sandboxes the CNI plugin reported.
    sandboxes: cni::Sandboxes,
    /// CNI ADDs waiting for their pod to be in the datapath.
    cni_waiters: Vec<cni::Waiter>,
    /// Where the node's own addresses are read (`--node-netns`).
    node_netns: Option<PathBuf>,
    /// The node's own addresses, as last read (every resync: they may
    /// change, as with DHCP).
    node_addresses: Vec<IpAddr>,
    /// The API's view, as last published: where a CNI ADD's pod stands.
    view: api::SharedView,
    /// When a failed datapath apply is tried again.
    apply: ApplyRetry,
    /// When the memory a large change freed is handed back to the kernel.
    release_at: Option<tokio::time::Instant>,
}

impl Controller {
    pub fn new(config: Config) -> Self {
        let unsynced: BTreeSet<&'static str> = [
            (config.file_source, FILE_SOURCE),
            (config.kubernetes_source, KUBERNETES_SOURCE),
            (config.xds_source, XDS_SOURCE),
        ]
        .into_iter()
        .filter_map(|(configured, name)| configured.then_some(name))
        .collect();
        if unsynced.is_empty() {
            config.health.set_sources_synced();
        }
        for source in &unsynced {
            config.health.register(source_component(source));
        }
        let mut publishers: Vec<Box<dyn Publish + Send>> = Vec::new();
        let zds = config.zds.map(|links| {
            publishers.push(Box::new(links.publisher));
            ZdsState {
                acked: zds::server::Acknowledged::default(),
                pinned: Some(links.pinned),
                inherited: BTreeSet::new(),
            }
        });
        if let Some(annotator) = config.annotator {
            publishers.push(Box::new(annotator));
        }
        publishers.push(Box::new(api::view::Publisher {
            view: config.view.clone(),
            changes: config.changes,
        }));
        publishers.push(Box::new(config.recorder));
        let mut controller = Self {
            settings: config.settings,
            kubepods_parent: config.kubepods_parent,
            pod_parents: config.pod_parents,
            file: file::Loader::default(),
            unsynced,
            rejected: None,
            kube: None,
            kube_is_source: config.kubernetes_source,
            xds: None,
            istiod_pods: None,
            pending: Touched::All,
            retry_backlog: Vec::new(),
            disagreements: BTreeSet::new(),
            host: HostCache::default(),
            pass_due: Pass::Full,
            last_pods: BTreeMap::new(),
            maps: DesiredMaps::default(),
            diff_all: true,
            full_resync: config.full_resync,
            last_full_pass: std::time::Instant::now(),
            zds,
            publishers,
            pushed_pods: BTreeMap::new(),
            pushed_ztunnels: BTreeMap::new(),
            sandboxes: cni::Sandboxes::default(),
            cni_waiters: Vec::new(),
            node_netns: config.node_netns,
            node_addresses: Vec::new(),
            view: config.view,
            apply: ApplyRetry::new(config.health),
            release_at: None,
        };
        controller.refresh_node_addresses();
        controller
    }

    /// The workloads file may have changed: re-reads it; returns whether
    /// its state changed (a bad file is logged and the last good state
    /// stays).
    pub fn file_changed(&mut self, path: &Path) -> bool {
        self.load(path)
    }

    /// A change of the Kubernetes feed's view.
    pub fn kubernetes(&mut self, update: kubernetes::Update) {
        match update {
            kubernetes::Update::Snapshot(snapshot) => {
                let old = self.kube.replace(snapshot).unwrap_or_default();
                let new = self.kube.as_ref().expect("just set");
                touch_differing(&mut self.pending, &old.pods, &new.pods);
                self.synced(KUBERNETES_SOURCE);
            }
            kubernetes::Update::Pod(uid, state) => {
                // Pod updates follow the feed's first snapshot.
                if let Some(kube) = &mut self.kube {
                    kube.set(&uid, state);
                    self.pending.add(&uid.clone().into());
                }
            }
        }
    }

    /// istiod's new view of the node (`None`: none received yet).
    pub fn istiod(&mut self, snapshot: Option<xds::Snapshot>) {
        self.xds = snapshot;
        if !self.kube_is_source {
            let old = std::mem::take(&mut self.istiod_pods).unwrap_or_default();
            self.istiod_pods = self.xds.as_ref().map(|xds| {
                let mut pods = merge::istiod_pods(xds);
                keep_shared(&mut pods, &old);
                pods
            });
            touch_differing(
                &mut self.pending,
                &old,
                self.istiod_pods.as_ref().unwrap_or(&BTreeMap::new()),
            );
        }
        if self.xds.is_some() {
            self.synced(XDS_SOURCE);
        }
    }

    /// What ztunnel acknowledged over ZDS.
    pub fn acknowledged(&mut self, acked: zds::server::Acknowledged) {
        if let Some(zds) = &mut self.zds {
            zds.acked = acked;
        }
    }

    /// Whether ztunnel's snapshot has ended since the daemon started.
    pub fn zds_snapshot_taken(&self) -> bool {
        self.zds.as_ref().is_some_and(|z| z.acked.snapshot_taken)
    }

    /// A push through the API: checked against the node (a pushed cgroup
    /// must be a pod-level cgroup of its own), then applied; whether it was
    /// is the answer.
    pub fn push(&mut self, entry: Pushed) -> Result<(), Status> {
        push::refuse_containing(&entry, self.placed(), &self.pod_parents, &mut |path| {
            cgroup::cgroup_id(path).ok()
        })
        .inspect_err(|e| {
            warn!(
                ?entry,
                "push through the API refused, nothing changed: {}",
                e.message()
            )
        })?;
        info!(?entry, "pushed through the API");
        self.apply_push(entry);
        Ok(())
    }

    /// A CNI call: ADDs wait (see [`Self::answer_cni`]), DELs and CHECKs are
    /// answered at once. Returns whether the node state changed.
    pub fn cni(&mut self, call: cni::Request, attached: bool) -> bool {
        match call {
            cni::Request::Add {
                uid,
                sandbox,
                deadline,
                reply,
            } => {
                info!(pod = %uid, namespace = %sandbox.namespace, name = %sandbox.name, netns = %sandbox.netns.display(), "CNI ADD");
                self.pending.add(&uid.clone().into());
                self.sandboxes.add(uid.clone(), sandbox);
                self.cni_waiters.push(cni::Waiter {
                    uid,
                    deadline,
                    reply,
                });
                true
            }
            cni::Request::Del {
                uid,
                container_id,
                reply,
            } => {
                let changed = self.sandboxes.delete(&uid, &container_id);
                if changed {
                    self.pending.add(&uid.clone().into());
                    info!(pod = %uid, container = %container_id, "CNI DEL");
                }
                let _ = reply.send(());
                changed
            }
            cni::Request::Check { uid, reply } => {
                let _ = reply.send(self.cni_verdict(&uid, attached).response());
                false
            }
        }
    }

    /// When the first waiting CNI ADD times out.
    pub fn cni_deadline(&self) -> Option<tokio::time::Instant> {
        self.cni_waiters.iter().map(|w| w.deadline).min()
    }

    /// When a failed apply is tried again; `None` while the last one
    /// succeeded.
    pub fn retry_at(&self) -> Option<tokio::time::Instant> {
        self.apply.at
    }

    /// When the memory freed by a large change is to be handed back (see
    /// [`crate::heap`]); `None` while none is due.
    pub fn release_at(&self) -> Option<tokio::time::Instant> {
        self.release_at
    }

    /// Hands the heap's free pages back to the kernel.
    pub fn release_free_pages(&mut self) {
        self.release_at = None;
        crate::heap::release_free_pages();
    }

    /// Whether a retry pass has pods left to look at again (and no failed
    /// apply waits for its backoff): the loop reconciles again when it has
    /// nothing else to do.
    pub fn retrying(&self) -> bool {
        !self.retry_backlog.is_empty() && self.apply.at.is_none()
    }

    /// The periodic resync: re-reads the node's addresses, and makes the
    /// next reconcile a full pass when one is due; returns whether to
    /// reconcile (not while a failed apply waits for its backoff).
    pub fn resync(&mut self) -> bool {
        self.refresh_node_addresses();
        self.pass_due =
            if self.pass_due == Pass::Full || self.last_full_pass.elapsed() >= self.full_resync {
                Pass::Full
            } else {
                Pass::Retry
            };
        self.apply.at.is_none()
    }
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
    inherited: BTreeSet<WorkloadId>,
}

impl ZdsState {
    /// The pods ztunnel serves: until its snapshot has ended, those this
    /// daemon handed over and those an earlier daemon had.
    fn ready(&self) -> BTreeSet<WorkloadId> {
        if self.acked.snapshot_taken {
            self.acked.pods.clone()
        } else {
            self.acked.pods.union(&self.inherited).cloned().collect()
        }
    }
}

impl Controller {
    /// Re-reads the node's own addresses; on failure the last ones stay.
    fn refresh_node_addresses(&mut self) {
        let Some(path) = &self.node_netns else {
            return;
        };
        match crate::host::netns::addresses(path) {
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

    fn apply_push(&mut self, entry: Pushed) {
        match entry {
            Pushed::Pod(pod) => {
                self.pending.add(&pod.uid);
                self.pushed_pods.insert(pod.uid.clone(), Arc::new(pod));
            }
            Pushed::RemovePod(uid) => {
                self.pending.add(&uid);
                self.pushed_pods.remove(&uid);
            }
            Pushed::Ztunnel { cgroup, zero_copy } => {
                self.pushed_ztunnels.insert(cgroup, zero_copy);
            }
            Pushed::RemoveZtunnel(cgroup) => {
                self.pushed_ztunnels.remove(&cgroup);
            }
        }
    }

    /// What each source last delivered.
    fn views(&self) -> merge::Views<'_> {
        merge::Views {
            file: self.file.view(),
            kubernetes: self.kube.as_ref(),
            istiod: self.istiod_pods.as_ref(),
            pushed_pods: &self.pushed_pods,
            pushed_ztunnels: &self.pushed_ztunnels,
            sandboxes: &self.sandboxes,
        }
    }

    /// Whether some source has delivered a node state.
    pub fn has_state(&self) -> bool {
        self.views().any()
    }

    /// Which enrolled pods ztunnel serves, for `spec`: ZDS gates the
    /// in-pod model only; a shared ztunnel takes no pods.
    fn readiness(&self, spec: &NodeSpec) -> Readiness {
        match &self.zds {
            Some(zds) if spec.redirect.is_none() => Readiness::Acknowledged(zds.ready()),
            _ => Readiness::Ungated,
        }
    }

    /// Re-reads the workloads file; returns whether the spec changed. A bad
    /// file is logged and the last good spec stays in force.
    fn load(&mut self, path: &Path) -> bool {
        let started = std::time::Instant::now();
        match self.file.load(path) {
            Ok(loaded) => {
                self.rejected = None;
                self.synced(FILE_SOURCE);
                self.apply.health.running(Component::WorkloadsFile);
                let file::Loaded::Changed(pods) = loaded else {
                    return false;
                };
                let view = self.file.view().expect("just loaded");
                info!(
                    pods = view.pods.len(),
                    ztunnels = view.node.ztunnels.len(),
                    changed = pods.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "workloads file loaded"
                );
                for uid in &pods {
                    self.pending.add(uid);
                }
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
        let id = WorkloadId::Kubernetes(uid.clone());
        let pod = self
            .view
            .read()
            .expect("view lock")
            .pods
            .get(&id)
            .map(api::view::PodRow::to_pb);
        let ztunnels = self
            .kube
            .as_ref()
            .map(|k| k.ztunnels.iter().cloned().collect())
            .unwrap_or_default();
        cni::verdict(
            uid,
            &cni::Standing {
                pod: pod.as_ref(),
                ztunnels: &ztunnels,
                listed_by_kubernetes: self.kube_is_source.then(|| {
                    self.kube
                        .as_ref()
                        .is_some_and(|k| k.pods.contains_key(&id) || k.ztunnels.contains(uid))
                }),
            },
        )
    }

    /// Answers each waiting ADD whose pod is now in the datapath (or whose
    /// time is up).
    pub fn answer_cni(&mut self, attached: bool) {
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
            // What was kept for the unsynced sources is compared whole.
            self.diff_all = true;
            self.apply.health.set_sources_synced();
        }
    }

    /// With both Kubernetes and istiod as sources, logs each pod on which
    /// they start or stop disagreeing (Kubernetes decides).
    fn cross_check(&mut self) {
        let (Some(kube), Some(xds)) = (&self.kube, &self.xds) else {
            return;
        };
        let now = xds::disagreements(kube.pods.values().map(Arc::as_ref), &xds.workloads);
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
    pub fn reconcile(&mut self, datapath: &mut Datapath) {
        match self.try_reconcile(datapath) {
            Ok(()) => self.apply.succeeded(),
            Err(e) => self.apply.failed(&e),
        }
    }

    fn try_reconcile(&mut self, datapath: &mut Datapath) -> anyhow::Result<()> {
        // Until some source has delivered a state, whatever is pinned stays
        // (and no retry slice is left waiting for a reconcile that returns
        // here).
        if !self.views().any() {
            self.retry_backlog.clear();
            return Ok(());
        }
        let node = merge::node(&self.views());
        let mut readiness = self.readiness(&node);
        self.cross_check();
        let started = std::time::Instant::now();
        let pass = std::mem::replace(&mut self.pass_due, Pass::Cached);
        if pass == Pass::Full {
            self.last_full_pass = std::time::Instant::now();
            datapath.reread();
        }
        self.host.begin_pass(pass);
        let pending = std::mem::replace(&mut self.pending, Touched::none());
        let mut touched = self.merge_pods(if pass == Pass::Full {
            Touched::All
        } else {
            pending
        });
        // A retry pass's pods are looked at a slice per reconcile, so a
        // source's change waits for one slice, not for every pod still
        // starting.
        match pass {
            Pass::Full => self.retry_backlog.clear(),
            Pass::Retry => self.retry_backlog = self.maps.retry_candidates(&self.last_pods),
            Pass::Cached => {}
        }
        let retry = self
            .retry_backlog
            .split_off(self.retry_backlog.len().saturating_sub(RETRY_SLICE));
        let settings = &self.settings;
        let mut resolver =
            SystemResolver::new(&self.kubepods_parent, &self.node_addresses, &mut self.host);
        let mut changed = self.maps.update_retrying(
            &node,
            &self.last_pods,
            &mut touched,
            &retry,
            &readiness,
            settings,
            &mut resolver,
        );
        // Each reconcile until ztunnel's snapshot learns which of its pods
        // an earlier daemon had seen acknowledged, before any is held: those
        // of a source that delivers late too.
        if let Some(zds) = self.zds.as_mut() {
            if zds.acked.snapshot_taken {
                zds.pinned = None;
            }
            let learned = zds.pinned.as_ref().map_or_else(BTreeSet::new, |pinned| {
                desired::acknowledged_before(&self.maps.desired, pinned)
            });
            let new: Vec<WorkloadId> = learned.difference(&zds.inherited).cloned().collect();
            if !new.is_empty() {
                zds.inherited.extend(new.iter().cloned());
                if readiness != Readiness::Ungated {
                    info!(
                        pods = new.len(),
                        "pods ztunnel acknowledged before this daemon started stay unheld until its next snapshot"
                    );
                    readiness = Readiness::Acknowledged(zds.ready());
                    let more = self.maps.update(
                        &node,
                        &self.last_pods,
                        Touched::none(),
                        &readiness,
                        settings,
                        &mut resolver,
                    );
                    changed.merge(more);
                }
            }
        }
        let desired = &self.maps.desired;
        if !changed.unresolved.is_empty() {
            // Name the first few; a node starting many pods at once would
            // otherwise log one line per pod.
            const NAMED: usize = 10;
            for u in changed.unresolved.iter().take(NAMED) {
                warn!(owner = %u.owner, cgroup = %u.cgroup.display(), "not (fully) in the datapath, retrying: {}", u.error);
            }
            if changed.unresolved.len() > NAMED {
                warn!(
                    more = changed.unresolved.len() - NAMED,
                    unresolved = desired.unresolved.len(),
                    "more workloads not in the datapath yet, retrying"
                );
            }
        }
        // While a source has not delivered, nothing the kernel holds is
        // deleted on its behalf (its pods are not known yet): the whole
        // maps are compared, with what the kernel holds kept. Once every
        // source has, and after a failed apply, the next diff is whole too.
        // Until the maps are written, a failure leaves the next diff whole.
        let diff_all = std::mem::replace(&mut self.diff_all, true);
        let retained;
        let desired = if self.unsynced.is_empty() {
            desired
        } else {
            let mut kept = desired.clone();
            desired::retain_current(
                &mut kept,
                desired::Current {
                    cgroups: datapath.cgroup_entries()?.clone(),
                    netns: datapath.netns_entries()?.clone(),
                    inbound: datapath.inbound_entries()?.clone(),
                    inbound_netns: datapath.netns_links().clone(),
                    sidecar_ranges: datapath.sidecar_range_entries()?.clone(),
                    sidecar_ports: datapath.sidecar_port_entries()?.clone(),
                },
            );
            retained = kept;
            &retained
        };
        changed.all |= diff_all || !self.unsynced.is_empty();
        let cgroup_ops = desired::diff_changed(
            datapath.cgroup_entries()?,
            &desired.cgroups,
            &changed.cgroups,
            changed.all,
        );
        let netns_ops = desired::diff_changed(
            datapath.netns_entries()?,
            &desired.netns,
            &changed.netns,
            changed.all,
        );
        // Namespaces first: a pod's binds are judged against its netns entry
        // as soon as its cgroup entry makes it known.
        datapath.apply_netns(&netns_ops)?;
        // Before the cgroups: a newly enrolled pod's first connect may ask
        // getpeername at once.
        if datapath.set_node_config(desired.node)? {
            info!(config = ?desired.node, "node settings written");
        }
        // A sidecar pod's new rule set is in place before its entries name
        // it, and its old one goes only after: no connection sees half.
        let (range_deletes, range_puts): (Vec<_>, Vec<_>) = desired::diff_changed(
            datapath.sidecar_range_entries()?,
            &desired.sidecar_ranges,
            &changed.sidecar_ranges,
            changed.all,
        )
        .into_iter()
        .partition(|op| matches!(op, desired::Op::Delete(_)));
        let (port_deletes, port_puts): (Vec<_>, Vec<_>) = desired::diff_changed(
            datapath.sidecar_port_entries()?,
            &desired.sidecar_ports,
            &changed.sidecar_ports,
            changed.all,
        )
        .into_iter()
        .partition(|op| matches!(op, desired::Op::Delete(_)));
        datapath.apply_sidecar_ranges(&range_puts)?;
        datapath.apply_sidecar_ports(&port_puts)?;
        let cgroup_ops = desired::proxies_around(cgroup_ops, datapath.cgroup_entries()?);
        datapath.apply_cgroups(&cgroup_ops)?;
        let (inbound_changes, attached_all) =
            apply_inbound(&mut self.host, datapath, desired, &changed)?;
        // After the inbound targets too, which name the set as well.
        datapath.apply_sidecar_ranges(&range_deletes)?;
        datapath.apply_sidecar_ports(&port_deletes)?;
        // A namespace not attached yet is tried again by a whole diff.
        self.diff_all = !self.unsynced.is_empty() || !attached_all;
        // A pass that looked at every pod lets go of the namespaces it did
        // not ask for (after the inbound links, which attach to the
        // namespaces the pass held).
        self.host.end_pass(touched == Touched::All);
        // After the maps: a pod leaving the mesh is handed its Del only once
        // its redirect entries are gone.
        let acknowledged = self.zds.as_ref().map(ZdsState::ready);
        // A pod whose spec changed but not its entries (a new name) is
        // republished too.
        let changed_pods = changed.pods.len();
        let republish = match touched {
            Touched::Pods(mut uids) if !changed.all => {
                uids.extend(changed.pods);
                Touched::Pods(uids)
            }
            _ => Touched::All,
        };
        let reconciled = Reconciled {
            node: &node,
            pods: &self.last_pods,
            republish: &republish,
            desired,
            complete: self.unsynced.is_empty(),
            acknowledged: acknowledged.as_ref(),
            kubernetes: self.kube.as_ref(),
            applied_in: started.elapsed(),
        };
        for publisher in &mut self.publishers {
            publisher.reconciled(&reconciled);
        }
        // A full pass that changed little frees little: only a change of
        // many pods (their parts replaced) or many map entries counts.
        if changed_pods.max(cgroup_ops.len()) >= crate::heap::LARGE_CHANGE {
            self.release_at
                .get_or_insert_with(|| tokio::time::Instant::now() + crate::heap::SETTLE);
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

    /// The pods of the last reconcile on their cgroups, which a pushed
    /// cgroup must not contain.
    fn placed(&self) -> impl Iterator<Item = PlacedPod<'_>> {
        self.last_pods.values().filter_map(|pod| {
            let (cgroup, _) = self.maps.desired.placed.get(&pod.uid)?;
            Some(PlacedPod {
                uid: &pod.uid,
                namespace: &pod.namespace,
                name: &pod.name,
                cgroup,
            })
        })
    }
}

impl Controller {
    /// Merges the pods `candidates` again (every pod for
    /// [`Touched::All`]); forgets what was found on the live system about
    /// each that is new or gone or names another cgroup, namespace or
    /// addresses; returns the new, changed and gone ([`Touched::All`] stays
    /// all).
    fn merge_pods(&mut self, candidates: Touched) -> Touched {
        let views = self.views();
        let uids: Vec<WorkloadId> = match &candidates {
            Touched::All => {
                let mut all = views.uids();
                all.extend(self.last_pods.keys());
                all.into_iter().cloned().collect()
            }
            Touched::Pods(uids) => uids.iter().cloned().collect(),
        };
        let merged: Vec<(WorkloadId, Option<Arc<PodSpec>>)> = uids
            .into_iter()
            .filter_map(|uid| {
                let pod = merge::pod(&views, &uid);
                (self.last_pods.get(&uid) != pod.as_ref()).then_some((uid, pod))
            })
            .collect();
        let mut changed = BTreeSet::new();
        for (uid, pod) in merged {
            // What was found on the host still holds for a pod whose change
            // names the same cgroup, namespace and addresses (a new mode,
            // name or capture override).
            let was = self.last_pods.get(&uid);
            if !was
                .zip(pod.as_ref())
                .is_some_and(|(was, now)| same_host_facts(was, now))
            {
                let placed = self.maps.desired.placed.get(&uid).map(|(p, _)| &**p);
                self.host.forget(&uid, placed);
                for p in [was, pod.as_ref()].into_iter().flatten() {
                    if let PodCgroup::Path(path) = &p.cgroup {
                        self.host.forget(&uid, Some(path));
                    }
                }
            }
            match pod {
                Some(pod) => self.last_pods.insert(uid.clone(), pod),
                None => self.last_pods.remove(&uid),
            };
            changed.insert(uid);
        }
        match candidates {
            Touched::All => Touched::All,
            Touched::Pods(_) => Touched::Pods(changed),
        }
    }
}

/// Whether two specs of a pod are looked up on the host alike: the same
/// cgroup, network namespace and addresses.
fn same_host_facts(a: &PodSpec, b: &PodSpec) -> bool {
    a.cgroup == b.cgroup && a.netns == b.netns && a.ips == b.ips
}

/// Adds to `pending` each pod that differs between `old` and `new`.
fn touch_differing(pending: &mut Touched, old: &PodMap, new: &PodMap) {
    for (uid, pod) in new {
        if old.get(uid) != Some(pod) {
            pending.add(uid);
        }
    }
    for uid in old.keys() {
        if !new.contains_key(uid) {
            pending.add(uid);
        }
    }
}

/// Brings inbound capture to `desired`: exempt sources first (so a probe is
/// never refused on the way), then each new address's entry before its
/// netns's link, and a leaving netns's link before its entries go. Returns
/// how many changes were made, and whether every wanted link is attached.
fn apply_inbound(
    host: &mut HostCache,
    datapath: &mut Datapath,
    desired: &desired::Desired,
    changed: &desired::Changed,
) -> anyhow::Result<(usize, bool)> {
    let exempt_ops = desired::diff(datapath.exempt_entries()?, &desired.exempt);
    datapath.apply_exempt(&exempt_ops)?;
    let (deletes, puts): (Vec<_>, Vec<_>) = desired::diff_changed(
        datapath.inbound_entries()?,
        &desired.inbound,
        &changed.inbound,
        changed.all,
    )
    .into_iter()
    .partition(|op| matches!(op, desired::Op::Delete(_)));
    // Before a sidecar pod's inbound is captured: its proxy's passthrough
    // binds `::6` from the first connection on.
    let mut attached_all = add_passthrough_sources(host, datapath, desired, changed);
    datapath.apply_inbound(&puts)?;
    let attached = datapath.netns_links().clone();
    let mut changes = exempt_ops.len() + puts.len() + deletes.len();
    let (attach, detach): (Vec<NetnsCookie>, Vec<NetnsCookie>) = if changed.all {
        (
            desired
                .inbound_netns
                .difference(&attached)
                .copied()
                .collect(),
            attached
                .difference(&desired.inbound_netns)
                .copied()
                .collect(),
        )
    } else {
        changed
            .inbound_netns
            .iter()
            .partition(|cookie| desired.inbound_netns.contains(cookie))
    };
    for cookie in attach.iter().filter(|c| !attached.contains(c)) {
        let Some(ns) = host.cookies.namespace(cookie.0) else {
            attached_all = false;
            continue;
        };
        match datapath.attach_inbound(*cookie, std::os::fd::AsFd::as_fd(ns)) {
            Ok(()) => changes += 1,
            // One pod's namespace failing must not stall the node: it
            // is retried at the next reconcile.
            Err(e) => {
                attached_all = false;
                warn!(netns = %cookie, "attaching inbound capture, retrying: {e}")
            }
        }
    }
    for cookie in detach.iter().filter(|c| attached.contains(c)) {
        datapath.detach_inbound(*cookie)?;
        changes += 1;
    }
    datapath.apply_inbound(&deletes)?;
    Ok((changes, attached_all))
}

/// Gives the namespace of each sidecar pod with an IPv6 address that the
/// update changed (or of every one, on a whole diff) its proxy's IPv6
/// passthrough source. Whether every one has it.
fn add_passthrough_sources(
    host: &HostCache,
    datapath: &mut Datapath,
    desired: &desired::Desired,
    changed: &desired::Changed,
) -> bool {
    let sidecar_v6 = |(ip, target): (&IpAddr, &InboundTarget)| {
        (ip.is_ipv6() && target.flags & ambridge_common::flags::SIDECAR != 0)
            .then_some(NetnsCookie(target.netns_cookie))
    };
    let namespaces: BTreeSet<NetnsCookie> = if changed.all {
        desired.inbound.iter().filter_map(sidecar_v6).collect()
    } else {
        changed
            .inbound
            .iter()
            .filter_map(|ip| desired.inbound.get_key_value(ip))
            .filter_map(sidecar_v6)
            .collect()
    };
    let mut all = true;
    for cookie in namespaces {
        let Some(ns) = host.cookies.namespace(cookie.0) else {
            all = false;
            continue;
        };
        if let Err(e) = datapath.add_passthrough_source(cookie, ns) {
            all = false;
            warn!(netns = %cookie, "sidecar passthrough source, retrying: {e}");
        }
    }
    all
}
