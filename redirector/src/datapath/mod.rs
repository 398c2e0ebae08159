//! The kernel side: load the programs, attach them to the node's cgroup,
//! pin maps and links under bpffs, and keep the cgroup map as reconciled.
//!
//! Pin layout under the bpffs directory (default `/sys/fs/bpf/ambridge`):
//! `maps/<MAP>_V<n>` for every map (pinned by name and layout version, so a
//! restarted or upgraded daemon reuses the maps whose layout it shares,
//! with their contents), `links/<program>` for every cgroup attachment and
//! `netns-links/<netns cookie>` for the inbound `sk_lookup` program in each
//! pod network namespace whose inbound TCP is captured.
//! Links are held only by their pins: the daemon can exit or crash and the
//! datapath keeps working; `ambridge uninstall` removes the pins and with
//! them the attachments.

mod error;
pub mod features;
mod link;
mod loopback;
mod pins;
mod sidecar_rules;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
};

use ambridge_common::{
    CgroupInfo, ConnKey, ConnRecord, Counter, InboundTarget, IpKey, NetnsInfo, NodeConfig,
    SidecarPort, SidecarRange, map_names,
};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
};
pub use error::Error;
use ipnet::IpNet;
use link::AttachType;
pub use pins::Pins;
use tracing::{debug, info};

use crate::{
    node::desired::{Op, PortRule, RuleKey},
    node::entries::{ip_from_key, ip_key},
    types::{CgroupId, NetnsCookie},
};

/// The source a sidecar proxy's inbound passthrough connections leave from
/// over IPv6 (127.0.0.6 over IPv4, which `lo`'s 127.0.0.0/8 holds already).
pub const PASSTHROUGH_SOURCE_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The compiled kernel programs, built by `build.rs` for the BPF target.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambridge-ebpf"));

/// How a program is loaded (aya's typed loader per program type).
#[derive(Clone, Copy)]
enum Kind {
    SockAddr,
    Sock,
    SockOps,
    Sockopt,
    SkLookup,
    SkMsg,
}

/// Loads program `name` of `ebpf` (through the kernel's verifier), as its
/// `kind`. Loading an already loaded program is an error of aya's.
fn load_program(ebpf: &mut Ebpf, name: &'static str, kind: Kind) -> Result<(), Error> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    match kind {
        Kind::SockAddr => <&mut CgroupSockAddr>::try_from(program)
            .map_err(prog_err(name))?
            .load(),
        Kind::Sock => <&mut CgroupSock>::try_from(program)
            .map_err(prog_err(name))?
            .load(),
        Kind::SockOps => <&mut SockOps>::try_from(program)
            .map_err(prog_err(name))?
            .load(),
        Kind::Sockopt => <&mut CgroupSockopt>::try_from(program)
            .map_err(prog_err(name))?
            .load(),
        Kind::SkLookup => <&mut SkLookup>::try_from(program)
            .map_err(prog_err(name))?
            .load(),
        Kind::SkMsg => <&mut SkMsg>::try_from(program)
            .map_err(prog_err(name))?
            .load(),
    }
    .map_err(prog_err(name))
}

/// Every program of the object and how it is loaded, in load order: the
/// cgroup programs, then inbound capture's, then same-node acceleration's
/// (on a kernel that refuses several, the first refusal named is that of
/// a program every pod needs).
fn load_order() -> impl Iterator<Item = (&'static str, Kind)> {
    PROGRAMS
        .iter()
        .map(|(name, kind, _)| (*name, *kind))
        .chain([(SK_LOOKUP, Kind::SkLookup), (SK_MSG, Kind::SkMsg)])
}

/// Every cgroup program of the object: its name (the function name), how
/// it is loaded, and the cgroup hook it attaches to, in attach order:
/// consumers of a record before its producers (checked by a test), so no
/// record is written before what reads or removes it is in place.
const PROGRAMS: [(&str, Kind, AttachType); 13] = [
    ("getsockopt", Kind::Sockopt, AttachType::CgroupGetsockopt),
    (
        "getpeername4",
        Kind::SockAddr,
        AttachType::CgroupInet4Getpeername,
    ),
    (
        "getpeername6",
        Kind::SockAddr,
        AttachType::CgroupInet6Getpeername,
    ),
    ("recvmsg4", Kind::SockAddr, AttachType::CgroupUdp4Recvmsg),
    ("recvmsg6", Kind::SockAddr, AttachType::CgroupUdp6Recvmsg),
    (
        "sock_release",
        Kind::Sock,
        AttachType::CgroupInetSockRelease,
    ),
    ("sock_ops", Kind::SockOps, AttachType::CgroupSockOps),
    ("bind4", Kind::SockAddr, AttachType::CgroupInet4Bind),
    ("bind6", Kind::SockAddr, AttachType::CgroupInet6Bind),
    ("sendmsg4", Kind::SockAddr, AttachType::CgroupUdp4Sendmsg),
    ("sendmsg6", Kind::SockAddr, AttachType::CgroupUdp6Sendmsg),
    ("connect4", Kind::SockAddr, AttachType::CgroupInet4Connect),
    ("connect6", Kind::SockAddr, AttachType::CgroupInet6Connect),
];

/// The `sk_lookup` program, attached to each captured pod's netns.
const SK_LOOKUP: &str = "inbound";

/// The `sk_msg` program, attached to the sockhash rather than to a cgroup.
const SK_MSG: &str = "redirect";

/// The maps the daemon fills from the node state (the others are the
/// programs' own).
const CONFIG_MAPS: [&str; 7] = [
    map_names::CGROUPS,
    map_names::NETNS,
    map_names::NODE,
    map_names::INBOUND,
    map_names::EXEMPT,
    map_names::SIDECAR_RANGES,
    map_names::SIDECAR_PORTS,
];

/// Copies of the daemon-written maps; `None` until read (again).
#[derive(Default)]
struct Mirror {
    cgroups: Option<BTreeMap<CgroupId, CgroupInfo>>,
    netns: Option<BTreeMap<NetnsCookie, NetnsInfo>>,
    inbound: Option<BTreeMap<IpAddr, InboundTarget>>,
    exempt: Option<BTreeMap<IpNet, u32>>,
    sidecar_ranges: Option<BTreeMap<RuleKey<IpNet>, u32>>,
    sidecar_ports: Option<BTreeMap<PortRule, u32>>,
}

/// The loaded datapath, with handles on the maps the daemon writes.
pub struct Datapath {
    cgroups: HashMap<MapData, u64, CgroupInfo>,
    netns: HashMap<MapData, u64, NetnsInfo>,
    node: Array<MapData, NodeConfig>,
    inbound: HashMap<MapData, IpKey, InboundTarget>,
    exempt: LpmTrie<MapData, IpKey, u32>,
    sidecar_ranges: LpmTrie<MapData, SidecarRange, u32>,
    sidecar_ports: HashMap<MapData, SidecarPort, u32>,
    /// The pod network namespaces the `sk_lookup` program is attached to.
    netns_links: BTreeSet<NetnsCookie>,
    /// The sidecar pod namespaces given the IPv6 passthrough source this
    /// run.
    passthrough_sources: BTreeSet<NetnsCookie>,
    pins: Pins,
    /// Some configuration map was created empty (first install, or a build
    /// whose layout differs from the pinned one).
    fresh_config: bool,
    /// Links of an earlier run are pinned: a datapath is serving already.
    running: bool,
    /// What the daemon-written maps hold, as last read or written: only
    /// this daemon writes them (one at a time, by the pins' lock), so a
    /// diff is against this copy, and [`Self::reread`] refreshes it from
    /// the kernel.
    mirror: Mirror,
    // Keeps program fds (and the object's other maps) open while the daemon
    // runs; the pinned links keep them alive after it exits.
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the programs, reusing the pinned maps of the same layout, and
    /// attaches the `sk_msg` program to the sockhash. Every program goes
    /// through the verifier first: one it refuses (another kernel, another
    /// LLVM) fails the start before anything is attached, naming the
    /// program and, in the error, the verifier's log. Nothing is attached
    /// to a cgroup yet: see [`Datapath::attach`].
    pub fn load(pins: &Pins) -> Result<Self, Error> {
        pins.create()?;
        let fresh_config = CONFIG_MAPS.iter().any(|name| !pins.map(name).exists());
        let running = fs::read_dir(pins.links()).is_ok_and(|mut d| d.next().is_some());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .load(OBJECT)
            .map_err(Error::Load)?;
        for (name, kind) in load_order() {
            load_program(&mut ebpf, name, kind)?;
        }
        attach_sk_msg(&mut ebpf)?;
        let netns_links = pinned_netns_links(pins)?;
        let cgroups = take_hash(&mut ebpf, map_names::CGROUPS)?;
        let netns = take_hash(&mut ebpf, map_names::NETNS)?;
        let node = ebpf
            .take_map(map_names::NODE)
            .ok_or(Error::MissingMap(map_names::NODE))?;
        let node = Array::try_from(node).map_err(map_err(map_names::NODE))?;
        let inbound = ebpf
            .take_map(map_names::INBOUND)
            .ok_or(Error::MissingMap(map_names::INBOUND))?;
        let inbound = HashMap::try_from(inbound).map_err(map_err(map_names::INBOUND))?;
        let exempt = ebpf
            .take_map(map_names::EXEMPT)
            .ok_or(Error::MissingMap(map_names::EXEMPT))?;
        let exempt = LpmTrie::try_from(exempt).map_err(map_err(map_names::EXEMPT))?;
        let sidecar_ranges = ebpf
            .take_map(map_names::SIDECAR_RANGES)
            .ok_or(Error::MissingMap(map_names::SIDECAR_RANGES))?;
        let sidecar_ranges =
            LpmTrie::try_from(sidecar_ranges).map_err(map_err(map_names::SIDECAR_RANGES))?;
        let sidecar_ports = ebpf
            .take_map(map_names::SIDECAR_PORTS)
            .ok_or(Error::MissingMap(map_names::SIDECAR_PORTS))?;
        let sidecar_ports =
            HashMap::try_from(sidecar_ports).map_err(map_err(map_names::SIDECAR_PORTS))?;
        Ok(Self {
            cgroups,
            netns,
            node,
            inbound,
            exempt,
            sidecar_ranges,
            sidecar_ports,
            netns_links,
            passthrough_sources: BTreeSet::new(),
            pins: pins.clone(),
            fresh_config,
            running,
            mirror: Mirror::default(),
            ebpf,
        })
    }

    /// Whether the configuration maps were created empty by [`Self::load`]:
    /// attach only once they hold the node state, or enrolled pods' connects
    /// would go unredirected meanwhile. Otherwise they are the running
    /// datapath's own maps, and attaching at once changes nothing.
    pub fn needs_state_before_attach(&self) -> bool {
        self.fresh_config
    }

    /// Whether an earlier run's programs are attached and serving (so
    /// waiting before [`Self::attach`] costs nothing).
    pub fn replaces_running(&self) -> bool {
        self.running
    }

    /// Attaches the programs to `cgroup_root` in multi-attach mode (other
    /// cgroup programs, such as a CNI's socket load balancer, keep
    /// running). Links already pinned by an earlier run are replaced
    /// atomically: the new link is attached before the old one's pin is
    /// renamed over, so no connect goes unseen. Then the maps of other
    /// layouts, now unused, are unpinned.
    pub fn attach(&mut self, cgroup_root: &Path, pins: &Pins) -> Result<(), Error> {
        let ebpf = &mut self.ebpf;
        let cgroup = fs::File::open(cgroup_root).map_err(|source| Error::Io {
            what: format!("open cgroup {}", cgroup_root.display()),
            source,
        })?;
        for (name, _, attach_type) in PROGRAMS {
            let program = ebpf.program(name).ok_or(Error::MissingProgram(name))?;
            let prog_fd = program.fd().map_err(prog_err(name))?.as_fd();
            let link =
                link::create_link(prog_fd, cgroup.as_fd(), attach_type).map_err(|source| {
                    Error::Syscall {
                        call: "bpf(BPF_LINK_CREATE)",
                        what: format!("attach {name} to {}", cgroup_root.display()),
                        source,
                    }
                })?;
            pins.pin_link(name, link)?;
            debug!(program = name, cgroup = %cgroup_root.display(), "attached");
        }
        self.update_netns_links()?;
        let stale = pins.remove_maps_except(&map_names::ALL)?;
        if !stale.is_empty() {
            info!(?stale, "unpinned the maps of an older layout");
        }
        info!(cgroup = %cgroup_root.display(), bpffs = %pins.root().display(), "datapath installed");
        Ok(())
    }

    /// Forgets the copies of the maps: the next look reads the kernel's
    /// (the periodic full resync, a safety net against any other writer).
    pub fn reread(&mut self) {
        self.mirror = Mirror::default();
    }

    /// What the kernel's cgroup map holds.
    pub fn cgroup_entries(&mut self) -> Result<&BTreeMap<CgroupId, CgroupInfo>, Error> {
        if self.mirror.cgroups.is_none() {
            self.mirror.cgroups = Some(entries(&self.cgroups, map_names::CGROUPS, CgroupId)?);
        }
        Ok(self.mirror.cgroups.as_ref().expect("read above"))
    }

    /// What the kernel's netns map holds.
    pub fn netns_entries(&mut self) -> Result<&BTreeMap<NetnsCookie, NetnsInfo>, Error> {
        if self.mirror.netns.is_none() {
            self.mirror.netns = Some(entries(&self.netns, map_names::NETNS, NetnsCookie)?);
        }
        Ok(self.mirror.netns.as_ref().expect("read above"))
    }

    /// Writes the node settings if they differ from what the kernel holds;
    /// returns whether they did.
    pub fn set_node_config(&mut self, cfg: NodeConfig) -> Result<bool, Error> {
        let current = self.node.get(&0, 0).map_err(map_err(map_names::NODE))?;
        if current == cfg {
            return Ok(false);
        }
        self.node.set(0, cfg, 0).map_err(map_err(map_names::NODE))?;
        Ok(true)
    }

    /// Applies cgroup map operations from [`crate::node::desired::diff`].
    pub fn apply_cgroups(&mut self, ops: &[Op<CgroupId, CgroupInfo>]) -> Result<(), Error> {
        let applied = apply(&mut self.cgroups, map_names::CGROUPS, ops, |id| id.0);
        follow(&mut self.mirror.cgroups, ops, &applied);
        applied
    }

    /// Applies netns map operations from [`crate::node::desired::diff`].
    pub fn apply_netns(&mut self, ops: &[Op<NetnsCookie, NetnsInfo>]) -> Result<(), Error> {
        let applied = apply(&mut self.netns, map_names::NETNS, ops, |c| c.0);
        follow(&mut self.mirror.netns, ops, &applied);
        applied
    }

    /// What the kernel's inbound capture map holds.
    pub fn inbound_entries(&mut self) -> Result<&BTreeMap<IpAddr, InboundTarget>, Error> {
        if self.mirror.inbound.is_none() {
            let read = self
                .inbound
                .iter()
                .map(|r| r.map(|(k, v)| (ip_from_key(&k), v)))
                .collect::<Result<_, _>>()
                .map_err(map_err(map_names::INBOUND))?;
            self.mirror.inbound = Some(read);
        }
        Ok(self.mirror.inbound.as_ref().expect("read above"))
    }

    /// Applies inbound capture map operations.
    pub fn apply_inbound(&mut self, ops: &[Op<IpAddr, InboundTarget>]) -> Result<(), Error> {
        let applied = apply(&mut self.inbound, map_names::INBOUND, ops, ip_key);
        follow(&mut self.mirror.inbound, ops, &applied);
        applied
    }

    /// What the kernel's exempt-source trie holds.
    pub fn exempt_entries(&mut self) -> Result<&BTreeMap<IpNet, u32>, Error> {
        if self.mirror.exempt.is_none() {
            let read = self
                .exempt
                .iter()
                .map(|r| r.map(|(k, v)| (prefix_from_key(&k), v)))
                .collect::<Result<_, _>>()
                .map_err(map_err(map_names::EXEMPT))?;
            self.mirror.exempt = Some(read);
        }
        Ok(self.mirror.exempt.as_ref().expect("read above"))
    }

    /// Applies exempt-source operations.
    pub fn apply_exempt(&mut self, ops: &[Op<IpNet, u32>]) -> Result<(), Error> {
        let applied = apply_trie(&mut self.exempt, map_names::EXEMPT, ops, prefix_key);
        follow(&mut self.mirror.exempt, ops, &applied);
        applied
    }

    /// The pod network namespaces inbound capture is attached to.
    pub fn netns_links(&self) -> &BTreeSet<NetnsCookie> {
        &self.netns_links
    }

    /// Attaches inbound capture to the network namespace `netns` (whose
    /// cookie is `cookie`) and pins the link.
    pub fn attach_inbound(
        &mut self,
        cookie: NetnsCookie,
        netns: BorrowedFd<'_>,
    ) -> Result<(), Error> {
        let prog_fd = self.sk_lookup_fd()?;
        let link = link::create_link(prog_fd, netns, AttachType::SkLookup).map_err(|source| {
            Error::Syscall {
                call: "bpf(BPF_LINK_CREATE)",
                what: format!("attach {SK_LOOKUP} to the netns of cookie {cookie}"),
                source,
            }
        })?;
        let path = self.pins.netns_link(cookie.0);
        link::pin(link.as_fd(), &path).map_err(|source| Error::Syscall {
            call: "bpf(BPF_OBJ_PIN)",
            what: format!("pin the inbound link at {}", path.display()),
            source,
        })?;
        self.netns_links.insert(cookie);
        Ok(())
    }

    /// Detaches inbound capture from the network namespace of `cookie` (a
    /// namespace that is gone already detached it: its pin goes).
    pub fn detach_inbound(&mut self, cookie: NetnsCookie) -> Result<(), Error> {
        let path = self.pins.netns_link(cookie.0);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    what: format!("unpin {}", path.display()),
                    source,
                });
            }
        }
        self.netns_links.remove(&cookie);
        self.passthrough_sources.remove(&cookie);
        Ok(())
    }

    /// Gives a sidecar pod's network namespace `netns` (of cookie `cookie`)
    /// its proxy's IPv6 passthrough source, `::6` on `lo`: Envoy binds it to
    /// hand a captured inbound connection on to the application, and the
    /// address is istio-init's (`ip -6 addr add ::6/128 dev lo`), which
    /// does not run where ambridge captures. Once per namespace and run; the
    /// address is never taken away (nor is it by istio-init), as a proxy
    /// may still hold connections from it.
    pub fn add_passthrough_source(
        &mut self,
        cookie: NetnsCookie,
        netns: &fs::File,
    ) -> Result<(), Error> {
        if self.passthrough_sources.contains(&cookie) {
            return Ok(());
        }
        let what = format!("the netns of cookie {cookie}");
        crate::host::netns::in_netns(netns, &what, || {
            loopback::add_address(IpAddr::V6(PASSTHROUGH_SOURCE_V6))
        })
        .map_err(|source| Error::Syscall {
            call: "rtnetlink RTM_NEWADDR",
            what: format!("add {PASSTHROUGH_SOURCE_V6} to lo in {what}"),
            source,
        })?;
        self.passthrough_sources.insert(cookie);
        Ok(())
    }

    fn sk_lookup_fd(&self) -> Result<BorrowedFd<'_>, Error> {
        let program = self
            .ebpf
            .program(SK_LOOKUP)
            .ok_or(Error::MissingProgram(SK_LOOKUP))?;
        Ok(program.fd().map_err(prog_err(SK_LOOKUP))?.as_fd())
    }

    /// Moves every pinned inbound link of an earlier run to this run's
    /// program, in place; the links of namespaces that are gone are
    /// unpinned.
    fn update_netns_links(&mut self) -> Result<(), Error> {
        for cookie in self.netns_links.clone() {
            let path = self.pins.netns_link(cookie.0);
            let updated = link::open_pinned(&path)
                .and_then(|fd| link::update_link(fd.as_fd(), self.sk_lookup_fd().expect("loaded")));
            match updated {
                Ok(()) => {}
                // ENOLINK: the namespace is gone, and the link with it.
                Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => self.detach_inbound(cookie)?,
                Err(source) => {
                    return Err(Error::Syscall {
                        call: "bpf(BPF_LINK_UPDATE)",
                        what: format!(
                            "move the inbound link {} to this run's program",
                            path.display()
                        ),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The netns cookies whose inbound links are pinned under `pins`.
fn pinned_netns_links(pins: &Pins) -> Result<BTreeSet<NetnsCookie>, Error> {
    let dir = pins.netns_links();
    let entries = fs::read_dir(&dir).map_err(|source| Error::Io {
        what: format!("read {}", dir.display()),
        source,
    })?;
    let mut cookies = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            what: format!("read {}", dir.display()),
            source,
        })?;
        // Only this module names the pins; anything else is left alone.
        if let Some(cookie) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            cookies.insert(NetnsCookie(cookie));
        }
    }
    Ok(cookies)
}

/// The trie key of `net`: an IPv4 /n is the IPv4-mapped /(96+n).
fn prefix_key(net: IpNet) -> Key<IpKey> {
    let net = net.trunc();
    let len = match net {
        IpNet::V4(v4) => 96 + u32::from(v4.prefix_len()),
        IpNet::V6(v6) => u32::from(v6.prefix_len()),
    };
    Key::new(len, ip_key(net.addr()))
}

fn prefix_from_key(key: &Key<IpKey>) -> IpNet {
    let ip = ip_from_key(&key.data());
    let len = key.prefix_len();
    let len = if ip.is_ipv4() { len - 96 } else { len };
    IpNet::new(ip, len as u8).expect("a prefix this module wrote")
}

/// Attaches the (loaded) `sk_msg` program to the sockhash. The
/// attachment lives as long as the (pinned) map does, and replaces the
/// program of an earlier run.
fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), Error> {
    let socks: SockHash<&MapData, ConnKey> = ebpf
        .map(map_names::SOCKS)
        .ok_or(Error::MissingMap(map_names::SOCKS))?
        .try_into()
        .map_err(map_err(map_names::SOCKS))?;
    let map_fd = socks.fd().try_clone().map_err(|source| Error::Io {
        what: format!("dup the fd of map {}", map_names::SOCKS),
        source,
    })?;
    let program: &mut SkMsg = ebpf
        .program_mut(SK_MSG)
        .ok_or(Error::MissingProgram(SK_MSG))?
        .try_into()
        .map_err(prog_err(SK_MSG))?;
    let link = program.attach(&map_fd).map_err(prog_err(SK_MSG))?;
    // Dropping the link would detach it; the map holds the program anyway.
    std::mem::forget(program.take_link(link).map_err(prog_err(SK_MSG))?);
    Ok(())
}

fn take_hash<V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, u64, V>, Error> {
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    HashMap::try_from(map).map_err(map_err(name))
}

fn entries<K: Ord, V: Pod>(
    map: &HashMap<MapData, u64, V>,
    name: &'static str,
    key: impl Fn(u64) -> K,
) -> Result<BTreeMap<K, V>, Error> {
    map.iter()
        .map(|r| r.map(|(k, v)| (key(k), v)))
        .collect::<Result<_, _>>()
        .map_err(map_err(name))
}

/// Brings a map's copy along with `ops`, once they were applied; after a
/// failure part of them may be, so the copy is forgotten (read again next
/// time).
fn follow<K: Ord + Copy, V: Copy>(
    copy: &mut Option<BTreeMap<K, V>>,
    ops: &[Op<K, V>],
    applied: &Result<(), Error>,
) {
    if applied.is_err() {
        *copy = None;
        return;
    }
    if let Some(copy) = copy {
        for op in ops {
            match *op {
                Op::Put(k, v) => {
                    copy.insert(k, v);
                }
                Op::Delete(k) => {
                    copy.remove(&k);
                }
            }
        }
    }
}

/// As [`apply`], for an LPM trie.
fn apply_trie<K: Copy, R: Pod, V: Pod>(
    trie: &mut LpmTrie<MapData, R, V>,
    name: &'static str,
    ops: &[Op<K, V>],
    raw: impl Fn(K) -> Key<R>,
) -> Result<(), Error> {
    for op in ops {
        let result = match *op {
            Op::Put(k, v) => trie.insert(&raw(k), v, 0),
            Op::Delete(k) => match trie.remove(&raw(k)) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        };
        result.map_err(map_err(name))?;
    }
    Ok(())
}

fn apply<K: Copy, R: Pod, V: Pod>(
    map: &mut HashMap<MapData, R, V>,
    name: &'static str,
    ops: &[Op<K, V>],
    raw: impl Fn(K) -> R,
) -> Result<(), Error> {
    for op in ops {
        match *op {
            Op::Put(k, v) => map.insert(raw(k), v, 0).map_err(map_err(name))?,
            Op::Delete(k) => match map.remove(&raw(k)) {
                Ok(()) => {}
                // Already gone: the goal state is reached all the same.
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err(name)(e)),
            },
        }
    }
    Ok(())
}

fn prog_err(program: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |source| match source {
        // EPERM is the caller's privileges, not the verifier.
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } if io_error.raw_os_error() != Some(libc::EPERM) => {
            verifier_refusal(program, io_error, &verifier_log.to_string())
        }
        source => Error::Program { program, source },
    }
}

/// The kernel's verifier refused `program` (`BPF_PROG_LOAD` failed with
/// `error`), its log being `log`.
fn verifier_refusal(program: &'static str, error: std::io::Error, log: &str) -> Error {
    let kernel = kernel_release();
    Error::Verifier {
        program,
        missing: features::missing_helper(program, log, &kernel),
        kernel,
        source: error,
        last_lines: last_lines(log, VERIFIER_LINES),
    }
}

/// How many of the verifier's last lines a refusal shows: where it
/// stopped, and the instructions just before.
const VERIFIER_LINES: usize = 12;

/// The running kernel's release (`uname -r`), or why it is unknown.
fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_string())
        .unwrap_or_else(|e| format!("(release unknown: {e})"))
}

/// The last `n` non-blank lines of `log`.
fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { map, source }
}

fn open_pinned(pins: &Pins, name: &'static str) -> Result<Map, Error> {
    let data = MapData::from_pin(pins.map(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

/// The datapath's maps opened for reading only: what the API's `Status`
/// and `ambridge stats` (while the daemon is down) report. Opened once from
/// the pins; walking the maps is blocking work, to be done off the reactor.
pub struct ReadOnly {
    counters: PerCpuArray<MapData, u64>,
    cgroups: HashMap<MapData, u64, CgroupInfo>,
    netns: HashMap<MapData, u64, NetnsInfo>,
    pending: HashMap<MapData, u64, ConnRecord>,
    conns: HashMap<MapData, ConnKey, ConnRecord>,
    socks: SockHash<MapData, ConnKey>,
    inbound: HashMap<MapData, IpKey, InboundTarget>,
    listeners: SockHash<MapData, u64>,
    dns: HashMap<MapData, u64, ConnRecord>,
}

impl ReadOnly {
    /// Opens the maps pinned under `pins`.
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        Ok(Self {
            counters: PerCpuArray::try_from(open_pinned(pins, map_names::COUNTERS)?)
                .map_err(map_err(map_names::COUNTERS))?,
            cgroups: HashMap::try_from(open_pinned(pins, map_names::CGROUPS)?)
                .map_err(map_err(map_names::CGROUPS))?,
            netns: HashMap::try_from(open_pinned(pins, map_names::NETNS)?)
                .map_err(map_err(map_names::NETNS))?,
            pending: HashMap::try_from(open_pinned(pins, map_names::PENDING)?)
                .map_err(map_err(map_names::PENDING))?,
            conns: HashMap::try_from(open_pinned(pins, map_names::CONNS)?)
                .map_err(map_err(map_names::CONNS))?,
            socks: SockHash::try_from(open_pinned(pins, map_names::SOCKS)?)
                .map_err(map_err(map_names::SOCKS))?,
            inbound: HashMap::try_from(open_pinned(pins, map_names::INBOUND)?)
                .map_err(map_err(map_names::INBOUND))?,
            listeners: SockHash::try_from(open_pinned(pins, map_names::LISTENERS)?)
                .map_err(map_err(map_names::LISTENERS))?,
            dns: HashMap::try_from(open_pinned(pins, map_names::DNS)?)
                .map_err(map_err(map_names::DNS))?,
        })
    }

    /// The per-CPU counters, summed.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, Error> {
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(map_err(map_names::COUNTERS))?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// How many entries each map of [`Self::occupancy`] can hold, as this
    /// build creates them.
    pub fn capacity(&self) -> Vec<(&'static str, u32)> {
        use ambridge_common::*;
        vec![
            ("cgroups", CGROUPS_CAPACITY),
            ("netns", NETNS_CAPACITY),
            ("pending_connects", PENDING_CAPACITY),
            ("tracked_connections", CONNS_CAPACITY),
            ("accelerated_sockets", SOCKS_CAPACITY),
            ("inbound_addresses", INBOUND_CAPACITY),
            ("inbound_listeners", LISTENERS_CAPACITY),
            ("dns_sockets", DNS_CAPACITY),
        ]
    }

    /// How many entries each map holds: cgroups and network namespaces
    /// known to the datapath, connects not yet established, connections
    /// whose record is tracked, sockets in the sockhash, and so on. Walks
    /// every map.
    pub fn occupancy(&self) -> Vec<(&'static str, usize)> {
        vec![
            ("cgroups", self.cgroups.keys().count()),
            ("netns", self.netns.keys().count()),
            ("pending_connects", self.pending.keys().count()),
            ("tracked_connections", self.conns.keys().count()),
            ("accelerated_sockets", self.socks.keys().count()),
            ("inbound_addresses", self.inbound.keys().count()),
            ("inbound_listeners", self.listeners.keys().count()),
            ("dns_sockets", self.dns.keys().count()),
        ]
    }
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Removes every pin under `pins`: the links go (and with them the
/// attachments, as nothing else holds them), then the maps.
pub fn uninstall(pins: &Pins) -> Result<Removed, Error> {
    let mut removed = Removed::default();
    if !pins.root().exists() {
        return Ok(removed);
    }
    removed.links = pins.remove_all_in(&pins.links())?;
    removed.links.extend(
        pins.remove_all_in(&pins.netns_links())?
            .into_iter()
            .map(|cookie| format!("inbound (netns {cookie})")),
    );
    removed.maps = pins.remove_all_in(&pins.maps())?;
    pins.remove_dirs()?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_refusal_names_the_program_the_kernel_and_the_logs_last_lines() {
        let log = (1..=40)
            .map(|i| format!("{i}: (b7) r{} = 0", i % 10))
            .chain(["".into(), "R4 !read_ok".into(), "   ".into()])
            .collect::<Vec<_>>()
            .join("\n");
        let tail = last_lines(&log, VERIFIER_LINES);
        assert_eq!(tail.lines().count(), VERIFIER_LINES);
        assert_eq!(tail.lines().last(), Some("R4 !read_ok"));
        assert!(tail.starts_with("30: "), "{tail}");
        let error = verifier_refusal(
            "inbound",
            std::io::Error::from_raw_os_error(libc::EACCES),
            &log,
        );
        let shown = error.to_string();
        assert!(shown.contains("program `inbound`"), "{shown}");
        assert!(
            shown.contains(&format!("Linux {}", kernel_release())),
            "{shown}"
        );
        assert!(shown.ends_with("R4 !read_ok"), "{shown}");
        assert_eq!(last_lines("", 3), "");
    }

    /// Which cgroup programs write and which read (or remove) each record map:
    /// `(map, producers, consumers)`.
    const RECORDS: [(&str, &[&str], &[&str]); 3] = [
        (
            map_names::PENDING,
            &["connect4", "connect6", "bind4", "bind6"],
            &["sock_ops", "sock_release"],
        ),
        (
            map_names::CONNS,
            &["sock_ops"],
            &["getsockopt", "getpeername4", "getpeername6"],
        ),
        (
            map_names::DNS,
            &["connect4", "connect6", "sendmsg4", "sendmsg6"],
            &[
                "recvmsg4",
                "recvmsg6",
                "getpeername4",
                "getpeername6",
                "sock_release",
            ],
        ),
    ];

    #[test]
    fn every_record_is_read_and_removed_before_anything_writes_it() {
        let position = |name: &str| {
            PROGRAMS
                .iter()
                .position(|(p, ..)| *p == name)
                .unwrap_or_else(|| panic!("{name} is not a cgroup program"))
        };
        for (map, producers, consumers) in RECORDS {
            for producer in producers {
                for consumer in consumers {
                    assert!(
                        position(consumer) < position(producer),
                        "{map}: {consumer} must be attached before {producer}"
                    );
                }
            }
        }
    }
}
