//! Running the `ambridge-cni` plugin as a container runtime does: the CNI
//! environment (and nothing else of the test's), the network configuration
//! with the previous plugin's result on stdin, the result or error on
//! stdout.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{Pod, workspace_bin};

/// One finished call of the plugin.
#[derive(Debug)]
pub struct CniCall {
    pub success: bool,
    /// Its stdout, parsed (`Null` when empty).
    pub output: Value,
    pub stderr: String,
    /// CLOCK_MONOTONIC when the call was seen to return.
    pub returned_ns: u64,
}

/// CLOCK_MONOTONIC in nanoseconds (what the probe's `released` reports).
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// The network configuration the runtime hands the plugin for `pod`, with
/// a `prevResult` holding the pod's addresses as the main plugin reported
/// them, and `extra` keys (`socket`, `timeoutSeconds`, ...).
pub fn config_for(pod: &Pod, extra: Value) -> Value {
    let mut config = json!({
        "cniVersion": "1.0.0",
        "name": "sandbox-pod-network",
        "type": "ambridge-cni",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns.display().to_string()}],
            "ips": [
                {"address": format!("{}/24", pod.ip4), "interface": 0},
                {"address": format!("{}/64", pod.ip6), "interface": 0},
            ],
            "dns": {},
        },
    });
    if let (Value::Object(config), Value::Object(extra)) = (&mut config, extra) {
        config.extend(extra);
    }
    config
}

/// Runs the plugin's `command` (ADD, DEL, CHECK, VERSION) for `pod`'s
/// sandbox `container_id` in namespace `namespace`, with `config` on stdin.
pub fn call(
    command: &str,
    pod: &Pod,
    namespace: &str,
    container_id: &str,
    config: &Value,
) -> CniCall {
    let plugin = workspace_bin("ambridge-cni");
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}",
        pod.name, pod.uid
    );
    let mut child = Command::new(&plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", &pod.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ambridge-cni");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(config.to_string().as_bytes())
        .expect("writing the network configuration");
    let out = child.wait_with_output().expect("waiting for ambridge-cni");
    let returned_ns = monotonic_ns();
    let stdout = String::from_utf8_lossy(&out.stdout);
    CniCall {
        success: out.status.success(),
        output: if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("plugin output {stdout:?}: {e}"))
        },
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        returned_ns,
    }
}

/// A node's CNI directories, made for one test and removed after it: the
/// bin directory and the configuration directory, with `conflist` (if
/// any) as its network configuration, `10-net.conflist`.
pub struct CniDirs {
    pub bin: std::path::PathBuf,
    pub conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl CniDirs {
    pub fn new(conflist: Option<&Value>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let dirs = Self {
            bin,
            conf,
            _dir: dir,
        };
        if let Some(conflist) = conflist {
            std::fs::write(dirs.conflist(), conflist.to_string()).unwrap();
        }
        dirs
    }

    /// The network configuration's path.
    pub fn conflist(&self) -> std::path::PathBuf {
        self.conf.join("10-net.conflist")
    }

    /// `--cni-bin-dir DIR --cni-conf-dir DIR`, for `ambridge run` and
    /// `ambridge uninstall`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--cni-bin-dir".into(),
            self.bin.display().to_string(),
            "--cni-conf-dir".into(),
            self.conf.display().to_string(),
        ]
    }
}
