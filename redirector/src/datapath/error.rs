use std::path::PathBuf;

/// Errors of the kernel side, each naming the program, map, path or call
/// that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "loading the BPF object failed (is this Linux >= 5.7 with CONFIG_CGROUP_BPF, run as root?): {0}"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the BPF object has no program `{0}` (build mismatch)")]
    MissingProgram(&'static str),
    #[error("the BPF object has no map `{0}` (build mismatch)")]
    MissingMap(&'static str),
    #[error(
        "the verifier of Linux {kernel} refused program `{program}`{}: {source}; its last lines:\n{last_lines}",
        missing.as_ref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    Verifier {
        program: &'static str,
        /// `uname -r`.
        kernel: String,
        /// What the program needs that this kernel lacks, where the log
        /// says ([`super::features::missing_helper`]).
        missing: Option<String>,
        #[source]
        source: std::io::Error,
        last_lines: String,
    },
    #[error("program `{program}`")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{call} failed ({what})")]
    Syscall {
        call: &'static str,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map `{map}`")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{path} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
