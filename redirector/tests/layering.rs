//! The folders follow the data flow (see the crate docs): sources and pure
//! decisions never reach the datapath, nothing but the controller changes
//! it, and the publishers only read it.

use std::{fs, path::Path};

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).unwrap();
            out.push((path.display().to_string(), text));
        }
    }
    out
}

fn src(folder: &str) -> Vec<(String, String)> {
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(folder),
    )
}

#[test]
fn sources_decisions_and_host_lookups_never_touch_the_datapath() {
    for folder in ["sources", "node", "host"] {
        for (path, text) in src(folder) {
            for needle in ["crate::datapath", "datapath::", "crate::controller"] {
                assert!(!text.contains(needle), "{path} uses {needle}");
            }
        }
    }
}

#[test]
fn publishers_never_write_the_datapath_and_only_the_api_reads_it() {
    for (path, text) in src("publish") {
        for needle in ["crate::datapath", "datapath::", "Datapath"] {
            assert!(!text.contains(needle), "{path} uses {needle}");
        }
    }
    for (path, text) in src("api") {
        for line in text.lines().filter(|l| l.contains("datapath::")) {
            assert!(
                line.contains("datapath::ReadOnly") || line.contains("datapath::{self, Pins}"),
                "{path} uses more of the datapath than its read-only view: {line}"
            );
        }
    }
}

#[test]
fn only_the_controller_and_the_daemon_that_builds_it_hold_the_datapath() {
    for folder in ["sources", "node", "host", "publish", "api", "cni", "cli"] {
        for (path, text) in src(folder) {
            assert!(
                !text.contains("Datapath"),
                "{path} names the datapath's owner type"
            );
        }
    }
}

#[test]
fn the_cli_reads_the_datapath_only_through_its_read_only_view_probes_the_kernel_or_removes_it() {
    for (path, text) in src("cli") {
        for line in text.lines().filter(|l| l.contains("datapath::")) {
            assert!(
                [
                    "datapath::ReadOnly",
                    "datapath::uninstall",
                    "datapath::{self, Pins}",
                    "datapath::Pins",
                    // Loads throwaway programs and maps, never the datapath's.
                    "datapath::features",
                ]
                .iter()
                .any(|allowed| line.contains(allowed)),
                "{path}: {line}"
            );
        }
    }
}
