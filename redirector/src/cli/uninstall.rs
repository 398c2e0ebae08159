//! `ambridge uninstall`: every program detached and every pin removed, so
//! traffic flows directly again.

use std::path::PathBuf;

use ambridge::datapath::{self, Pins};

use super::DEFAULT_BPFFS;

/// Detach every program and remove every pin: traffic flows directly.
#[derive(clap::Args)]
pub struct Uninstall {
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
}

impl Uninstall {
    pub fn run(self) -> anyhow::Result<()> {
        let removed = datapath::uninstall(&Pins::new(&self.bpffs))?;
        if removed.links.is_empty() && removed.maps.is_empty() {
            println!("nothing installed under {}", self.bpffs.display());
        } else {
            println!(
                "detached {} ({}) and removed {} maps from {}",
                removed.links.len(),
                removed.links.join(", "),
                removed.maps.len(),
                self.bpffs.display()
            );
        }
        Ok(())
    }
}
