//! Finding cgroup v2 and turning cgroup directories into ids.

use std::{
    collections::HashMap,
    io,
    os::{
        fd::OwnedFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag, open, openat},
    sys::stat::{Mode, SFlag, fstatat},
};

use crate::types::CgroupId;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The first cgroup2 mount point listed in `mounts` (the text of
/// `/proc/self/mounts`). On hybrid layouts it is not `/sys/fs/cgroup`.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_src, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// The cgroup2 mount of this process's mount namespace.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    cgroup2_mount_in(&mounts).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 mount in /proc/self/mounts (ambridge needs cgroup v2)",
        )
    })
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The id of the cgroup v2 directory at `path`. Fails if `path` is not a
/// directory on a cgroup2 filesystem.
pub fn cgroup_id(path: &Path) -> io::Result<CgroupId> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| named("open", path, e))?;
    id_of(dir.into(), path)
}

/// The id of the cgroup v2 directory open as `dir` (at `path`): one path
/// walk to open it, then questions to the descriptor (`O_PATH` fstatfs:
/// Linux 3.12).
fn id_of(dir: OwnedFd, path: &Path) -> io::Result<CgroupId> {
    let fs = nix::sys::statfs::fstatfs(&dir).map_err(|e| named("fstatfs", path, e.into()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not on a cgroup2 filesystem", path.display()),
        ));
    }
    let meta = std::fs::File::from(dir)
        .metadata()
        .map_err(|e| named("fstat", path, e))?;
    Ok(CgroupId(meta.ino()))
}

/// `e` of the call `call` on `path`, its kind kept: callers tell a cgroup
/// not made yet (`NotFound`) apart.
fn named(call: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{call} {}: {e}", path.display()))
}

/// Open cgroupfs directories, each the parent of cgroups looked up: a
/// cgroup below one is opened relative to it, walking one path component
/// instead of the whole path (a kernfs lookup a component is most of what
/// finding 10,000 pods' cgroups costs).
///
/// cgroup v2 directories cannot be renamed, so a kept directory stands for
/// its path until it is removed. A cgroup not found below a kept directory
/// is looked for again by path: the directory may have been removed and
/// made anew. Only a parent whose path has no symbolic link is kept (a
/// link could be pointed elsewhere later); a mount moved over a kept path
/// is seen at the next full pass, when every directory is let go.
#[derive(Default)]
pub struct Dirs(HashMap<PathBuf, Kept, crate::types::FastHash>);

/// A kept parent directory.
struct Kept {
    dir: OwnedFd,
    /// The device of its filesystem, if that is cgroup2: a directory below
    /// it on the same device is a cgroup of that hierarchy.
    cgroup2_dev: Option<u64>,
}

impl Kept {
    fn new(dir: OwnedFd) -> Self {
        let on_cgroup2 = nix::sys::statfs::fstatfs(&dir)
            .is_ok_and(|fs| fs.filesystem_type().0 == CGROUP2_SUPER_MAGIC);
        let cgroup2_dev = on_cgroup2
            .then(|| nix::sys::stat::fstat(&dir).ok())
            .flatten()
            .map(|st| st.st_dev);
        Self { dir, cgroup2_dev }
    }
}

impl Dirs {
    /// At most this many directories are kept; past it, all are let go.
    const KEPT: usize = 64;

    /// The id of the cgroup v2 directory at `path` (see [`cgroup_id`]).
    pub fn cgroup_id(&mut self, path: &Path) -> io::Result<CgroupId> {
        // Below a kept cgroup2 parent, one `fstatat` answers (the id is the
        // inode number, Linux 5.5 on 64-bit hosts) where an open, two
        // questions to the descriptor and a close would. Anything else it
        // finds is left to the open below, which says what is wrong.
        if let (Some(parent), Some(name)) = (path.parent(), path.file_name())
            && let Some(kept) = self.0.get(parent)
            && let Some(dev) = kept.cgroup2_dev
            && let Ok(st) = fstatat(&kept.dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            && st.st_dev == dev
            && SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
        {
            return Ok(CgroupId(st.st_ino));
        }
        let dir = self
            .open(path, None, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .map_err(|e| named("open", path, e))?;
        id_of(dir, path)
    }

    /// Opens `cgroup`, or the file `file` in it, with `flags`.
    pub fn open(&mut self, cgroup: &Path, file: Option<&str>, flags: OFlag) -> io::Result<OwnedFd> {
        let flags = flags | OFlag::O_CLOEXEC;
        let (Some(parent), Some(name)) = (cgroup.parent(), cgroup.file_name()) else {
            return by_path(cgroup, file, flags);
        };
        let below = match file {
            Some(file) => Path::new(name).join(file),
            None => PathBuf::from(name),
        };
        if let Some(kept) = self.0.get(parent) {
            return match openat(&kept.dir, &below, flags, Mode::empty()) {
                // The kept parent may have been removed and made anew: the
                // path decides, and a cgroup found by it retires the kept
                // directory. Not found either way, the parent stays kept (a
                // pod cgroup not made yet costs no reopening of it).
                Err(Errno::ENOENT) => {
                    let found = by_path(cgroup, file, flags);
                    if found.is_ok() {
                        self.0.remove(parent);
                    }
                    found
                }
                found => found.map_err(io::Error::from),
            };
        }
        let Ok(dir) = open(
            parent,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return by_path(cgroup, file, flags);
        };
        let found = openat(&dir, &below, flags, Mode::empty());
        if std::fs::canonicalize(parent).is_ok_and(|real| real == parent) {
            if self.0.len() >= Self::KEPT {
                self.0.clear();
            }
            self.0.insert(parent.to_path_buf(), Kept::new(dir));
        }
        found.map_err(io::Error::from)
    }

    /// Lets every kept directory go.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// Opens `cgroup`, or the file `file` in it, by its whole path.
fn by_path(cgroup: &Path, file: Option<&str>, flags: OFlag) -> io::Result<OwnedFd> {
    let path = match file {
        Some(file) => cgroup.join(file),
        None => cgroup.to_path_buf(),
    };
    Ok(open(&path, flags, Mode::empty())?)
}

/// The cgroup v2 path in the text of a `/proc/<pid>/cgroup` file: the
/// `0::` line, relative to the reader's cgroup namespace root (which is
/// where its cgroup2 mount is rooted). `None` when there is no such line,
/// or the path leaves that root (`/../..`: a cgroup outside the reader's
/// namespace).
pub fn v2_path_in(proc_cgroup: &str) -> Option<PathBuf> {
    let path = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))?
        .trim_end();
    let path = Path::new(path).strip_prefix("/").ok()?;
    path.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
        .then(|| path.to_path_buf())
}

/// The cgroup v2 path of process `pid`, relative to the cgroup2 mount.
pub fn cgroup_of_pid(pid: u32) -> io::Result<PathBuf> {
    let file = format!("/proc/{pid}/cgroup");
    let text =
        std::fs::read_to_string(&file).map_err(|e| with_path(e, "reading", Path::new(&file)))?;
    v2_path_in(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{file} names no cgroup v2 path inside this cgroup namespace: {:?}",
                text.trim()
            ),
        )
    })
}

/// The ids of the cgroup at `relative` under the cgroup2 `mount` and of
/// every cgroup above it up to the mount's root, nearest first.
pub fn lineage(mount: &Path, relative: &Path) -> io::Result<Vec<CgroupId>> {
    let mut ids = Vec::new();
    let mut at = Some(mount.join(relative));
    while let Some(dir) = at {
        ids.push(cgroup_id(&dir)?);
        at = dir.parent().filter(|_| dir != mount).map(Path::to_path_buf);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_path_of_a_process_is_its_0_line_relative_to_the_mount() {
        let text = "12:cpu,cpuacct:/kubepods/x\n0::/kubepods/burstable/pod1/ctr\n";
        assert_eq!(
            v2_path_in(text),
            Some(PathBuf::from("kubepods/burstable/pod1/ctr"))
        );
        assert_eq!(v2_path_in("0::/\n"), Some(PathBuf::new()));
        // Outside the reader's cgroup namespace, or no v2 line at all.
        assert_eq!(v2_path_in("0::/../../other\n"), None);
        assert_eq!(v2_path_in("3:memory:/x\n"), None);
    }

    #[test]
    fn this_process_lineage_ends_at_the_root_cgroup() {
        let mount = cgroup2_mount().unwrap();
        let own = cgroup_of_pid(std::process::id()).unwrap();
        let ids = lineage(&mount, &own).unwrap();
        assert_eq!(ids.len(), own.components().count() + 1);
        assert_eq!(ids[0], cgroup_id(&mount.join(&own)).unwrap());
        assert_eq!(ids.last(), Some(&cgroup_id(&mount).unwrap()));
    }

    #[test]
    fn finds_cgroup2_on_a_hybrid_layout() {
        let mounts = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        let mounts = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        assert!(cgroup_id(dir.path()).is_err());
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        let e = Dirs::default().cgroup_id(&inner).unwrap_err();
        assert!(e.to_string().contains("not on a cgroup2 filesystem"), "{e}");
    }

    /// A cgroup tree made for one test, removed however the test ends.
    struct Tree(PathBuf);

    impl Drop for Tree {
        fn drop(&mut self) {
            for dir in ["parent/child", "parent/sibling", "parent", ""] {
                let _ = std::fs::remove_dir(self.0.join(dir));
            }
        }
    }

    #[test]
    fn a_cgroup_is_found_below_a_kept_parent_even_once_both_are_made_anew() {
        let root = cgroup2_mount()
            .unwrap()
            .join(format!("ambridge-unit-dirs-{}", std::process::id()));
        let tree = Tree(root);
        let (parent, child) = (tree.0.join("parent"), tree.0.join("parent/child"));
        std::fs::create_dir_all(&child).unwrap();
        let mut dirs = Dirs::default();
        let first = dirs.cgroup_id(&child).unwrap();
        assert_eq!(first, cgroup_id(&child).unwrap());
        assert!(dirs.0.contains_key(&parent), "the parent is kept open");
        dirs.open(&child, Some("cgroup.events"), OFlag::O_RDONLY)
            .expect("a file in the cgroup, below the kept parent");
        // Below the kept parent an id is one stat: a sibling's is its own,
        // and a file (twice: the second below its kept cgroup) is refused.
        let sibling = parent.join("sibling");
        std::fs::create_dir(&sibling).unwrap();
        assert_eq!(
            dirs.cgroup_id(&sibling).unwrap(),
            cgroup_id(&sibling).unwrap()
        );
        assert_ne!(dirs.cgroup_id(&sibling).unwrap(), first);
        for _ in 0..2 {
            let file = dirs.cgroup_id(&child.join("cgroup.procs")).unwrap_err();
            assert!(file.to_string().contains("cgroup.procs"), "{file}");
        }
        assert!(dirs.0.contains_key(&child), "the file's cgroup is kept");
        std::fs::remove_dir(&sibling).unwrap();

        std::fs::remove_dir(&child).unwrap();
        std::fs::remove_dir(&parent).unwrap();
        let gone = dirs.cgroup_id(&child).unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound, "{gone}");
        std::fs::create_dir_all(&child).unwrap();
        let again = dirs.cgroup_id(&child).unwrap();
        assert_eq!(again, cgroup_id(&child).unwrap());
        assert_ne!(again, first, "the new cgroup, not the removed one");

        // Through a symbolic link the parent is used, never kept.
        let links = tempfile::tempdir().unwrap();
        let link = links.path().join("tree");
        std::os::unix::fs::symlink(&tree.0, &link).unwrap();
        let mut dirs = Dirs::default();
        assert_eq!(dirs.cgroup_id(&link.join("parent/child")).unwrap(), again);
        assert!(dirs.0.is_empty(), "a parent behind a link is not kept");
    }
}

/// One directory where the kubelet creates pod-level cgroups, and how it
/// names them there. A single table serves both looking a pod up by UID and
/// listing every pod, so the two cannot disagree about the layout.
struct PodCgroupDir {
    /// The directory holding the pod cgroups, relative to the parent.
    dir: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    /// What stands for `-` in the UID: the systemd driver uses `_`, as `-`
    /// separates the levels of a slice name.
    dash: char,
}

/// Every driver and QoS class: guaranteed pods sit directly under
/// `kubepods`, the others under their QoS level.
const POD_CGROUP_DIRS: [PodCgroupDir; 6] = [
    // cgroupfs driver
    PodCgroupDir {
        dir: "kubepods",
        prefix: "pod",
        suffix: "",
        dash: '-',
    },
    PodCgroupDir {
        dir: "kubepods/burstable",
        prefix: "pod",
        suffix: "",
        dash: '-',
    },
    PodCgroupDir {
        dir: "kubepods/besteffort",
        prefix: "pod",
        suffix: "",
        dash: '-',
    },
    // systemd driver
    PodCgroupDir {
        dir: "kubepods.slice",
        prefix: "kubepods-pod",
        suffix: ".slice",
        dash: '_',
    },
    PodCgroupDir {
        dir: "kubepods.slice/kubepods-burstable.slice",
        prefix: "kubepods-burstable-pod",
        suffix: ".slice",
        dash: '_',
    },
    PodCgroupDir {
        dir: "kubepods.slice/kubepods-besteffort.slice",
        prefix: "kubepods-besteffort-pod",
        suffix: ".slice",
        dash: '_',
    },
];

impl PodCgroupDir {
    /// The name of the cgroup directory of `pod_uid` in this directory.
    fn name_of(&self, pod_uid: &str) -> String {
        let uid = pod_uid.replace('-', &self.dash.to_string());
        format!("{}{uid}{}", self.prefix, self.suffix)
    }

    /// The pod UID (with dashes) whose cgroup in this directory is called
    /// `name`, or `None` if `name` is not a pod cgroup (a QoS level, a
    /// container scope, a cgroup interface file).
    fn pod_uid_of(&self, name: &str) -> Option<String> {
        let uid = name
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?
            .replace(self.dash, "-");
        // The round trip rejects names this layout would not produce, such
        // as a systemd slice spelling the UID with dashes.
        (is_pod_uid(&uid) && self.name_of(&uid) == name).then_some(uid)
    }
}

/// Where the kubelet puts a pod's cgroup, relative to the cgroup2 mount,
/// for both cgroup drivers and every QoS class: guaranteed pods sit
/// directly under `kubepods`, the others under their QoS level.
pub fn kubepods_candidates(pod_uid: &str) -> Vec<PathBuf> {
    POD_CGROUP_DIRS
        .iter()
        .map(|d| Path::new(d.dir).join(d.name_of(pod_uid)))
        .collect()
}

/// The directories under `parent` where the kubelet creates pod cgroups
/// (`kubepods` and its QoS levels, for both drivers), whether they exist or
/// not.
pub fn kubelet_pod_dirs(parent: &Path) -> Vec<PathBuf> {
    POD_CGROUP_DIRS.iter().map(|d| parent.join(d.dir)).collect()
}

/// Every pod-level cgroup under `parent` (the same parent as
/// [`find_pod_cgroup`]), as (pod UID with dashes, cgroup directory),
/// layout by layout in the order [`find_pod_cgroup`] tries them. Layouts
/// that do not exist on this node (the other driver, an unused QoS class)
/// are skipped.
pub fn list_pod_cgroups(parent: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut pods = Vec::new();
    for layout in &POD_CGROUP_DIRS {
        let dir = parent.join(layout.dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(with_path(e, "read_dir", &dir)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| with_path(e, "read_dir", &dir))?;
            let Some(uid) = entry
                .file_name()
                .to_str()
                .and_then(|n| layout.pod_uid_of(n))
            else {
                continue;
            };
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pods.push((uid, path)),
                Ok(_) => {}
                // The pod went away while we were listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(e, "stat", &path)),
            }
        }
    }
    Ok(pods)
}

/// `e`, saying which operation on which path failed; the kind is kept so
/// callers can still tell `NotFound` apart.
fn with_path(e: io::Error, op: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

/// Finds the pod-level cgroup of `pod_uid` under `parent` (the cgroup2
/// mount, or wherever the kubelet's `kubepods` lives).
pub fn find_pod_cgroup(parent: &Path, pod_uid: &str) -> io::Result<PathBuf> {
    kubepods_candidates(pod_uid)
        .into_iter()
        .map(|relative| parent.join(relative))
        .find(|path| path.is_dir())
        .ok_or_else(|| pod_cgroup_missing(parent, pod_uid))
}

/// The cgroup of container `container` (the runtime's ID for it) below
/// the pod-level cgroup `pod`: named `<id>` by the kubelet's cgroupfs
/// driver, `<runtime>-<id>.scope` (`cri-containerd-`, `crio-`, `docker-`)
/// by its systemd driver. `None` while there is none.
pub fn container_cgroup(pod: &Path, container: &str) -> io::Result<Option<PathBuf>> {
    let scope = format!("-{container}.scope");
    let entries = std::fs::read_dir(pod).map_err(|e| named("read_dir", pod, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| named("read_dir", pod, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == container || name.ends_with(&scope) {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// The error of [`find_pod_cgroup`] finding no cgroup for `pod_uid`.
pub fn pod_cgroup_missing(parent: &Path, pod_uid: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no cgroup for pod {pod_uid} under {} (looked for the cgroupfs and systemd layouts of every QoS class)",
            parent.display()
        ),
    )
}

/// Whether `uid` has the shape of a Kubernetes UID (a UUID), so it can be
/// put into a cgroup path safely.
pub fn is_pod_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod kubepods_tests {
    use super::*;

    const UID: &str = "9f2c0d7e-5b1a-4c6e-9a53-2f0b8e1d4c11";

    #[test]
    fn every_driver_and_qos_layout_is_found() {
        for relative in kubepods_candidates(UID) {
            let root = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(root.path().join(&relative)).unwrap();
            assert_eq!(
                find_pod_cgroup(root.path(), UID).unwrap(),
                root.path().join(&relative),
                "{}",
                relative.display()
            );
        }
    }

    #[test]
    fn a_container_cgroup_is_found_by_its_id_in_either_drivers_layout() {
        let id = "3f1a9c";
        for name in [
            id.to_string(),
            format!("cri-containerd-{id}.scope"),
            format!("crio-{id}.scope"),
        ] {
            let pod = tempfile::tempdir().unwrap();
            std::fs::create_dir(pod.path().join("other")).unwrap();
            std::fs::create_dir(pod.path().join(&name)).unwrap();
            assert_eq!(
                container_cgroup(pod.path(), id).unwrap(),
                Some(pod.path().join(&name)),
                "{name}"
            );
            assert_eq!(container_cgroup(pod.path(), "3f1a").unwrap(), None);
        }
        let gone = tempfile::tempdir().unwrap().path().join("gone");
        let err = container_cgroup(&gone, id).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn the_systemd_layout_uses_underscores_in_the_uid() {
        let systemd: Vec<_> = kubepods_candidates(UID)
            .into_iter()
            .filter(|p| p.starts_with("kubepods.slice"))
            .collect();
        assert_eq!(systemd.len(), 3);
        assert!(systemd.iter().all(|p| {
            p.to_string_lossy()
                .contains("9f2c0d7e_5b1a_4c6e_9a53_2f0b8e1d4c11")
        }));
        assert_eq!(
            systemd[1],
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9f2c0d7e_5b1a_4c6e_9a53_2f0b8e1d4c11.slice"
            )
        );
    }

    #[test]
    fn a_guaranteed_pod_sits_directly_under_kubepods() {
        let c = kubepods_candidates(UID);
        assert_eq!(c[0], PathBuf::from(format!("kubepods/pod{UID}")));
        assert_eq!(
            c[3],
            PathBuf::from("kubepods.slice/kubepods-pod9f2c0d7e_5b1a_4c6e_9a53_2f0b8e1d4c11.slice")
        );
    }

    #[test]
    fn a_missing_pod_cgroup_names_the_pod() {
        let root = tempfile::tempdir().unwrap();
        let err = find_pod_cgroup(root.path(), UID).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains(UID), "{err}");
    }

    const OTHER: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

    fn mkdirs(root: &Path, dirs: &[&str]) {
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
    }

    fn sorted(mut pods: Vec<(String, PathBuf)>) -> Vec<(String, PathBuf)> {
        pods.sort();
        pods
    }

    #[test]
    fn every_driver_and_qos_layout_is_listed() {
        for relative in kubepods_candidates(UID) {
            let root = tempfile::tempdir().unwrap();
            mkdirs(root.path(), &[relative.to_str().unwrap()]);
            assert_eq!(
                list_pod_cgroups(root.path()).unwrap(),
                vec![(UID.to_string(), root.path().join(&relative))],
                "{}",
                relative.display()
            );
        }
    }

    #[test]
    fn pods_of_every_qos_class_are_listed_together() {
        let root = tempfile::tempdir().unwrap();
        let guaranteed = format!("kubepods/pod{UID}");
        let besteffort = format!("kubepods/besteffort/pod{OTHER}");
        mkdirs(
            root.path(),
            &[&guaranteed, &besteffort, "kubepods/burstable"],
        );
        assert_eq!(
            sorted(list_pod_cgroups(root.path()).unwrap()),
            sorted(vec![
                (UID.to_string(), root.path().join(guaranteed)),
                (OTHER.to_string(), root.path().join(besteffort)),
            ])
        );
    }

    #[test]
    fn directories_that_are_not_pods_are_ignored() {
        let root = tempfile::tempdir().unwrap();
        let pod = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9f2c0d7e_5b1a_4c6e_9a53_2f0b8e1d4c11.slice";
        mkdirs(
            root.path(),
            &[
                &format!("{pod}/cri-containerd-0123abcd.scope"),
                "kubepods.slice/kubepods-besteffort.slice",
                "kubepods.slice/system.slice",
                "kubepods.slice/kubepods-podnotauid.slice",
                // The systemd driver never spells the UID with dashes.
                &format!("kubepods.slice/kubepods-pod{OTHER}.slice"),
                &format!("kubepods/pod{OTHER}x"),
                "kubepods/burstable/random",
            ],
        );
        std::fs::write(root.path().join("kubepods.slice/cgroup.procs"), "").unwrap();
        std::fs::write(root.path().join(format!("kubepods/pod{OTHER}")), "").unwrap();
        assert_eq!(
            list_pod_cgroups(root.path()).unwrap(),
            vec![(UID.to_string(), root.path().join(pod))]
        );
    }

    #[test]
    fn no_kubepods_directory_lists_no_pods() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(list_pod_cgroups(root.path()).unwrap(), vec![]);
    }

    #[test]
    fn an_unreadable_parent_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        // A file where a directory should be: ENOTDIR, not NotFound.
        std::fs::write(root.path().join("kubepods"), "").unwrap();
        let err = list_pod_cgroups(root.path()).unwrap_err();
        assert!(err.to_string().contains("kubepods"), "{err}");
    }

    #[test]
    fn pod_cgroup_names_parse_back_to_the_uid() {
        for layout in &POD_CGROUP_DIRS {
            let name = layout.name_of(UID);
            assert_eq!(layout.pod_uid_of(&name).as_deref(), Some(UID), "{name}");
        }
    }

    #[test]
    fn only_uuid_shaped_uids_are_pod_uids() {
        assert!(is_pod_uid(UID));
        for bad in [
            "",
            "sleep",
            "../../etc",
            "9f2c0d7e-5b1a-4c6e-9a53-2f0b8e1d4c1x",
            "9f2c0d7e5b1a4c6e9a532f0b8e1d4c11abcd",
        ] {
            assert!(!is_pod_uid(bad), "{bad}");
        }
    }
}
