//! `ambridge`: the node agent (`run`) and its operator commands.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use ambridge::{
    cgroup,
    daemon::{self, Options},
    datapath::{self, Pins},
    state::{OriginalSrc, Settings},
    types::Port,
    workloads,
};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/ambridge";

#[derive(Parser)]
#[command(version, about = "eBPF traffic capture for Istio Ambient")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the datapath and keep it equal to the node's workloads.
    Run {
        /// cgroup v2 directory the programs attach to [default: the cgroup2
        /// mount found in /proc/self/mounts].
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// bpffs directory where maps and links are pinned.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Where the kubelet's `kubepods` cgroups live, for workloads named
        /// only by pod UID [default: the cgroup2 mount].
        #[arg(long)]
        kubepods_parent: Option<PathBuf>,
        /// Workloads file (watched; edits apply without restart).
        #[arg(long, default_value = "/etc/ambridge/workloads.yaml")]
        workloads: PathBuf,
        /// ztunnel's outbound listener port.
        #[arg(long, default_value_t = Port::ZTUNNEL_OUTBOUND.0)]
        redirect_port: u16,
        /// What to do with ztunnel's original-source (IP_TRANSPARENT)
        /// binds: `undo` where the node has no TPROXY return routing,
        /// `preserve` where istio-cni's routing is in place.
        #[arg(long, value_enum, default_value = "undo")]
        original_src: OriginalSrc,
        /// Same-node acceleration with sockmap and msg_redirect. Off by
        /// default: on Linux 6.18 a *blocking* reader of an accelerated
        /// socket can get EAGAIN on a wakeup without data (see README);
        /// turn it on where applications use non-blocking sockets.
        #[arg(long, value_enum, default_value = "off")]
        sockmap: Switch,
        /// How often the maps are re-checked against the workloads.
        #[arg(long, default_value = "5", value_name = "SECONDS")]
        resync_seconds: u64,
    },
    /// Detach every program and remove every pin: traffic flows directly.
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print the datapath counters and how full the maps are.
    Stats {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a workloads file and print what it enrolls.
    Validate { file: PathBuf },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            cgroup_root,
            bpffs,
            kubepods_parent,
            workloads,
            redirect_port,
            original_src,
            sockmap,
            resync_seconds,
        } => {
            let cgroup_root = match cgroup_root {
                Some(dir) => dir,
                None => cgroup::cgroup2_mount()?,
            };
            let kubepods_parent = match kubepods_parent {
                Some(dir) => dir,
                None => cgroup::cgroup2_mount()?,
            };
            let opts = Options {
                cgroup_root,
                kubepods_parent,
                pins: Pins::new(bpffs),
                workloads,
                settings: Settings {
                    port: Port(redirect_port),
                    original_src,
                    sockmap: sockmap == Switch::On,
                },
                resync: Duration::from_secs(resync_seconds.max(1)),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(daemon::run(opts))
        }
        Command::Uninstall { bpffs } => {
            let removed = datapath::uninstall(&Pins::new(&bpffs))?;
            if removed.links.is_empty() && removed.maps.is_empty() {
                println!("nothing installed under {}", bpffs.display());
            } else {
                println!(
                    "detached {} ({}) and removed {} maps from {}",
                    removed.links.len(),
                    removed.links.join(", "),
                    removed.maps.len(),
                    bpffs.display()
                );
            }
            Ok(())
        }
        Command::Stats { bpffs, json } => {
            let pins = Pins::new(&bpffs);
            let counters = datapath::read_counters(&pins)
                .with_context(|| format!("reading counters pinned under {}", bpffs.display()))?;
            let maps = datapath::map_occupancy(&pins)
                .with_context(|| format!("reading maps pinned under {}", bpffs.display()))?;
            if json {
                let counters: serde_json::Map<_, _> = counters
                    .iter()
                    .map(|(c, v)| (c.name().to_string(), serde_json::Value::from(*v)))
                    .collect();
                let maps: serde_json::Map<_, _> = maps
                    .iter()
                    .map(|(name, n)| (name.to_string(), serde_json::Value::from(*n)))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"counters": counters, "map_entries": maps})
                );
            } else {
                println!("counters");
                for (c, v) in counters {
                    println!("  {:<28} {v}", c.name());
                }
                println!("map entries");
                for (name, n) in maps {
                    println!("  {name:<28} {n}");
                }
            }
            Ok(())
        }
        Command::Validate { file } => {
            let spec =
                workloads::load(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for pod in &spec.pods {
                let cgroup = pod.cgroup.as_ref().map_or_else(
                    || "(from the pod UID)".to_string(),
                    |c| c.display().to_string(),
                );
                println!(
                    "pod {}/{} uid={} mode={:?} cgroup={cgroup}",
                    pod.namespace, pod.name, pod.uid, pod.mode
                );
            }
            for z in &spec.ztunnels {
                println!("ztunnel cgroup={}", z.cgroup.display());
            }
            Ok(())
        }
    }
}
