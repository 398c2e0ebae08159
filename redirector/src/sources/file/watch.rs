//! Noticing that the workloads file may have changed: editors and ConfigMap
//! mounts replace it by rename, and the daemon's own reads are no change.

use std::path::Path;

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Watches the directory holding `file` (editors and ConfigMap mounts replace
/// files by rename) and signals `tx` when the file may have changed: a
/// write, create, rename or removal of the file itself or of a ConfigMap
/// mount's `..`-named entries. Reads (the daemon's own included) and other
/// files of the directory are not changes.
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
