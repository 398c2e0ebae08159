//! `ambridge run`: install the datapath, then keep the cgroup map equal to
//! what the workloads file says, on every edit and on a periodic resync (which
//! also picks up pod cgroups created after the file named them).

use std::{
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
    cgroup,
    datapath::{Datapath, Pins},
    reconcile::{self, Unresolved},
    state::{NodeSpec, RedirectSettings},
    workloads,
};

/// Settings of `ambridge run`.
#[derive(Clone, Debug)]
pub struct Options {
    pub cgroup_root: PathBuf,
    pub pins: Pins,
    pub workloads: PathBuf,
    pub redirect: RedirectSettings,
    pub resync: Duration,
}

/// Runs until SIGTERM or SIGINT. The datapath stays installed afterwards.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let mut datapath = Datapath::install(&opts.cgroup_root, &opts.pins)?;
    let (tx, mut changed) = mpsc::channel(1);
    let _watcher = watch(&opts.workloads, tx)?;
    let mut node = Node::default();
    node.load(&opts.workloads);
    node.reconcile(&mut datapath, &opts.redirect)?;
    info!(workloads = %opts.workloads.display(), "ready");

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
                    node.reconcile(&mut datapath, &opts.redirect)?;
                }
            }
            _ = resync.tick() => node.reconcile(&mut datapath, &opts.redirect)?,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping; the datapath stays installed (`ambridge uninstall` removes it)");
    Ok(())
}

/// The daemon's view of the node: the last good spec, and what it last
/// reported as unresolved (so a persisting problem is logged once).
#[derive(Default)]
struct Node {
    spec: Option<NodeSpec>,
    unresolved: Vec<Unresolved>,
}

impl Node {
    /// Re-reads the workloads file; returns whether the spec changed. A bad
    /// file is logged and the last good spec stays in force.
    fn load(&mut self, path: &Path) -> bool {
        match workloads::load(path) {
            Ok(spec) => {
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
                error!(file = %path.display(), "workloads file rejected, keeping the last good state: {e}");
                false
            }
        }
    }

    fn reconcile(
        &mut self,
        datapath: &mut Datapath,
        redirect: &RedirectSettings,
    ) -> anyhow::Result<()> {
        // Until a file has been read successfully, whatever is pinned stays.
        let Some(spec) = &self.spec else {
            return Ok(());
        };
        let desired = reconcile::desired(spec, redirect, cgroup::cgroup_id);
        if desired.unresolved != self.unresolved {
            for u in &desired.unresolved {
                warn!(owner = %u.owner, cgroup = %u.cgroup.display(), "cgroup not found, retrying: {}", u.error);
            }
            self.unresolved = desired.unresolved.clone();
        }
        let current = datapath.cgroup_entries()?;
        let ops = reconcile::diff(&current, &desired.entries);
        if !ops.is_empty() {
            datapath.apply(&ops)?;
            info!(
                changes = ops.len(),
                entries = desired.entries.len(),
                "reconciled cgroup map"
            );
        }
        Ok(())
    }
}

/// Watches the directory holding `file` (editors and ConfigMap mounts replace
/// files by rename) and signals `tx` on any change in it.
fn watch(file: &Path, tx: mpsc::Sender<()>) -> anyhow::Result<notify::RecommendedWatcher> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
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
