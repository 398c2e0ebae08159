//! `ambridge version`: this build, the running kernel, and which of the
//! program and map types the datapath needs the kernel has.

use ambridge::datapath::features;

use super::render::{self, OutputArgs};

/// Print the build, the kernel and what the kernel offers the datapath
/// (probing needs CAP_BPF).
#[derive(clap::Args)]
pub struct Version {
    #[command(flatten)]
    output: OutputArgs,
}

impl Version {
    pub fn run(self) -> anyhow::Result<()> {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .map_err(|e| anyhow::anyhow!("uname: {e}"))?;
        let found = features::probe();
        let document = || {
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "kernel": kernel,
                "features": found.iter().map(|f| serde_json::json!({
                    "name": f.name,
                    "since": f.since,
                    "found": f.found.as_ref().ok(),
                    "error": f.found.as_ref().err(),
                })).collect::<Vec<_>>(),
            })
        };
        if render::document(self.output.format(), document)? {
            return Ok(());
        }
        render::fields(
            &format!("ambridge {}", env!("CARGO_PKG_VERSION")),
            &[("kernel", kernel.as_str())],
        );
        let mut table = render::Table::new(&["KERNEL FEATURE", "SINCE", "FOUND"]);
        for f in &found {
            let state = match &f.found {
                Ok(found) => render::yes_no(*found).to_string(),
                Err(e) => format!("unknown: {e}"),
            };
            table.row(vec![
                f.name.to_string(),
                format!("Linux {}", f.since),
                state,
            ]);
        }
        table.print();
        Ok(())
    }
}
