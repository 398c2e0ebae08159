//! Which network namespace a pod (or the shared ztunnel) lives in, as the
//! kernel programs identify it: the netns cookie.
//!
//! A cgroup's netns is the netns of a process in it (any container of a pod
//! shares the sandbox's netns). Its cookie is read with `SO_NETNS_COOKIE`
//! (Linux 5.14) on a socket opened inside it, from a short-lived thread that
//! enters the namespace, so the daemon's own threads never change netns.

use std::{
    collections::HashMap,
    fs, io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// `/proc/<pid>/ns/net` of the first process found in `cgroup` or below it,
/// or `None` if no process runs there yet.
pub fn netns_of_cgroup(cgroup: &Path) -> io::Result<Option<PathBuf>> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs"))?;
    if let Some(pid) = procs.lines().find(|l| !l.trim().is_empty()) {
        return Ok(Some(PathBuf::from(format!("/proc/{}/ns/net", pid.trim()))));
    }
    for entry in fs::read_dir(cgroup)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(ns) = netns_of_cgroup(&entry.path())?
        {
            return Ok(Some(ns));
        }
    }
    Ok(None)
}

/// The cookie of the network namespace at `netns` (a `/proc/*/ns/net` or
/// `/run/netns/*` path).
pub fn cookie(netns: &Path) -> io::Result<u64> {
    let ns = fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("setns into {}: {e}", netns.display())))?;
            let sock = std::net::UdpSocket::bind("127.0.0.1:0")
                .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
            let mut cookie = 0u64;
            let mut len = size_of::<u64>() as libc::socklen_t;
            // SAFETY: `cookie` and `len` outlive the call and match in size.
            let ret = unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NETNS_COOKIE,
                    (&mut cookie as *mut u64).cast(),
                    &mut len,
                )
            };
            if ret != 0 {
                return Err(io::Error::other(format!(
                    "getsockopt(SO_NETNS_COOKIE) in {}: {}",
                    netns.display(),
                    io::Error::last_os_error()
                )));
            }
            Ok(cookie)
        })
        .join()
        .map_err(|_| io::Error::other("netns cookie thread panicked"))?
    })
}

/// Netns cookies by namespace identity (device and inode of the nsfs file),
/// so each namespace is entered once.
#[derive(Default)]
pub struct CookieCache {
    by_ns: HashMap<(u64, u64), u64>,
}

impl CookieCache {
    /// The netns cookie of `cgroup`'s processes, `None` while it has none.
    pub fn of_cgroup(&mut self, cgroup: &Path) -> io::Result<Option<u64>> {
        let Some(ns) = netns_of_cgroup(cgroup)? else {
            return Ok(None);
        };
        let meta = match fs::metadata(&ns) {
            Ok(m) => m,
            // The process exited between listing and looking: try later.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let id = (meta.dev(), meta.ino());
        if let Some(c) = self.by_ns.get(&id) {
            return Ok(Some(*c));
        }
        let c = cookie(&ns)?;
        self.by_ns.insert(id, c);
        Ok(Some(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_directory_without_processes_has_no_netns() {
        // A plain directory stands in for an empty cgroup.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        fs::create_dir(dir.path().join("app")).unwrap();
        fs::write(dir.path().join("app").join("cgroup.procs"), "\n").unwrap();
        assert_eq!(netns_of_cgroup(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_process_in_a_child_cgroup_gives_the_pods_netns() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        fs::create_dir(dir.path().join("app")).unwrap();
        fs::write(dir.path().join("app").join("cgroup.procs"), "4242\n").unwrap();
        assert_eq!(
            netns_of_cgroup(dir.path()).unwrap(),
            Some(PathBuf::from("/proc/4242/ns/net"))
        );
    }

    #[test]
    fn the_cookie_of_our_own_netns_is_stable() {
        let own = Path::new("/proc/self/ns/net");
        assert_eq!(cookie(own).unwrap(), cookie(own).unwrap());
    }
}
