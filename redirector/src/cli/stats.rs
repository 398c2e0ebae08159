//! `ambridge stats`: the datapath counters and how full the maps are,
//! through the local API, or from the pinned maps while the daemon is down
//! (the datapath keeps working without it, and so does this).

use std::path::PathBuf;

use ambridge::{
    api,
    datapath::{self, Pins},
};
use anyhow::Context as _;

use super::{
    DEFAULT_API, DEFAULT_BPFFS, on_runtime,
    render::{self, OutputArgs},
};

/// Counters or map sizes, by name.
type NamedValues = Vec<(String, u64)>;

/// Print the datapath counters and how full the maps are (through the
/// local API, or from the pinned maps while the daemon is down).
#[derive(clap::Args)]
pub struct Stats {
    #[arg(long, default_value = DEFAULT_API)]
    api: PathBuf,
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

impl Stats {
    pub fn run(self) -> anyhow::Result<()> {
        let (counters, maps, source) = match self.read_through_api() {
            Ok((c, m)) => (c, m, "the daemon's API".to_string()),
            Err(e) => self.read_pins().with_context(|| {
                format!("daemon not reachable ({e:#}), and reading the pinned maps failed")
            })?,
        };
        let obj = |v: &[(String, u64)]| -> serde_json::Map<String, serde_json::Value> {
            v.iter()
                .map(|(k, n)| (k.clone(), serde_json::Value::from(*n)))
                .collect()
        };
        let document = || serde_json::json!({"counters": obj(&counters), "map_entries": obj(&maps), "source": source});
        // Key-value lists: wide adds nothing to them.
        if !render::document(self.output.format(), document)? {
            render::line(format_args!("from {source}"));
            render::fields("counters", &counters);
            render::fields("map entries", &maps);
        }
        Ok(())
    }

    fn read_through_api(&self) -> anyhow::Result<(NamedValues, NamedValues)> {
        on_runtime(async {
            let s = api::connect(&self.api)
                .await?
                .status(api::pb::StatusRequest {})
                .await?
                .into_inner();
            let pairs =
                |v: Vec<api::pb::Counter>| v.into_iter().map(|c| (c.name, c.value)).collect();
            Ok((pairs(s.counters), pairs(s.map_entries)))
        })
    }

    fn read_pins(&self) -> anyhow::Result<(NamedValues, NamedValues, String)> {
        let maps = datapath::ReadOnly::open(&Pins::new(&self.bpffs))
            .with_context(|| format!("opening the maps pinned under {}", self.bpffs.display()))?;
        let counters = maps.counters()?;
        let maps = maps.occupancy();
        Ok((
            counters
                .into_iter()
                .map(|(c, v)| (c.name().to_string(), v))
                .collect(),
            maps.into_iter()
                .map(|(n, v)| (n.to_string(), v as u64))
                .collect(),
            format!(
                "pinned maps under {} (daemon not reachable)",
                self.bpffs.display()
            ),
        ))
    }
}
