//! Putting the chained plugin on the node: its binary into the CNI bin
//! directory, and its entry last in the network configuration the container
//! runtime loads. The daemon keeps it there (a main plugin that rewrites its
//! conflist drops the entry; the next look puts it back) and `ambridge
//! uninstall` takes both away, so pods start as before.
//!
//! The runtime (libcni, as containerd and CRI-O use it) loads the first
//! file of the configuration directory by name among `*.conf`,
//! `*.conflist` and `*.json`; only a conflist chains plugins, so a
//! single-plugin `.conf` is refused, naming it. A file is replaced in one
//! rename, keeping its mode, through a symbolic link to where it points,
//! and not over a change someone else made meanwhile; its keys come out
//! in sorted order.

use std::{
    fs, io,
    io::Write,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

/// The entry's `type`: the binary's name in the bin directory.
pub const PLUGIN_TYPE: &str = "ambridge-cni";

/// Why the plugin could not be put in place or taken away.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no network configuration (*.conflist, *.conf, *.json) in {0} yet")]
    NoConfig(PathBuf),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{path}: not JSON: {source}")]
    NotJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{0}: a single-plugin configuration (no `plugins` list); a chained plugin needs a conflist"
    )]
    NotAList(PathBuf),
    #[error(
        "{0}: changed by someone else each time it was being updated; tried {RACE_TRIES} times"
    )]
    KeptChanging(PathBuf),
}

/// How many times a configuration file changed under an update is read
/// and updated again.
const RACE_TRIES: usize = 3;

/// What tells a file's versions apart without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            inode: meta.ino(),
            len: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

fn io_error(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, op, source }
}

/// Where the plugin goes, and what its entry says.
#[derive(Clone, Debug)]
pub struct Install {
    /// The CNI bin directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The `ambridge-cni` binary to copy there.
    pub binary: PathBuf,
    /// The daemon's API socket, as the plugin reaches it on the node.
    pub socket: PathBuf,
    /// The source and the installed binary as last found equal: while
    /// both stamps hold, neither is read again.
    binaries: Option<(Stamp, Stamp)>,
}

/// What [`Install::ensure`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub binary: bool,
    /// The configuration file the entry was (re)written into.
    pub config: Option<PathBuf>,
}

impl Changed {
    pub fn any(&self) -> bool {
        self.binary || self.config.is_some()
    }
}

impl Install {
    pub fn new(bin_dir: PathBuf, conf_dir: PathBuf, binary: PathBuf, socket: PathBuf) -> Self {
        Self {
            bin_dir,
            conf_dir,
            binary,
            socket,
            binaries: None,
        }
    }

    /// The plugin's entry in the conflist.
    pub fn entry(&self) -> Value {
        json!({"type": PLUGIN_TYPE, "socket": self.socket})
    }

    /// Puts the binary and the entry in place where they are missing or
    /// differ; touches nothing that is already right.
    pub fn ensure(&mut self) -> Result<Changed, Error> {
        let config =
            active_config(&self.conf_dir)?.ok_or(Error::NoConfig(self.conf_dir.clone()))?;
        let binary = self.ensure_binary()?;
        let config = ensure_entry(&config, &self.entry())?.then_some(config);
        Ok(Changed { binary, config })
    }

    fn ensure_binary(&mut self) -> Result<bool, Error> {
        let target = self.bin_dir.join(PLUGIN_TYPE);
        let stamps = Stamp::of(&self.binary).zip(Stamp::of(&target));
        if stamps.is_some() && stamps == self.binaries {
            return Ok(false);
        }
        let new = fs::read(&self.binary).map_err(io_error(&self.binary, "read"))?;
        let written = !fs::read(&target).is_ok_and(|old| old == new);
        if written {
            write_atomically(&target, &new, 0o755, None)?;
        }
        self.binaries = Stamp::of(&self.binary).zip(Stamp::of(&target));
        Ok(written)
    }
}

/// Puts `entry` last in the conflist `config` unless it is there; returns
/// whether the file was written.
fn ensure_entry(config: &Path, entry: &Value) -> Result<bool, Error> {
    // Through a symbolic link: the file it points to is what the runtime
    // reads, and the link stays a link.
    let target = fs::canonicalize(config).map_err(io_error(config, "resolve"))?;
    for _ in 0..RACE_TRIES {
        let before = Stamp::of(&target);
        let text = fs::read(&target).map_err(io_error(&target, "read"))?;
        let current: Value = serde_json::from_slice(&text).map_err(|source| Error::NotJson {
            path: config.to_path_buf(),
            source,
        })?;
        let wanted = with_entry(&current, entry).ok_or(Error::NotAList(config.to_path_buf()))?;
        if wanted == current {
            return Ok(false);
        }
        let mode = fs::metadata(&target)
            .map_err(io_error(&target, "stat"))?
            .mode();
        match write_atomically(&target, &to_text(&wanted), mode & 0o7777, before) {
            Err(Error::KeptChanging(_)) => continue,
            done => return done.map(|()| true),
        }
    }
    Err(Error::KeptChanging(config.to_path_buf()))
}

/// What [`remove`] took away.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub binary: bool,
    /// The configuration files the entry was taken out of.
    pub configs: Vec<PathBuf>,
}

/// Takes the entry out of every configuration file of `conf_dir` that has
/// one, then the binary out of `bin_dir`: the runtime never runs an entry
/// whose binary is gone.
pub fn remove(bin_dir: &Path, conf_dir: &Path) -> Result<Removed, Error> {
    let mut removed = Removed::default();
    for config in config_files(conf_dir)? {
        let Ok(target) = fs::canonicalize(&config) else {
            continue;
        };
        let before = Stamp::of(&target);
        let Ok(text) = fs::read(&target) else {
            continue;
        };
        let Ok(current) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        let without = without_entry(&current);
        if without != current {
            let mode = fs::metadata(&target)
                .map_err(io_error(&target, "stat"))?
                .mode();
            write_atomically(&target, &to_text(&without), mode & 0o7777, before)?;
            removed.configs.push(config);
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => removed.binary = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&binary, "remove")(e)),
    }
    Ok(removed)
}

/// The configuration files of `dir` the runtime considers, by name.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir, "read_dir")(e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            ) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The configuration the runtime loads: the first of [`config_files`].
pub fn active_config(dir: &Path) -> Result<Option<PathBuf>, Error> {
    Ok(config_files(dir)?.into_iter().next())
}

/// `conflist` with `entry` last among its plugins, and no other entry of
/// ours; `None` for a configuration without a `plugins` list.
pub fn with_entry(conflist: &Value, entry: &Value) -> Option<Value> {
    let mut out = without_entry(conflist);
    out.get_mut("plugins")?.as_array_mut()?.push(entry.clone());
    Some(out)
}

/// `conflist` without any entry of ours.
pub fn without_entry(conflist: &Value) -> Value {
    let mut out = conflist.clone();
    if let Some(plugins) = out.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    }
    out
}

fn to_text(config: &Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(config).expect("a JSON value serializes");
    text.push(b'\n');
    text
}

/// Replaces `path` by `contents`, of mode `mode`, in one rename: the
/// runtime reads the old file or the new one, never half of one. The
/// temporary file's name has no configuration extension, so it is never
/// loaded. With `unchanged_since`, a file that changed since that stamp is
/// left as it is ([`Error::KeptChanging`], for the caller to read again).
fn write_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
    unchanged_since: Option<Stamp>,
) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".ambridge-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_error(dir, "create a temporary file"))?;
    tmp.write_all(contents)
        .map_err(io_error(tmp.path(), "write"))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
        .map_err(io_error(tmp.path(), "chmod"))?;
    if unchanged_since.is_some() && Stamp::of(path) != unchanged_since {
        return Err(Error::KeptChanging(path.to_path_buf()));
    }
    tmp.persist(path)
        .map_err(|e| io_error(path, "rename into place")(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calico() -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
               "plugins": [{"type": "calico"}, {"type": "portmap"}]})
    }

    fn install(dir: &Path) -> Install {
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&conf).unwrap();
        let binary = dir.join("built-ambridge-cni");
        fs::write(&binary, b"plugin v1").unwrap();
        Install::new(bin, conf, binary, "/var/run/ambridge/api.sock".into())
    }

    #[test]
    fn the_entry_goes_last_once_and_replaces_an_older_one_of_ours() {
        let entry = json!({"type": PLUGIN_TYPE, "socket": "/s"});
        let once = with_entry(&calico(), &entry).unwrap();
        let types: Vec<&str> = once["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["calico", "portmap", PLUGIN_TYPE]);
        assert_eq!(with_entry(&once, &entry).unwrap(), once);
        let mut older = calico();
        older["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"type": PLUGIN_TYPE, "socket": "/old"}));
        assert_eq!(with_entry(&older, &entry).unwrap(), once);
        assert_eq!(without_entry(&once), calico());
        assert_eq!(with_entry(&json!({"type": "bridge"}), &entry), None);
    }

    #[test]
    fn ensuring_twice_writes_once_and_removal_leaves_the_main_plugin_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let mut install = install(dir.path());
        assert!(matches!(install.ensure(), Err(Error::NoConfig(_))));
        let conflist = install.conf_dir.join("10-calico.conflist");
        fs::write(&conflist, to_text(&calico())).unwrap();
        // Later by name: not what the runtime loads.
        let other = install.conf_dir.join("20-other.conflist");
        fs::write(&other, to_text(&calico())).unwrap();

        let first = install.ensure().unwrap();
        assert!(first.binary);
        assert_eq!(first.config.as_deref(), Some(conflist.as_path()));
        assert_eq!(
            fs::read(install.bin_dir.join(PLUGIN_TYPE)).unwrap(),
            b"plugin v1"
        );
        let mode = fs::metadata(install.bin_dir.join(PLUGIN_TYPE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!install.ensure().unwrap().any(), "nothing left to change");
        assert_eq!(
            serde_json::from_slice::<Value>(&fs::read(&other).unwrap()).unwrap(),
            calico()
        );

        // A new build of the plugin, and a main plugin rewriting its file.
        fs::write(&install.binary, b"plugin v2").unwrap();
        fs::write(&conflist, to_text(&calico())).unwrap();
        let again = install.ensure().unwrap();
        assert!(again.binary && again.config.is_some());

        let removed = remove(&install.bin_dir, &install.conf_dir).unwrap();
        assert!(removed.binary);
        assert_eq!(removed.configs, vec![conflist.clone()]);
        assert_eq!(
            serde_json::from_slice::<Value>(&fs::read(&conflist).unwrap()).unwrap(),
            calico()
        );
        assert!(!install.bin_dir.join(PLUGIN_TYPE).exists());
        let leftovers: Vec<_> = fs::read_dir(&install.conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "no temporary file left: {leftovers:?}");
    }

    #[test]
    fn a_single_plugin_conf_or_a_file_that_is_not_json_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut install = install(dir.path());
        let conf = install.conf_dir.join("10-bridge.conf");
        fs::write(&conf, br#"{"cniVersion": "0.4.0", "type": "bridge"}"#).unwrap();
        let e = install.ensure().unwrap_err();
        assert!(matches!(e, Error::NotAList(_)), "{e}");
        assert!(e.to_string().contains("10-bridge.conf"), "{e}");
        fs::write(&conf, b"{not json").unwrap();
        let e = install.ensure().unwrap_err();
        assert!(e.to_string().contains("10-bridge.conf: not JSON"), "{e}");
        assert_eq!(fs::read(&conf).unwrap(), b"{not json", "left as it was");
    }

    #[test]
    fn a_linked_configuration_is_updated_where_it_points_keeping_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let mut install = install(dir.path());
        let real = dir.path().join("real.conflist");
        fs::write(&real, to_text(&calico())).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
        let link = install.conf_dir.join("10-calico.conflist");
        std::os::unix::fs::symlink(&real, &link).unwrap();

        install.ensure().unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let written: Value = serde_json::from_slice(&fs::read(&real).unwrap()).unwrap();
        assert_eq!(written["plugins"][2]["type"], PLUGIN_TYPE);
        let mode = fs::metadata(&real).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);

        remove(&install.bin_dir, &install.conf_dir).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let restored: Value = serde_json::from_slice(&fs::read(&real).unwrap()).unwrap();
        assert_eq!(restored, calico());
        assert_eq!(
            fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[test]
    fn a_file_changed_under_an_update_is_left_to_be_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-calico.conflist");
        fs::write(&path, to_text(&calico())).unwrap();
        let before = Stamp::of(&path);
        // Someone else's write lands between the read and the rename.
        std::thread::sleep(std::time::Duration::from_millis(5));
        fs::write(&path, b"{\"theirs\": true}").unwrap();
        let e = write_atomically(&path, b"ours", 0o644, before).unwrap_err();
        assert!(matches!(e, Error::KeptChanging(_)), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"{\"theirs\": true}");
    }
}
