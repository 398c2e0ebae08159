//! What this kernel offers of what the datapath needs, found by loading a
//! trivial program or creating a tiny map of each type (`bpf(2)`, so it
//! needs `CAP_BPF` or `CAP_SYS_ADMIN`; without them every probe fails and
//! says so). A program type is probed, not each hook of it: the releases
//! name when the last hook the datapath attaches came.

use aya::{maps::MapType, programs::ProgramType};

/// One program or map type the datapath uses, and whether this kernel has
/// it.
#[derive(Debug)]
pub struct Feature {
    /// The type, with what ambridge uses it for.
    pub name: &'static str,
    /// The first Linux release that has it.
    pub since: &'static str,
    /// Found, not found, or why the probe failed.
    pub found: Result<bool, String>,
}

const PROGRAMS: [(ProgramType, &str, &str); 6] = [
    (
        ProgramType::CgroupSockAddr,
        "cgroup_sock_addr (connect and bind 4.17, sendmsg 4.18, recvmsg 5.2, getpeername 5.8)",
        "5.8",
    ),
    (
        ProgramType::SockOps,
        "sock_ops (connection records)",
        "4.13",
    ),
    (
        ProgramType::SkMsg,
        "sk_msg (same-node acceleration, on a sockhash)",
        "4.18",
    ),
    (
        ProgramType::CgroupSockopt,
        "cgroup_sockopt (SO_ORIGINAL_DST)",
        "5.3",
    ),
    (ProgramType::SkLookup, "sk_lookup (inbound capture)", "5.9"),
    (
        ProgramType::CgroupSock,
        "cgroup_sock (sock_release: records freed with their socket)",
        "5.9",
    ),
];

const MAPS: [(MapType, &str, &str); 4] = [
    (MapType::LruHash, "lru_hash (connection records)", "4.10"),
    (
        MapType::SockHash,
        "sockhash (accelerated sockets, inbound listeners)",
        "4.18",
    ),
    (MapType::LpmTrie, "lpm_trie (exempt sources)", "4.11"),
    (MapType::PerCpuArray, "percpu_array (counters)", "4.6"),
];

/// Probes every program and map type the datapath uses.
pub fn probe() -> Vec<Feature> {
    let programs = PROGRAMS.iter().map(|(kind, name, since)| Feature {
        name,
        since,
        found: aya::sys::is_program_supported(*kind).map_err(|e| e.to_string()),
    });
    let maps = MAPS.iter().map(|(kind, name, since)| Feature {
        name,
        since,
        found: aya::sys::is_map_supported(*kind).map_err(|e| e.to_string()),
    });
    programs.chain(maps).collect()
}
