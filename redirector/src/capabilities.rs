//! The capabilities `ambridge run` needs, each for one kind of operation,
//! checked at start: a container given too few fails at once, naming what
//! it lacks and what for, rather than with an `EPERM` somewhere later.
//! `deploy/`'s DaemonSet grants exactly these (a conformance test compares
//! the two, and runs the daemon with only these).

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

/// The capabilities of [`NEEDED`] this process lacks in its effective set
/// (of those this kernel knows).
pub fn missing() -> Result<Vec<Needed>, Error> {
    let effective = caps::read(None, CapSet::Effective)?;
    let known = caps::runtime::thread_all_supported();
    Ok(NEEDED
        .iter()
        .filter(|n| known.contains(&n.capability) && !effective.contains(&n.capability))
        .copied()
        .collect())
}

/// Fails unless this process has every capability of [`NEEDED`].
pub fn check() -> Result<(), Error> {
    match missing()? {
        lacking if lacking.is_empty() => Ok(()),
        lacking => Err(Error::Missing(lacking)),
    }
}
