//! `ambridge-cni`, a chained CNI plugin (CNI spec 1.0: ADD, DEL, CHECK,
//! VERSION). It adds no interface and no address: at ADD it hands the
//! daemon the sandbox's network namespace, the addresses of the previous
//! plugin's result and the pod's Kubernetes identity, waits until the pod
//! is in the datapath, and passes `prevResult` through unchanged.
//!
//! Network configuration keys besides the standard ones (all optional):
//! - `socket`: the daemon's API socket (default [`crate::api::DEFAULT_SOCKET`]);
//! - `timeoutSeconds`: how long an ADD waits for the pod (default 30, at
//!   most 600, the longest the daemon waits);
//! - `excludeNamespaces`: pods here start without asking the daemon
//!   (default `["kube-system"]`, as the daemon never enrolls them);
//! - `onDaemonUnreachable`: `fail` (default) fails the ADD of every other
//!   pod while the daemon cannot be reached, since the plugin cannot tell
//!   which pods it would enroll; `allow` lets them start, uncaptured until
//!   the daemon is back.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::pb;

/// The CNI versions whose configuration and results this plugin reads.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// CNI's well-known error codes (spec, "Error").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    Io = 5,
    Decoding = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
}

/// A failed command, as the runtime is told on stdout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: ErrorCode, msg: &str, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// What the daemon does while it cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDaemonUnreachable {
    #[default]
    Fail,
    Allow,
}

/// The network configuration on stdin (with the runtime's `prevResult`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    #[serde(default)]
    pub on_daemon_unreachable: OnDaemonUnreachable,
    pub prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    crate::api::DEFAULT_SOCKET.into()
}

fn default_timeout() -> u32 {
    30
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

impl Config {
    /// Parses and checks the configuration; errors name the key.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let invalid = |details: String| {
            CniError::new(
                ErrorCode::Decoding,
                "the network configuration on stdin is not valid",
                details,
            )
        };
        // Read as a whole first: the keys the plugin skips are checked
        // too (UTF-8, escapes), so what it accepts is JSON.
        let json: Value = serde_json::from_slice(stdin).map_err(|e| invalid(e.to_string()))?;
        let config: Config = serde_path_to_error::deserialize(json).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            match key.as_str() {
                "." => invalid(inner.to_string()),
                _ => invalid(format!("{key}: {inner}")),
            }
        })?;
        if !SUPPORTED_VERSIONS.contains(&config.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                "unsupported cniVersion",
                format!(
                    "cniVersion {:?}; this plugin supports {}",
                    config.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let longest = crate::sources::cni::CNI_MAX_WAIT.as_secs();
        if config.timeout_seconds == 0 || u64::from(config.timeout_seconds) > longest {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "invalid timeoutSeconds",
                format!(
                    "timeoutSeconds is {}; it must be between 1 and {longest} (the longest the daemon waits)",
                    config.timeout_seconds
                ),
            ));
        }
        // The result of an ADD is `prevResult`: a runtime given anything
        // but an object back could not read it as a result.
        if let Some(prev) = config.prev_result.as_ref().filter(|p| !p.is_object()) {
            return Err(CniError::new(
                ErrorCode::Decoding,
                "invalid prevResult",
                format!("prevResult must be an object, not {prev}"),
            ));
        }
        Ok(config)
    }

    /// The previous plugin's result, passed through: ADD's output.
    pub fn result(&self) -> Value {
        let mut result = self
            .prev_result
            .clone()
            .unwrap_or_else(|| json!({"interfaces": [], "ips": []}));
        if let Value::Object(map) = &mut result {
            map.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        }
        result
    }

    /// The pod's addresses in `prevResult` (`ips[].address`, CIDR
    /// notation); none without one.
    pub fn previous_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(prev) = &self.prev_result else {
            return Ok(Vec::new());
        };
        let bad =
            |details: String| CniError::new(ErrorCode::Decoding, "invalid prevResult", details);
        let Some(ips) = prev.get("ips") else {
            return Ok(Vec::new());
        };
        let ips = ips
            .as_array()
            .ok_or_else(|| bad("prevResult.ips is not a list".into()))?;
        ips.iter()
            .enumerate()
            .map(|(i, entry)| {
                let address = entry
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("prevResult.ips[{i}].address is missing")))?;
                let net = address.parse::<ipnet::IpNet>().map_err(|e| {
                    bad(format!(
                        "prevResult.ips[{i}].address {address:?} is not an address with a prefix length: {e}"
                    ))
                })?;
                // ipnet reads `010.1.2.3` as 10.1.2.3, where inet_aton reads
                // 8.1.2.3: only the standard notation is unambiguous.
                let written = address.split_once('/').map(|(ip, _)| ip.parse::<IpAddr>());
                if !matches!(written, Some(Ok(ip)) if ip == net.addr()) {
                    return Err(bad(format!(
                        "prevResult.ips[{i}].address {address:?} is not in standard notation (leading zeros?)"
                    )));
                }
                Ok(net.addr())
            })
            .collect()
    }
}

/// The CNI command (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The runtime's environment for one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`; DEL may come without one (the namespace is gone).
    pub netns: Option<PathBuf>,
    /// The pod, from `CNI_ARGS`; `None` when the runtime is not running a
    /// Kubernetes pod.
    pub pod: Option<PodIdentity>,
}

/// `K8S_POD_NAMESPACE`, `K8S_POD_NAME` and `K8S_POD_UID` of `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Invocation {
    /// Reads the CNI environment variables through `var`.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let missing = |name: &str| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                "missing environment variable",
                format!("{name} is not set"),
            )
        };
        let command = match var("CNI_COMMAND")
            .ok_or_else(|| missing("CNI_COMMAND"))?
            .as_str()
        {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "unknown CNI_COMMAND",
                    format!("CNI_COMMAND={other:?}; expected ADD, DEL, CHECK or VERSION"),
                ));
            }
        };
        if command == Command::Version {
            return Ok(Self {
                command,
                container_id: String::new(),
                netns: None,
                pod: None,
            });
        }
        let container_id = var("CNI_CONTAINERID")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| missing("CNI_CONTAINERID"))?;
        let netns = var("CNI_NETNS")
            .filter(|n| !n.is_empty())
            .map(PathBuf::from);
        match &netns {
            None if command != Command::Del => return Err(missing("CNI_NETNS")),
            // The daemon opens it from its own working directory; a DEL
            // does not use it and must succeed regardless.
            Some(path) if command != Command::Del && !path.is_absolute() => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "CNI_NETNS is not an absolute path",
                    format!("CNI_NETNS={:?}", path.display().to_string()),
                ));
            }
            _ => {}
        }
        let pod = pod_identity(&var("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            pod,
        })
    }
}

/// The pod named by `CNI_ARGS` (`K=V;K=V`), `None` if it names none.
fn pod_identity(args: &str) -> Result<Option<PodIdentity>, CniError> {
    let args: BTreeMap<&str, &str> = args
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let get = |k: &str| args.get(k).copied().filter(|v| !v.is_empty());
    let (namespace, name, uid) = (
        get("K8S_POD_NAMESPACE"),
        get("K8S_POD_NAME"),
        get("K8S_POD_UID"),
    );
    match (namespace, name, uid) {
        (None, None, None) => Ok(None),
        (Some(namespace), Some(name), Some(uid)) => Ok(Some(PodIdentity {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        })),
        _ => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "incomplete pod identity in CNI_ARGS",
            format!(
                "CNI_ARGS needs K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID \
                 (the runtime must pass the pod UID); got namespace {namespace:?}, \
                 name {name:?}, uid {uid:?}"
            ),
        )),
    }
}

/// VERSION's output.
pub fn version_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// Runs one command; returns what to print on success (nothing for DEL and
/// CHECK).
pub async fn run(invocation: &Invocation, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if invocation.command == Command::Version {
        return Ok(Some(version_result()));
    }
    let config = Config::parse(stdin)?;
    let pass = match invocation.command {
        Command::Add => Some(config.result()),
        _ => None,
    };
    // Not a Kubernetes pod, or one of a namespace the daemon never enrolls.
    let Some(pod) = invocation
        .pod
        .as_ref()
        .filter(|p| !config.exclude_namespaces.contains(&p.namespace))
    else {
        return Ok(pass);
    };
    let sandbox = cni_sandbox(invocation, pod);
    let timeout = Duration::from_secs(config.timeout_seconds.into());
    let unreachable = |e: String| {
        CniError::new(
            ErrorCode::TryAgainLater,
            "the ambridge daemon cannot be reached",
            format!(
                "{}: {e}; pod {}/{} is not started, as its connects could bypass ztunnel",
                config.socket.display(),
                pod.namespace,
                pod.name
            ),
        )
    };
    match invocation.command {
        Command::Add => {
            let request = add_request(invocation, &config, pod)?;
            let mut client = match connect(&config).await {
                Ok(client) => client,
                Err(e) if config.on_daemon_unreachable == OnDaemonUnreachable::Allow => {
                    eprintln!(
                        "ambridge-cni: {e}; starting pod {}/{} anyway (onDaemonUnreachable: allow)",
                        pod.namespace, pod.name
                    );
                    return Ok(pass);
                }
                Err(e) => return Err(unreachable(e)),
            };
            // The daemon answers when its wait ends; a little more here so
            // its answer, not this deadline, says why.
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout + Duration::from_secs(2));
            client.cni_add(request).await.map_err(|s| refused(pod, s))?;
            Ok(pass)
        }
        Command::Del => {
            // A DEL must succeed if the daemon is gone: it forgets the
            // sandbox anyway once its cgroup and namespace are gone.
            match connect(&config).await {
                Ok(mut client) => {
                    if let Err(s) = client
                        .cni_del(pb::CniDelRequest {
                            sandbox: Some(sandbox),
                        })
                        .await
                    {
                        eprintln!(
                            "ambridge-cni: DEL of {}/{}: {}",
                            pod.namespace,
                            pod.name,
                            s.message()
                        );
                    }
                }
                Err(e) => eprintln!("ambridge-cni: DEL of {}/{}: {e}", pod.namespace, pod.name),
            }
            Ok(None)
        }
        Command::Check => {
            let mut client = connect(&config).await.map_err(unreachable)?;
            let standing = client
                .cni_check(pb::CniCheckRequest {
                    uid: pod.uid.clone(),
                })
                .await
                .map_err(|s| refused(pod, s))?
                .into_inner();
            if standing.outcome() == pb::CniOutcome::Waiting {
                return Err(CniError::new(
                    ErrorCode::TryAgainLater,
                    "the pod is not in the datapath",
                    format!("pod {}/{}: {}", pod.namespace, pod.name, standing.reason),
                ));
            }
            Ok(None)
        }
        Command::Version => unreachable!("answered above"),
    }
}

fn cni_sandbox(invocation: &Invocation, pod: &PodIdentity) -> pb::CniSandbox {
    pb::CniSandbox {
        uid: pod.uid.clone(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        container_id: invocation.container_id.clone(),
    }
}

/// What an ADD of `pod` asks the daemon, the request [`run`] sends. Public
/// so the fuzz target can check that the daemon accepts every request the
/// plugin builds from a configuration and environment it accepted.
pub fn add_request(
    invocation: &Invocation,
    config: &Config,
    pod: &PodIdentity,
) -> Result<pb::CniAddRequest, CniError> {
    Ok(pb::CniAddRequest {
        sandbox: Some(cni_sandbox(invocation, pod)),
        netns: invocation
            .netns
            .as_ref()
            .map(|n| n.display().to_string())
            .unwrap_or_default(),
        ips: config
            .previous_ips()?
            .iter()
            .map(ToString::to_string)
            .collect(),
        // `Config::parse` keeps it within `CNI_MAX_WAIT`; a config built
        // otherwise saturates, which the daemon refuses, naming the field.
        timeout_ms: config.timeout_seconds.saturating_mul(1000),
    })
}

async fn connect(
    config: &Config,
) -> Result<pb::node_client::NodeClient<tonic::transport::Channel>, String> {
    crate::api::connect(&config.socket)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// The daemon's refusal (or its wait running out), as the runtime is told.
fn refused(pod: &PodIdentity, status: tonic::Status) -> CniError {
    let code = match status.code() {
        tonic::Code::InvalidArgument => ErrorCode::InvalidConfig,
        tonic::Code::Unavailable => ErrorCode::TryAgainLater,
        tonic::Code::DeadlineExceeded => ErrorCode::TryAgainLater,
        _ => ErrorCode::Io,
    };
    CniError::new(
        code,
        "ambridge did not put the pod in the datapath",
        format!("pod {}/{}: {}", pod.namespace, pod.name, status.message()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=9f2c";

    #[test]
    fn the_pod_comes_from_cni_args_and_a_partial_identity_is_refused() {
        let add = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_ARGS", ARGS),
        ]))
        .unwrap();
        assert_eq!(
            add.pod,
            Some(PodIdentity {
                namespace: "default".into(),
                name: "web".into(),
                uid: "9f2c".into()
            })
        );
        let err = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
        ]))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.details.contains("K8S_POD_UID"), "{err}");
        let plain = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
        ]))
        .unwrap();
        assert_eq!(plain.pod, None);
    }

    #[test]
    fn add_needs_an_absolute_netns_but_del_does_not() {
        let err = Invocation::from_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1")]))
            .unwrap_err();
        assert!(err.details.contains("CNI_NETNS"), "{err}");
        let del = Invocation::from_env(env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")]))
            .unwrap();
        assert_eq!(del.netns, None);
        let err = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "cni-1"),
        ]))
        .unwrap_err();
        assert!(err.msg.contains("absolute"), "{err}");
        let del = Invocation::from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "cni-1"),
        ]))
        .unwrap();
        assert_eq!(del.netns, Some(PathBuf::from("cni-1")));
        let err = Invocation::from_env(env(&[("CNI_COMMAND", "GC")])).unwrap_err();
        assert!(err.details.contains("GC"), "{err}");
    }

    #[test]
    fn prev_result_is_passed_through_with_the_config_version_and_its_addresses_read() {
        let config = Config::parse(
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"ambridge-cni",
                 "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
                   "ips":[{"address":"10.1.2.3/24","gateway":"10.1.2.1","interface":0},
                          {"address":"fd00::3/64"}],
                   "dns":{}}}"#,
        )
        .unwrap();
        assert_eq!(
            config.previous_ips().unwrap(),
            vec![
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "fd00::3".parse().unwrap()
            ]
        );
        let result = config.result();
        assert_eq!(result["interfaces"][0]["name"], "eth0");
        assert_eq!(result["ips"][0]["gateway"], "10.1.2.1");
        assert_eq!(result["cniVersion"], "1.0.0");
        assert_eq!(config.socket, PathBuf::from(crate::api::DEFAULT_SOCKET));
        assert_eq!(config.exclude_namespaces, vec!["kube-system".to_string()]);
        assert_eq!(config.on_daemon_unreachable, OnDaemonUnreachable::Fail);
    }

    #[test]
    fn bad_configurations_name_what_is_wrong() {
        for (input, code, needle) in [
            (&b"{"[..], ErrorCode::Decoding, "EOF"),
            (
                br#"{"cniVersion":"0.2.0"}"#,
                ErrorCode::IncompatibleVersion,
                "0.2.0",
            ),
            (
                br#"{"cniVersion":"1.0.0","onDaemonUnreachable":"maybe"}"#,
                ErrorCode::Decoding,
                "onDaemonUnreachable: unknown variant `maybe`",
            ),
            // A key the plugin does not read must still be JSON.
            (
                b"{\"cniVersion\":\"1.0.0\",\"type\":\"amb\xf2idge\"}",
                ErrorCode::Decoding,
                "invalid unicode code point",
            ),
            (
                br#"{"cniVersion":"1.0.0","timeoutSeconds":0}"#,
                ErrorCode::InvalidConfig,
                "timeoutSeconds",
            ),
            // Past the daemon's longest wait; in milliseconds it would
            // not fit the request's u32 either.
            (
                br#"{"cniVersion":"1.0.0","timeoutSeconds":4294968}"#,
                ErrorCode::InvalidConfig,
                "between 1 and 600",
            ),
            (
                br#"{"cniVersion":"1.0.0","prevResult":[]}"#,
                ErrorCode::Decoding,
                "prevResult must be an object",
            ),
        ] {
            let err = Config::parse(input).unwrap_err();
            assert_eq!(err.code, code, "{err}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        let config = Config::parse(
            br#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"10.1.2.3"}]}}"#,
        )
        .unwrap();
        let err = config.previous_ips().unwrap_err();
        assert!(err.details.contains("prevResult.ips[0].address"), "{err}");
        let config = Config::parse(
            br#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"010.1.2.3/24"}]}}"#,
        )
        .unwrap();
        let err = config.previous_ips().unwrap_err();
        assert!(err.details.contains("standard notation"), "{err}");
    }
}
