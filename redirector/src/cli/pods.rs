//! `ambridge pods`: the node's workloads and where each stands, through the
//! local API.

use std::path::PathBuf;

use ambridge::api;

use super::{
    DEFAULT_API, on_runtime,
    render::{self, Format, OutputArgs},
};

/// List the node's workloads and where they stand (local API).
#[derive(clap::Args)]
pub struct Pods {
    #[arg(long, default_value = DEFAULT_API)]
    api: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
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
        let format = self.output.format();
        if render::document(format, || {
            serde_json::Value::Array(pods.iter().map(as_json).collect())
        })? {
            return Ok(());
        }
        let wide = format == Format::Wide;
        let mut headers = vec![
            "NAMESPACE",
            "NAME",
            "MODE",
            "DATAPATH",
            "INBOUND",
            "DNS",
            "ACCEL",
            "IPS",
        ];
        if wide {
            headers.extend(["UID", "CGROUP ID", "CGROUP"]);
        }
        headers.push("PROBLEM");
        let mut table = render::Table::new(&headers);
        for p in pods {
            let (mode, inbound) = (p.mode().word(), p.inbound().word());
            let mut row = vec![
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
            ];
            if wide {
                row.extend([p.uid, p.cgroup_id.to_string(), p.cgroup]);
            }
            row.push(p.problem);
            table.row(row);
        }
        table.print();
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
