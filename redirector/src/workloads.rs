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
//! naming the line and field, and the caller keeps its last good state.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    state::{
        CaptureOverrides, CgroupRef, Mode, NodeSpec, PodCgroup, PodSpec, SharedRedirect,
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
    redirect: Option<Redirect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Workload {
    uid: PodUid,
    name: String,
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    cgroup: Option<PathBuf>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    mode: Mode,
    accelerate: Option<bool>,
    #[serde(default)]
    bypass_inbound_capture: bool,
    dns_capture: Option<bool>,
}

fn default_service_account() -> String {
    crate::state::service_account_or_default(None)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ztunnel {
    cgroup: PathBuf,
    #[serde(default)]
    zero_copy: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Redirect {
    ip: Option<IpAddr>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    port: Option<Port>,
}

/// Why a workloads file was rejected.
#[derive(Debug, PartialEq, Eq)]
pub struct FileError {
    /// 1-based line of the offending value, when known.
    pub line: Option<usize>,
    /// Dotted path of the offending field, e.g. `workloads[1].ips`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for FileError {}

/// Parses and validates the text of a workloads file.
pub fn parse(text: &str) -> Result<NodeSpec, FileError> {
    let file: File = if text.trim().is_empty() {
        File {
            workloads: Vec::new(),
            ztunnel: None,
            redirect: None,
        }
    } else {
        serde_yaml::from_str(text).map_err(|e| syntax_error(&e, text))?
    };
    validate(&file, text)?;
    let redirect = file
        .redirect
        .as_ref()
        .map(|r| shared_redirect(r, text))
        .transpose()?;
    Ok(NodeSpec {
        redirect,
        ready: None,
        pods: file
            .workloads
            .into_iter()
            .map(|w| PodSpec {
                uid: w.uid,
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                cgroup: w.cgroup.map_or(PodCgroup::Uid, PodCgroup::Path),
                netns: None,
                ips: w.ips,
                mode: w.mode,
                accelerate: w.accelerate,
                capture: CaptureOverrides {
                    inbound: !w.bypass_inbound_capture,
                    dns: w.dns_capture,
                },
            })
            .collect(),
        ztunnels: file
            .ztunnel
            .into_iter()
            .map(|z| ZtunnelSpec {
                cgroup: CgroupRef::Path(z.cgroup),
                zero_copy: z.zero_copy,
            })
            .collect(),
    })
}

/// Reads and parses the workloads file at `path`.
pub fn load(path: &Path) -> Result<NodeSpec, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        line: None,
        field: "(file)".into(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    parse(&text)
}

/// serde_yaml reports "path: message at line L column C"; split it so the
/// line and field are fields of their own.
fn syntax_error(e: &serde_yaml::Error, text: &str) -> FileError {
    // An error at the end of the input (an unclosed quote, say) is placed
    // at the end of the stream, which is on the line after a final newline:
    // a line the file does not have. Its last line is where it ends.
    let last = text.lines().count().max(1);
    let line = e.location().map(|l| l.line().min(last));
    let full = e.to_string();
    let without_location = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full,
    };
    let (field, message) = match without_location.split_once(": ") {
        Some((path, msg)) if !path.contains(' ') => (path.to_string(), msg.to_string()),
        _ => ("(document)".to_string(), without_location),
    };
    FileError {
        line,
        field,
        message,
    }
}

fn validate(file: &File, text: &str) -> Result<(), FileError> {
    let mut uids = HashSet::new();
    let mut cgroups = HashSet::new();
    let mut addresses = HashMap::new();
    for (i, w) in file.workloads.iter().enumerate() {
        let err = |field: &str, needle: &str, message: String| FileError {
            line: line_of(text, needle, 1),
            field: format!("workloads[{i}].{field}"),
            message,
        };
        if w.uid.0.is_empty() {
            return Err(err("uid", "uid:", "must not be empty".into()));
        }
        if !uids.insert(&w.uid) {
            return Err(FileError {
                line: line_of(text, &w.uid.0, 2),
                field: format!("workloads[{i}].uid"),
                message: format!("uid {} is listed twice", w.uid),
            });
        }
        match &w.cgroup {
            // Found from the UID: it must be one, to be a safe path part.
            None if !crate::cgroup::is_pod_uid(&w.uid.0) => {
                return Err(err(
                    "uid",
                    &w.uid.0,
                    format!(
                        "{} is not a Kubernetes pod UID; give `cgroup` or the pod's UID",
                        w.uid
                    ),
                ));
            }
            None => {}
            Some(cgroup) if !cgroup.is_absolute() => {
                return Err(err(
                    "cgroup",
                    &cgroup.to_string_lossy(),
                    format!("{} is not an absolute path", cgroup.display()),
                ));
            }
            Some(cgroup) if !cgroups.insert(cgroup) => {
                return Err(FileError {
                    line: line_of(text, &cgroup.to_string_lossy(), 2),
                    field: format!("workloads[{i}].cgroup"),
                    message: format!(
                        "cgroup {} is already used by another workload",
                        cgroup.display()
                    ),
                });
            }
            Some(_) => {}
        }
        let v4: Vec<_> = w.ips.iter().filter(|ip| ip.is_ipv4()).collect();
        let v6: Vec<_> = w.ips.iter().filter(|ip| ip.is_ipv6()).collect();
        for (family, ips) in [("IPv4", &v4), ("IPv6", &v6)] {
            if ips.len() > 1 {
                return Err(err(
                    "ips",
                    &ips[1].to_string(),
                    format!(
                        "pod {} has more than one {family} address ({}, {}); a pod has one per family",
                        w.uid, ips[0], ips[1]
                    ),
                ));
            }
        }
        if let Some(IpAddr::V6(mapped)) = v6.first()
            && mapped.to_ipv4_mapped().is_some()
        {
            return Err(err(
                "ips",
                &mapped.to_string(),
                format!("{mapped} is IPv4-mapped; list the IPv4 address instead"),
            ));
        }
        // Two pods cannot share an address: the second's connects would be
        // sent to the first's ztunnel listener.
        for ip in &w.ips {
            if let Some((first, first_uid)) = addresses.insert(*ip, (i, &w.uid)) {
                return Err(FileError {
                    line: line_of(text, &ip.to_string(), 2),
                    field: format!("workloads[{i}].ips"),
                    message: format!(
                        "{ip} is also workloads[{first}]'s (pod {first_uid}, line {}); two pods cannot share an address",
                        line_of(text, &ip.to_string(), 1).unwrap_or(0)
                    ),
                });
            }
        }
    }
    if let Some(z) = &file.ztunnel {
        if !z.cgroup.is_absolute() {
            return Err(FileError {
                line: line_of(text, &z.cgroup.to_string_lossy(), 1),
                field: "ztunnel.cgroup".into(),
                message: format!("{} is not an absolute path", z.cgroup.display()),
            });
        }
        if cgroups.contains(&z.cgroup) {
            return Err(FileError {
                line: line_of(text, &z.cgroup.to_string_lossy(), 2),
                field: "ztunnel.cgroup".into(),
                message: format!(
                    "{} is also a workload's cgroup; ztunnel must have its own",
                    z.cgroup.display()
                ),
            });
        }
    }
    Ok(())
}

/// The shared-ztunnel target: at most one address per family, given as
/// `ip` or `ips`, and a port that is not 0.
fn shared_redirect(r: &Redirect, text: &str) -> Result<SharedRedirect, FileError> {
    let err = |field: &str, needle: &str, message: String| FileError {
        line: line_of(text, needle, 1),
        field: format!("redirect.{field}"),
        message,
    };
    if r.ip.is_some() && !r.ips.is_empty() {
        return Err(err(
            "ip",
            "ip:",
            "give either `ip` or `ips`, not both".into(),
        ));
    }
    let ips: Vec<IpAddr> = r.ip.into_iter().chain(r.ips.iter().copied()).collect();
    if ips.is_empty() {
        return Err(err(
            "ips",
            "redirect:",
            "the shared-ztunnel model needs ztunnel's IP (`ip` or `ips`)".into(),
        ));
    }
    let mut out = SharedRedirect::default();
    for ip in ips {
        let taken = match ip {
            IpAddr::V4(v4) => out.ip4.replace(v4).is_some(),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                return Err(err(
                    "ips",
                    &v6.to_string(),
                    format!("{v6} is IPv4-mapped; give the IPv4 address instead"),
                ));
            }
            IpAddr::V6(v6) => out.ip6.replace(v6).is_some(),
        };
        if taken {
            return Err(err(
                "ips",
                &ip.to_string(),
                format!("more than one address of {ip}'s family; ztunnel has one per family"),
            ));
        }
    }
    if let Some(port) = r.port {
        if port.0 == 0 {
            return Err(err("port", "port:", "port 0 is not a listener port".into()));
        }
        out.port = Some(port);
    }
    Ok(out)
}

/// 1-based line of the `occurrence`-th appearance of `needle` in `text`.
fn line_of(text: &str, needle: &str, occurrence: usize) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(occurrence - 1)
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn parses_the_documented_shape() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.pods.len(), 2);
        let sleep = &spec.pods[0];
        assert_eq!(sleep.uid, PodUid("9f2c-1".into()));
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
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn a_shared_redirect_with_two_ipv4_addresses_is_rejected() {
        let err = parse("redirect:\n  ips: [198.18.0.50, 198.18.0.51]\n").unwrap_err();
        assert_eq!(err.field, "redirect.ips");
        assert!(err.message.contains("one per family"), "{err}");
    }

    #[test]
    fn a_shared_redirect_to_port_zero_is_rejected() {
        let err = parse("redirect:\n  ip: 198.18.0.50\n  port: 0\n").unwrap_err();
        assert_eq!(err.field, "redirect.port");
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn an_empty_file_is_an_empty_node() {
        assert_eq!(parse("").unwrap(), NodeSpec::default());
        assert_eq!(parse("workloads: []\n").unwrap(), NodeSpec::default());
    }

    #[test]
    fn a_bad_mode_names_its_line_and_field() {
        let text = GOOD.replace("mode: none", "mode: sidecar");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(14));
        assert_eq!(err.field, "workloads[1].mode");
        assert!(err.message.contains("sidecar"), "{err}");
    }

    #[test]
    fn a_bad_ip_names_its_line_and_field() {
        let text = GOOD.replace("198.18.0.3", "198.18.0.300");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(13));
        assert_eq!(err.field, "workloads[1].ips[0]");
    }

    #[test]
    fn a_missing_field_is_named() {
        let text = GOOD.replace("    name: httpbin\n", "");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1]");
        assert!(err.message.contains("missing field `name`"), "{err}");
        assert!(err.line.is_some());
    }

    #[test]
    fn an_unknown_field_is_rejected() {
        let text = GOOD.replace("mode: none", "mode: none\n    colour: blue");
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("unknown field `colour`"), "{err}");
        assert_eq!(err.line, Some(15));
    }

    #[test]
    fn broken_yaml_is_a_document_error_with_a_line() {
        let err = parse("workloads:\n  - uid: [unclosed\n").unwrap_err();
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn an_error_at_the_end_of_the_file_names_its_last_line() {
        // Found by the workloads_file fuzz target: the end of the stream is
        // on line 3, after the final newline of this 2-line file.
        let text = "workloads:\n  - uid: \"unclosed\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("end of stream"), "{err}");
    }

    #[test]
    fn a_duplicate_uid_points_at_its_second_use() {
        let text = GOOD.replace("uid: 9f2c-2", "uid: 9f2c-1");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1].uid");
        assert_eq!(err.line, Some(9));
    }

    #[test]
    fn an_address_listed_for_two_pods_is_rejected_naming_both() {
        let text = GOOD.replace("[198.18.0.3]", "[198.18.0.2]");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1].ips");
        assert_eq!(err.line, Some(13));
        assert!(
            err.message.contains("workloads[0]") && err.message.contains("9f2c-1"),
            "{err}"
        );
    }

    #[test]
    fn two_addresses_of_one_family_are_rejected() {
        let text = GOOD.replace("[198.18.0.3]", "[198.18.0.3, 198.18.0.4]");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "workloads[1].ips");
        assert_eq!(err.line, Some(13));
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
        assert_eq!(err.line, Some(2));
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
        assert_eq!(err.line, Some(16));
    }

    #[test]
    fn display_names_line_and_field() {
        let err = FileError {
            line: Some(3),
            field: "workloads[0].mode".into(),
            message: "unknown variant".into(),
        };
        assert_eq!(
            err.to_string(),
            "line 3: workloads[0].mode: unknown variant"
        );
    }
}
