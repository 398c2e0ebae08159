//! The workloads file read again entry by entry: a file whose `workloads`
//! list is in plain block style is cut into its entries, and an entry whose
//! text is the same as at the last good load is taken as it was parsed
//! then. Only new or edited entries are parsed, and only the pods they and
//! the vanished entries name are reported changed.
//!
//! A text that differs from the last good one only inside the list (a pod
//! added, edited or removed) is compared with it byte for byte, and only
//! the entries around the bytes that differ are cut again: a one-pod change
//! to a file of 10,000 pods costs two comparisons of the texts rather than
//! a cut of its 60,000 lines.
//!
//! The result is the whole-file parse's, or that parse is what runs: any
//! file this module cannot cut with certainty (flow style, anchors and
//! aliases, tags, several documents, odd indentation), any entry that does
//! not parse or validate alone, and any clash between entries falls back
//! to [`super::parse`], which also names the line of an error.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    ops::Range,
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
    /// The last good text, and its entries when it could be cut.
    last: Option<LastText>,
    /// The pods' cgroups and addresses, for a new entry's clashes.
    cgroups: HashMap<Arc<Path>, WorkloadId, FastHash>,
    addresses: HashMap<IpAddr, WorkloadId, FastHash>,
}

/// A good text and, when it was cut, where each entry of its `workloads`
/// list is and whose it is. A new text that differs from it only inside
/// the list is cut again only where it differs.
struct LastText {
    text: String,
    /// The list's entries, in order: each starts where the one before
    /// ends.
    entries: Vec<Kept>,
    /// The column of the entries' `- `.
    indent: usize,
}

/// One entry of the last good text: its bytes, and its pod's UID.
struct Kept {
    span: Range<usize>,
    uid: WorkloadId,
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

/// One list entry: its text, where it starts in the file, and the column
/// of its `- `.
#[derive(Clone, Copy)]
struct Entry<'a> {
    text: &'a str,
    at: usize,
    indent: usize,
}

impl Entry<'_> {
    fn span(&self) -> Range<usize> {
        self.at..self.at + self.text.len()
    }
}

/// Where a new text differs from the last good one, in entries: the last
/// text's entries `old` gave way to `new`, and the text around the list
/// is `node` (`None`: as it was).
struct Edit<'a> {
    old: Range<usize>,
    new: Vec<Entry<'a>>,
    node: Option<NodeSpec>,
    /// The column of the entries' `- `.
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
        self.take(super::read(path)?)
    }

    /// Parses `text` as [`super::parse`] does, reusing what the last good
    /// load parsed of unchanged entries.
    pub fn parse(&mut self, text: &str) -> Result<Loaded, FileError> {
        self.take(text.to_owned())
    }

    /// Brings the state to `text`, keeping it as the last text when good.
    fn take(&mut self, text: String) -> Result<Loaded, FileError> {
        if let Some(last) = &self.last
            && last.text == text
        {
            return Ok(Loaded::Unchanged);
        }
        if let Some(edit) = self.edit(&text)
            && let Some(loaded) = self.apply(edit, &text)
        {
            let last = self.last.as_mut().expect("an edit is of the last text");
            last.text = text;
            return Ok(loaded);
        }
        let spec = parse(&text)?;
        Ok(self.replace(spec, text))
    }

    /// How `text` differs from the last good text, in entries; `None`
    /// where it cannot be cut (it is parsed whole then).
    fn edit<'a>(&self, text: &'a str) -> Option<Edit<'a>> {
        let last = self.last.as_ref()?;
        if let Some(edit) = splice(last, text) {
            return Some(edit);
        }
        let cut = cut(text)?;
        let node = parse(&cut.rest).ok()?;
        // A second `workloads` key outside the list that was cut.
        if !node.pods.is_empty() {
            return None;
        }
        let indent = cut.entries.first()?.indent;
        Some(Edit {
            old: 0..last.entries.len(),
            new: cut.entries,
            node: Some(node),
            indent,
        })
    }

    /// Brings the state to `text` as `edit` says it differs, parsing only
    /// the entries that are new to the last text; `None` where the whole
    /// text must be parsed instead (nothing is changed then).
    fn apply(&mut self, edit: Edit, text: &str) -> Option<Loaded> {
        let (view, last) = (self.view.as_ref()?, self.last.as_ref()?);
        let old = &last.entries[edit.old.clone()];
        // The entries that gave way, by their text: one that is written
        // again as it was is the same pod.
        let was: HashMap<&str, usize, FastHash> = old
            .iter()
            .enumerate()
            .map(|(i, kept)| (&last.text[kept.span.clone()], i))
            .collect();
        let mut again = vec![false; old.len()];
        let mut uids: Vec<Option<WorkloadId>> = Vec::with_capacity(edit.new.len());
        let mut unseen: Vec<Entry> = Vec::new();
        for entry in &edit.new {
            match was.get(entry.text) {
                Some(&i) if !again[i] => {
                    again[i] = true;
                    uids.push(Some(old[i].uid.clone()));
                }
                _ => {
                    uids.push(None);
                    unseen.push(*entry);
                }
            }
        }
        let parsed = parse_entries(&unseen)?;
        let gone: BTreeSet<&WorkloadId> = old
            .iter()
            .zip(&again)
            .filter(|(_, again)| !**again)
            .map(|(kept, _)| &kept.uid)
            .collect();
        let node_changed = edit.node.as_ref().is_some_and(|node| *node != view.node);
        if parsed.is_empty() && gone.is_empty() && !node_changed {
            // The same entries, moved: only where they are has changed.
            self.keep(edit, uids, text);
            return Some(Loaded::Unchanged);
        }
        // A new entry may clash with any other; the kept ones did not
        // clash with each other.
        let kept = |owner: Option<&WorkloadId>| owner.is_some_and(|uid| !gone.contains(uid));
        let mut new_uids = HashSet::with_hasher(FastHash::default());
        let mut new_cgroups = HashSet::with_hasher(FastHash::default());
        let mut new_addresses = HashSet::with_hasher(FastHash::default());
        for pod in &parsed {
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
        let ztunnels = edit.node.as_ref().unwrap_or(&view.node).ztunnels.iter();
        for z in ztunnels {
            if let CgroupRef::Path(path) = &z.cgroup
                && (kept(self.cgroups.get(path.as_path())) || new_cgroups.contains(path.as_path()))
            {
                return None;
            }
        }
        let mut changed: BTreeSet<WorkloadId> = gone.into_iter().cloned().collect();
        let view = self.view.as_mut().expect("checked above");
        for uid in &changed {
            if let Some(pod) = view.pods.remove(uid) {
                forget(&mut self.cgroups, &mut self.addresses, &pod);
            }
        }
        let mut parsed = parsed.into_iter();
        for uid in uids.iter_mut().filter(|uid| uid.is_none()) {
            let pod = parsed.next().expect("one pod parsed for each unseen entry");
            index(&mut self.cgroups, &mut self.addresses, &pod);
            changed.insert(pod.uid.clone());
            *uid = Some(pod.uid.clone());
            view.pods.insert(pod.uid.clone(), Arc::new(pod));
        }
        if let Some(node) = edit.node.clone() {
            view.node = node;
        }
        self.keep(edit, uids, text);
        Some(Loaded::Changed(changed))
    }

    /// Records `edit`'s entries, whose pods are `uids`, as the last
    /// text's (the caller keeps `text` then).
    fn keep(&mut self, edit: Edit, uids: Vec<Option<WorkloadId>>, text: &str) {
        let last = self.last.as_mut().expect("an edit is of the last text");
        let after = edit.old.start + edit.new.len();
        let new = edit.new.iter().zip(uids).map(|(entry, uid)| Kept {
            span: entry.span(),
            uid: uid.expect("every entry's pod is known"),
        });
        last.entries.splice(edit.old, new);
        // The entries after the edit are as they were, moved by the length
        // it added or took.
        let (new_len, old_len) = (text.len(), last.text.len());
        let moved = |at: usize| at + new_len - old_len;
        for kept in &mut last.entries[after..] {
            kept.span = moved(kept.span.start)..moved(kept.span.end);
        }
        last.indent = edit.indent;
    }

    /// Replaces the state with the whole file's `spec`, parsed from `text`.
    fn replace(&mut self, spec: NodeSpec, text: String) -> Loaded {
        let mut new = View::from(spec);
        let old = self.view.take();
        if let Some(old) = &old {
            keep_shared(&mut new.pods, &old.pods);
        }
        self.last = Some(last_text(text, &new));
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

/// The lines of a text from some offset on, each cut at its newline with
/// `memchr`.
struct Lines<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lines<'a> {
    /// The lines of `text` from `at`, a line's start, on.
    fn from(text: &'a str, at: usize) -> Self {
        Self { text, at }
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

/// Whether nothing in `text` could tie one entry to another or change how
/// it reads alone (anchors and aliases, tags, directives, tabs, several
/// documents, a byte order mark).
fn cuttable(text: &str) -> bool {
    let bytes = text.as_bytes();
    memchr::memchr3(b'&', b'*', b'!', bytes).is_none()
        && memchr::memchr3(b'%', b'\t', b'\r', bytes).is_none()
        && !text.starts_with("---")
        && !text.contains("\n---")
        && !text.contains("\n...")
        && !text.contains('\u{feff}')
}

/// Cuts `text` into the rest and the entries of its `workloads` block
/// list; `None` when it is not plainly that shape.
fn cut(text: &str) -> Option<Cut<'_>> {
    if !cuttable(text) {
        return None;
    }
    let mut rest = String::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut lines = Lines::from(text, 0);
    while let Some(line) = lines.next() {
        if line.text.trim_end() != "workloads:" {
            rest.push_str(line.text);
            continue;
        }
        if !entries.is_empty() {
            return None;
        }
        // Up to the first entry: empty lines, and comments at the
        // entries' column or deeper.
        let mut indent = None;
        let first = loop {
            let next = lines.next()?;
            if next.depth == 0 && !next.blank() {
                return None;
            }
            if next.empty && indent.is_none() {
                continue;
            }
            let at = *indent.get_or_insert(next.depth);
            if next.depth < at && !(next.empty && next.body() == "\n") {
                return None;
            }
            if next.blank() {
                continue;
            }
            if next.depth != at {
                return None;
            }
            break next;
        };
        let (list, end) = cut_list(text, first.start, text.len(), first.depth)?;
        entries = list;
        lines = Lines::from(text, end);
    }
    // The rest is parsed alone: it must read as it does around the list,
    // a block mapping from column 0 (`workloads:` is at column 0).
    let root = Lines::from(&rest, 0).find(|line| !line.blank());
    if root.is_some_and(|line| line.depth > 0 || line.body().starts_with(['{', '['])) {
        return None;
    }
    (!entries.is_empty()).then_some(Cut { rest, entries })
}

/// The entries of a list whose `- ` is at column `indent`, from `from`, an
/// entry's first line, up to where the list ends (a line at column 0) or
/// `to`, whichever comes first; with where that is. `None` where a line
/// would be cut through when an entry is read alone.
fn cut_list(text: &str, from: usize, to: usize, indent: usize) -> Option<(Vec<Entry<'_>>, usize)> {
    let mut entries = Vec::new();
    // Where the entry being read started.
    let mut start: Option<usize> = None;
    let mut end = from;
    for line in Lines::from(&text[..to], from) {
        if line.depth == 0 && !line.blank() {
            break;
        }
        end = line.end;
        // A comment or a value less indented than the entries would be cut
        // through when an entry is read alone.
        if line.depth < indent && !(line.empty && line.body() == "\n") {
            return None;
        }
        if line.blank() {
            // Before the first entry it would belong to the one before.
            start?;
            continue;
        }
        if line.depth == indent {
            if !line.body().starts_with("- ") {
                return None;
            }
            if let Some(s) = start {
                entries.push(Entry {
                    text: &text[s..line.start],
                    at: s,
                    indent,
                });
            }
            start = Some(line.start);
        } else if start.is_none() {
            return None;
        }
    }
    if let Some(s) = start {
        entries.push(Entry {
            text: &text[s..end],
            at: s,
            indent,
        });
    }
    Some((entries, end))
}

/// How `text` differs from `last`'s, when it differs only inside the list:
/// the entries around the bytes that differ are cut again, the others are
/// as they were.
fn splice<'a>(last: &LastText, text: &'a str) -> Option<Edit<'a>> {
    let (old, new) = (last.text.as_bytes(), text.as_bytes());
    let list = last.entries.first()?.span.start..last.entries.last()?.span.end;
    let same_start = common_prefix(old, new);
    let same_end = common_suffix(&old[same_start..], &new[same_start..]);
    let old_to = old.len() - same_end;
    if same_start < list.start || old_to > list.end {
        return None;
    }
    // The entries from the one the first different byte is in to the one
    // the last is in (for bytes added between two entries, the second).
    let first = last.entries.partition_point(|k| k.span.start <= same_start) - 1;
    let end = last
        .entries
        .partition_point(|k| k.span.start < old_to)
        .max(first + 1);
    let from = last.entries[first].span.start;
    let to = (last.entries[end - 1].span.end + new.len()).checked_sub(old.len())?;
    // The entries after are cut where they were: a line ends before them.
    if to < from || (to < new.len() && new[to - 1] != b'\n') {
        return None;
    }
    let region = text.get(from..to)?;
    // What is new to the text may not tie entries together either (a
    // document marker right after the line before the region included).
    if !cuttable(region) || region.starts_with("---") || region.starts_with("...") {
        return None;
    }
    let (entries, list_end) = cut_list(text, from, to, last.indent)?;
    // An edit that leaves the list without entries leaves `workloads:`
    // without a value, which the whole parse rejects.
    let emptied = entries.is_empty() && first == 0 && end == last.entries.len();
    if list_end != to || emptied {
        return None;
    }
    Some(Edit {
        old: first..end,
        new: entries,
        node: None,
        indent: last.indent,
    })
}

/// How many bytes `a` and `b` start with alike (compared a block at a
/// time: two texts of a large node differ in a few bytes).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 1024;
    let n = a.len().min(b.len());
    let mut at = 0;
    while at + BLOCK <= n && a[at..at + BLOCK] == b[at..at + BLOCK] {
        at += BLOCK;
    }
    at + a[at..n]
        .iter()
        .zip(&b[at..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// How many bytes `a` and `b` end with alike.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 1024;
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut same = 0;
    while same + BLOCK <= n && a[n - same - BLOCK..n - same] == b[n - same - BLOCK..n - same] {
        same += BLOCK;
    }
    same + a[..n - same]
        .iter()
        .rev()
        .zip(b[..n - same].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

/// The last text of a good `view`, parsed whole from `text`, with its
/// entries when it can be cut and each entry alone names a pod the whole
/// parse found (otherwise none: the next text is cut whole).
fn last_text(text: String, view: &View) -> LastText {
    let (entries, indent) = kept_entries(&text, view).unwrap_or_default();
    LastText {
        text,
        entries,
        indent,
    }
}

fn kept_entries(text: &str, view: &View) -> Option<(Vec<Kept>, usize)> {
    let cut = cut(text)?;
    let mut entries = Vec::with_capacity(cut.entries.len());
    for entry in &cut.entries {
        let workload: Workload = serde_saphyr::from_str(&dedent(entry)).ok()?;
        entries.push(Kept {
            span: entry.span(),
            uid: WorkloadId::from(workload.uid.value),
        });
    }
    // Entries the cut read otherwise than the parse are not reused.
    if entries.len() != view.pods.len() || entries.iter().any(|k| !view.pods.contains_key(&k.uid)) {
        return None;
    }
    Some((entries, cut.entries.first()?.indent))
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
        assert_eq!(loader.last.as_ref().map_or(0, |l| l.entries.len()), 2);
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
        assert!(loader.last.as_ref().is_some_and(|l| l.entries.is_empty()));
    }

    /// A node of `n` pods, some entries with a comment or a blank line in
    /// them or after them.
    fn node_of(n: usize) -> String {
        let mut text = String::from("# the node\nworkloads:\n\n");
        for i in 0..n {
            text += &format!(
                "  - uid: p{i}\n    name: p{i}\n    namespace: default\n    cgroup: /cg/p{i}\n    ips: [198.18.0.{}]\n    mode: ambient\n",
                i + 2
            );
            if i % 3 == 1 {
                text += "    # the next one\n";
            }
            if i % 4 == 2 {
                text += "\n";
            }
        }
        text + "ztunnel:\n  cgroup: /cg/z\n"
    }

    #[test]
    fn an_edit_inside_the_list_cuts_only_its_entries_again_and_reads_as_the_whole_parse() {
        let before = node_of(12);
        let entry = |i: usize| {
            format!("  - uid: p{i}\n    name: p{i}\n    namespace: default\n    cgroup: /cg/p{i}\n")
        };
        let new =
            "  - uid: q\n    name: q\n    namespace: default\n    cgroup: /cg/q\n    mode: none\n";
        let mut edits: Vec<(String, Option<bool>)> = Vec::new();
        for i in [0, 1, 2, 6, 11] {
            let at = before.find(&entry(i)).expect("the entry");
            // Where the entry after it starts, or the list's end.
            let next = before
                .find(&entry(i + 1))
                .unwrap_or_else(|| before.find("ztunnel:").unwrap());
            let line_after = |text: &str| text[at..].find('\n').map(|n| at + n + 1).unwrap();
            let edited = |f: &dyn Fn(&mut String)| {
                let mut text = before.clone();
                f(&mut text);
                text
            };
            // The edited text, and whether only its entries around the
            // edit are cut again (`None`: either, as the edit reads).
            edits.extend([
                (edited(&|t| t.insert_str(at, new)), Some(true)),
                (before.replacen(&entry(i), "", 1), None),
                (edited(&|t| t.replace_range(at..next, "")), Some(true)),
                (
                    before.replacen(&format!("name: p{i}\n"), &format!("name: r{i}\n"), 1),
                    Some(true),
                ),
                (
                    before.replacen(&format!("198.18.0.{}]", i + 2), "198.18.0.99]", 1),
                    Some(true),
                ),
                (
                    edited(&|t| t.insert_str(line_after(t), "    # a note\n")),
                    Some(true),
                ),
                (edited(&|t| t.insert(line_after(t), '\n')), Some(true)),
                (edited(&|t| t.insert_str(at, "  # a note\n")), None),
                (edited(&|t| t.insert(at, '\n')), None),
                (
                    edited(&|t| t.insert_str(line_after(t), "   name: odd\n")),
                    Some(true),
                ),
                (
                    edited(&|t| t.insert_str(line_after(t), "name: top\n")),
                    Some(false),
                ),
                (edited(&|t| t.insert_str(at, "---\n")), Some(false)),
                (edited(&|t| t.insert_str(at, &entry(i))), Some(true)),
                (edited(&|t| t.insert_str(at, &entry(i + 1))), Some(true)),
                (
                    before.replacen(&format!("cgroup: /cg/p{i}\n"), "cgroup: /cg/z\n", 1),
                    Some(true),
                ),
                (
                    before.replacen(&format!("uid: p{i}\n"), &format!("uid: &a p{i}\n"), 1),
                    Some(false),
                ),
            ]);
        }
        edits.extend([
            (format!("{before}{new}"), Some(false)),
            (
                before.replace("ztunnel:\n", &format!("{new}ztunnel:\n")),
                Some(true),
            ),
            (
                before.replace("workloads:\n\n", &format!("workloads:\n\n{new}")),
                Some(true),
            ),
            (before.replace("/cg/z", "/cg/y"), Some(false)),
            (before.replace("# the node\n", ""), Some(false)),
            (
                before.replace("ztunnel:\n  cgroup: /cg/z\n", ""),
                Some(false),
            ),
        ]);
        for (edited, spliced) in edits {
            let mut loader = Loader::default();
            assert_eq!(
                loader.parse(&before),
                Ok(Loaded::Changed(
                    (0..12)
                        .map(|i| WorkloadId::kubernetes(format!("p{i}")))
                        .collect()
                ))
            );
            let last = loader.last.as_ref().expect("the text is cut");
            assert_eq!(last.entries.len(), 12);
            let edit = splice(last, &edited);
            if let Some(spliced) = spliced {
                assert_eq!(edit.is_some(), spliced, "{edited}");
            }
            // The entries the edit touched, and the one after for bytes
            // added right before it.
            if let Some(edit) = edit {
                assert!(edit.old.len() <= 2, "{edited}");
            }
            let got = loader.parse(&edited);
            match whole(&edited) {
                Ok(want) => {
                    assert!(got.is_ok(), "{edited}: {got:?}");
                    assert_eq!(spec(&loader), want, "{edited}");
                }
                Err(want) => assert_eq!(got, Err(want), "{edited}"),
            }
            // And back.
            loader.parse(&before).unwrap();
            assert_eq!(Ok(spec(&loader)), whole(&before), "back from {edited}");
        }
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
            // Every entry gone.
            "workloads:\nztunnel:\n  cgroup: /cg/z\n".to_string(),
        ] {
            let err = loader.parse(&bad).unwrap_err();
            assert_eq!(Err(err), parse(&bad), "{bad}");
            assert_eq!(Ok(spec(&loader)), whole(FILE), "{bad}");
        }
        // The text around the list reads otherwise alone: a mapping from
        // column 1 is one, but not before `workloads:` at column 0.
        let first = "ztunnel:\n  cgroup: /cg/z\nworkloads:\n  - uid: a\n    name: a\n    namespace: d\n    cgroup: /cg/a\n    mode: none\n";
        let mut ztunnel_first = Loader::default();
        ztunnel_first.parse(first).unwrap();
        let bad = format!(" {first}");
        let err = ztunnel_first.parse(&bad).unwrap_err();
        assert_eq!(Err(err), parse(&bad));
        assert_eq!(Ok(spec(&ztunnel_first)), whole(first));
        // The last good entries are still known.
        assert_eq!(loader.parse(FILE), Ok(Loaded::Unchanged));
        assert_eq!(loader.last.as_ref().map_or(0, |l| l.entries.len()), 2);
    }
}
