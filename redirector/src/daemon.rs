//! `ambridge run`: install the datapath, then keep the maps equal to the
//! node state its sources describe (the workloads file, Kubernetes,
//! istiod's workload discovery, pushes through the local API), on every
//! change and on a periodic resync (which also picks up pod cgroups created
//! after a source named them).

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    api,
    controller::{Config, Controller, ZdsLinks},
    datapath::{self, Datapath, Pins},
    host::cgroup,
    node::{entries, spec::Settings},
    publish::{annotator::Annotator, zds},
    sources::{
        file,
        push::{self, PushRequest},
        xds,
    },
    supervise::{Component, Health, supervise},
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
    /// How often the maps are checked against the node state, and pods not
    /// (fully) found yet are looked for again.
    pub resync: Duration,
    /// How often everything is looked up again on the live system and the
    /// kernel's maps are read again (the safety net: a cgroup or sandbox
    /// recreated, a map written by someone else).
    pub full_resync: Duration,
    /// Where the local API listens.
    pub api_socket: PathBuf,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub monitoring: Option<std::net::SocketAddr>,
    /// The chained CNI plugin to keep installed, if the daemon does.
    pub cni_install: Option<crate::cni::install::Install>,
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
    pub mesh: crate::node::membership::MeshSettings,
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

/// Runs until SIGTERM or SIGINT. The datapath stays installed afterwards.
/// Only a datapath that cannot be loaded or attached, or pins that cannot
/// be taken, end it: every other part is supervised, and retried with
/// backoff when it fails (see [`crate::supervise`]).
pub async fn run(opts: Options) -> anyhow::Result<()> {
    // Before anything is touched: too few capabilities stop the daemon
    // here, naming each one and what it is for.
    crate::capabilities::check(opts.settings.sidecar.is_some())?;
    // The programs attach to this directory; anything but a cgroup v2 one
    // would fail only then, with the kernel's bare EBADF.
    crate::host::cgroup::cgroup_id(&opts.cgroup_root).with_context(|| {
        format!(
            "--cgroup-root {} must be a cgroup v2 directory (with the hybrid layout, below /sys/fs/cgroup/unified)",
            opts.cgroup_root.display()
        )
    })?;
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
    datapath.set_node_config(entries::node_config(None, &opts.settings))?;
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
    // Registered before anything can report readiness: the daemon is not
    // ready until the plugin is in place.
    let mut cni_keeper = opts
        .cni_install
        .clone()
        .map(|install| CniKeeper::new(install, health.clone()));
    if !datapath.needs_state_before_attach() {
        datapath.attach(&opts.cgroup_root, &opts.pins)?;
        attached = true;
        health.set_attached();
    }
    let (tx, mut changed) = mpsc::channel(1);
    let _watcher = if opts.file_source {
        Some(file::watch(&opts.workloads, tx)?)
    } else {
        None
    };
    // The Kubernetes feed sends its view, then each change; without it the
    // sender just stays here, silent.
    let (kube_tx, mut kube_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut annotator = None;
    let _idle_kube_sender = match &opts.kubernetes {
        Some(source) => {
            let client = kube_client(source).await?;
            // Serving ZDS, ambridge is the node agent istiod listens to.
            if opts.zds_socket.is_some() {
                annotator = Some(Annotator::new(client.clone()));
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
                    let run = crate::sources::kubernetes::run(
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
    let recorder = api::monitoring::Recorder::default();
    let (push, mut pushes) = mpsc::channel(64);
    let (cni_calls, mut cni_rx) = mpsc::channel(64);
    let (changes, _) = tokio::sync::broadcast::channel(1024);
    // Bound before the daemon says it is ready: a port in use is an error
    // at start, not a probe that never answers. Port 0 takes a free one; the
    // address bound is what `ambridge status` reports.
    let monitoring_listener = match opts.monitoring {
        Some(address) => Some(api::monitoring::bind(address).await?),
        None => None,
    };
    let monitoring = monitoring_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .context("the monitoring listener's address")?;
    if let Some(address) = monitoring {
        info!(%address, "serving /metrics, /healthz and /readyz");
    }
    {
        let context = api::Context {
            view: view.clone(),
            settings: opts.settings.clone(),
            cgroup_root: opts.cgroup_root.clone(),
            pins: opts.pins.clone(),
            maps: std::sync::Arc::new(
                datapath::ReadOnly::open(&opts.pins).context("opening the maps for the API")?,
            ),
            reports: api::Reports {
                zds: zds_stats,
                health: health.clone(),
                monitoring,
            },
        };
        if let Some(listener) = monitoring_listener {
            // axum's server handles failed accepts itself (it waits and
            // accepts again): it returns only if it cannot go on at all.
            let (context, recorder, health) = (context.clone(), recorder.clone(), health.clone());
            tokio::spawn(async move {
                if let Err(e) = api::monitoring::serve(listener, context, recorder).await {
                    error!("the monitoring port stopped: {e:#}");
                    health.failed(Component::Monitoring, format!("{e:#}"));
                }
            });
        }
        let channels = (push, cni_calls, changes.clone());
        let socket = opts.api_socket.clone();
        // Bound before the daemon says it is ready when it can be.
        let mut first = api::bind(&socket)
            .inspect_err(|e| warn!("binding the API socket, retrying: {e:#}"))
            .ok();
        tokio::spawn(supervise(Component::Api, health.clone(), move || {
            let listener = first.take();
            let (socket, context) = (socket.clone(), context.clone());
            let channels = api::Channels {
                push: channels.0.clone(),
                cni: channels.1.clone(),
                changes: channels.2.clone(),
            };
            async move {
                let listener = match listener {
                    Some(listener) => listener,
                    None => api::bind(&socket)?,
                };
                api::serve(listener, context, channels).await
            }
        }));
    }
    let zds = match &opts.zds_socket {
        Some(_) => Some(ZdsLinks {
            pinned: datapath.cgroup_entries()?.clone(),
            publisher: zds::Publisher {
                pods: zds_pods,
                pods_complete: zds_pods_complete,
                ztunnels: zds_ztunnels,
            },
        }),
        None => None,
    };
    let mut node = Controller::new(Config {
        settings: opts.settings.clone(),
        kubepods_parent: opts.kubepods_parent.clone(),
        pod_parents: push::pod_parents(&opts.cgroup_root, &opts.kubepods_parent),
        file_source: opts.file_source,
        kubernetes_source: opts.kubernetes.is_some(),
        xds_source: opts.xds.is_some(),
        node_netns: opts.node_netns.clone(),
        full_resync: opts.full_resync,
        zds,
        annotator,
        view,
        changes,
        recorder,
        health: health.clone(),
    });
    if opts.file_source {
        node.file_changed(&opts.workloads);
    }
    node.reconcile(&mut datapath);
    let ready_to_attach = |node: &Controller| {
        node.has_state()
            && (!await_zds || node.zds_snapshot_taken() || loaded_at.elapsed() > ZDS_SNAPSHOT_WAIT)
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
    if let Some(keeper) = cni_keeper.as_mut() {
        keeper.keep();
    }
    // Loading the programs parsed the kernel's BTF (a 19 MB heap peak at
    // Linux 6.18), all freed by now, of which the allocator kept about
    // 1.4 MiB resident in an idle daemon.
    crate::heap::release_free_pages();
    info!(workloads = %opts.workloads.display(), "ready");

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut resync = tokio::time::interval(opts.resync);
    resync.reset();
    loop {
        tokio::select! {
            // Looked at in this order: a change waiting goes before the
            // next slice of a retry pass, which is always ready while one
            // runs, so it comes last. An input ready at every turn would
            // keep those after it waiting; each branch takes all its
            // channel holds, so only changes coming faster than reconciles
            // could.
            biased;
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(()) = changed.recv() => {
                while changed.try_recv().is_ok() {}
                if node.file_changed(&opts.workloads) {
                    node.reconcile(&mut datapath);
                }
            }
            Some(update) = kube_rx.recv() => {
                node.kubernetes(update);
                // One reconcile for every change that came meanwhile.
                while let Ok(more) = kube_rx.try_recv() {
                    node.kubernetes(more);
                }
                node.reconcile(&mut datapath);
            }
            Ok(()) = zds_ready.changed() => {
                node.acknowledged(zds_ready.borrow_and_update().clone());
                node.reconcile(&mut datapath);
            }
            Ok(()) = xds_rx.changed() => {
                node.istiod(xds_rx.borrow_and_update().clone());
                node.reconcile(&mut datapath);
            }
            Some(PushRequest { entry, reply }) = pushes.recv() => {
                let pushed = node.push(entry);
                if pushed.is_ok() {
                    node.reconcile(&mut datapath);
                }
                // The caller may have gone; the push stands (or not) anyway.
                let _ = reply.send(pushed);
            }
            Some(call) = cni_rx.recv() => {
                if node.cni(call, attached) {
                    node.reconcile(&mut datapath);
                }
            }
            _ = sleep_until(node.cni_deadline()) => {}
            _ = resync.tick() => {
                if let Some(keeper) = cni_keeper.as_mut() {
                    keeper.keep();
                }
                // A failed apply is tried again on its backoff, not at
                // every resync.
                if node.resync() {
                    node.reconcile(&mut datapath);
                }
            }
            _ = sleep_until(node.retry_at()) => {
                node.reconcile(&mut datapath);
            }
            _ = sleep_until(node.release_at()) => node.release_free_pages(),
            () = std::future::ready(()), if node.retrying() => {
                node.reconcile(&mut datapath);
            }
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

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Puts the chained CNI plugin in place where it is missing (at start, and
/// at every resync: a main plugin may rewrite its conflist), reporting to
/// `health`; a failure is logged when it first happens or changes.
struct CniKeeper {
    install: crate::cni::install::Install,
    health: Health,
    last_error: Option<String>,
}

impl CniKeeper {
    fn new(install: crate::cni::install::Install, health: Health) -> Self {
        health.register(Component::CniPlugin);
        Self {
            install,
            health,
            last_error: None,
        }
    }

    fn keep(&mut self) {
        match self.install.ensure() {
            Ok(changed) => {
                if changed.any() {
                    info!(
                        binary = changed.binary,
                        config = ?changed.config,
                        bin_dir = %self.install.bin_dir.display(),
                        "chained CNI plugin installed"
                    );
                }
                self.last_error = None;
                self.health.running(Component::CniPlugin);
            }
            Err(e) => {
                let error = e.to_string();
                if self.last_error.as_ref() != Some(&error) {
                    warn!("installing the chained CNI plugin, retrying at each resync: {error}");
                }
                self.health.failed(Component::CniPlugin, error.clone());
                self.last_error = Some(error);
            }
        }
    }
}
