//! The capabilities `ambridge run` needs, each for one kind of operation,
//! checked at start: a container given too few fails at once, naming what
//! it lacks and what for, rather than with an `EPERM` somewhere later.
//! `deploy/`'s DaemonSet grants exactly these, and its `sidecar` component
//! what the sidecar-mode fallback adds (a conformance test compares them,
//! and runs the daemon with only these).

use caps::{CapSet, Capability};

/// A capability the daemon needs, and for what.
#[derive(Clone, Copy, Debug)]
pub struct Needed {
    pub capability: Capability,
    pub for_what: &'static str,
}

/// Every capability the daemon needs, in the DaemonSet's order.
///
/// `CAP_BPF` (Linux 5.8) and `CAP_NET_ADMIN` are the narrow grants for
/// loading and attaching the programs, but the kernel lets `CAP_SYS_ADMIN`
/// stand in for both there, and `setns(2)` needs `CAP_SYS_ADMIN` anyway:
/// they would add nothing for the programs, and `CAP_NET_ADMIN` would add
/// the power to change the node's interfaces, routes and firewall.
pub const NEEDED: [Needed; 2] = [
    Needed {
        capability: Capability::CAP_SYS_ADMIN,
        for_what: "loading and attaching the programs (bpf(2)) and entering pods' network namespaces (setns(2)) to read their addresses and cookies",
    },
    Needed {
        capability: Capability::CAP_SYS_PTRACE,
        for_what: "opening /proc/PID/ns/net of pod processes, which run with other capabilities",
    },
];

/// What `--sidecar on` needs besides [`NEEDED`]: a sidecar pod with an
/// IPv6 address gets its proxy's passthrough source, `::6`, on its `lo`,
/// which rtnetlink grants to `CAP_NET_ADMIN` alone (`CAP_SYS_ADMIN` does
/// not stand in). Without the fallback the daemon changes no interface,
/// and is not given it.
pub const SIDECAR_NEEDED: Needed = Needed {
    capability: Capability::CAP_NET_ADMIN,
    for_what: "adding the sidecar proxy's passthrough source ::6 to sidecar pods' loopback (rtnetlink), under --sidecar on",
};

/// Every capability the daemon needs with the sidecar-mode fallback on or
/// off, in the DaemonSet's order.
pub fn needed(sidecar: bool) -> Vec<Needed> {
    let mut needed = NEEDED.to_vec();
    if sidecar {
        needed.push(SIDECAR_NEEDED);
    }
    needed
}

/// Why the daemon cannot start with the capabilities it has.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading this process's capabilities (capget): {0}")]
    Read(#[from] caps::errors::CapsError),
    #[error(
        "missing capabilities in the effective set: {}; grant them (a container's securityContext.capabilities.add, as deploy/ does)",
        .0.iter().map(|n| format!("{} for {}", n.capability, n.for_what)).collect::<Vec<_>>().join("; ")
    )]
    Missing(Vec<Needed>),
}

/// The capabilities of [`needed`] this process lacks in its effective set
/// (of those this kernel knows).
pub fn missing(sidecar: bool) -> Result<Vec<Needed>, Error> {
    let effective = caps::read(None, CapSet::Effective)?;
    let known = caps::runtime::thread_all_supported();
    Ok(needed(sidecar)
        .into_iter()
        .filter(|n| known.contains(&n.capability) && !effective.contains(&n.capability))
        .collect())
}

/// Fails unless this process has every capability of [`needed`].
pub fn check(sidecar: bool) -> Result<(), Error> {
    match missing(sidecar)? {
        lacking if lacking.is_empty() => Ok(()),
        lacking => Err(Error::Missing(lacking)),
    }
}
