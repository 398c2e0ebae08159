//! The `ambridge` commands, one module each, and their one renderer. Every
//! command but `run` talks to the daemon through the local API, or, while
//! the daemon is down, reads the datapath's pinned maps (`stats`) or removes
//! them (`uninstall`).

mod pods;
mod render;
mod run;
mod stats;
mod status;
mod uninstall;
mod validate;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Where `run` pins the datapath unless told otherwise.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf/ambridge";
const DEFAULT_API: &str = ambridge::api::DEFAULT_SOCKET;

#[derive(Parser)]
#[command(version, about = "eBPF traffic capture for Istio Ambient")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(Box<run::Run>),
    Status(status::Status),
    Pods(pods::Pods),
    Uninstall(uninstall::Uninstall),
    Stats(stats::Stats),
    Validate(validate::Validate),
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
