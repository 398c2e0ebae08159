//! The workloads file: the embedded feed, and the one used when no cluster is
//! configured.
//!
//! ```yaml
//! workloads:
//!   - uid: 9f2c0d7e-...           # pod UID
//!     name: sleep
//!     namespace: default
//!     cgroup: /sys/fs/cgroup/unified/node/pod-sleep   # pod-level cgroup;
//!                                 # optional: found from the UID if absent
//!     ips: [198.18.0.2, "fd00:18::2"]
//!     mode: ambient               # ambient | none
//!     accelerate: true            # optional: overrides --sockmap for this pod
//!     bypass_inbound_capture: false   # optional: true captures outbound only
//!     dns_capture: true           # optional: overrides --dns-capture
//! ztunnel:
//!   cgroup: /sys/fs/cgroup/unified/node/ztunnel
//!   zero_copy: false              # true: it relays with splice(2)
//! redirect:                       # only for the shared-ztunnel model
//!   ips: [198.18.0.50, "fd00:18::50"]   # ztunnel's own IPs (or `ip: ...`)
//!   port: 15001
//! ```
//!
//! Parsing is all or nothing: a file with any error yields a [`FileError`]
//! naming the line, column and field of the value it is about, and the
//! caller keeps its last good state. Values that validation looks at are
//! read with their position ([`Spanned`]), so an error is placed on the
//! entry it is about even when the same text appears elsewhere in the file.

mod entries;
mod watch;

pub use entries::{Loaded, Loader};
pub use watch::watch;

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt::{self, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use serde_path_to_error::Segment;
use serde_saphyr::{
    Location, MessageFormatter, SnippetMode, Spanned, UserMessageFormatter, localizer::Localizer,
};

use crate::{
    node::sidecar::{self, SidecarRules},
    node::spec::{
        CaptureOverrides, CgroupRef, Mode, NodeSpec, PodCgroup, PodMap, PodSpec, SharedRedirect,
        ZtunnelSpec,
    },
    types::{PodUid, Port},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    workloads: Vec<Workload>,
    ztunnel: Option<Ztunnel>,
    redirect: Option<Spanned<Redirect>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Workload {
    uid: Spanned<PodUid>,
    name: String,
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    cgroup: Option<Spanned<PathBuf>>,
    #[serde(default)]
    ips: Vec<Spanned<IpAddr>>,
    mode: Mode,
    accelerate: Option<bool>,
    #[serde(default)]
    bypass_inbound_capture: bool,
    dns_capture: Option<bool>,
    /// A `mode: sidecar` pod's `traffic.sidecar.istio.io/` annotations, by
    /// their last part (`excludeOutboundPorts: "22"`).
    sidecar: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    /// A `mode: sidecar` pod's proxy container, by the runtime's ID for
    /// it (the name of its cgroup below the pod's, or part of it).
    proxy_container: Option<Spanned<String>>,
}

fn default_service_account() -> String {
    crate::node::spec::service_account_or_default(None)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ztunnel {
    cgroup: Spanned<PathBuf>,
    #[serde(default)]
    zero_copy: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Redirect {
    ip: Option<Spanned<IpAddr>>,
    #[serde(default)]
    ips: Vec<Spanned<IpAddr>>,
    port: Option<Spanned<Port>>,
}

/// A place in the workloads file: 1-based line and column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    /// The position of a parser location; `None` for the parser's
    /// "unknown" location.
    fn of(location: Location) -> Option<Self> {
        if location == Location::UNKNOWN {
            return None;
        }
        Some(Self {
            line: usize::try_from(location.line()).ok()?,
            column: usize::try_from(location.column()).ok()?,
        })
    }

    /// Where a value read with its span is used (for an alias, the alias).
    fn of_value<T>(value: &Spanned<T>) -> Option<Self> {
        Self::of(value.referenced)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Why a workloads file was rejected.
#[derive(Debug, PartialEq, Eq)]
pub struct FileError {
    /// Where the offending value is, when known.
    pub at: Option<Position>,
    /// Path of the offending field, e.g. `workloads[1].ips[0]`.
    pub field: String,
    pub message: String,
}

impl FileError {
    /// An error about a value read with its position.
    fn about<T>(field: String, value: &Spanned<T>, message: String) -> Self {
        Self {
            at: Position::of_value(value),
            field,
            message,
        }
    }

    /// 1-based line of the offending value, when known.
    pub fn line(&self) -> Option<usize> {
        self.at.map(|at| at.line)
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(at) => write!(f, "{at}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for FileError {}

/// Parses and validates the text of a workloads file.
pub fn parse(text: &str) -> Result<NodeSpec, FileError> {
    let mut failed_at = None;
    let file: File = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            failed_at = Some(field_path(e.path()));
            e.into_inner()
        })
    })
    .map_err(|e| syntax_error(&e, failed_at, text))?;
    validate(&file)?;
    let redirect = file.redirect.as_ref().map(shared_redirect).transpose()?;
    Ok(NodeSpec {
        redirect,
        pods: file
            .workloads
            .into_iter()
            .enumerate()
            .map(|(i, w)| pod_spec(w, i))
            .collect::<Result<_, _>>()?,
        ztunnels: file
            .ztunnel
            .into_iter()
            .map(|z| ZtunnelSpec {
                cgroup: CgroupRef::Path(z.cgroup.value),
                zero_copy: z.zero_copy,
            })
            .collect(),
    })
}

/// The workloads file's last good state, its pods by UID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Its ztunnels and shared redirect (its pods are `pods`).
    pub node: NodeSpec,
    pub pods: PodMap,
}

impl From<NodeSpec> for View {
    fn from(mut spec: NodeSpec) -> Self {
        let pods = std::mem::take(&mut spec.pods)
            .into_iter()
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        Self { node: spec, pods }
    }
}

/// A validated entry (the `i`th) as the pod it describes, or what is wrong
/// with its sidecar rules.
fn pod_spec(w: Workload, i: usize) -> Result<PodSpec, FileError> {
    let sidecar = sidecar_rules(&w, i)?;
    let sidecar_proxy = match w.proxy_container {
        Some(id) if w.mode != Mode::Sidecar => {
            return Err(FileError::about(
                format!("workloads[{i}].proxy_container"),
                &id,
                "is only for `mode: sidecar`".into(),
            ));
        }
        Some(id) if id.value.is_empty() || id.value.contains('/') => {
            return Err(FileError::about(
                format!("workloads[{i}].proxy_container"),
                &id,
                format!("{:?} is not a container ID", id.value),
            ));
        }
        other => other.map(|id| Arc::from(id.value)),
    };
    Ok(PodSpec {
        kept_because: None,
        uid: w.uid.value.into(),
        name: w.name,
        namespace: w.namespace,
        service_account: w.service_account,
        cgroup: w
            .cgroup
            .map_or(PodCgroup::Uid, |c| PodCgroup::Path(c.value.into())),
        netns: None,
        ips: w.ips.into_iter().map(|ip| ip.value).collect(),
        mode: w.mode,
        accelerate: w.accelerate,
        capture: CaptureOverrides {
            inbound: !w.bypass_inbound_capture,
            dns: w.dns_capture,
            sidecar,
            sidecar_proxy,
        },
    })
}

/// The rules of the `i`th entry's `sidecar` block, read as Istio reads the
/// annotations it names; an error is placed at the value it is about.
fn sidecar_rules(w: &Workload, i: usize) -> Result<Option<Arc<SidecarRules>>, FileError> {
    let Some(block) = &w.sidecar else {
        return Ok(None);
    };
    let field = format!("workloads[{i}].sidecar");
    if w.mode != Mode::Sidecar {
        return Err(FileError::about(
            field,
            block,
            "is only for `mode: sidecar`".into(),
        ));
    }
    let name = |annotation: &'static str| annotation.rsplit('/').next().unwrap_or(annotation);
    let mut annotations = BTreeMap::new();
    for (key, value) in &block.value {
        let Some(annotation) = sidecar::ANNOTATIONS.iter().find(|a| name(a) == key) else {
            let known: Vec<&str> = sidecar::ANNOTATIONS.iter().map(|a| name(a)).collect();
            return Err(FileError::about(
                format!("{field}.{key}"),
                value,
                format!("unknown key; expected one of {}", known.join(", ")),
            ));
        };
        annotations.insert(*annotation, value);
    }
    sidecar::rules(&|a| annotations.get(a).map(|v| v.value.as_str())).map_err(|e| {
        let message = format!("{:?} is not valid: expected {}", e.value, e.expected);
        let field = format!("{field}.{}", name(e.annotation));
        match annotations.get(e.annotation) {
            Some(value) => FileError::about(field, *value, message),
            None => FileError::about(field, block, message),
        }
    })
}

/// The text of the workloads file at `path`.
fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|e| FileError {
        at: None,
        field: "(file)".into(),
        message: format!("cannot read {}: {e}", path.display()),
    })
}

/// Reads and parses the workloads file at `path`.
pub fn load(path: &Path) -> Result<NodeSpec, FileError> {
    parse(&read(path)?)
}

/// The key under which [`Spanned`] hands its value to serde: a path
/// segment of the deserializer's, not of the file.
const SPANNED_VALUE_KEY: &str = "value";

/// The path at which deserialization failed, as the file spells it:
/// `workloads[1].ips[0]`; `(document)` for the top level.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } if key == SPANNED_VALUE_KEY => {}
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.extend(name.chars().flat_map(char::escape_default));
            }
            // A key that is not a string, or the key of a duplicate entry:
            // the message names it.
            Segment::Unknown => {}
        }
    }
    if out.is_empty() {
        "(document)".into()
    } else {
        out
    }
}

/// Renders the parser's message alone: the position is a field of
/// [`FileError`] of its own, so the suffix naming it is left out.
struct WithoutPosition;

impl Localizer for WithoutPosition {
    fn attach_location<'a>(&self, base: Cow<'a, str>, _: Location) -> Cow<'a, str> {
        base
    }

    fn alias_used_at(&self, _: Location) -> String {
        String::new()
    }
}

impl MessageFormatter for WithoutPosition {
    fn localizer(&self) -> &dyn Localizer {
        self
    }

    fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> Cow<'a, str> {
        UserMessageFormatter.format_message(err)
    }
}

/// A syntax or type error, at the path where deserialization stopped.
fn syntax_error(e: &serde_saphyr::Error, field: Option<String>, text: &str) -> FileError {
    // An error at the end of the input could be placed at the end of the
    // stream, which is on the line after a final newline: a line the file
    // does not have. Its last line is where it ends.
    let last = text.lines().count().max(1);
    let at = e.location().and_then(Position::of).map(|at| Position {
        line: at.line.min(last),
        ..at
    });
    FileError {
        at,
        field: field.unwrap_or_else(|| "(document)".into()),
        message: e.render_with_options(serde_saphyr::render_options! {
            formatter: &WithoutPosition,
            snippets: SnippetMode::Off,
        }),
    }
}

/// Another entry's value that a value of this one collides with, to be
/// named in the error: `workloads[0].uid (line 2, column 10)`.
struct FirstUse {
    field: String,
    at: Option<Position>,
}

impl FirstUse {
    fn new<T>(field: String, value: &Spanned<T>) -> Self {
        Self {
            field,
            at: Position::of_value(value),
        }
    }
}

impl fmt::Display for FirstUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(at) => write!(f, "{} ({at})", self.field),
            None => f.write_str(&self.field),
        }
    }
}

fn validate(file: &File) -> Result<(), FileError> {
    let mut uids: HashMap<&PodUid, FirstUse> = HashMap::new();
    let mut cgroups: HashMap<&Path, (FirstUse, &PodUid)> = HashMap::new();
    let mut addresses: HashMap<IpAddr, (FirstUse, &PodUid)> = HashMap::new();
    for (i, w) in file.workloads.iter().enumerate() {
        let uid = &w.uid.value;
        let uid_field = format!("workloads[{i}].uid");
        if uid.as_str().is_empty() {
            return Err(FileError::about(
                uid_field,
                &w.uid,
                "must not be empty".into(),
            ));
        }
        if !PodUid::may_be(uid.as_str()) {
            return Err(FileError::about(
                uid_field,
                &w.uid,
                format!("{uid} is not a Kubernetes pod UID (it has a `/`)"),
            ));
        }
        if let Some(first) = uids.get(uid) {
            return Err(FileError::about(
                uid_field,
                &w.uid,
                format!("uid {uid} is listed twice: also at {first}"),
            ));
        }
        uids.insert(uid, FirstUse::new(uid_field.clone(), &w.uid));
        match &w.cgroup {
            // Found from the UID: it must be one, to be a safe path part.
            None if !crate::host::cgroup::is_pod_uid(uid.as_str()) => {
                return Err(FileError::about(
                    uid_field,
                    &w.uid,
                    format!("{uid} is not a Kubernetes pod UID; give `cgroup` or the pod's UID"),
                ));
            }
            None => {}
            Some(cgroup) => {
                let field = format!("workloads[{i}].cgroup");
                let path = cgroup.value.as_path();
                if !path.is_absolute() {
                    return Err(FileError::about(
                        field,
                        cgroup,
                        format!("{} is not an absolute path", path.display()),
                    ));
                }
                if let Some((first, first_uid)) = cgroups.get(path) {
                    return Err(FileError::about(
                        field,
                        cgroup,
                        format!(
                            "cgroup {} is already used by pod {first_uid}, at {first}",
                            path.display()
                        ),
                    ));
                }
                cgroups.insert(path, (FirstUse::new(field, cgroup), uid));
            }
        }
        let ips: Vec<(String, &Spanned<IpAddr>)> = w
            .ips
            .iter()
            .enumerate()
            .map(|(k, ip)| (format!("workloads[{i}].ips[{k}]"), ip))
            .collect();
        let v4: Vec<_> = ips.iter().filter(|(_, ip)| ip.value.is_ipv4()).collect();
        let v6: Vec<_> = ips.iter().filter(|(_, ip)| ip.value.is_ipv6()).collect();
        for (family, of_family) in [("IPv4", &v4), ("IPv6", &v6)] {
            if let [(_, first), (field, second), ..] = of_family.as_slice() {
                return Err(FileError::about(
                    field.clone(),
                    second,
                    format!(
                        "pod {uid} has more than one {family} address ({}, {}); a pod has one per family",
                        first.value, second.value
                    ),
                ));
            }
        }
        if let Some((field, ip)) = v6.first()
            && let IpAddr::V6(mapped) = ip.value
            && mapped.to_ipv4_mapped().is_some()
        {
            return Err(FileError::about(
                field.clone(),
                ip,
                format!("{mapped} is IPv4-mapped; list the IPv4 address instead"),
            ));
        }
        // Two pods cannot share an address: the second's connects would be
        // sent to the first's ztunnel listener.
        for (field, ip) in ips {
            if let Some((first, first_uid)) = addresses.get(&ip.value) {
                return Err(FileError::about(
                    field,
                    ip,
                    format!(
                        "{} is also pod {first_uid}'s, at {first}; two pods cannot share an address",
                        ip.value
                    ),
                ));
            }
            addresses.insert(ip.value, (FirstUse::new(field, ip), uid));
        }
    }
    if let Some(z) = &file.ztunnel {
        let field = || "ztunnel.cgroup".to_string();
        let path = z.cgroup.value.as_path();
        if !path.is_absolute() {
            return Err(FileError::about(
                field(),
                &z.cgroup,
                format!("{} is not an absolute path", path.display()),
            ));
        }
        if let Some((first, first_uid)) = cgroups.get(path) {
            return Err(FileError::about(
                field(),
                &z.cgroup,
                format!(
                    "{} is also pod {first_uid}'s cgroup, at {first}; ztunnel must have its own",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The shared-ztunnel target: at most one address per family, given as
/// `ip` or `ips`, and a port that is not 0.
fn shared_redirect(redirect: &Spanned<Redirect>) -> Result<SharedRedirect, FileError> {
    let r = &redirect.value;
    if let Some(ip) = &r.ip
        && !r.ips.is_empty()
    {
        return Err(FileError::about(
            "redirect.ip".into(),
            ip,
            "give either `ip` or `ips`, not both".into(),
        ));
    }
    let ips: Vec<(String, &Spanned<IpAddr>)> =
        r.ip.iter()
            .map(|ip| ("redirect.ip".to_string(), ip))
            .chain(
                r.ips
                    .iter()
                    .enumerate()
                    .map(|(k, ip)| (format!("redirect.ips[{k}]"), ip)),
            )
            .collect();
    if ips.is_empty() {
        return Err(FileError::about(
            "redirect.ips".into(),
            redirect,
            "the shared-ztunnel model needs ztunnel's IP (`ip` or `ips`)".into(),
        ));
    }
    let mut out = SharedRedirect::default();
    for (field, ip) in ips {
        let taken = match ip.value {
            IpAddr::V4(v4) => out.ip4.replace(v4).is_some(),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                return Err(FileError::about(
                    field,
                    ip,
                    format!("{v6} is IPv4-mapped; give the IPv4 address instead"),
                ));
            }
            IpAddr::V6(v6) => out.ip6.replace(v6).is_some(),
        };
        if taken {
            return Err(FileError::about(
                field,
                ip,
                format!(
                    "more than one address of {}'s family; ztunnel has one per family",
                    ip.value
                ),
            ));
        }
    }
    if let Some(port) = &r.port {
        if port.value.0 == 0 {
            return Err(FileError::about(
                "redirect.port".into(),
                port,
                "port 0 is not a listener port".into(),
            ));
        }
        out.port = Some(port.value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::WorkloadId;

    const GOOD: &str = r#"
workloads:
  - uid: 9f2c-1
    name: sleep
    namespace: default
    cgroup: /sys/fs/cgroup/unified/node/pod-sleep
    ips: [198.18.0.2, "fd00:18::2"]
    mode: ambient
  - uid: 9f2c-2
    name: httpbin
    namespace: default
    cgroup: /sys/fs/cgroup/unified/node/pod-httpbin
    ips: [198.18.0.3]
    mode: none
ztunnel:
  cgroup: /sys/fs/cgroup/unified/node/ztunnel
"#;

    const SHARED: &str = "redirect:\n  ips: [198.18.0.50, \"fd00:18::50\"]\n  port: 15011\n";

    #[test]
    fn a_sidecar_pods_block_is_read_as_istios_annotations_and_a_bad_value_names_its_key() {
        let block = "    mode: sidecar\n    sidecar:\n      excludeOutboundPorts: \"22, 443\"\n      includeOutboundIPRanges: \"198.18.0.0/24\"\n";
        let spec = parse(&GOOD.replace("    mode: none\n", block)).unwrap();
        let pod = &spec.pods[1];
        assert_eq!(pod.mode, Mode::Sidecar);
        let rules = pod.capture.sidecar.as_deref().expect("rules");
        assert_eq!(rules.exclude_ports, [Port(22), Port(443)]);
        assert_eq!(
            rules.include_ranges,
            sidecar::Ranges::Only(vec!["198.18.0.0/24".parse().unwrap()])
        );
        let plain = parse(&GOOD.replace("mode: none", "mode: sidecar")).unwrap();
        assert_eq!(plain.pods[1].capture.sidecar, None);

        // Each error is placed at the value it is about (the block itself
        // for a block that does not belong).
        for (bad, field, says, column) in [
            (
                block.replace("22, 443", "22, 70000"),
                "workloads[1].sidecar.excludeOutboundPorts",
                "70000",
                29,
            ),
            (
                block.replace("excludeOutboundPorts", "excludeInboundPortz"),
                "workloads[1].sidecar.excludeInboundPortz",
                "unknown key",
                28,
            ),
            (
                block.replace("mode: sidecar", "mode: ambient"),
                "workloads[1].sidecar",
                "mode: sidecar",
                7,
            ),
        ] {
            let err = parse(&GOOD.replace("    mode: none\n", &bad)).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.contains(says), "{err}");
            assert_eq!(err.at, Some(Position { line: 16, column }), "{err}");
        }
    }

    #[test]
    fn parses_the_documented_shape() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.pods.len(), 2);
        let sleep = &spec.pods[0];
        assert_eq!(sleep.uid, WorkloadId::kubernetes("9f2c-1"));
        assert_eq!(sleep.name, "sleep");
        assert_eq!(sleep.namespace, "default");
        assert_eq!(sleep.mode, Mode::Ambient);
        assert_eq!(
            sleep.ips,
            vec![
                "198.18.0.2".parse::<IpAddr>().unwrap(),
                "fd00:18::2".parse().unwrap()
            ]
        );
        assert_eq!(spec.pods[1].mode, Mode::None);
        assert_eq!(
            spec.ztunnels,
            vec![ZtunnelSpec {
                cgroup: CgroupRef::Path("/sys/fs/cgroup/unified/node/ztunnel".into()),
                zero_copy: false,
            }]
        );
        assert_eq!(spec.redirect, None);
    }

    #[test]
    fn a_pods_acceleration_override_is_parsed() {
        let text = GOOD.replace("    mode: none\n", "    mode: none\n    accelerate: true\n");
        let spec = parse(&text).unwrap();
        assert_eq!(spec.pods[0].accelerate, None);
        assert_eq!(spec.pods[1].accelerate, Some(true));
    }

    #[test]
    fn a_zero_copy_ztunnel_is_parsed() {
        let text = format!("{GOOD}  zero_copy: true\n");
        assert!(parse(&text).unwrap().ztunnels[0].zero_copy);
    }

    #[test]
    fn the_shared_model_redirect_is_parsed() {
        let spec = parse(&format!("{GOOD}{SHARED}")).unwrap();
        assert_eq!(
            spec.redirect,
            Some(SharedRedirect {
                ip4: Some("198.18.0.50".parse().unwrap()),
                ip6: Some("fd00:18::50".parse().unwrap()),
                port: Some(Port(15011)),
            })
        );
        let one = parse("redirect:\n  ip: 198.18.0.50\n").unwrap();
        assert_eq!(
            one.redirect.unwrap().ip4,
            Some("198.18.0.50".parse().unwrap())
        );
    }

    #[test]
    fn a_shared_redirect_without_an_address_is_rejected() {
        let err = parse("redirect:\n  port: 15001\n").unwrap_err();
        assert_eq!(err.field, "redirect.ips");
        // The redirect's mapping, which has neither `ip` nor `ips`.
        assert_eq!(err.at, Some(Position { line: 2, column: 3 }));
    }

    #[test]
    fn a_shared_redirect_with_two_ipv4_addresses_is_rejected() {
        let err = parse("redirect:\n  ips: [198.18.0.50, 198.18.0.51]\n").unwrap_err();
        assert_eq!(err.field, "redirect.ips[1]");
        assert_eq!(
            err.at,
            Some(Position {
                line: 2,
                column: 22
            })
        );
        assert!(err.message.contains("one per family"), "{err}");
    }

    #[test]
    fn a_shared_redirect_to_port_zero_is_rejected() {
        let err = parse("redirect:\n  ip: 198.18.0.50\n  port: 0\n").unwrap_err();
        assert_eq!(err.field, "redirect.port");
        assert_eq!(err.line(), Some(3));
    }

    #[test]
    fn an_empty_file_is_an_empty_node() {
        assert_eq!(parse("").unwrap(), NodeSpec::default());
        assert_eq!(parse("workloads: []\n").unwrap(), NodeSpec::default());
    }

    #[test]
    fn a_bad_mode_names_its_line_and_field() {
        let text = GOOD.replace("mode: none", "mode: sidecars");
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.at,
            Some(Position {
                line: 14,
                column: 11
            })
        );
        assert_eq!(err.field, "workloads[1].mode");
        assert!(err.message.contains("sidecars"), "{err}");
        assert!(
            !err.message.contains("line"),
            "the position is given once: {err}"
        );
    }

    #[test]
    fn a_bad_ip_names_its_line_and_field() {
        let text = GOOD.replace("198.18.0.3", "198.18.0.300");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line(), Some(13));
        assert_eq!(err.field, "workloads[1].ips[0]");
    }

    #[test]
    fn a_missing_field_is_named() {
        let text = GOOD.replace("    name: httpbin\n", "");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1]");
        assert!(err.message.contains("missing field `name`"), "{err}");
        assert!(err.line().is_some());
    }

    #[test]
    fn an_unknown_field_is_rejected() {
        let text = GOOD.replace("mode: none", "mode: none\n    colour: blue");
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("unknown field `colour`"), "{err}");
        assert_eq!(err.line(), Some(15));
    }

    #[test]
    fn broken_yaml_is_a_document_error_with_a_line() {
        let err = parse("workloads:\n  - uid: [unclosed\n").unwrap_err();
        assert!(err.line().is_some(), "{err}");
    }

    #[test]
    fn an_error_at_the_end_of_the_file_names_its_last_line() {
        // Found by the workloads_file fuzz target: the end of the stream is
        // on line 3, after the final newline of this 2-line file.
        let text = "workloads:\n  - uid: \"unclosed\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line(), Some(2), "{err}");
        assert!(err.message.contains("unclosed quote"), "{err}");
    }

    #[test]
    fn a_duplicate_uid_points_at_its_second_use() {
        let text = GOOD.replace("uid: 9f2c-2", "uid: 9f2c-1");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1].uid");
        assert_eq!(err.line(), Some(9));
    }

    #[test]
    fn an_address_listed_for_two_pods_is_rejected_naming_both() {
        let text = GOOD.replace("[198.18.0.3]", "[198.18.0.2]");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1].ips[0]");
        assert_eq!(err.line(), Some(13));
        assert!(
            err.message.contains("workloads[0]") && err.message.contains("9f2c-1"),
            "{err}"
        );
    }

    #[test]
    fn two_addresses_of_one_family_are_rejected() {
        let text = GOOD.replace("[198.18.0.3]", "[198.18.0.3, 198.18.0.4]");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1].ips[1]");
        assert_eq!(
            err.at,
            Some(Position {
                line: 13,
                column: 23
            })
        );
        assert_eq!(err.line(), Some(13));
        assert!(err.message.contains("more than one IPv4"), "{err}");
    }

    #[test]
    fn an_ipv4_mapped_address_is_rejected() {
        let text = GOOD.replace("[198.18.0.3]", "[\"::ffff:198.18.0.3\"]");
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("IPv4-mapped"), "{err}");
    }

    #[test]
    fn a_workload_named_only_by_its_pod_uid_is_accepted() {
        let text = "workloads:\n  - uid: 9f2c0d7e-5b1a-4c6e-9a53-2f0b8e1d4c11\n    name: a\n    namespace: d\n    mode: ambient\n";
        let spec = parse(text).unwrap();
        assert_eq!(spec.pods[0].cgroup, PodCgroup::Uid);
    }

    #[test]
    fn without_a_cgroup_the_uid_must_be_a_pod_uid() {
        let text =
            "workloads:\n  - uid: ../../etc\n    name: a\n    namespace: d\n    mode: ambient\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.field, "workloads[0].uid");
        assert_eq!(err.line(), Some(2));
        assert!(err.message.contains("not a Kubernetes pod UID"), "{err}");
    }

    #[test]
    fn a_relative_cgroup_is_rejected() {
        let text = GOOD.replace("/sys/fs/cgroup/unified/node/pod-httpbin", "pod-httpbin");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1].cgroup");
    }

    #[test]
    fn ztunnel_cannot_share_a_pod_cgroup() {
        let text = GOOD.replace(
            "cgroup: /sys/fs/cgroup/unified/node/ztunnel",
            "cgroup: /sys/fs/cgroup/unified/node/pod-sleep",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "ztunnel.cgroup");
        assert_eq!(err.line(), Some(16));
        assert!(
            err.message
                .contains("pod 9f2c-1's cgroup, at workloads[0].cgroup (line 6, column 13)"),
            "{err}"
        );
    }

    /// Three entries whose values are prefixes of one another's, so that
    /// a value's text is found on another entry's line before its own.
    const THREE: &str = "\
workloads:
  - uid: 9f2c-1
    name: sleep
    namespace: default
    cgroup: /sys/fs/cgroup/unified/node/pod-sleep
    ips: [198.18.0.2]
    mode: ambient
  - uid: 9f2c-10
    name: httpbin
    namespace: default
    cgroup: /sys/fs/cgroup/unified/node/pod-sleep-v2
    ips: [198.18.0.20]
    mode: ambient
  - uid: 9f2c-3
    name: curl
    namespace: default
    cgroup: /sys/fs/cgroup/unified/node/pod-curl
    ips: [198.18.0.30]
    mode: ambient
";

    #[test]
    fn the_three_entry_file_is_valid() {
        assert_eq!(parse(THREE).unwrap().pods.len(), 3);
    }

    #[test]
    fn a_duplicated_address_is_placed_on_its_entry_and_names_the_first() {
        let text = THREE.replace("[198.18.0.30]", "[198.18.0.2]");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[2].ips[0]");
        assert_eq!(
            err.at,
            Some(Position {
                line: 18,
                column: 11
            })
        );
        assert!(
            err.message
                .contains("pod 9f2c-1's, at workloads[0].ips[0] (line 6, column 11)"),
            "{err}"
        );
    }

    #[test]
    fn a_duplicated_uid_is_placed_on_its_entry_and_names_the_first() {
        let text = THREE.replace("uid: 9f2c-3", "uid: 9f2c-1");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[2].uid");
        assert_eq!(
            err.at,
            Some(Position {
                line: 14,
                column: 10
            })
        );
        assert!(
            err.message.contains("workloads[0].uid (line 2, column 10)"),
            "{err}"
        );
    }

    #[test]
    fn a_duplicated_cgroup_is_placed_on_its_entry_and_names_the_first() {
        let text = THREE.replace("node/pod-curl", "node/pod-sleep");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[2].cgroup");
        assert_eq!(
            err.at,
            Some(Position {
                line: 17,
                column: 13
            })
        );
        assert!(
            err.message
                .contains("pod 9f2c-1, at workloads[0].cgroup (line 5, column 13)"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_uid_is_placed_on_its_entry() {
        for empty in ["uid:", "uid: \"\""] {
            let text = THREE.replace("uid: 9f2c-3", empty);
            let err = parse(&text).unwrap_err();
            assert_eq!(err.field, "workloads[2].uid", "{empty}: {err}");
            assert_eq!(err.line(), Some(14), "{empty}: {err}");
        }
    }

    #[test]
    fn an_istiod_workload_name_is_no_uid_and_is_placed_on_its_entry() {
        let text = THREE.replace("uid: 9f2c-3", "uid: Kubernetes//Pod/default/curl");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[2].uid", "{err}");
        assert_eq!(err.line(), Some(14), "{err}");
        assert!(
            err.to_string().contains("not a Kubernetes pod UID"),
            "{err}"
        );
    }

    #[test]
    fn a_relative_cgroup_is_placed_on_its_line_not_on_a_name_like_it() {
        let text = THREE
            .replace("name: curl", "name: pod-curl")
            .replace("/sys/fs/cgroup/unified/node/pod-curl", "pod-curl");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[2].cgroup");
        assert_eq!(
            err.at,
            Some(Position {
                line: 17,
                column: 13
            })
        );
    }

    #[test]
    fn a_refused_address_is_placed_on_its_entry_not_on_a_comment_naming_it() {
        let text = format!(
            "# ::ffff:198.18.0.30 is refused: list 198.18.0.31 alone\n{}",
            THREE.replace("[198.18.0.30]", "[198.18.0.30, \"::ffff:198.18.0.30\"]")
        );
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("IPv4-mapped"), "{err}");
        assert_eq!(err.field, "workloads[2].ips[1]");
        assert_eq!(
            err.at,
            Some(Position {
                line: 19,
                column: 24
            })
        );

        let text = format!(
            "# 198.18.0.31 is curl's second address\n{}",
            THREE.replace("[198.18.0.30]", "[198.18.0.30, 198.18.0.31]")
        );
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("more than one IPv4"), "{err}");
        assert_eq!(err.field, "workloads[2].ips[1]");
        assert_eq!(
            err.at,
            Some(Position {
                line: 19,
                column: 24
            })
        );
    }

    #[test]
    fn an_unknown_field_is_named_by_its_path() {
        let text = THREE.replace("    name: curl\n", "    name: curl\n    colour: blue\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[2].colour");
        assert_eq!(
            err.at,
            Some(Position {
                line: 16,
                column: 5
            })
        );
    }

    #[test]
    fn display_names_line_and_field() {
        let err = FileError {
            at: Some(Position {
                line: 3,
                column: 11,
            }),
            field: "workloads[0].mode".into(),
            message: "unknown variant".into(),
        };
        assert_eq!(
            err.to_string(),
            "line 3, column 11: workloads[0].mode: unknown variant"
        );
    }
}
