//! Running the daemon with only some capabilities, as a DaemonSet's
//! `securityContext.capabilities` runs it: root, with every capability set
//! (bounding, inheritable, permitted, effective, ambient) cut to a list, by
//! `setpriv` from util-linux.

use std::{path::Path, process::Command};

/// The environment variable naming the capabilities every test daemon gets
/// (`bpf,net_admin,...`); unset, a daemon keeps root's.
pub const ENV: &str = "AMBRIDGE_TEST_CAPS";

/// The capabilities daemons are limited to, from [`ENV`].
pub fn limited() -> Option<Vec<String>> {
    let list = std::env::var(ENV).ok()?;
    Some(
        list.split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect(),
    )
}

/// A command running `program` with only `caps` (names without `CAP_`,
/// any case) in every set.
pub fn with_only(program: &Path, caps: &[String]) -> Command {
    let list: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set={list}"))
        .arg(format!("--inh-caps={list}"))
        .arg(format!("--ambient-caps={list}"))
        .arg("--")
        .arg(program);
    cmd
}

/// The capabilities the daemon asks for (`ambridge::capabilities::needed`),
/// named as a DaemonSet lists them (`sys_admin`): with the sidecar-mode
/// fallback on or off.
pub fn asked_for(sidecar: bool) -> Vec<String> {
    ambridge::capabilities::needed(sidecar)
        .iter()
        .map(|n| {
            n.capability
                .to_string()
                .trim_start_matches("CAP_")
                .to_ascii_lowercase()
        })
        .collect()
}
