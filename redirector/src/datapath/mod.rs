//! The kernel side: load the programs, attach them to the node's cgroup,
//! pin maps and links under bpffs, and keep the cgroup map as reconciled.
//!
//! Pin layout under the bpffs directory (default `/sys/fs/bpf/ambridge`):
//! `maps/<MAP>_V<n>` for every map (pinned by name and layout version, so a
//! restarted or upgraded daemon reuses the maps whose layout it shares,
//! with their contents) and `links/<program>` for every attachment.
//! Links are held only by their pins: the daemon can exit or crash and the
//! datapath keeps working; `ambridge uninstall` removes the pins and with
//! them the attachments.

mod error;
mod link;
mod pins;

use std::{collections::BTreeMap, fs, os::fd::AsFd, path::Path};

use ambridge_common::{CgroupInfo, ConnKey, ConnRecord, Counter, NetnsInfo, NodeConfig, map_names};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{CgroupSockAddr, CgroupSockopt, SkMsg, SockOps},
};
pub use error::Error;
use link::AttachType;
pub use pins::Pins;
use tracing::{debug, info};

use crate::{
    reconcile::Op,
    types::{CgroupId, NetnsCookie},
};

/// The compiled kernel programs, built by `build.rs` for the BPF target.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambridge-ebpf"));

/// How a program is loaded (aya's typed loader per program type).
#[derive(Clone, Copy)]
enum Kind {
    SockAddr,
    SockOps,
    Sockopt,
}

/// Every program of the object: its name (the function name), how it is
/// loaded, and the cgroup hook it attaches to.
const PROGRAMS: [(&str, Kind, AttachType); 8] = [
    ("connect4", Kind::SockAddr, AttachType::CgroupInet4Connect),
    ("connect6", Kind::SockAddr, AttachType::CgroupInet6Connect),
    ("bind4", Kind::SockAddr, AttachType::CgroupInet4Bind),
    ("bind6", Kind::SockAddr, AttachType::CgroupInet6Bind),
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
    ("sock_ops", Kind::SockOps, AttachType::CgroupSockOps),
    ("getsockopt", Kind::Sockopt, AttachType::CgroupGetsockopt),
];

/// The `sk_msg` program, attached to the sockhash rather than to a cgroup.
const SK_MSG: &str = "redirect";

/// The maps the daemon fills from the node state (the others are the
/// programs' own).
const CONFIG_MAPS: [&str; 3] = [map_names::CGROUPS, map_names::NETNS, map_names::NODE];

/// The loaded datapath, with handles on the maps the daemon writes.
pub struct Datapath {
    cgroups: HashMap<MapData, u64, CgroupInfo>,
    netns: HashMap<MapData, u64, NetnsInfo>,
    node: Array<MapData, NodeConfig>,
    /// Some configuration map was created empty (first install, or a build
    /// whose layout differs from the pinned one).
    fresh_config: bool,
    /// Links of an earlier run are pinned: a datapath is serving already.
    running: bool,
    // Keeps program fds (and the object's other maps) open while the daemon
    // runs; the pinned links keep them alive after it exits.
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the programs, reusing the pinned maps of the same layout, and
    /// attaches the `sk_msg` program to the sockhash. Nothing is attached
    /// to a cgroup yet: see [`Datapath::attach`].
    pub fn load(pins: &Pins) -> Result<Self, Error> {
        pins.create()?;
        let fresh_config = CONFIG_MAPS.iter().any(|name| !pins.map(name).exists());
        let running = fs::read_dir(pins.links()).is_ok_and(|mut d| d.next().is_some());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .load(OBJECT)
            .map_err(Error::Load)?;
        attach_sk_msg(&mut ebpf)?;
        let cgroups = take_hash(&mut ebpf, map_names::CGROUPS)?;
        let netns = take_hash(&mut ebpf, map_names::NETNS)?;
        let node = ebpf
            .take_map(map_names::NODE)
            .ok_or(Error::MissingMap(map_names::NODE))?;
        let node = Array::try_from(node).map_err(map_err(map_names::NODE))?;
        Ok(Self {
            cgroups,
            netns,
            node,
            fresh_config,
            running,
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
        for (name, kind, attach_type) in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
            match kind {
                Kind::SockAddr => {
                    let p: &mut CgroupSockAddr = program.try_into().map_err(prog_err(name))?;
                    p.load().map_err(prog_err(name))?;
                }
                Kind::SockOps => {
                    let p: &mut SockOps = program.try_into().map_err(prog_err(name))?;
                    p.load().map_err(prog_err(name))?;
                }
                Kind::Sockopt => {
                    let p: &mut CgroupSockopt = program.try_into().map_err(prog_err(name))?;
                    p.load().map_err(prog_err(name))?;
                }
            }
            let prog_fd = program.fd().map_err(prog_err(name))?.as_fd();
            let link = link::create_cgroup_link(prog_fd, cgroup.as_fd(), attach_type).map_err(
                |source| Error::Syscall {
                    call: "bpf(BPF_LINK_CREATE)",
                    what: format!("attach {name} to {}", cgroup_root.display()),
                    source,
                },
            )?;
            pins.pin_link(name, link)?;
            debug!(program = name, cgroup = %cgroup_root.display(), "attached");
        }
        let stale = pins.remove_maps_except(&map_names::ALL)?;
        if !stale.is_empty() {
            info!(?stale, "unpinned the maps of an older layout");
        }
        info!(cgroup = %cgroup_root.display(), bpffs = %pins.root().display(), "datapath installed");
        Ok(())
    }

    /// What the kernel's cgroup map holds now.
    pub fn cgroup_entries(&self) -> Result<BTreeMap<CgroupId, CgroupInfo>, Error> {
        entries(&self.cgroups, map_names::CGROUPS, CgroupId)
    }

    /// What the kernel's netns map holds now.
    pub fn netns_entries(&self) -> Result<BTreeMap<NetnsCookie, NetnsInfo>, Error> {
        entries(&self.netns, map_names::NETNS, NetnsCookie)
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

    /// Applies cgroup map operations from [`crate::reconcile::diff`].
    pub fn apply_cgroups(&mut self, ops: &[Op<CgroupId, CgroupInfo>]) -> Result<(), Error> {
        apply(&mut self.cgroups, map_names::CGROUPS, ops, |id| id.0)
    }

    /// Applies netns map operations from [`crate::reconcile::diff`].
    pub fn apply_netns(&mut self, ops: &[Op<NetnsCookie, NetnsInfo>]) -> Result<(), Error> {
        apply(&mut self.netns, map_names::NETNS, ops, |c| c.0)
    }
}

/// Loads the `sk_msg` program and attaches it to the sockhash. The
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
    program.load().map_err(prog_err(SK_MSG))?;
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

fn apply<K: Copy, V: Pod>(
    map: &mut HashMap<MapData, u64, V>,
    name: &'static str,
    ops: &[Op<K, V>],
    raw: impl Fn(K) -> u64,
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
    move |source| Error::Program { program, source }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { map, source }
}

fn open_pinned(pins: &Pins, name: &'static str) -> Result<Map, Error> {
    let data = MapData::from_pin(pins.map(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

/// Sums the per-CPU counters pinned under `pins`.
pub fn read_counters(pins: &Pins) -> Result<Vec<(Counter, u64)>, Error> {
    let map = open_pinned(pins, map_names::COUNTERS)?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(map).map_err(map_err(map_names::COUNTERS))?;
    Counter::ALL
        .iter()
        .map(|c| {
            let per_cpu = counters
                .get(&(*c as u32), 0)
                .map_err(map_err(map_names::COUNTERS))?;
            Ok((*c, per_cpu.iter().sum()))
        })
        .collect()
}

/// How many entries each map pinned under `pins` holds: cgroups and network
/// namespaces known to the datapath, connects not yet established,
/// connections whose record is tracked, and sockets in the sockhash.
pub fn map_occupancy(pins: &Pins) -> Result<Vec<(&'static str, usize)>, Error> {
    let cgroups: HashMap<MapData, u64, CgroupInfo> =
        HashMap::try_from(open_pinned(pins, map_names::CGROUPS)?)
            .map_err(map_err(map_names::CGROUPS))?;
    let netns: HashMap<MapData, u64, NetnsInfo> =
        HashMap::try_from(open_pinned(pins, map_names::NETNS)?)
            .map_err(map_err(map_names::NETNS))?;
    let pending: HashMap<MapData, u64, ConnRecord> =
        HashMap::try_from(open_pinned(pins, map_names::PENDING)?)
            .map_err(map_err(map_names::PENDING))?;
    let conns: HashMap<MapData, ConnKey, ConnRecord> =
        HashMap::try_from(open_pinned(pins, map_names::CONNS)?)
            .map_err(map_err(map_names::CONNS))?;
    let socks: SockHash<MapData, ConnKey> =
        SockHash::try_from(open_pinned(pins, map_names::SOCKS)?)
            .map_err(map_err(map_names::SOCKS))?;
    Ok(vec![
        ("cgroups", cgroups.keys().count()),
        ("netns", netns.keys().count()),
        ("pending_connects", pending.keys().count()),
        ("tracked_connections", conns.keys().count()),
        ("accelerated_sockets", socks.keys().count()),
    ])
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
    removed.maps = pins.remove_all_in(&pins.maps())?;
    pins.remove_dirs()?;
    Ok(removed)
}
