//! Noticing that the workloads file may have changed: editors and ConfigMap
//! mounts replace it by rename, and the daemon's own reads are no change.

use std::path::Path;

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Watches the directory holding `file` (editors and ConfigMap mounts replace
/// files by rename) and signals `tx` when the file has changed, complete:
/// written and closed, renamed into place (or a ConfigMap mount's
/// `..`-named entries swapped), created as a symlink, or removed. A write
/// in progress, reads (the daemon's own included) and other files of the
/// directory are not changes, so a change is read at once, never half
/// written.
pub fn watch(file: &Path, tx: mpsc::Sender<()>) -> anyhow::Result<notify::RecommendedWatcher> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            return;
        };
        let is_symlink = |p: &Path| {
            p.symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
        };
        if changes_the_file(&event, name.as_deref(), is_symlink) {
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

/// Whether a watch event in the file's directory completed a change of the
/// file named `name` (`is_symlink` tells a created symlink, complete at
/// once, from a created file, complete when its writer closes it).
fn changes_the_file(
    event: &notify::Event,
    name: Option<&std::ffi::OsStr>,
    is_symlink: impl Fn(&Path) -> bool,
) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let names_it = |p: &Path, swap_too: bool| {
        let entry = p.file_name();
        entry == name
            || (swap_too && entry.is_some_and(|e| e.as_encoded_bytes().starts_with(b"..")))
    };
    event.paths.iter().any(|p| match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) | EventKind::Remove(_) => {
            names_it(p, false)
        }
        EventKind::Modify(ModifyKind::Name(_)) => names_it(p, true),
        EventKind::Create(_) => names_it(p, false) && is_symlink(p),
        _ => false,
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
    fn a_change_counts_once_complete_never_while_it_is_being_written() {
        let name = Some(OsStr::new("workloads.yaml"));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let read_done = EventKind::Access(AccessKind::Close(AccessMode::Read));
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let renamed = EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::To));
        let writing = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        let created = EventKind::Create(CreateKind::Any);
        let removed = EventKind::Remove(notify::event::RemoveKind::Any);
        for (kind, path, symlink, change) in [
            (open, "/d/workloads.yaml", false, false),
            (read_done, "/d/workloads.yaml", false, false),
            // Created and being written: complete only when closed.
            (created, "/d/workloads.yaml", false, false),
            (writing, "/d/workloads.yaml", false, false),
            (written, "/d/workloads.yaml", false, true),
            (renamed, "/d/workloads.yaml", false, true),
            (removed, "/d/workloads.yaml", false, true),
            // `ln -sf`: a symlink is complete when created.
            (created, "/d/workloads.yaml", true, true),
            // Another file of the directory (the API socket, say).
            (created, "/d/api.sock", true, false),
            (written, "/d/other.yaml", false, false),
            // A ConfigMap mount swaps its `..data` link.
            (renamed, "/d/..data", false, true),
        ] {
            assert_eq!(
                changes_the_file(&event(kind, path), name, |_| symlink),
                change,
                "{kind:?} {path}"
            );
        }
    }
}
