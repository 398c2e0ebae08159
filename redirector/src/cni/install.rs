//! Putting the chained plugin on the node: its binary into the CNI bin
//! directory, and its entry last in the network configuration the container
//! runtime loads. The daemon keeps it there (a main plugin that rewrites its
//! conflist drops the entry; the next look puts it back) and `ambridge
//! uninstall` takes both away, so pods start as before.
//!
//! The runtime (libcni, as containerd and CRI-O use it) loads the first
//! file of the configuration directory by name among `*.conf`,
//! `*.conflist` and `*.json`; only a conflist chains plugins, so a
//! single-plugin `.conf` is refused, naming it.

use std::{
    fs, io,
    io::Write,
    os::unix::fs::PermissionsExt,
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
    /// The plugin's entry in the conflist.
    pub fn entry(&self) -> Value {
        json!({"type": PLUGIN_TYPE, "socket": self.socket})
    }

    /// Puts the binary and the entry in place where they are missing or
    /// differ; touches nothing that is already right.
    pub fn ensure(&self) -> Result<Changed, Error> {
        let config =
            active_config(&self.conf_dir)?.ok_or(Error::NoConfig(self.conf_dir.clone()))?;
        let binary = self.ensure_binary()?;
        let text = fs::read(&config).map_err(io_error(&config, "read"))?;
        let current: Value = serde_json::from_slice(&text).map_err(|source| Error::NotJson {
            path: config.clone(),
            source,
        })?;
        let wanted = with_entry(&current, &self.entry()).ok_or(Error::NotAList(config.clone()))?;
        let config = if wanted == current {
            None
        } else {
            write_atomically(&config, &to_text(&wanted), None)?;
            Some(config)
        };
        Ok(Changed { binary, config })
    }

    fn ensure_binary(&self) -> Result<bool, Error> {
        let target = self.bin_dir.join(PLUGIN_TYPE);
        let new = fs::read(&self.binary).map_err(io_error(&self.binary, "read"))?;
        if fs::read(&target).is_ok_and(|old| old == new) {
            return Ok(false);
        }
        write_atomically(&target, &new, Some(0o755))?;
        Ok(true)
    }
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
        let Ok(text) = fs::read(&config) else {
            continue;
        };
        let Ok(current) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        let without = without_entry(&current);
        if without != current {
            write_atomically(&config, &to_text(&without), None)?;
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

/// Replaces `path` by `contents` in one rename: the runtime reads the old
/// file or the new one, never half of one. The temporary file's name has
/// no configuration extension, so it is never loaded.
fn write_atomically(path: &Path, contents: &[u8], mode: Option<u32>) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".ambridge-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_error(dir, "create a temporary file"))?;
    tmp.write_all(contents)
        .map_err(io_error(tmp.path(), "write"))?;
    if let Some(mode) = mode {
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
            .map_err(io_error(tmp.path(), "chmod"))?;
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
        Install {
            bin_dir: bin,
            conf_dir: conf,
            binary,
            socket: "/var/run/ambridge/api.sock".into(),
        }
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
        let install = install(dir.path());
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
        let install = install(dir.path());
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
}
