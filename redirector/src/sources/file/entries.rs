//! The workloads file read again entry by entry: a file whose `workloads`
//! list is in plain block style is cut into its entries, and an entry whose
//! text is the same as at the last good load is taken as it was parsed
//! then. Only new or edited entries are parsed, and only the pods they and
//! the vanished entries name are reported changed.
//!
//! The result is the whole-file parse's, or that parse is what runs: any
//! file this module cannot cut with certainty (flow style, anchors and
//! aliases, tags, several documents, odd indentation), any entry that does
//! not parse or validate alone, and any clash between entries falls back
//! to [`super::parse`], which also names the line of an error.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use super::{File, FileError, View, Workload, parse, pod_spec, validate};
use crate::{
    node::spec::{CgroupRef, NodeSpec, PodCgroup, PodSpec, keep_shared},
    types::{FastHash, WorkloadId},
};

/// The workloads file's last good state, and what it was parsed from.
#[derive(Default)]
pub struct Loader {
    view: Option<View>,
    /// Each entry's text, with its pod's UID and the load that last saw it.
    entries: HashMap<Box<str>, (WorkloadId, u64), FastHash>,
    /// Counts loads: an entry seen twice in one is a duplicate.
    load: u64,
    /// The pods' cgroups and addresses, for a new entry's clashes.
    cgroups: HashMap<Arc<Path>, WorkloadId, FastHash>,
    addresses: HashMap<IpAddr, WorkloadId, FastHash>,
}

/// What a good load changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// Nothing: the same state as before.
    Unchanged,
    /// These pods (new, edited or gone), and maybe the node-wide part.
    Changed(BTreeSet<WorkloadId>),
}

/// The workloads file cut into the text around the `workloads` list and
/// the list's entries, each as it is written in the file.
struct Cut<'a> {
    rest: String,
    entries: Vec<Entry<'a>>,
}

/// One list entry: its text, and the column of its `- `.
#[derive(Clone, Copy)]
struct Entry<'a> {
    text: &'a str,
    indent: usize,
}

impl Loader {
    /// The last good state; `None` before the first.
    pub fn view(&self) -> Option<&View> {
        self.view.as_ref()
    }

    /// Reads and parses the workloads file at `path`, as [`super::load`]
    /// does. A bad file leaves the last good state as it was.
    pub fn load(&mut self, path: &std::path::Path) -> Result<Loaded, FileError> {
        self.parse(&super::read(path)?)
    }

    /// Parses `text` as [`super::parse`] does, reusing what the last good
    /// load parsed of unchanged entries.
    pub fn parse(&mut self, text: &str) -> Result<Loaded, FileError> {
        self.load += 1;
        let cut = cut(text);
        if self.view.is_some()
            && let Some(cut) = &cut
            && let Some(loaded) = self.apply(cut)
        {
            return Ok(loaded);
        }
        let spec = parse(text)?;
        Ok(self.replace(spec, cut))
    }

    /// Brings the state to `cut`, parsing only its new entries; `None`
    /// where the whole file must be parsed instead (nothing is changed
    /// then).
    fn apply(&mut self, cut: &Cut) -> Option<Loaded> {
        let node = parse(&cut.rest).ok()?;
        // A second `workloads` key outside the list that was cut.
        if !node.pods.is_empty() {
            return None;
        }
        let mut unseen: Vec<Entry> = Vec::new();
        for entry in &cut.entries {
            match self.entries.get_mut(entry.text) {
                // The same text twice is a duplicate UID: the whole parse
                // says where.
                Some((_, seen)) if *seen == self.load => return None,
                Some((_, seen)) => *seen = self.load,
                None => unseen.push(*entry),
            }
        }
        let new: Vec<(&str, PodSpec)> = unseen
            .iter()
            .map(|e| e.text)
            .zip(parse_entries(&unseen)?)
            .collect();
        let view = self.view.as_ref().expect("checked by the caller");
        let gone: BTreeSet<&WorkloadId> = self
            .entries
            .values()
            .filter(|(_, seen)| *seen != self.load)
            .map(|(uid, _)| uid)
            .collect();
        if new.is_empty() && gone.is_empty() && view.node == node {
            return Some(Loaded::Unchanged);
        }
        // A new entry may clash with any other; the kept ones did not
        // clash with each other.
        let kept = |owner: Option<&WorkloadId>| owner.is_some_and(|uid| !gone.contains(uid));
        let mut new_uids = HashSet::with_hasher(FastHash::default());
        let mut new_cgroups = HashSet::with_hasher(FastHash::default());
        let mut new_addresses = HashSet::with_hasher(FastHash::default());
        for (_, pod) in &new {
            let uid_taken = view.pods.contains_key(&pod.uid) && !gone.contains(&pod.uid);
            if uid_taken || !new_uids.insert(&pod.uid) {
                return None;
            }
            if let PodCgroup::Path(path) = &pod.cgroup
                && (kept(self.cgroups.get(&**path)) || !new_cgroups.insert(&**path))
            {
                return None;
            }
            for ip in &pod.ips {
                if kept(self.addresses.get(ip)) || !new_addresses.insert(*ip) {
                    return None;
                }
            }
        }
        for z in &node.ztunnels {
            if let CgroupRef::Path(path) = &z.cgroup
                && (kept(self.cgroups.get(path.as_path())) || new_cgroups.contains(path.as_path()))
            {
                return None;
            }
        }
        let mut changed: BTreeSet<WorkloadId> = gone.into_iter().cloned().collect();
        let view = self.view.as_mut().expect("checked by the caller");
        for uid in &changed {
            if let Some(pod) = view.pods.remove(uid) {
                forget(&mut self.cgroups, &mut self.addresses, &pod);
            }
        }
        let load = self.load;
        self.entries.retain(|_, (_, seen)| *seen == load);
        for (text, pod) in new {
            self.entries.insert(text.into(), (pod.uid.clone(), load));
            index(&mut self.cgroups, &mut self.addresses, &pod);
            changed.insert(pod.uid.clone());
            view.pods.insert(pod.uid.clone(), Arc::new(pod));
        }
        view.node = node;
        Some(Loaded::Changed(changed))
    }

    /// Replaces the state with the whole file's `spec` (its entries are
    /// `cut`'s, when it could be cut).
    fn replace(&mut self, spec: NodeSpec, cut: Option<Cut>) -> Loaded {
        let mut new = View::from(spec);
        let old = self.view.take();
        if let Some(old) = &old {
            keep_shared(&mut new.pods, &old.pods);
        }
        if old.as_ref() == Some(&new) {
            self.view = old;
            return Loaded::Unchanged;
        }
        let old = old.unwrap_or_default();
        let mut changed = BTreeSet::new();
        for (uid, pod) in &new.pods {
            if old.pods.get(uid) != Some(pod) {
                changed.insert(uid.clone());
            }
        }
        changed.extend(
            old.pods
                .keys()
                .filter(|uid| !new.pods.contains_key(*uid))
                .cloned(),
        );
        self.cgroups.clear();
        self.addresses.clear();
        for pod in new.pods.values() {
            index(&mut self.cgroups, &mut self.addresses, pod);
        }
        self.entries.clear();
        if let Some(cut) = cut {
            let uids = cut.entries.iter().filter_map(|e| {
                let workload: Workload = serde_saphyr::from_str(&dedent(e)).ok()?;
                Some(WorkloadId::from(workload.uid.value))
            });
            for (entry, uid) in cut.entries.iter().zip(uids) {
                self.entries.insert(entry.text.into(), (uid, self.load));
            }
            // Entries the cut read otherwise than the parse are not reused.
            if self.entries.len() != new.pods.len()
                || self
                    .entries
                    .values()
                    .any(|(uid, _)| !new.pods.contains_key(uid))
            {
                self.entries.clear();
            }
        }
        self.view = Some(new);
        Loaded::Changed(changed)
    }
}

fn index(
    cgroups: &mut HashMap<Arc<Path>, WorkloadId, FastHash>,
    addresses: &mut HashMap<IpAddr, WorkloadId, FastHash>,
    pod: &PodSpec,
) {
    if let PodCgroup::Path(path) = &pod.cgroup {
        cgroups.insert(path.clone(), pod.uid.clone());
    }
    for ip in &pod.ips {
        addresses.insert(*ip, pod.uid.clone());
    }
}

fn forget(
    cgroups: &mut HashMap<Arc<Path>, WorkloadId, FastHash>,
    addresses: &mut HashMap<IpAddr, WorkloadId, FastHash>,
    pod: &PodSpec,
) {
    if let PodCgroup::Path(path) = &pod.cgroup {
        cgroups.remove(&**path);
    }
    for ip in &pod.ips {
        addresses.remove(ip);
    }
}

/// One entry as a mapping document of its own.
fn dedent(entry: &Entry) -> String {
    let mut out = String::with_capacity(entry.text.len());
    for (i, line) in entry.text.split_inclusive('\n').enumerate() {
        // An empty line less indented than the entry stays an empty line.
        let body = match line.get(entry.indent..) {
            Some(body) if !body.is_empty() => body,
            _ => "\n",
        };
        match i {
            0 => {
                out.push_str("  ");
                out.push_str(body.strip_prefix("- ").unwrap_or(body));
            }
            _ => out.push_str(body),
        }
    }
    out
}

/// Each of `entries` parsed and validated on its own (see [`parse_entry`]),
/// on up to [`PARSERS`] threads when there are many (a node filled from
/// empty), in their order; `None` if any fails.
fn parse_entries(entries: &[Entry]) -> Option<Vec<PodSpec>> {
    if entries.len() < 2 * PER_PARSER {
        return parse_on(entries, 1);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(PARSERS)
        .min(entries.len() / PER_PARSER);
    parse_on(entries, threads)
}

/// [`parse_entries`] on `threads` threads of its own, the caller waiting
/// rather than parsing beside them (why: [`crate::heap`]'s arenas). A
/// part whose thread cannot be started (a `pids.max` reached) is parsed on
/// the caller's.
fn parse_on(entries: &[Entry], threads: usize) -> Option<Vec<PodSpec>> {
    let parse_all = |part: &[Entry]| part.iter().map(parse_entry).collect::<Option<Vec<_>>>();
    if threads <= 1 || entries.is_empty() {
        return parse_all(entries);
    }
    let share = entries.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parsers: Vec<_> = entries
            .chunks(share)
            .map(|part| {
                let parser = std::thread::Builder::new().name("parse".into());
                (
                    part,
                    parser.spawn_scoped(scope, move || parse_all(part)).ok(),
                )
            })
            .collect();
        let mut pods = Vec::with_capacity(entries.len());
        for (part, parser) in parsers {
            pods.extend(match parser {
                Some(parser) => parser
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))?,
                None => parse_all(part)?,
            });
        }
        Some(pods)
    })
}

/// At most this many threads parse entries: YAML costs about 10 us an
/// entry, so 10,000 new ones take 100 ms on one core.
const PARSERS: usize = 4;

/// Fewer entries than this a thread are parsed on the caller's thread
/// alone: starting one costs tens of microseconds.
const PER_PARSER: usize = 256;

/// One entry parsed and validated on its own.
fn parse_entry(entry: &Entry) -> Option<PodSpec> {
    let workload: Workload = serde_saphyr::from_str(&dedent(entry)).ok()?;
    let alone = File {
        workloads: vec![workload],
        ztunnel: None,
        redirect: None,
    };
    validate(&alone).ok()?;
    pod_spec(alone.workloads.into_iter().next()?, 0).ok()
}

/// One line of the file, with its newline, and how it starts.
#[derive(Clone, Copy)]
struct Line<'a> {
    text: &'a str,
    /// Its offsets in the file.
    start: usize,
    end: usize,
    /// Leading spaces.
    depth: usize,
    /// Nothing but white space.
    empty: bool,
}

impl<'a> Line<'a> {
    /// The line past its leading spaces.
    fn body(&self) -> &'a str {
        &self.text[self.depth..]
    }

    /// Empty, or a comment.
    fn blank(&self) -> bool {
        self.empty || self.body().starts_with('#')
    }
}

/// The lines of a text, each cut at its newline with `memchr`.
struct Lines<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, at: 0 }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = Line<'a>;

    fn next(&mut self) -> Option<Line<'a>> {
        let rest = &self.text[self.at..];
        if rest.is_empty() {
            return None;
        }
        let len = memchr::memchr(b'\n', rest.as_bytes()).map_or(rest.len(), |n| n + 1);
        let text = &rest[..len];
        let depth = text.bytes().take_while(|&b| b == b' ').count();
        let empty = match text.as_bytes().get(depth) {
            None | Some(b'\n') => true,
            Some(b) if b.is_ascii_graphic() => false,
            Some(_) => text.trim().is_empty(),
        };
        let start = self.at;
        self.at += len;
        Some(Line {
            text,
            start,
            end: self.at,
            depth,
            empty,
        })
    }
}

/// Cuts `text` into the rest and the entries of its `workloads` block
/// list; `None` when it is not plainly that shape.
fn cut(text: &str) -> Option<Cut<'_>> {
    // What could tie one entry to another or change how it reads alone.
    let bytes = text.as_bytes();
    if memchr::memchr3(b'&', b'*', b'!', bytes).is_some()
        || memchr::memchr3(b'%', b'\t', b'\r', bytes).is_some()
        || text.starts_with("---")
        || text.contains("\n---")
        || text.contains("\n...")
        || text.contains('\u{feff}')
    {
        return None;
    }
    let mut rest = String::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut found = false;
    let mut lines = Lines::new(text).peekable();
    while let Some(line) = lines.next() {
        if line.text.trim_end() != "workloads:" {
            rest.push_str(line.text);
            continue;
        }
        if found {
            return None;
        }
        found = true;
        let mut indent = None;
        // Where the entry being read started.
        let mut start: Option<usize> = None;
        let mut end = line.end;
        while let Some(next) = lines.peek().copied() {
            if next.depth == 0 && !next.blank() {
                break;
            }
            lines.next();
            end = next.end;
            if next.empty && indent.is_none() {
                continue;
            }
            let at = *indent.get_or_insert(next.depth);
            // A comment or a value less indented than the entries would be
            // cut through when an entry is read alone.
            if next.depth < at && !(next.empty && next.body() == "\n") {
                return None;
            }
            if next.blank() {
                continue;
            }
            if next.depth == at {
                if !next.body().starts_with("- ") {
                    return None;
                }
                if let Some(s) = start {
                    entries.push(Entry {
                        text: &text[s..next.start],
                        indent: at,
                    });
                }
                start = Some(next.start);
            } else if start.is_none() {
                return None;
            }
        }
        let (Some(s), Some(at)) = (start, indent) else {
            return None;
        };
        entries.push(Entry {
            text: &text[s..end],
            indent: at,
        });
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

    /// An entry to add after the others.
    const THIRD: &str = "  - uid: c
    name: c
    namespace: default
    cgroup: /cg/c
    mode: none
";

    /// The loader's state as the whole parse spells it.
    fn spec(loader: &Loader) -> NodeSpec {
        let view = loader.view().expect("a good state");
        NodeSpec {
            pods: view.pods.values().map(|p| PodSpec::clone(p)).collect(),
            ..view.node.clone()
        }
    }

    fn whole(text: &str) -> Result<NodeSpec, FileError> {
        parse(text).map(|mut spec| {
            spec.pods.sort_by(|a, b| a.uid.cmp(&b.uid));
            spec
        })
    }

    fn uids(names: &[&str]) -> Loaded {
        Loaded::Changed(
            names
                .iter()
                .map(|n| WorkloadId::kubernetes(n.to_string()))
                .collect(),
        )
    }

    #[test]
    fn an_entry_by_entry_parse_gives_what_the_whole_parse_gives() {
        let mut loader = Loader::default();
        assert_eq!(loader.parse(FILE), Ok(uids(&["a", "b"])));
        assert_eq!(Ok(spec(&loader)), whole(FILE));
        assert_eq!(loader.entries.len(), 2);
        assert_eq!(loader.parse(FILE), Ok(Loaded::Unchanged));
        for edited in [
            FILE.replace("mode: none", "mode: ambient"),
            FILE.replace("    mode: none", "   mode: none"),
            FILE.replace("  - uid: b", "  -   uid: b"),
            FILE.replace("uid: b", "uid: c"),
            FILE.replace("name: b", "name: &x b\n    service_account: *x"),
            FILE.replace("/cg/z", "/cg/y"),
            FILE.replace(
                "    cgroup: /cg/b\n",
                "#   cgroup: /cg/b\n    cgroup: /cg/c\n",
            ),
            FILE.replace(
                "    cgroup: /cg/b\n",
                "  # cgroup: /cg/b\n    cgroup: /cg/c\n",
            ),
            FILE.replace(
                "    mode: none\n",
                "    mode: none\n    service_account: |\n      a\n \n      b\n",
            ),
            FILE.replace("    mode: none\n", &format!("    mode: none\n{THIRD}")),
            // A byte order mark is allowed only where a document starts
            // (found by the `workloads_file` fuzz target).
            FILE.replace("ztunnel:\n  cgroup: /cg/z\n", "\u{feff}"),
        ] {
            let mut loader = Loader::default();
            loader.parse(FILE).unwrap();
            let got = loader.parse(&edited);
            let want = whole(&edited);
            let Ok(want) = want else {
                assert_eq!(got.map(|_| ()), want.map(|_| ()), "{edited}");
                continue;
            };
            // Every pod that differs is reported.
            let before = whole(FILE).unwrap();
            let differ: BTreeSet<&WorkloadId> = want
                .pods
                .iter()
                .filter(|p| !before.pods.contains(p))
                .chain(before.pods.iter().filter(|p| !want.pods.contains(p)))
                .map(|p| &p.uid)
                .collect();
            match got {
                Ok(Loaded::Changed(reported)) => {
                    assert!(differ.iter().all(|uid| reported.contains(*uid)), "{edited}")
                }
                Ok(Loaded::Unchanged) => assert!(differ.is_empty() && want == before, "{edited}"),
                Err(e) => panic!("{edited}: {e}"),
            }
            assert_eq!(spec(&loader), want, "{edited}");
        }
        // A file it cannot cut is parsed whole.
        let flow = "workloads: []\nztunnel:\n  cgroup: /cg/z\n";
        assert_eq!(loader.parse(flow), Ok(uids(&["a", "b"])));
        assert_eq!(Ok(spec(&loader)), whole(flow));
        assert!(loader.entries.is_empty());
    }

    #[test]
    fn entries_parsed_on_several_threads_come_back_in_file_order_and_one_bad_entry_fails_all() {
        let text: String = (0..10)
            .map(|i| {
                format!(
                    "  - uid: p{i}\n    name: p{i}\n    namespace: default\n    cgroup: /cg/p{i}\n    mode: ambient\n"
                )
            })
            .collect();
        let file = format!("workloads:\n{text}");
        let entries = cut(&file).expect("plain block style").entries;
        let alone: Vec<PodSpec> = entries.iter().map(|e| parse_entry(e).unwrap()).collect();
        for threads in 1..=4 {
            assert_eq!(
                parse_on(&entries, threads),
                Some(alone.clone()),
                "{threads} threads"
            );
        }
        let bad = file.replace("uid: p7\n", "uid: p7\n    ips: [nonsense]\n");
        let entries = cut(&bad).expect("plain block style").entries;
        for threads in 1..=4 {
            assert_eq!(parse_on(&entries, threads), None, "{threads} threads");
        }
    }

    #[test]
    fn a_bad_or_clashing_entry_is_reported_as_the_whole_parse_reports_it_and_changes_nothing() {
        let mut loader = Loader::default();
        loader.parse(FILE).unwrap();
        for bad in [
            FILE.replace("cgroup: /cg/b", "cgroup: /cg/a"),
            FILE.replace("uid: b", "uid: a"),
            FILE.replace("cgroup: /cg/z", "cgroup: /cg/b"),
            FILE.replace("mode: none", "mode: maybe"),
            FILE.replace("ips: [198.18.0.2]", "ips: [198.18.0.2, 198.18.0.3]"),
            FILE.replace("    mode: none", "    mode: none\n    ips: [198.18.0.2]"),
            FILE.replace("ztunnel:", "workloads:\n  - uid: c\n    name: c\nztunnel:"),
        ] {
            let err = loader.parse(&bad).unwrap_err();
            assert_eq!(Err(err), parse(&bad), "{bad}");
            assert_eq!(Ok(spec(&loader)), whole(FILE), "{bad}");
        }
        // The last good entries are still known.
        assert_eq!(loader.parse(FILE), Ok(Loaded::Unchanged));
        assert_eq!(loader.entries.len(), 2);
    }
}
