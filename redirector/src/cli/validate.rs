//! `ambridge validate`: a workloads file checked, and what it enrolls.

use std::path::PathBuf;

use ambridge::{node::spec::PodCgroup, sources::file};

use super::render;

/// Check a workloads file and print what it enrolls.
#[derive(clap::Args)]
pub struct Validate {
    file: PathBuf,
}

impl Validate {
    pub fn run(self) -> anyhow::Result<()> {
        let spec =
            file::load(&self.file).map_err(|e| anyhow::anyhow!("{}: {e}", self.file.display()))?;
        let mut pods = render::Table::new(&["NAMESPACE", "NAME", "UID", "MODE", "CGROUP"]);
        for pod in &spec.pods {
            pods.row(vec![
                pod.namespace.clone(),
                pod.name.clone(),
                pod.uid.to_string(),
                format!("{:?}", pod.mode).to_lowercase(),
                match &pod.cgroup {
                    PodCgroup::Path(path) => path.display().to_string(),
                    PodCgroup::Uid => "(from the pod UID)".to_string(),
                    PodCgroup::Address => "(from the pod's addresses)".to_string(),
                },
            ]);
        }
        pods.print();
        for z in &spec.ztunnels {
            render::line(format_args!("ztunnel cgroup={:?}", z.cgroup));
        }
        Ok(())
    }
}
