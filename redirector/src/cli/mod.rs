//! The `ambridge` commands, one module each, and their one renderer. Every
//! command but `run` and `version` talks to the daemon through the local
//! API, or, while the daemon is down, reads the datapath's pinned maps
//! (`stats`) or removes them (`uninstall`).
//!
//! Exit codes, for every command: 0 done; 1 failed (the error is printed
//! on stderr, `ambridge: ...`); 2 the command line was wrong (clap's
//! usage error).

mod pods;
mod render;
mod run;
mod stats;
mod status;
mod uninstall;
mod validate;
mod version;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Where `run` pins the datapath unless told otherwise.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf/ambridge";
const DEFAULT_API: &str = ambridge::api::DEFAULT_SOCKET;

#[derive(Parser)]
#[command(version, about = "eBPF traffic capture for Istio Ambient")]
pub struct Cli {
    /// How log lines are written on stderr: `text` for people, `json` (one
    /// object a line) for a log collector.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    Run(Box<run::Run>),
    Status(status::Status),
    Pods(pods::Pods),
    Uninstall(uninstall::Uninstall),
    Stats(stats::Stats),
    Validate(validate::Validate),
    Version(version::Version),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run(run) => run.run(),
            Command::Status(status) => status.run(),
            Command::Pods(pods) => pods.run(),
            Command::Uninstall(uninstall) => uninstall.run(),
            Command::Stats(stats) => stats.run(),
            Command::Validate(validate) => validate.run(),
            Command::Version(version) => version.run(),
        }
    }
}

/// Runs an API client call on a small runtime.
fn on_runtime<T>(call: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(call)
}
