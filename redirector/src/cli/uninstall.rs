//! `ambridge uninstall`: every program detached and every pin removed, so
//! traffic flows directly again; with the CNI directories, the chained
//! plugin taken out too, so pods start as before.

use std::path::PathBuf;

use ambridge::datapath::{self, Pins};

use super::{DEFAULT_BPFFS, render};

/// Detach every program and remove every pin: traffic flows directly.
#[derive(clap::Args)]
pub struct Uninstall {
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Also remove `ambridge-cni` from this CNI bin directory...
    #[arg(long, requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// ...and its entry from the configuration files of this directory.
    #[arg(long, requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
}

impl Uninstall {
    pub fn run(self) -> anyhow::Result<()> {
        // The plugin first: with the daemon gone for good it would refuse
        // every new pod, unable to reach it.
        if let (Some(bin_dir), Some(conf_dir)) = (&self.cni_bin_dir, &self.cni_conf_dir) {
            let removed = ambridge::cni::install::remove(bin_dir, conf_dir)?;
            render::line(format_args!(
                "removed the chained CNI plugin: binary {}, entry from {}",
                if removed.binary { "removed" } else { "absent" },
                if removed.configs.is_empty() {
                    "no configuration".to_string()
                } else {
                    removed
                        .configs
                        .iter()
                        .map(|c| c.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        let removed = datapath::uninstall(&Pins::new(&self.bpffs))?;
        if removed.links.is_empty() && removed.maps.is_empty() {
            render::line(format_args!(
                "nothing installed under {}",
                self.bpffs.display()
            ));
        } else {
            render::line(format_args!(
                "detached {} ({}) and removed {} maps from {}",
                removed.links.len(),
                removed.links.join(", "),
                removed.maps.len(),
                self.bpffs.display()
            ));
        }
        Ok(())
    }
}
