//! Issue 14: the CLI's conventions, as kubectl and istioctl users expect
//! them: `-o table|wide|json|yaml` on every report, `ambridge version`,
//! exit codes, and the daemon's `--log-format json`.

use std::process::{Command, Output};

use ambridge_conformance::{Fixture, PodRole, workspace_bin};
use serde_json::Value;

fn ambridge(args: &[&str]) -> Output {
    Command::new(workspace_bin("ambridge"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ambridge {args:?}: {e}"))
}

fn stdout_of(args: &[&str]) -> String {
    let out = ambridge(args);
    assert!(
        out.status.success(),
        "ambridge {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_report_prints_the_same_document_as_json_and_yaml_and_wide_adds_columns() {
    // A ztunnel stand-in acknowledges the client in replacement mode.
    let f = Fixture::three_pods()
        .ztunnel(&[PodRole::Client], &[])
        .wait_enrolled()
        .start();
    let api = f.daemon.api_socket().display().to_string();
    for command in ["status", "pods", "stats"] {
        let json: Value =
            serde_json::from_str(&stdout_of(&[command, "-o", "json", "--api", &api])).unwrap();
        let legacy: Value =
            serde_json::from_str(&stdout_of(&[command, "--json", "--api", &api])).unwrap();
        let yaml: Value =
            serde_saphyr::from_str(&stdout_of(&[command, "-o", "yaml", "--api", &api])).unwrap();
        assert_eq!(yaml, json, "{command}: -o yaml and -o json differ");
        assert_eq!(legacy, json, "{command}: --json and -o json differ");
        let table = stdout_of(&[command, "--api", &api]);
        assert!(
            !table.trim_start().starts_with(['{', '[']),
            "{command}: {table}"
        );
    }
    let uid = &f.client.uid;
    let table = stdout_of(&["pods", "--api", &api]);
    let wide = stdout_of(&["pods", "-o", "wide", "--api", &api]);
    assert!(!table.contains(uid.as_str()), "{table}");
    let header = wide.lines().next().unwrap();
    assert!(
        header.contains("UID") && header.contains("CGROUP ID"),
        "{wide}"
    );
    assert!(wide.contains(uid.as_str()), "{wide}");
    let status_wide = stdout_of(&["status", "-o", "wide", "--api", &api]);
    assert!(status_wide.contains("map entries"), "{status_wide}");
}

#[test]
fn exit_codes_are_0_done_1_failed_2_usage() {
    assert_eq!(ambridge(&["version"]).status.code(), Some(0));
    let unreachable = ambridge(&["status", "--api", "/nonexistent/api.sock"]);
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.starts_with("ambridge: ") && stderr.contains("/nonexistent/api.sock"),
        "{stderr}"
    );
    for usage in [
        &["status", "-o", "xml"][..],
        &["pods", "--json", "-o", "yaml"],
        &["no-such-command"],
    ] {
        assert_eq!(ambridge(usage).status.code(), Some(2), "{usage:?}");
    }
}

#[test]
fn version_names_the_running_kernel_and_finds_every_feature_and_program_the_datapath_needs() {
    // A directory of its own for the program check's scratch maps: other
    // tests run `ambridge version` meanwhile.
    let bpffs =
        std::path::PathBuf::from(format!("/sys/fs/bpf/ambridge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&bpffs).unwrap();
    let version: Value = serde_json::from_str(&stdout_of(&[
        "version",
        "-o",
        "json",
        "--bpffs",
        bpffs.to_str().unwrap(),
    ]))
    .unwrap();
    let release = nix::sys::utsname::uname().unwrap();
    assert_eq!(
        version["kernel"],
        release.release().to_string_lossy().as_ref()
    );
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
    // The netns cookie in sock_ops, sk_msg and cgroup_sockopt programs.
    assert_eq!(version["minimum_kernel"], "5.15", "{version}");
    let features = version["features"].as_array().unwrap();
    assert!(
        features
            .iter()
            .any(|f| f["name"].as_str().unwrap().starts_with("SO_NETNS_COOKIE")),
        "{version}"
    );
    assert!(features.len() >= 11, "{version}");
    for feature in features {
        assert_eq!(feature["found"], true, "{feature}");
    }
    // Every program of this build through this kernel's verifier, the
    // cgroup hooks, sk_lookup and sk_msg; the scratch maps gone after.
    let programs = version["programs"].as_array().unwrap();
    let names: Vec<&str> = programs.iter().filter_map(|p| p["name"].as_str()).collect();
    for name in [
        "connect4",
        "connect6",
        "getsockopt",
        "sock_ops",
        "inbound",
        "redirect",
    ] {
        assert!(names.contains(&name), "{name} not checked: {version}");
    }
    for program in programs {
        assert_eq!(program["loaded"], true, "{program}");
    }
    let left: Vec<_> = std::fs::read_dir(&bpffs).unwrap().collect();
    std::fs::remove_dir(&bpffs).unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn with_log_format_json_the_daemon_writes_one_json_object_a_line() {
    let node = ambridge_conformance::Node::new();
    node.write_workloads_text("workloads: []\n");
    let daemon = ambridge_conformance::Daemon::start_with(&node, &["--log-format", "json"]);
    let log = daemon.log();
    assert!(!log.is_empty());
    for line in &log {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        log.iter()
            .any(|l| serde_json::from_str::<Value>(l).unwrap()["fields"]["message"] == "ready"),
        "{log:?}"
    );
}

#[test]
fn a_cgroup_root_that_is_not_a_cgroup_v2_directory_stops_the_daemon_at_start_naming_it() {
    let dir = std::env::temp_dir().join(format!("ambridge-not-a-cgroup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let workloads = dir.join("workloads.yaml");
    std::fs::write(&workloads, "workloads: []\n").unwrap();
    let bpffs = format!("/sys/fs/bpf/ambridge-cli-root-{}", std::process::id());
    let (root, api) = (dir.display().to_string(), dir.join("api.sock"));
    let out = ambridge(&[
        "run",
        "--cgroup-root",
        &root,
        "--bpffs",
        &bpffs,
        "--workloads",
        workloads.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Before anything is loaded or pinned.
    let pinned = std::path::Path::new(&bpffs).exists();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--cgroup-root {root} must be a cgroup v2 directory"
        )) && stderr.contains("is not on a cgroup2 filesystem"),
        "{stderr}"
    );
    assert!(!pinned, "{bpffs} was made");
}

#[test]
fn a_report_whose_reader_went_away_ends_quietly_with_success() {
    // As `ambridge version | head -0`: the reader is gone before the
    // first line (the program check takes a while before any output).
    let bpffs = format!("/sys/fs/bpf/ambridge-cli-pipe-{}", std::process::id());
    std::fs::create_dir_all(&bpffs).unwrap();
    let mut child = Command::new(workspace_bin("ambridge"))
        .args(["version", "--bpffs", &bpffs])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running ambridge version");
    drop(child.stdout.take());
    let out = child
        .wait_with_output()
        .expect("waiting for ambridge version");
    std::fs::remove_dir(&bpffs).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
