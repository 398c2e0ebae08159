//! Many pods' cgroups looked at on several threads at once: a node filled
//! from empty, or a full pass, asks for 10,000 cgroup ids and as many
//! `cgroup.events` reads, each a kernfs lookup and open that one thread
//! would make one after the other. The answers are handed to the caches
//! (`Resolve::look_ahead` of [`super::resolver::SystemResolver`]), which
//! the pods' parts then read as if they had looked one by one.

use std::{io, path::Path, thread};

use super::{cgroup, netns};
use crate::types::CgroupId;

/// Below this many cgroups one thread looks: starting threads would cost
/// more than they save.
pub const PARALLEL_AFTER: usize = 256;

/// One cgroup to look at, and whether its sandbox's namespace is asked
/// for (a pod whose namespace file is known needs only the id).
pub struct Ask<'a> {
    pub cgroup: &'a Path,
    pub sandbox: bool,
}

/// What was found about one [`Ask`].
pub struct Found {
    pub id: io::Result<CgroupId>,
    /// `None` if the sandbox was not asked for.
    pub sandbox: Option<io::Result<Option<netns::Opened>>>,
}

/// Looks at every cgroup of `asks`, on up to as many threads as the
/// machine has CPUs and no more than one per [`PARALLEL_AFTER`] cgroups;
/// in the order asked.
pub fn survey(asks: &[Ask]) -> Vec<Found> {
    let threads = thread::available_parallelism()
        .map_or(1, usize::from)
        .min(asks.len() / PARALLEL_AFTER)
        .max(1);
    if threads == 1 {
        return look(asks);
    }
    let chunk = asks.len().div_ceil(threads);
    thread::scope(|s| {
        let handles: Vec<_> = asks
            .chunks(chunk)
            .map(|part| {
                let spawned = thread::Builder::new()
                    .name("cgroup-survey".into())
                    .spawn_scoped(s, || look(part));
                (part, spawned)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(part, spawned)| match spawned {
                // A thread that cannot start leaves its part to this one.
                Err(_) => look(part),
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            })
            .collect()
    })
}

/// One thread's part, with its own open parent directories.
fn look(asks: &[Ask]) -> Vec<Found> {
    let mut dirs = cgroup::Dirs::default();
    asks.iter()
        .map(|ask| Found {
            id: dirs.cgroup_id(ask.cgroup),
            sandbox: ask
                .sandbox
                .then(|| netns::open_sandbox_of(&mut dirs, ask.cgroup)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A plain directory per pod standing in for its cgroup, every third
    /// with a process, every seventh missing.
    #[test]
    fn a_survey_on_many_threads_finds_what_one_lookup_at_a_time_finds() {
        let root = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let pods: Vec<PathBuf> = (0..PARALLEL_AFTER * 3 + 5)
            .map(|i| root.path().join(format!("pod{i}")))
            .collect();
        for (i, pod) in pods.iter().enumerate() {
            if i % 7 == 0 {
                continue;
            }
            std::fs::create_dir(pod).unwrap();
            let populated = i % 3 == 0;
            std::fs::write(
                pod.join("cgroup.events"),
                format!("populated {}\nfrozen 0\n", u8::from(populated)),
            )
            .unwrap();
            let procs = if populated {
                format!("{me}\n")
            } else {
                String::new()
            };
            std::fs::write(pod.join("cgroup.procs"), procs).unwrap();
        }
        let asks: Vec<Ask> = pods
            .iter()
            .enumerate()
            .map(|(i, cgroup)| Ask {
                cgroup,
                sandbox: i % 5 != 0,
            })
            .collect();
        let found = survey(&asks);
        assert_eq!(found.len(), pods.len());
        for ((ask, found), i) in asks.iter().zip(&found).zip(0..) {
            let id = cgroup::cgroup_id(ask.cgroup).ok();
            assert_eq!(found.id.as_ref().ok(), id.as_ref(), "pod {i}");
            let sandbox = ask.sandbox.then(|| netns::netns_of_cgroup(ask.cgroup).ok());
            assert_eq!(
                found
                    .sandbox
                    .as_ref()
                    .map(|s| s.as_ref().ok().map(|o| o.as_ref().map(|o| o.path.clone()))),
                sandbox,
                "pod {i}"
            );
        }
    }
}
