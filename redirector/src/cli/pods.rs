//! `ambridge pods`: the node's workloads and where each stands, through the
//! local API.

use std::path::PathBuf;

use ambridge::api;

use super::{
    DEFAULT_API, on_runtime,
    render::{self, Format},
};

/// List the node's workloads and where they stand (local API).
#[derive(clap::Args)]
pub struct Pods {
    #[arg(long, default_value = DEFAULT_API)]
    api: PathBuf,
    #[arg(long)]
    json: bool,
}

impl Pods {
    pub fn run(self) -> anyhow::Result<()> {
        let pods = on_runtime(async {
            Ok(api::connect(&self.api)
                .await?
                .list_pods(api::pb::ListPodsRequest {})
                .await?
                .into_inner()
                .pods)
        })?;
        match Format::from_json_flag(self.json) {
            Format::Json => render::json(&serde_json::Value::Array(
                pods.iter().map(as_json).collect(),
            )),
            Format::Text => {
                let mut table = render::Table::new(&[
                    "NAMESPACE",
                    "NAME",
                    "MODE",
                    "DATAPATH",
                    "INBOUND",
                    "DNS",
                    "ACCEL",
                    "IPS",
                    "PROBLEM",
                ]);
                for p in pods {
                    let (mode, inbound) = (p.mode().word(), p.inbound().word());
                    table.row(vec![
                        p.namespace,
                        p.name,
                        mode.into(),
                        match (p.in_datapath, p.held) {
                            (false, _) => "not yet",
                            (true, true) => "held",
                            (true, false) => "in",
                        }
                        .into(),
                        inbound.into(),
                        render::yes_no(p.dns_captured).into(),
                        render::yes_no(p.accelerated).into(),
                        p.ips.join(","),
                        p.problem,
                    ]);
                }
                table.print();
            }
        }
        Ok(())
    }
}

fn as_json(p: &api::pb::Pod) -> serde_json::Value {
    serde_json::json!({
        "uid": p.uid, "namespace": p.namespace, "name": p.name,
        "mode": p.mode().word(), "ips": p.ips, "cgroup": p.cgroup,
        "cgroup_id": p.cgroup_id, "in_datapath": p.in_datapath,
        "accelerated": p.accelerated, "held": p.held,
        "inbound": p.inbound().word(), "dns_captured": p.dns_captured,
        "problem": p.problem,
    })
}
