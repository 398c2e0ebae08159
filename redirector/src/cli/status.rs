//! `ambridge status`: the daemon, its settings, its components and the
//! datapath counters, through the local API.

use std::{path::PathBuf, time::Duration};

use ambridge::api;

use super::{
    DEFAULT_API, on_runtime,
    render::{self, Format, OutputArgs},
};

/// Show the daemon, its settings and the datapath counters (local API).
#[derive(clap::Args)]
pub struct Status {
    #[arg(long, default_value = DEFAULT_API)]
    api: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

impl Status {
    pub fn run(self) -> anyhow::Result<()> {
        let status = on_runtime(async {
            Ok(api::connect(&self.api)
                .await?
                .status(api::pb::StatusRequest {})
                .await?
                .into_inner())
        })?;
        let format = self.output.format();
        if !render::document(format, || as_json(&status))? {
            print_text(status, format == Format::Wide);
        }
        Ok(())
    }
}

fn as_json(status: &api::pb::StatusResponse) -> serde_json::Value {
    let counters: serde_json::Map<_, _> = status
        .counters
        .iter()
        .map(|c| (c.name.clone(), serde_json::Value::from(c.value)))
        .collect();
    serde_json::json!({
        "version": status.version, "cgroup_root": status.cgroup_root,
        "bpffs": status.bpffs, "state_loaded": status.state_loaded,
        "pods": status.pods, "enrolled": status.enrolled,
        "ztunnels": status.ztunnels, "unresolved": status.unresolved,
        "original_src": status.original_src().word(), "sockmap": status.sockmap,
        "counters": counters,
        "map_entries": status.map_entries.iter()
            .map(|c| (c.name.clone(), serde_json::Value::from(c.value)))
            .collect::<serde_json::Map<_, _>>(),
        "zds": status.zds.as_ref().map(|z| serde_json::json!({
            "connections": z.connections, "peers_refused": z.peers_refused,
        })),
        "ready": status.ready,
        "monitoring_address": (!status.monitoring_address.is_empty())
            .then_some(&status.monitoring_address),
        "components": status.components.iter().map(|c| serde_json::json!({
            "name": c.name, "state": c.state().word(), "last_error": c.last_error,
            "restarts": c.restarts, "since_unix_seconds": c.since_unix_seconds,
        })).collect::<Vec<_>>(),
    })
}

fn print_text(status: api::pb::StatusResponse, wide: bool) {
    let original_src = status.original_src().word();
    let zds = match &status.zds {
        Some(z) => format!(
            "serving: {} ztunnel connections, {} peers refused",
            z.connections, z.peers_refused
        ),
        None => "off (istio-cni serves it)".into(),
    };
    render::fields(
        &format!("ambridge {}", status.version),
        &[
            ("ready", render::yes_no(status.ready).to_string()),
            ("cgroup root", status.cgroup_root),
            ("bpffs", status.bpffs),
            (
                "node state",
                if status.state_loaded {
                    "loaded"
                } else {
                    "not loaded yet"
                }
                .into(),
            ),
            (
                "pods",
                format!(
                    "{} ({} enrolled, {} not in the datapath yet)",
                    status.pods, status.enrolled, status.unresolved
                ),
            ),
            ("ztunnels", status.ztunnels.to_string()),
            ("original-src", original_src.into()),
            ("sockmap", if status.sockmap { "on" } else { "off" }.into()),
            ("zds", zds),
            (
                "monitoring",
                if status.monitoring_address.is_empty() {
                    "off".into()
                } else {
                    format!("http://{}/metrics", status.monitoring_address)
                },
            ),
        ],
    );
    let mut components =
        render::Table::new(&["COMPONENT", "STATE", "RESTARTS", "FOR", "LAST ERROR"]);
    for c in &status.components {
        let since = std::time::UNIX_EPOCH
            .checked_add(Duration::from_secs(c.since_unix_seconds))
            .and_then(|t| t.elapsed().ok())
            .map_or_else(String::new, |ago| format!("{}s", ago.as_secs()));
        components.row(vec![
            c.name.clone(),
            c.state().word().into(),
            c.restarts.to_string(),
            since,
            c.last_error.clone(),
        ]);
    }
    components.print();
    let counters: Vec<(&str, u64)> = status
        .counters
        .iter()
        .map(|c| (c.name.as_str(), c.value))
        .collect();
    render::fields("counters", &counters);
    if wide {
        let maps: Vec<(&str, u64)> = status
            .map_entries
            .iter()
            .map(|c| (c.name.as_str(), c.value))
            .collect();
        render::fields("map entries", &maps);
    }
}
