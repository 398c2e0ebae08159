//! What this kernel offers of what the datapath needs, found by loading a
//! trivial program or creating a tiny map of each type (`bpf(2)`, so it
//! needs `CAP_BPF` or `CAP_SYS_ADMIN`; without them every probe fails and
//! says so). A program type is probed, not each hook of it: the releases
//! name when the last hook the datapath attaches came. [`check_programs`]
//! goes further: every program of this build through this kernel's
//! verifier, on throwaway maps, never the datapath's.

use std::{fs, path::Path};

use aya::{
    EbpfLoader,
    maps::MapType,
    programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramType, SkLookup, SkMsg, SockOps},
};

use super::{Error, Kind, OBJECT, Pins, SK_LOOKUP, SK_MSG, prog_err};

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

/// One program of the object, and whether this kernel loaded it.
pub type ProgramCheck = (&'static str, Result<(), Error>);

/// Every program of the object, through this kernel's verifier, none
/// attached: what `ambridge version` reports of this build on this kernel.
/// The maps are created under a scratch directory of the bpf filesystem
/// `bpffs`, removed after.
pub fn check_programs(bpffs: &Path) -> Result<Vec<ProgramCheck>, Error> {
    let scratch = Pins::new(bpffs.join(format!("ambridge-check-{}", std::process::id())));
    let checked = scratch.create().and_then(|()| load_each_program(&scratch));
    let removed = fs::remove_dir_all(scratch.root()).map_err(|source| Error::Io {
        what: format!("remove {}", scratch.root().display()),
        source,
    });
    let checked = checked?;
    removed?;
    Ok(checked)
}

fn load_each_program(scratch: &Pins) -> Result<Vec<ProgramCheck>, Error> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(scratch.maps())
        .load(OBJECT)
        .map_err(Error::Load)?;
    let kinds = super::PROGRAMS
        .iter()
        .map(|(name, kind, _)| (*name, Some(*kind)))
        .chain([(SK_LOOKUP, None), (SK_MSG, None)]);
    let mut checked = Vec::new();
    for (name, kind) in kinds {
        let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
        let loaded = match (kind, name) {
            (Some(Kind::SockAddr), _) => <&mut CgroupSockAddr>::try_from(program)
                .map_err(prog_err(name))
                .and_then(|p| p.load().map_err(prog_err(name))),
            (Some(Kind::Sock), _) => <&mut CgroupSock>::try_from(program)
                .map_err(prog_err(name))
                .and_then(|p| p.load().map_err(prog_err(name))),
            (Some(Kind::SockOps), _) => <&mut SockOps>::try_from(program)
                .map_err(prog_err(name))
                .and_then(|p| p.load().map_err(prog_err(name))),
            (Some(Kind::Sockopt), _) => <&mut CgroupSockopt>::try_from(program)
                .map_err(prog_err(name))
                .and_then(|p| p.load().map_err(prog_err(name))),
            (None, SK_LOOKUP) => <&mut SkLookup>::try_from(program)
                .map_err(prog_err(name))
                .and_then(|p| p.load().map_err(prog_err(name))),
            (None, _) => <&mut SkMsg>::try_from(program)
                .map_err(prog_err(name))
                .and_then(|p| p.load().map_err(prog_err(name))),
        };
        checked.push((name, loaded));
    }
    Ok(checked)
}

/// Helpers the programs call that came to a program type after the type
/// itself: the type, the helper, and the first release that lets it call
/// it. The kernel table in the README lists the same.
const LATE_HELPERS: [(&str, &str, &str); 5] = [
    ("cgroup_sock_addr", "bpf_get_netns_cookie", "5.7"),
    (
        "cgroup_sock_addr",
        "bpf_get_current_ancestor_cgroup_id",
        "5.7",
    ),
    ("sock_ops", "bpf_get_netns_cookie", "5.15"),
    ("sk_msg", "bpf_get_netns_cookie", "5.15"),
    ("cgroup_sockopt", "bpf_get_netns_cookie", "5.15"),
];

/// The program type of each program of the object, by its name.
fn program_type(program: &str) -> &'static str {
    match program {
        "sock_ops" => "sock_ops",
        "getsockopt" => "cgroup_sockopt",
        "sock_release" => "cgroup_sock",
        "inbound" => "sk_lookup",
        "redirect" => "sk_msg",
        _ => "cgroup_sock_addr",
    }
}

/// What a verifier refusal of `program` with this `log` says is missing,
/// where it is a helper this kernel does not give the program's type
/// (`unknown func <helper>#<id>`): the helper and, where known, the first
/// release that has it there.
pub fn missing_helper(program: &str, log: &str) -> Option<String> {
    let helper = log
        .lines()
        .find_map(|line| line.trim().strip_prefix("unknown func "))?
        .split('#')
        .next()?
        .trim();
    let kind = program_type(program);
    let since = LATE_HELPERS
        .iter()
        .find(|(t, h, _)| *t == kind && *h == helper)
        .map(|(_, _, since)| *since);
    Some(match since {
        Some(since) => format!("it calls {helper}, which {kind} programs have from Linux {since}"),
        None => format!("it calls {helper}, which this kernel does not give {kind} programs"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_the_kernel_lacks_is_named_with_the_release_that_brought_it() {
        let log = "0: (bf) r6 = r1\n1: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\nprocessed 2 insns";
        assert_eq!(
            missing_helper("sock_ops", log).as_deref(),
            Some("it calls bpf_get_netns_cookie, which sock_ops programs have from Linux 5.15")
        );
        assert_eq!(
            missing_helper("getsockopt", log).as_deref(),
            Some(
                "it calls bpf_get_netns_cookie, which cgroup_sockopt programs have from Linux 5.15"
            )
        );
        assert_eq!(
            missing_helper("inbound", "unknown func bpf_sk_assign#124").as_deref(),
            Some("it calls bpf_sk_assign, which this kernel does not give sk_lookup programs")
        );
        assert_eq!(missing_helper("connect4", "R4 !read_ok"), None);
    }
}
