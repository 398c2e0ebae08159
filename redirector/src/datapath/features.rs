//! What this kernel offers of what the datapath needs, found by loading a
//! trivial program or creating a tiny map of each type (`bpf(2)`, so it
//! needs `CAP_BPF` or `CAP_SYS_ADMIN`; without them every probe fails and
//! says so), and the socket option the daemon reads namespace cookies
//! with. A program type is probed, not each hook of it: the releases name
//! when the last hook the datapath attaches came. [`check_programs`] goes
//! further: every program of this build through this kernel's verifier, on
//! throwaway maps, never the datapath's. [`minimum_kernel`] is the latest
//! of all these releases.

use std::{fs, path::Path};

use aya::{EbpfLoader, maps::MapType, programs::ProgramType};

use super::{Error, OBJECT, Pins, load_order, load_program};

/// One program or map type the datapath uses, or the daemon's socket
/// option, and whether this kernel has it.
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

/// The daemon's own use of a socket option: the cookie of each pod's and
/// ztunnel's network namespace (the key of the netns map, which bind,
/// connection records and inbound capture read), from a socket inside it.
const NETNS_COOKIE: (&str, &str) = (
    "SO_NETNS_COOKIE (each pod's and ztunnel's namespace cookie, the netns map's key)",
    "5.14",
);

/// Probes every program and map type the datapath uses, and the socket
/// option the daemon reads namespace cookies with.
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
    let (name, since) = NETNS_COOKIE;
    // ENOPROTOOPT before 5.14; any other failure is the probe's own.
    let cookie = match crate::host::netns::own_cookie() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e.to_string()),
    };
    programs
        .chain(maps)
        .chain([Feature {
            name,
            since,
            found: cookie,
        }])
        .collect()
}

/// The oldest Linux release the daemon runs on: the latest of the
/// releases that brought each program type, map type, late helper and
/// socket option it uses (the netns cookie in `sock_ops`, `sk_msg` and
/// `cgroup_sockopt` programs, 5.15). Older kernels refuse at start, the
/// verifier naming the first program it refuses.
pub fn minimum_kernel() -> &'static str {
    PROGRAMS
        .iter()
        .map(|(_, _, since)| *since)
        .chain(MAPS.iter().map(|(_, _, since)| *since))
        .chain(LATE_HELPERS.iter().map(|(_, _, since)| *since))
        .chain([NETNS_COOKIE.1])
        .max_by_key(|since| release(since).expect("the tables' releases are major.minor"))
        .expect("non-empty tables")
}

/// The `(major, minor)` of a release (`5.15`, or `uname -r`'s
/// `6.1.0-50-amd64`), compared as numbers.
fn release(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split(['.', '-', '+']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
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
    Ok(load_order()
        .map(|(name, kind)| (name, load_program(&mut ebpf, name, kind)))
        .collect())
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
/// release that has it there; on a `kernel` older than
/// [`minimum_kernel`], that release too (on a newer one the helper is
/// missing for another reason: a distribution's build, a lockdown).
pub fn missing_helper(program: &str, log: &str, kernel: &str) -> Option<String> {
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
    let needs = minimum_kernel();
    let too_old = matches!(
        (release(kernel), release(needs)),
        (Some(running), Some(needed)) if running < needed
    );
    let why = match since {
        Some(since) => format!("it calls {helper}, which {kind} programs have from Linux {since}"),
        None => format!("it calls {helper}, which this kernel does not give {kind} programs"),
    };
    Some(if too_old {
        format!("{why}; ambridge needs Linux {needs} or later")
    } else {
        why
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_the_kernel_lacks_is_named_with_the_release_that_brought_it() {
        let log = "0: (bf) r6 = r1\n1: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\nprocessed 2 insns";
        let old = "5.10.0-32-amd64";
        assert_eq!(
            missing_helper("sock_ops", log, old).as_deref(),
            Some(
                "it calls bpf_get_netns_cookie, which sock_ops programs have from Linux 5.15; ambridge needs Linux 5.15 or later"
            )
        );
        assert_eq!(
            missing_helper("getsockopt", log, old).as_deref(),
            Some(
                "it calls bpf_get_netns_cookie, which cgroup_sockopt programs have from Linux 5.15; ambridge needs Linux 5.15 or later"
            )
        );
        assert_eq!(
            missing_helper("inbound", "unknown func bpf_sk_assign#124", old).as_deref(),
            Some(
                "it calls bpf_sk_assign, which this kernel does not give sk_lookup programs; ambridge needs Linux 5.15 or later"
            )
        );
        assert_eq!(missing_helper("connect4", "R4 !read_ok", old), None);
    }

    #[test]
    fn a_kernel_new_enough_is_not_told_to_upgrade() {
        let log = "unknown func bpf_sk_assign#124";
        for kernel in ["5.15.0-91-generic", "6.12.117+deb13-amd64", "6.18"] {
            assert_eq!(
                missing_helper("inbound", log, kernel).as_deref(),
                Some("it calls bpf_sk_assign, which this kernel does not give sk_lookup programs"),
                "{kernel}"
            );
        }
    }

    #[test]
    fn the_minimum_kernel_is_the_latest_release_any_feature_needs() {
        // 5.15 (netns cookie in sock_ops) outranks 5.9 and 5.14, compared
        // as numbers, not text ("5.9" > "5.15" as strings).
        assert_eq!(minimum_kernel(), "5.15");
        assert_eq!(release("6.1.0-50-amd64"), Some((6, 1)));
        assert_eq!(release("6.12.117+deb13-amd64"), Some((6, 12)));
        assert_eq!(release("5.15"), Some((5, 15)));
        assert_eq!(release("weird"), None);
    }
}
