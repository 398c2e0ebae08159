//! The real `ambridge` daemon, run as a child process against a sandbox node.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{Node, eventually, workspace_bin};

/// A running `ambridge run` for one node. Dropping it stops the daemon and
/// runs `ambridge uninstall`, so no pin or attachment outlives the test.
pub struct Daemon {
    child: Option<Child>,
    bpffs: PathBuf,
    api: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts the daemon on `node`'s cgroup and workloads file, and waits
    /// until its Status API says it is ready.
    pub fn start(node: &Node) -> Self {
        Self::start_with(node, &[])
    }

    /// As [`Daemon::start`], with extra `ambridge run` arguments.
    pub fn start_with(node: &Node, extra: &[&str]) -> Self {
        let mut daemon = Self::spawn_with(node, extra);
        daemon.wait_ready();
        daemon
    }

    /// Starts `ambridge run` for `node` without waiting for it to be ready
    /// (a daemon that waits for another to hand over).
    pub fn spawn(node: &Node) -> Self {
        Self::spawn_with(node, &[])
    }

    /// As [`Daemon::spawn`], with extra `ambridge run` arguments.
    pub fn spawn_with(node: &Node, extra: &[&str]) -> Self {
        Self::spawn_limited(node, extra, crate::capabilities::limited().as_deref())
    }

    /// As [`Daemon::start_with`], root with only the capabilities `caps`
    /// (names without `CAP_`) in every set, whatever the environment says.
    pub fn start_limited(node: &Node, extra: &[&str], caps: &[String]) -> Self {
        let mut daemon = Self::spawn_limited(node, extra, Some(caps));
        daemon.wait_ready();
        daemon
    }

    /// `run` with `node`'s cgroup, pins, workloads file and API socket: the
    /// arguments every daemon of `node` starts with.
    pub fn run_args(node: &Node) -> Vec<std::ffi::OsString> {
        vec![
            "run".into(),
            "--cgroup-root".into(),
            node.cgroup.clone().into(),
            "--bpffs".into(),
            node.bpffs().into(),
            "--workloads".into(),
            node.workloads_path().into(),
            "--api-socket".into(),
            node.dir.join("api.sock").into(),
        ]
    }

    fn spawn_limited(node: &Node, extra: &[&str], caps: Option<&[String]>) -> Self {
        let program = workspace_bin("ambridge");
        let mut command = match caps {
            Some(caps) => crate::capabilities::with_only(&program, caps),
            None => Command::new(&program),
        };
        let mut child = command
            .args(Self::run_args(node))
            // Tests want changes picked up fast, unless they say otherwise.
            .args(if extra.contains(&"--resync-seconds") {
                &[][..]
            } else {
                &["--resync-seconds", "1"][..]
            })
            .args(if extra.contains(&"--full-resync-seconds") {
                &[][..]
            } else {
                &["--full-resync-seconds", "1"][..]
            })
            // The sandbox node's own netns plays the host's: its
            // addresses are the node's, exempt from inbound capture.
            .args(if extra.contains(&"--node-netns") {
                Vec::new()
            } else {
                vec![
                    "--node-netns".to_string(),
                    format!("/run/netns/{}", node.netns_name),
                ]
            })
            // Every test daemon on a port of its own, found through its
            // status ([`Daemon::monitoring_url`]).
            .args(if extra.contains(&"--monitoring-address") {
                &[][..]
            } else {
                &["--monitoring-address", "127.0.0.1:0"][..]
            })
            .args(extra)
            .args(if crate::replacement_mode() && !extra.contains(&"--zds") {
                vec![
                    "--zds".to_string(),
                    "serve".into(),
                    "--zds-socket".into(),
                    crate::zds_socket(node).display().to_string(),
                ]
            } else {
                Vec::new()
            })
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ambridge run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[ambridge] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            child: Some(child),
            bpffs: node.bpffs(),
            api: node.dir.join("api.sock"),
            log,
        }
    }

    /// Waits until the daemon's Status API says it is ready (programs
    /// attached, every source delivered, ZDS listening when serving);
    /// panics with its log if it exits or takes over 30 s.
    pub fn wait_ready(&mut self) {
        self.wait_status("ready", |status| status["ready"] == true);
    }

    /// The base URL of the daemon's metrics and health probes
    /// (`http://127.0.0.1:PORT`), from its status.
    pub fn monitoring_url(&self) -> String {
        let status = self.status().expect("the daemon's status");
        let address = status["monitoring_address"]
            .as_str()
            .unwrap_or_else(|| panic!("no monitoring address in the status: {status}"));
        format!("http://{address}")
    }

    /// Waits until the daemon's API answers, ready or not: for a test that
    /// holds a source back on purpose. Panics as [`Daemon::wait_ready`].
    pub fn wait_serving(&mut self) {
        self.wait_status("serving its API", |_| true);
    }

    fn wait_status(&mut self, what: &str, reached: impl Fn(&serde_json::Value) -> bool) {
        let outcome = eventually(Duration::from_secs(30), || {
            if self.status().is_some_and(|s| reached(&s)) {
                return Some(Ok(()));
            }
            // A daemon that exited will never get there: fail at once.
            match self.child.as_mut().unwrap().try_wait() {
                Ok(Some(status)) => Some(Err(status)),
                _ => None,
            }
        });
        if let Some(Ok(())) = outcome {
            return;
        }
        // Let the reader thread drain the last lines.
        std::thread::sleep(Duration::from_millis(100));
        panic!(
            "ambridge never got to {what} ({outcome:?}); status: {:?}; log:\n{}",
            self.status(),
            self.log().join("\n")
        )
    }

    /// `ambridge status --json`, or `None` while the API does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(workspace_bin("ambridge"))
            .args(["status", "--json", "--api"])
            .arg(&self.api)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The health of the daemon's component `name` (`datapath`,
    /// `zds-server`, ...) as `ambridge status --json` shows it.
    pub fn component(&self, name: &str) -> Option<serde_json::Value> {
        self.status()?["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    /// Waits until `ambridge pods` shows `uid` with `mode` in the datapath
    /// and not held (in replacement mode, ztunnel acknowledged it), or
    /// absent with `None`.
    pub fn wait_for_mode(&self, uid: &str, mode: Option<&str>) {
        let reached = eventually(Duration::from_secs(15), || {
            let pods = self.api_json("pods");
            let found = pods.as_array()?.iter().find(|p| p["uid"] == uid).cloned();
            match (mode, found) {
                (None, None) => Some(()),
                (Some(m), Some(p))
                    if p["mode"] == m && p["in_datapath"] == true && p["held"] != true =>
                {
                    Some(())
                }
                _ => None,
            }
        });
        assert!(
            reached.is_some(),
            "pod {uid} never reached mode {mode:?}: {}",
            self.api_json("pods")
        );
    }

    /// The local API's socket.
    pub fn api_socket(&self) -> &std::path::Path {
        &self.api
    }

    /// `ambridge <command> --json --api <socket>` (`status`, `pods`),
    /// parsed.
    pub fn api_json(&self, command: &str) -> serde_json::Value {
        let out = Command::new(workspace_bin("ambridge"))
            .args([command, "--json", "--api"])
            .arg(&self.api)
            .output()
            .unwrap_or_else(|e| panic!("running ambridge {command}: {e}"));
        assert!(
            out.status.success(),
            "ambridge {command} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON from the API client")
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Every line the daemon has logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle` (counting only lines logged
    /// after `skip` lines).
    pub fn wait_log_after(&self, skip: usize, needle: &str, timeout: Duration) -> Option<String> {
        eventually(timeout, || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .skip(skip)
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_log_after(0, needle, timeout)
    }

    /// The datapath counters, from `ambridge stats --json`.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.stats_section("counters")
    }

    /// Entries per map, from `ambridge stats --json`.
    pub fn map_entries(&self) -> BTreeMap<String, u64> {
        self.stats_section("map_entries")
    }

    /// `ambridge stats --json`: through this daemon's API while it runs,
    /// from its pinned maps otherwise.
    pub fn stats_json(&self) -> serde_json::Value {
        let api = self.api.display().to_string();
        let out = self.cli(&["stats", "--json", "--api", &api]);
        serde_json::from_str(&out).expect("ambridge stats --json output")
    }

    fn stats_section(&self, section: &str) -> BTreeMap<String, u64> {
        serde_json::from_value(self.stats_json()[section].clone()).expect("a section of numbers")
    }

    /// Runs `ambridge <args> --bpffs <this daemon's pins>` and returns its
    /// stdout, panicking with its stderr if it fails.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(workspace_bin("ambridge"))
            .args(args)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .output()
            .unwrap_or_else(|e| panic!("running ambridge {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ambridge {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the daemon with SIGKILL, as a crash or an OOM kill would, and
    /// leaves its pins alone: unlike dropping the guard, nothing is
    /// uninstalled. The guard is left with nothing to stop or uninstall, to
    /// be replaced by the daemon that runs next.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The pins now belong to whichever daemon runs next.
        self.bpffs = PathBuf::new();
    }

    /// Hands the node over: stops this daemon (SIGTERM) and leaves its pins
    /// to the daemon that runs next, as a rolling upgrade does.
    pub fn retire(mut self) {
        self.stop();
        self.bpffs = PathBuf::new();
    }

    /// Stops the daemon (SIGTERM) and waits for it; the datapath stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// Runs `ambridge uninstall` for this daemon's pins and returns its
    /// output.
    pub fn uninstall(&self) -> String {
        self.cli(&["uninstall"])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if !self.bpffs.as_os_str().is_empty() && self.bpffs.exists() {
            // Not `cli`: a drop during a panic must not panic again.
            let _ = Command::new(workspace_bin("ambridge"))
                .args(["uninstall", "--bpffs"])
                .arg(&self.bpffs)
                .output();
        }
    }
}
