//! Which network namespace a pod (or the shared ztunnel) lives in, as the
//! kernel programs identify it: the netns cookie.
//!
//! A cgroup's netns is the netns of its sandbox process, the oldest in it
//! (every container of a pod shares the sandbox's netns unless it moved to
//! one of its own). Its cookie is read with `SO_NETNS_COOKIE`
//! (Linux 5.14) on a socket opened inside it, from a short-lived thread that
//! enters the namespace, so the daemon's own threads never change netns.

use super::{cgroup, misses::Misses};
use crate::types::FastHash;
use nix::fcntl::OFlag;
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::{self, Read},
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// `/proc/<pid>/ns/net` of the pod's sandbox: the oldest process in
/// `cgroup` or below it, or `None` if no process runs there yet. The
/// sandbox (pause) process starts before any container, so a container
/// process that has moved into a network namespace of its own (one that may
/// hold another pod's address) is never taken for the pod's.
pub fn netns_of_cgroup(cgroup: &Path) -> io::Result<Option<PathBuf>> {
    sandbox_netns(cgroup, fs::File::open(cgroup.join("cgroup.events"))?)
}

/// As [`netns_of_cgroup`], with `cgroup` opened below a directory `dirs`
/// keeps open.
pub(super) fn netns_of_cgroup_in(
    dirs: &mut cgroup::Dirs,
    cgroup: &Path,
) -> io::Result<Option<PathBuf>> {
    let events = dirs.open(cgroup, Some("cgroup.events"), OFlag::O_RDONLY)?;
    sandbox_netns(cgroup, events.into())
}

/// A sandbox's namespace as a survey found it ([`super::survey`]): opened
/// when it was found, so a pid reused since cannot stand in for it.
pub struct Opened {
    pub(super) path: PathBuf,
    /// What opening it gave (`NotFound`: the process had exited).
    ns: io::Result<fs::File>,
}

/// As [`netns_of_cgroup_in`], the namespace opened at once.
pub(super) fn open_sandbox_of(
    dirs: &mut cgroup::Dirs,
    cgroup: &Path,
) -> io::Result<Option<Opened>> {
    Ok(netns_of_cgroup_in(dirs, cgroup)?.map(|path| Opened {
        ns: open_netns(&path),
        path,
    }))
}

/// [`netns_of_cgroup`], once `cgroup`'s `cgroup.events` is open as
/// `events`.
fn sandbox_netns(cgroup: &Path, events: fs::File) -> io::Result<Option<PathBuf>> {
    // One read says whether any process runs in the subtree: a pod whose
    // sandbox has not started (or a cgroup that stays empty) costs no walk.
    if !populated(events)? {
        return Ok(None);
    }
    let mut oldest: Option<(u64, u32)> = None;
    for_each_process(cgroup, &mut |pid| {
        // A process that exited while listed has no start time: skipped.
        if let Some(started) = start_time(pid)
            && oldest.is_none_or(|o| (started, pid) < o)
        {
            oldest = Some((started, pid));
        }
    })?;
    Ok(oldest.map(|(_, pid)| PathBuf::from(format!("/proc/{pid}/ns/net"))))
}

/// Where a pod's network namespace is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsAt<'a> {
    /// The namespace of the sandbox process in this cgroup (see
    /// [`netns_of_cgroup`]).
    SandboxOf(&'a Path),
    /// This nsfs file: what the container runtime hands the CNI plugin
    /// (`CNI_NETNS`), before any process runs in the pod.
    File(&'a Path),
}

impl NetnsAt<'_> {
    /// The namespace's path, `None` while a cgroup has no process.
    fn path(self, dirs: &mut cgroup::Dirs) -> io::Result<Option<PathBuf>> {
        match self {
            NetnsAt::SandboxOf(cgroup) => netns_of_cgroup_in(dirs, cgroup),
            NetnsAt::File(path) => Ok(Some(path.to_path_buf())),
        }
    }
}

/// Whether a process runs in a cgroup or below it: `populated` of its
/// `cgroup.events` (cgroup v2, Linux 4.5), open as `events`.
fn populated(mut events: fs::File) -> io::Result<bool> {
    // The file is two short lines: read into a buffer on the stack, with
    // no size query (`read_to_string` asks for one first).
    let mut buf = [0u8; 128];
    let mut len = 0;
    while len < buf.len() {
        match events.read(&mut buf[len..])? {
            0 => break,
            n => len += n,
        }
    }
    Ok(buf[..len]
        .split(|b| *b == b'\n')
        .any(|l| l == b"populated 1"))
}

/// Calls `f` with every pid listed in `cgroup` and the cgroups below it.
fn for_each_process(cgroup: &Path, f: &mut impl FnMut(u32)) -> io::Result<()> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs"))?;
    for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
        f(pid);
    }
    for entry in fs::read_dir(cgroup)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            for_each_process(&entry.path(), f)?;
        }
    }
    Ok(())
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`,
/// field 22), `None` if it is gone.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: the fields resume after the last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Pod cgroups by the addresses their sandbox's network namespace holds.
pub type AddressIndex = HashMap<IpAddr, BTreeSet<PathBuf>>;

/// Which pod cgroup an identity given by address goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The one pod cgroup whose network namespace holds the addresses.
    Sole(PathBuf),
    /// Several hold them, one of them where the pod was placed before: it
    /// stays there (a tenant claiming a pod's address must not switch the
    /// pod's capture off), and `report` says who else claims it.
    Disputed { kept: PathBuf, report: String },
}

/// The one pod cgroup whose network namespace holds `ips`. An address held
/// by the namespaces of several pod cgroups is refused, naming them: one of
/// them claims another pod's address, and an identity given by address
/// must not go to it. Where the pod was `placed_before` on one of them,
/// it stays there, disputed.
pub fn claimant(
    index: &AddressIndex,
    ips: &[IpAddr],
    placed_before: Option<&Path>,
) -> io::Result<Claim> {
    let claimants: BTreeSet<&PathBuf> = ips
        .iter()
        .filter_map(|ip| index.get(ip))
        .flatten()
        .collect();
    let mut found = claimants.iter();
    match (found.next(), found.next()) {
        (Some(one), None) => Ok(Claim::Sole((*one).clone())),
        (None, _) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no pod cgroup's network namespace holds {ips:?} (pod not started yet?)"),
        )),
        (Some(_), Some(_)) => {
            let names = claimants
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            match placed_before.filter(|p| claimants.contains(&p.to_path_buf())) {
                Some(kept) => Ok(Claim::Disputed {
                    kept: kept.to_path_buf(),
                    report: format!(
                        "{ips:?} are held by the network namespaces of several pod cgroups \
                         ({names}): the pod stays on {}, where it was, as one of them claims \
                         another pod's address",
                        kept.display()
                    ),
                }),
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{ips:?} are held by the network namespaces of several pod cgroups \
                         ({names}): refused, as one of them claims another pod's address"
                    ),
                )),
            }
        }
    }
}

/// The cookie of the network namespace at `netns` (a `/proc/*/ns/net` or
/// `/run/netns/*` path).
pub fn cookie(netns: &Path) -> io::Result<u64> {
    in_netns(&open_netns(netns)?, &netns.display(), || cookie_here(netns))
}

/// [`own_cookie`], its error naming `netns`, the namespace the calling
/// thread is in.
fn cookie_here(netns: &Path) -> io::Result<u64> {
    own_cookie().map_err(|e| {
        io::Error::other(format!(
            "getsockopt(SO_NETNS_COOKIE) in {}: {e}",
            netns.display()
        ))
    })
}

/// The cookie of the calling thread's network namespace (`ENOPROTOOPT`
/// before Linux 5.14).
pub(crate) fn own_cookie() -> io::Result<u64> {
    // Any socket will do (the option is the socket layer's): a Unix one
    // needs no address, so a namespace whose `lo` is still down answers.
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io::Error::other(format!("socket(AF_UNIX): {e}")))?;
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
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The addresses of the interfaces of the network namespace at `netns`,
/// sorted, without loopback and IPv6 link-local ones: in a pod's netns,
/// the pod IPs.
pub fn addresses(netns: &Path) -> io::Result<Vec<IpAddr>> {
    in_netns(&open_netns(netns)?, &netns.display(), || {
        own_addresses(netns)
    })
}

/// The addresses of the calling thread's network namespace, filtered as
/// [`addresses`] describes; `netns` only names it in errors.
fn own_addresses(netns: &Path) -> io::Result<Vec<IpAddr>> {
    let interfaces = nix::ifaddrs::getifaddrs().map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("getifaddrs in {}: {e}", netns.display()),
        )
    })?;
    let mut ips: Vec<IpAddr> = interfaces
        .filter_map(|i| i.address)
        .filter_map(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
            (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
            _ => None,
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
        })
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// Opens a netns file, naming it if that fails; the error kind is kept so
/// callers can tell an exited process (`NotFound`) apart.
fn open_netns(netns: &Path) -> io::Result<fs::File> {
    fs::File::open(netns)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", netns.display())))
}

/// Runs `f` on a short-lived thread that has entered the network namespace
/// `ns` (opened from `netns`, which names it in errors). Only that thread
/// changes netns, so the daemon's own threads never do.
pub(crate) fn in_netns<T: Send>(
    ns: &fs::File,
    netns: &(dyn std::fmt::Display + Sync),
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, || {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("setns into {netns}: {e}"),
                    )
                })?;
                f()
            })
            .map_err(|e| {
                io::Error::new(e.kind(), format!("spawning a thread to enter {netns}: {e}"))
            })?
            .join()
            .map_err(|_| io::Error::other(format!("thread in netns {netns} panicked")))?
    })
}

/// Per-namespace values (cookies, addresses), so each namespace is entered
/// once rather than at every reconcile.
///
/// Entries are keyed by namespace identity (device and inode of the nsfs
/// file), and each entry keeps the namespace open: the kernel hands a freed
/// namespace's inode number to the next namespace created, so without the
/// open file a new pod could be answered with a dead pod's cookie or
/// addresses. The price is that a dead pod's namespace lives on until
/// [`Self::retain_seen`] drops its entry.
pub struct NsCache<T> {
    by_ns: HashMap<(u64, u64), Held<T>, FastHash>,
    /// The namespace each cgroup's sandbox was found in, by the last full
    /// pass (or since): a light pass takes it from here instead of
    /// looking for the sandbox process again.
    sandboxes: HashMap<PathBuf, (u64, u64), FastHash>,
    /// Cgroups found with no process yet, and when to look again.
    no_sandbox: Misses<PathBuf>,
    /// Where this pass's survey found each cgroup's sandbox
    /// ([`super::survey`]), taken instead of looking again.
    surveyed: HashMap<PathBuf, Option<Opened>, FastHash>,
    /// What this pass takes as found before.
    pass: Pass,
    /// Where the cgroups' `cgroup.events` files are opened.
    dirs: cgroup::Dirs,
}

/// How much of what was found before a pass takes as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Everything is looked up again (a cgroup or a sandbox may have been
    /// recreated).
    Full,
    /// What was found stands; what was not found yet is looked for again.
    Retry,
    /// Everything found or not found stands, but for the pods whose state
    /// changed (see [`NsCache::forget`]): the pass a source's change starts.
    Cached,
}

struct Held<T> {
    /// Keeps the namespace, and so its inode number, alive.
    ns: fs::File,
    value: T,
    /// Looked up since the last [`NsCache::retain_seen`].
    seen: bool,
}

impl<T> Default for NsCache<T> {
    fn default() -> Self {
        Self {
            by_ns: HashMap::default(),
            sandboxes: HashMap::default(),
            no_sandbox: Misses::default(),
            surveyed: HashMap::default(),
            pass: Pass::Full,
            dirs: cgroup::Dirs::default(),
        }
    }
}

impl<T: Clone> NsCache<T> {
    /// The value for the network namespace `at`, `None` while a cgroup
    /// has no process. `load` computes it inside the namespace; values
    /// `keep` refuses are returned but looked up again next time.
    fn of(
        &mut self,
        at: NetnsAt,
        load: impl FnOnce(&Path) -> io::Result<T> + Send,
        keep: impl FnOnce(&T) -> bool,
    ) -> io::Result<Option<T>>
    where
        T: Send,
    {
        Ok(self.of_with_id(at, load, keep)?.map(|(_, value)| value))
    }

    /// As [`Self::of`], with the namespace's identity.
    fn of_with_id(
        &mut self,
        at: NetnsAt,
        load: impl FnOnce(&Path) -> io::Result<T> + Send,
        keep: impl FnOnce(&T) -> bool,
    ) -> io::Result<Option<((u64, u64), T)>>
    where
        T: Send,
    {
        if let NetnsAt::SandboxOf(cgroup) = at
            && self.pass != Pass::Full
        {
            if let Some(id) = self.sandboxes.get(cgroup)
                && let Some(held) = self.by_ns.get_mut(id)
            {
                held.seen = true;
                return Ok(Some((*id, held.value.clone())));
            }
            if self.no_sandbox.skip(&cgroup.to_path_buf()) {
                return Ok(None);
            }
        }
        let surveyed = match at {
            NetnsAt::SandboxOf(cgroup) => self.surveyed.remove(cgroup),
            NetnsAt::File(_) => None,
        };
        let (netns, opened) = match surveyed {
            Some(Some(Opened { path, ns })) => (Some(path), Some(ns)),
            Some(None) => (None, None),
            None => (at.path(&mut self.dirs)?, None),
        };
        let Some(netns) = netns else {
            if let NetnsAt::SandboxOf(cgroup) = at {
                self.no_sandbox.missed(cgroup.to_path_buf());
            }
            return Ok(None);
        };
        let ns = match opened.unwrap_or_else(|| open_netns(&netns)) {
            Ok(f) => f,
            // The process exited between listing and looking: try later.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && matches!(at, NetnsAt::SandboxOf(_)) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        // Identity from the open file, not the path, so it is the namespace
        // we enter even if the process exits and its pid is reused meanwhile.
        let meta = ns
            .metadata()
            .map_err(|e| io::Error::new(e.kind(), format!("fstat {}: {e}", netns.display())))?;
        let id = (meta.dev(), meta.ino());
        if let Some(held) = self.by_ns.get_mut(&id) {
            held.seen = true;
            return Ok(Some((id, held.value.clone())));
        }
        let value = in_netns(&ns, &netns.display(), || load(&netns))?;
        if keep(&value) {
            if let NetnsAt::SandboxOf(cgroup) = at {
                self.no_sandbox.forget(&cgroup.to_path_buf());
                self.sandboxes.insert(cgroup.to_path_buf(), id);
            }
            self.by_ns.insert(
                id,
                Held {
                    ns,
                    value: value.clone(),
                    seen: true,
                },
            );
        }
        Ok(Some((id, value)))
    }

    /// Drops the entries not looked up since the previous call, closing
    /// their namespaces. Call it after each full pass over the pods: what a
    /// pass did not ask for belongs to a pod that is gone or has a new
    /// sandbox.
    pub fn retain_seen(&mut self) {
        self.by_ns.retain(|_, held| std::mem::take(&mut held.seen));
        let held = &self.by_ns;
        self.sandboxes.retain(|_, id| held.contains_key(id));
    }

    /// Starts a pass over the pods: a full one finds every sandbox again
    /// (one may have been recreated, in a new namespace); a light one takes
    /// the sandboxes found before as they were.
    pub fn begin_pass(&mut self, pass: Pass) {
        self.pass = pass;
        self.end_survey();
        self.no_sandbox.begin_pass(pass);
        if pass == Pass::Full {
            self.sandboxes.clear();
            self.dirs.clear();
        }
    }

    /// Whether [`Self::of`] the sandbox of `cgroup` would look on the live
    /// system this pass, rather than answer from what it holds.
    fn would_look(&self, cgroup: &Path) -> bool {
        self.pass == Pass::Full
            || !(self
                .sandboxes
                .get(cgroup)
                .is_some_and(|id| self.by_ns.contains_key(id))
                || self.no_sandbox.skip(&cgroup.to_path_buf()))
    }

    /// Where a survey found `cgroup`'s sandbox (`None`: no process runs
    /// there): the next look at it takes this, until [`Self::end_survey`].
    fn surveyed(&mut self, cgroup: PathBuf, sandbox: Option<Opened>) {
        self.surveyed.insert(cgroup, sandbox);
    }

    /// Lets go of what a survey found and no look took: it is only as good
    /// as the parts computed right after it.
    fn end_survey(&mut self) {
        // Dropped, not cleared: a survey of 10,000 cgroups is rare, and its
        // table need not stay allocated between them.
        self.surveyed = HashMap::default();
    }

    /// Forgets what was found about `cgroup`'s sandbox: its pod's state
    /// changed, so the next pass looks again.
    pub fn forget(&mut self, cgroup: &Path) {
        self.sandboxes.remove(cgroup);
        self.no_sandbox.forget(&cgroup.to_path_buf());
    }
}

/// Netns cookies of cgroups, and the namespaces behind them.
#[derive(Default)]
pub struct CookieCache {
    cache: NsCache<u64>,
    /// Which held namespace each cookie is.
    by_cookie: HashMap<u64, (u64, u64), FastHash>,
}

impl CookieCache {
    /// The cookie of the network namespace `at`, `None` while a cgroup has
    /// no process.
    pub fn of(&mut self, at: NetnsAt) -> io::Result<Option<u64>> {
        let found = self.cache.of_with_id(at, cookie_here, |_| true)?;
        Ok(found.map(|(id, cookie)| {
            self.by_cookie.insert(cookie, id);
            cookie
        }))
    }

    /// The namespace of a cookie looked up since the last
    /// [`Self::retain_seen`], kept open by the cache (so attaching to it
    /// attaches to that very namespace, even if its pod has just exited).
    pub fn namespace(&self, cookie: u64) -> Option<&fs::File> {
        let id = self.by_cookie.get(&cookie)?;
        self.cache.by_ns.get(id).map(|held| &held.ns)
    }

    /// See [`NsCache::retain_seen`].
    pub fn retain_seen(&mut self) {
        self.cache.retain_seen();
        let held = &self.cache.by_ns;
        self.by_cookie.retain(|_, id| held.contains_key(id));
    }

    /// See [`NsCache::begin_pass`].
    pub fn begin_pass(&mut self, pass: Pass) {
        self.cache.begin_pass(pass);
    }

    /// See [`NsCache::forget`].
    pub fn forget(&mut self, cgroup: &Path) {
        self.cache.forget(cgroup);
    }

    /// See [`NsCache::would_look`].
    pub fn would_look(&self, cgroup: &Path) -> bool {
        self.cache.would_look(cgroup)
    }

    /// See [`NsCache::surveyed`].
    pub fn surveyed(&mut self, cgroup: PathBuf, sandbox: Option<Opened>) {
        self.cache.surveyed(cgroup, sandbox);
    }

    /// See [`NsCache::end_survey`].
    pub fn end_survey(&mut self) {
        self.cache.end_survey();
    }
}

/// Interface addresses of cgroups' network namespaces (see [`addresses`]).
#[derive(Default)]
pub struct AddressCache(NsCache<Vec<IpAddr>>);

impl AddressCache {
    /// The addresses of the network namespace `at`, `None` while a cgroup
    /// has no process.
    ///
    /// An empty list is not cached: the CNI adds the pod IP only after the
    /// sandbox's namespace exists, so a later call must look again.
    pub fn of(&mut self, at: NetnsAt) -> io::Result<Option<Vec<IpAddr>>> {
        self.0.of(at, own_addresses, |ips| !ips.is_empty())
    }

    /// See [`NsCache::retain_seen`].
    pub fn retain_seen(&mut self) {
        self.0.retain_seen();
    }

    /// See [`NsCache::begin_pass`].
    pub fn begin_pass(&mut self, pass: Pass) {
        self.0.begin_pass(pass);
    }

    /// See [`NsCache::forget`].
    pub fn forget(&mut self, cgroup: &Path) {
        self.0.forget(cgroup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain directory standing in for a pod cgroup, its `cgroup.events`
    /// saying whether a process runs below it.
    fn pod_cgroup(populated: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let events = format!("populated {}\nfrozen 0\n", u8::from(populated));
        fs::write(dir.path().join("cgroup.events"), events).unwrap();
        fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        dir
    }

    #[test]
    fn a_cgroup_directory_without_processes_has_no_netns() {
        let dir = pod_cgroup(true);
        fs::create_dir(dir.path().join("app")).unwrap();
        fs::write(dir.path().join("app").join("cgroup.procs"), "\n").unwrap();
        assert_eq!(netns_of_cgroup(dir.path()).unwrap(), None);
    }

    #[test]
    fn an_unpopulated_cgroup_is_not_walked() {
        let dir = pod_cgroup(false);
        let me = std::process::id();
        fs::write(dir.path().join("cgroup.procs"), format!("{me}\n")).unwrap();
        assert_eq!(netns_of_cgroup(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_process_in_a_child_cgroup_gives_the_pods_netns() {
        let dir = pod_cgroup(true);
        fs::create_dir(dir.path().join("app")).unwrap();
        let me = std::process::id();
        fs::write(
            dir.path().join("app").join("cgroup.procs"),
            format!("{me}\n"),
        )
        .unwrap();
        assert_eq!(
            netns_of_cgroup(dir.path()).unwrap(),
            Some(PathBuf::from(format!("/proc/{me}/ns/net")))
        );
    }

    #[test]
    fn the_oldest_process_gives_the_pods_netns_whatever_the_listing_order() {
        // A younger process (a container that may have entered a netns of
        // its own) is listed first, and in the pod cgroup itself.
        let younger = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let younger = Kill(younger);
        let dir = pod_cgroup(true);
        let me = std::process::id();
        fs::write(
            dir.path().join("cgroup.procs"),
            format!("{}\n", younger.0.id()),
        )
        .unwrap();
        fs::create_dir(dir.path().join("pause")).unwrap();
        fs::write(
            dir.path().join("pause").join("cgroup.procs"),
            format!("999999999\n{me}\n"),
        )
        .unwrap();
        assert_eq!(
            netns_of_cgroup(dir.path()).unwrap(),
            Some(PathBuf::from(format!("/proc/{me}/ns/net")))
        );
    }

    #[test]
    fn an_address_held_by_two_pods_netns_is_refused_naming_both() {
        let ip: IpAddr = "198.18.0.2".parse().unwrap();
        let ip6: IpAddr = "fd00:18::2".parse().unwrap();
        let mut index = AddressIndex::new();
        index
            .entry(ip)
            .or_default()
            .insert(PathBuf::from("/cg/victim"));
        index
            .entry(ip6)
            .or_default()
            .insert(PathBuf::from("/cg/victim"));
        assert_eq!(
            claimant(&index, &[ip, ip6], None).unwrap(),
            Claim::Sole(PathBuf::from("/cg/victim"))
        );
        index
            .entry(ip)
            .or_default()
            .insert(PathBuf::from("/cg/attacker"));
        let err = claimant(&index, &[ip, ip6], None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let text = err.to_string();
        assert!(
            text.contains("/cg/victim") && text.contains("/cg/attacker"),
            "{text}"
        );
        // Split across families counts too.
        let mut split = AddressIndex::new();
        split
            .entry(ip)
            .or_default()
            .insert(PathBuf::from("/cg/victim"));
        split
            .entry(ip6)
            .or_default()
            .insert(PathBuf::from("/cg/attacker"));
        assert!(claimant(&split, &[ip, ip6], None).is_err());
        assert_eq!(
            claimant(&AddressIndex::new(), &[ip], None)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_pod_placed_before_on_a_claimant_stays_there_disputed_and_a_newcomer_gets_nothing() {
        let ip: IpAddr = "198.18.0.2".parse().unwrap();
        let mut index = AddressIndex::new();
        for cg in ["/cg/victim", "/cg/attacker"] {
            index.entry(ip).or_default().insert(PathBuf::from(cg));
        }
        let victim = Path::new("/cg/victim");
        match claimant(&index, &[ip], Some(victim)).unwrap() {
            Claim::Disputed { kept, report } => {
                assert_eq!(kept, victim);
                assert!(report.contains("/cg/attacker"), "{report}");
            }
            sole => panic!("not disputed: {sole:?}"),
        }
        // Placed before somewhere that no longer claims it: refused.
        assert!(claimant(&index, &[ip], Some(Path::new("/cg/gone"))).is_err());
    }

    #[test]
    fn the_cookie_of_our_own_netns_is_stable() {
        let own = Path::new("/proc/self/ns/net");
        assert_eq!(cookie(own).unwrap(), cookie(own).unwrap());
    }

    #[test]
    fn our_own_netns_has_no_loopback_or_link_local_address() {
        let ips = addresses(Path::new("/proc/self/ns/net")).unwrap();
        assert!(
            ips.iter().all(|ip| !ip.is_loopback()
                && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())),
            "{ips:?}"
        );
    }

    #[test]
    fn a_missing_netns_is_not_found_and_named() {
        let err = addresses(Path::new("/proc/self/ns/no-such-ns")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no-such-ns"), "{err}");
    }

    #[test]
    fn a_cgroup_without_processes_has_no_addresses_yet() {
        let dir = pod_cgroup(false);
        assert_eq!(
            AddressCache::default()
                .of(NetnsAt::SandboxOf(dir.path()))
                .unwrap(),
            None
        );
    }

    #[test]
    fn cached_addresses_last_while_seen_in_every_pass() {
        // A plain directory listing our pid stands in for our own cgroup.
        let dir = pod_cgroup(true);
        fs::write(
            dir.path().join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let expected = addresses(Path::new("/proc/self/ns/net")).unwrap();
        let mut cache = AddressCache::default();
        assert_eq!(
            cache.of(NetnsAt::SandboxOf(dir.path())).unwrap(),
            Some(expected.clone())
        );
        let cached = usize::from(!expected.is_empty());
        assert_eq!(cache.0.by_ns.len(), cached);
        cache.retain_seen();
        assert_eq!(cache.0.by_ns.len(), cached);
        assert_eq!(
            cache.of(NetnsAt::SandboxOf(dir.path())).unwrap(),
            Some(expected)
        );
        cache.retain_seen();
        cache.retain_seen();
        assert!(cache.0.by_ns.is_empty());
    }
}
