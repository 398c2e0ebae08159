//! The CNI plugin's input, as a container runtime hands it: the network
//! configuration on stdin (with the previous plugin's `prevResult`) and the
//! `CNI_*` environment. Whatever it is, the plugin answers with a result
//! or a CNI error, never a panic:
//! - every error has a CNI error code and a non-empty message and details,
//!   and its JSON form carries them;
//! - the environment read is the one given (command, container, netns, and
//!   a pod identity whose three parts each come from one `CNI_ARGS` pair);
//! - an accepted configuration has a supported version, a timeout the
//!   daemon allows, and an ADD result that is `prevResult` unchanged except
//!   for `cniVersion`, which prints as JSON that reads back the same;
//! - the addresses read from `prevResult` are exactly those of its
//!   `ips[].address` entries, in order;
//! - the daemon accepts every ADD request the plugin builds from input it
//!   accepted, and records the sandbox the runtime described.
//!
//! Input: the environment (lines `NAME=VALUE`; a line that is not UTF-8 is
//! a variable that is not set, as `std::env::var` reads it), a NUL byte,
//! then stdin. Without a NUL byte the whole input is stdin and the
//! environment is empty.

#![no_main]

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use ambridge::{
    cni::plugin::{self, CniError, Command, Config, ErrorCode, Invocation, SUPPORTED_VERSIONS},
    sources::cni::{CNI_MAX_WAIT, cni_sandbox},
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The error as the plugin prints it: a code the spec knows and something
/// said in `msg` and `details`.
fn check_error(e: &CniError, what: &str) {
    assert!(!e.msg.is_empty(), "{what}: an error without msg: {e:?}");
    assert!(
        !e.details.is_empty(),
        "{what}: an error without details: {e:?}"
    );
    let printed = e.to_json("1.0.0");
    assert_eq!(printed["code"], e.code as u32, "{what}: {printed}");
    assert!(
        matches!(
            e.code,
            ErrorCode::IncompatibleVersion
                | ErrorCode::InvalidEnvironment
                | ErrorCode::Io
                | ErrorCode::Decoding
                | ErrorCode::InvalidConfig
                | ErrorCode::TryAgainLater
        ) && (1..=99).contains(&(e.code as u32)),
        "{what}: {e:?}"
    );
    assert_eq!(printed["msg"], e.msg.as_str(), "{what}: {printed}");
}

/// The value of `key` in `CNI_ARGS` (`K=V` pairs, `;`-separated): the last
/// pair naming it wins, as libcni reads them.
fn arg<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

fn check_invocation(env: &BTreeMap<String, String>, invocation: &Invocation) {
    let var = |k: &str| env.get(k).map(String::as_str);
    let command = match var("CNI_COMMAND") {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        other => panic!("CNI_COMMAND {other:?} accepted"),
    };
    assert_eq!(invocation.command, command);
    if command == Command::Version {
        return;
    }
    assert!(!invocation.container_id.is_empty());
    assert_eq!(
        Some(invocation.container_id.as_str()),
        var("CNI_CONTAINERID")
    );
    assert_eq!(
        invocation.netns,
        var("CNI_NETNS")
            .filter(|n| !n.is_empty())
            .map(PathBuf::from)
    );
    if command != Command::Del {
        let netns = invocation.netns.as_ref().expect("ADD and CHECK need one");
        assert!(netns.is_absolute(), "relative CNI_NETNS {netns:?} accepted");
    }
    let args = var("CNI_ARGS").unwrap_or_default();
    let keys = ["K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID"];
    match &invocation.pod {
        Some(pod) => {
            for (key, value) in keys.into_iter().zip([&pod.namespace, &pod.name, &pod.uid]) {
                assert!(!value.is_empty(), "an empty {key} accepted");
                assert_eq!(arg(args, key), Some(value.as_str()), "{key} of {args:?}");
            }
        }
        None => {
            for key in keys {
                assert!(
                    arg(args, key).is_none_or(str::is_empty),
                    "CNI_ARGS {args:?} names {key}, yet no pod was read"
                );
            }
        }
    }
}

/// `prevResult` as the runtime wrote it, and the result the plugin gives
/// back for an ADD.
fn check_result(config: &Config, raw: &Value) {
    let given = raw.get("prevResult").filter(|p| !p.is_null());
    assert_eq!(config.prev_result.as_ref(), given, "prevResult as read");
    let result = config.result();
    let Value::Object(result_map) = &result else {
        panic!("a result that is not an object: {result}");
    };
    assert_eq!(
        result_map.get("cniVersion"),
        Some(&Value::String(config.cni_version.clone())),
        "{result}"
    );
    match given {
        Some(Value::Object(prev)) => {
            let mut expected = prev.clone();
            expected.insert("cniVersion".into(), config.cni_version.clone().into());
            assert_eq!(result_map, &expected, "prevResult changed on the way");
        }
        Some(other) => panic!("a prevResult that is not an object accepted: {other}"),
        None => {
            assert_eq!(result_map.len(), 3, "{result}");
            assert_eq!(result["interfaces"], Value::Array(Vec::new()));
            assert_eq!(result["ips"], Value::Array(Vec::new()));
        }
    }
    // What `ambridge-cni` prints is what the runtime reads.
    let printed = result.to_string();
    let read: Value = serde_json::from_str(&printed).expect("the printed result is JSON");
    if !has_float(&result) {
        assert_eq!(read, result, "the printed result reads back differently");
    }
}

/// Whether `value` holds a number that is not an integer: serde_json reads
/// such numbers back to the nearest float only within a rounding step, a
/// limit of the JSON library, not of the plugin (CNI results hold none).
fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// The addresses read from `prevResult` are those of `ips[].address`, with
/// their prefix length dropped; an error names `prevResult`.
fn check_previous_ips(config: &Config) -> Option<Vec<IpAddr>> {
    match config.previous_ips() {
        Ok(ips) => {
            let listed = config
                .prev_result
                .as_ref()
                .and_then(|p| p.get("ips"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            assert_eq!(ips.len(), listed.len(), "{ips:?} from {listed:?}");
            for (ip, entry) in ips.iter().zip(&listed) {
                let written = entry["address"].as_str().expect("an accepted address");
                let (address, prefix) = written.split_once('/').expect("a prefix length");
                assert_eq!(
                    address.parse::<IpAddr>().ok(),
                    Some(*ip),
                    "{written:?} read as {ip}"
                );
                let prefix: u8 = prefix.parse().expect("a numeric prefix length");
                assert!(prefix <= if ip.is_ipv4() { 32 } else { 128 }, "{written}");
            }
            Some(ips)
        }
        Err(e) => {
            check_error(&e, "previous_ips");
            assert!(e.details.contains("prevResult"), "{e}");
            None
        }
    }
}

/// The daemon's checks of an ADD accept whatever the plugin builds from
/// input it accepted, and keep the sandbox as the runtime described it.
fn check_add(invocation: &Invocation, config: &Config, ips: &[IpAddr]) {
    let Some(pod) = &invocation.pod else {
        return;
    };
    let request = plugin::add_request(invocation, config, pod).expect("the addresses were read");
    let (uid, sandbox, wait) = cni_sandbox(request)
        .unwrap_or_else(|s| panic!("the daemon refused the plugin's ADD: {}", s.message()));
    assert_eq!(uid.as_str(), pod.uid);
    assert_eq!(sandbox.namespace, pod.namespace);
    assert_eq!(sandbox.name, pod.name);
    assert_eq!(sandbox.container_id, invocation.container_id);
    assert_eq!(Some(&sandbox.netns), invocation.netns.as_ref());
    assert_eq!(sandbox.ips, ips);
    assert_eq!(wait, Duration::from_secs(config.timeout_seconds.into()));
    assert!(wait <= CNI_MAX_WAIT);
}

/// The environment before the first NUL byte and stdin after it.
fn split(data: &[u8]) -> (BTreeMap<String, String>, &[u8]) {
    let Some(at) = data.iter().position(|&b| b == 0) else {
        return (BTreeMap::new(), data);
    };
    let env = data[..at]
        .split(|&b| b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok()?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (env, &data[at + 1..])
}

fuzz_target!(|data: &[u8]| {
    let (env, stdin) = split(data);
    let invocation = match Invocation::from_env(|k| env.get(k).cloned()) {
        Ok(invocation) => {
            check_invocation(&env, &invocation);
            Some(invocation)
        }
        Err(e) => {
            check_error(&e, "the environment");
            None
        }
    };
    let config = match Config::parse(stdin) {
        Ok(config) => config,
        Err(e) => {
            check_error(&e, "the configuration");
            return;
        }
    };
    assert!(
        SUPPORTED_VERSIONS.contains(&config.cni_version.as_str()),
        "cniVersion {:?} accepted",
        config.cni_version
    );
    assert!(
        config.timeout_seconds >= 1 && u64::from(config.timeout_seconds) <= CNI_MAX_WAIT.as_secs(),
        "timeoutSeconds {} accepted",
        config.timeout_seconds
    );
    let raw: Value = serde_json::from_slice(stdin).expect("an accepted config is JSON");
    check_result(&config, &raw);
    let ips = check_previous_ips(&config);
    if let (Some(invocation), Some(ips)) = (&invocation, ips)
        && invocation.command == Command::Add
    {
        check_add(invocation, &config, &ips);
    }
});
