//! The workloads file read again entry by entry: a file whose `workloads`
//! list is in plain block style is cut into its entries, and an entry whose
//! text is the same as at the last good load is taken as it was parsed
//! then. Only new or edited entries are parsed.
//!
//! The result is the whole-file parse's, or that parse is what runs: any
//! file this module cannot cut with certainty (flow style, anchors and
//! aliases, tags, several documents, odd indentation), any entry that does
//! not parse or validate alone, and any clash between entries falls back
//! to [`super::parse`], which also names the line of an error.

use std::collections::{HashMap, HashSet};

use super::{File, FileError, Workload, parse, pod_spec, validate};
use crate::node::spec::{CgroupRef, NodeSpec, PodSpec};

/// What the last good load parsed, by entry text.
#[derive(Default)]
pub struct Loader {
    entries: HashMap<String, PodSpec>,
}

/// The workloads file cut into the text around the `workloads` list and
/// the list's entries, each as a mapping document of its own.
struct Cut {
    rest: String,
    entries: Vec<String>,
}

impl Loader {
    /// Reads and parses the workloads file at `path`, as [`super::load`]
    /// does.
    pub fn load(&mut self, path: &std::path::Path) -> Result<NodeSpec, FileError> {
        self.parse(&super::read(path)?)
    }

    /// Parses `text` as [`super::parse`] does, reusing what the last good
    /// load parsed of unchanged entries.
    pub fn parse(&mut self, text: &str) -> Result<NodeSpec, FileError> {
        match cut(text).and_then(|cut| self.parse_cut(cut)) {
            Some(spec) => Ok(spec),
            None => {
                let spec = parse(text)?;
                self.entries.clear();
                Ok(spec)
            }
        }
    }

    /// `None` where the whole file must be parsed instead.
    fn parse_cut(&mut self, cut: Cut) -> Option<NodeSpec> {
        let mut spec = parse(&cut.rest).ok()?;
        // A second `workloads` key outside the list that was cut.
        if !spec.pods.is_empty() {
            return None;
        }
        let mut entries = HashMap::with_capacity(cut.entries.len());
        for text in cut.entries {
            let pod = match self.entries.get(&text) {
                Some(pod) => pod.clone(),
                None => parse_entry(&text)?,
            };
            spec.pods.push(pod.clone());
            // Two identical entries are a duplicate UID: the whole parse
            // says where.
            if entries.insert(text, pod).is_some() {
                return None;
            }
        }
        if clash(&spec) {
            return None;
        }
        self.entries = entries;
        Some(spec)
    }
}

/// One entry parsed and validated on its own.
fn parse_entry(text: &str) -> Option<PodSpec> {
    let workload: Workload = serde_saphyr::from_str(text).ok()?;
    let alone = File {
        workloads: vec![workload],
        ztunnel: None,
        redirect: None,
    };
    validate(&alone).ok()?;
    alone.workloads.into_iter().next().map(pod_spec)
}

/// Whether two entries (or an entry and ztunnel) claim one UID, cgroup or
/// address: what [`validate`] checks across entries.
fn clash(spec: &NodeSpec) -> bool {
    let mut uids = HashSet::new();
    let mut cgroups = HashSet::new();
    let mut addresses = HashSet::new();
    for pod in &spec.pods {
        if !uids.insert(&pod.uid) {
            return true;
        }
        if let crate::node::spec::PodCgroup::Path(path) = &pod.cgroup
            && !cgroups.insert(path.as_path())
        {
            return true;
        }
        if pod.ips.iter().any(|ip| !addresses.insert(*ip)) {
            return true;
        }
    }
    spec.ztunnels.iter().any(|z| match &z.cgroup {
        CgroupRef::Path(path) => cgroups.contains(path.as_path()),
        CgroupRef::Pod(_) => false,
    })
}

/// Cuts `text` into the rest and the entries of its `workloads` block
/// list; `None` when it is not plainly that shape.
fn cut(text: &str) -> Option<Cut> {
    // What could tie one entry to another or change how it reads alone.
    if text
        .chars()
        .any(|c| matches!(c, '&' | '*' | '!' | '%' | '\t' | '\r'))
        || text.starts_with("---")
        || text.contains("\n---")
        || text.contains("\n...")
    {
        return None;
    }
    let mut rest = String::new();
    let mut entries: Vec<String> = Vec::new();
    let mut lines = text.split_inclusive('\n').peekable();
    let mut found = false;
    while let Some(line) = lines.next() {
        if line.trim_end() != "workloads:" {
            rest.push_str(line);
            continue;
        }
        if found {
            return None;
        }
        found = true;
        let mut indent = None;
        while let Some(&next) = lines.peek() {
            let trimmed = next.trim_start_matches(' ');
            let depth = next.len() - trimmed.len();
            let blank = trimmed.trim().is_empty() || trimmed.starts_with('#');
            if depth == 0 && !blank {
                break;
            }
            lines.next();
            if blank {
                if let Some(entry) = entries.last_mut() {
                    entry.push('\n');
                }
                continue;
            }
            let at = *indent.get_or_insert(depth);
            if depth < at {
                return None;
            }
            let body = &next[at..];
            if depth == at {
                let item = body.strip_prefix("- ")?;
                entries.push(format!("  {item}"));
            } else {
                let entry = entries.last_mut()?;
                entry.push_str(body);
            }
        }
        if entries.is_empty() {
            return None;
        }
    }
    found.then_some(Cut { rest, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "workloads:
  - uid: a
    name: a
    namespace: default
    cgroup: /cg/a
    ips: [198.18.0.2]
    mode: ambient

  # a comment between entries
  - uid: b
    name: b
    namespace: default
    cgroup: /cg/b
    mode: none
ztunnel:
  cgroup: /cg/z
";

    #[test]
    fn an_entry_by_entry_parse_gives_what_the_whole_parse_gives() {
        let mut loader = Loader::default();
        assert_eq!(loader.parse(FILE), parse(FILE));
        assert_eq!(loader.entries.len(), 2);
        for edited in [
            FILE.replace("mode: none", "mode: ambient"),
            FILE.replace("    mode: none", "   mode: none"),
            FILE.replace("  - uid: b", "  -   uid: b"),
            FILE.replace("name: b", "name: &x b\n    service_account: *x"),
            FILE.replace("ztunnel:", "workloads:\n  - uid: c\nztunnel:"),
        ] {
            assert_eq!(loader.parse(&edited), parse(&edited), "{edited}");
        }
        // A file it cannot cut is parsed whole.
        let flow = "workloads: []\nztunnel:\n  cgroup: /cg/z\n";
        assert_eq!(loader.parse(flow), parse(flow));
        assert!(loader.entries.is_empty());
    }

    #[test]
    fn a_bad_or_clashing_entry_is_reported_as_the_whole_parse_reports_it() {
        let mut loader = Loader::default();
        loader.parse(FILE).unwrap();
        for bad in [
            FILE.replace("cgroup: /cg/b", "cgroup: /cg/a"),
            FILE.replace("uid: b", "uid: a"),
            FILE.replace("cgroup: /cg/z", "cgroup: /cg/b"),
            FILE.replace("mode: none", "mode: maybe"),
            FILE.replace("ips: [198.18.0.2]", "ips: [198.18.0.2, 198.18.0.3]"),
        ] {
            let err = loader.parse(&bad).unwrap_err();
            assert_eq!(Err(err), parse(&bad), "{bad}");
        }
        // The last good entries stay for the next good file.
        assert_eq!(loader.entries.len(), 2);
    }
}
