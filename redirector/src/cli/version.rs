//! `ambridge version`: this build, the running kernel, which of the
//! program and map types the datapath needs the kernel has, and whether
//! its verifier takes each of this build's programs.

use std::path::PathBuf;

use ambridge::datapath::features;

use super::render::{self, OutputArgs};

/// Print the build, the kernel and what the kernel offers the datapath
/// (probing needs CAP_BPF).
#[derive(clap::Args)]
pub struct Version {
    #[command(flatten)]
    output: OutputArgs,
    /// A bpf filesystem where the program check creates its maps (in a
    /// scratch directory, removed after).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

impl Version {
    pub fn run(self) -> anyhow::Result<()> {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .map_err(|e| anyhow::anyhow!("uname: {e}"))?;
        let found = features::probe();
        // Each program through the verifier: what the feature probes cannot
        // tell (a helper a program calls, an access a kernel allows).
        let programs: Vec<(&str, Result<(), String>)> = match features::check_programs(&self.bpffs)
        {
            Ok(checked) => checked
                .into_iter()
                .map(|(name, loaded)| (name, loaded.map_err(|e| e.to_string())))
                .collect(),
            Err(e) => vec![("(all)", Err(e.to_string()))],
        };
        let document = || {
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "kernel": kernel,
                "minimum_kernel": features::minimum_kernel(),
                "features": found.iter().map(|f| serde_json::json!({
                    "name": f.name,
                    "since": f.since,
                    "found": f.found.as_ref().ok(),
                    "error": f.found.as_ref().err(),
                })).collect::<Vec<_>>(),
                "programs": programs.iter().map(|(name, loaded)| serde_json::json!({
                    "name": name,
                    "loaded": loaded.is_ok(),
                    "error": loaded.as_ref().err(),
                })).collect::<Vec<_>>(),
            })
        };
        if render::document(self.output.format(), document)? {
            return Ok(());
        }
        let needs = format!("Linux {} or later", features::minimum_kernel());
        render::fields(
            &format!("ambridge {}", env!("CARGO_PKG_VERSION")),
            &[("kernel", kernel.as_str()), ("needs", needs.as_str())],
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
        let mut table = render::Table::new(&["PROGRAM", "VERIFIER"]);
        for (name, loaded) in &programs {
            let state = match loaded {
                Ok(()) => "loaded".to_string(),
                Err(e) => format!("refused: {}", e.replace('\n', " | ")),
            };
            table.row(vec![name.to_string(), state]);
        }
        table.print();
        Ok(())
    }
}
