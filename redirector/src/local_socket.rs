//! Binding the daemon's root-only unix sockets (the local API, ZDS) so that
//! no process ever finds one at its path with a mode other than 0600.
//!
//! `bind(2)` creates the socket file with the process's umask applied, and
//! a `chmod` after it leaves a window in which a non-root process could
//! connect. Instead the socket is bound in a fresh directory of mode 0700
//! beside its path (which only root can enter), made 0600 there, and then
//! renamed into place. The rename also replaces a stale socket file of an
//! earlier run in one step, and keeps the socket bound: connecting by path
//! finds the socket by its inode.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// Why a socket could not be bound in place.
#[derive(Debug, thiserror::Error)]
#[error("{step} for the socket {path}: {source}")]
pub struct BindError {
    /// What failed: creating a directory, binding, chmod or rename.
    pub step: String,
    /// The socket's final path.
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The socket's file name in its private directory, kept short: the path
/// of a unix socket is limited to 107 bytes.
const STAGED_NAME: &str = "s";

/// Binds a unix socket at `path`, mode 0600 from the moment it appears
/// there. `bind` binds a new socket to the path it is given (the staging
/// path) and returns it.
pub fn bind_private<T>(
    path: &Path,
    bind: impl FnOnce(&Path) -> std::io::Result<T>,
) -> Result<T, BindError> {
    let fail = |step: String| {
        move |source| BindError {
            step,
            path: path.to_path_buf(),
            source,
        }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(fail(format!("creating {}", dir.display())))?;
    let private = tempfile::Builder::new()
        .prefix(".amb")
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)
        .map_err(fail(format!(
            "creating a private directory in {}",
            dir.display()
        )))?;
    let staged = private.path().join(STAGED_NAME);
    let socket = bind(&staged).map_err(fail(format!("binding {}", staged.display())))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))
        .map_err(fail(format!("chmod 0600 {}", staged.display())))?;
    fs::rename(&staged, path).map_err(fail(format!("renaming {}", staged.display())))?;
    // The private directory is empty now; dropping it removes it.
    private
        .close()
        .map_err(fail("removing the private directory".into()))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::{fs::FileTypeExt, net::UnixListener};

    #[test]
    fn the_socket_lands_at_its_path_with_mode_0600_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // A stale socket file of an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let listener = bind_private(&path, |p| UnixListener::bind(p)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("api.sock")]);
        // Still bound after the rename: a client reaches it by its path.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
    }

    #[test]
    fn a_failed_bind_names_the_socket_and_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let err = bind_private(&path, |_| -> std::io::Result<()> {
            Err(std::io::Error::other("no"))
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("binding") && text.contains("api.sock"),
            "{text}"
        );
    }
}
