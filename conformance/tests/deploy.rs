//! Issue 14: the install add-on in `deploy/`, rendered with the
//! `kubectl kustomize` users have, validated against every Kubernetes
//! release's schemas `kubernetes-validate` carries, and its RBAC compared
//! with the requests the real daemon makes to an API server.

use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use ambridge_conformance::{
    Daemon, Node, deploy, eventually,
    kubeapi::{ApiCall, KubeApi},
    workspace_bin,
};
use serde_json::{Value, json};

/// The agent's overlays, by the mode each runs in.
const OVERLAYS: [&str; 2] = ["companion", "replacement"];
const NODE: &str = "node-1";

/// `kubectl kustomize` of an agent overlay: its text and its objects.
fn render(overlay: &str) -> (String, Vec<Value>) {
    deploy::render(&format!("overlays/{overlay}"))
}

/// Every Kubernetes release `kubernetes-validate` has strict schemas for,
/// from 1.30 on.
fn kubernetes_releases() -> Vec<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import kubernetes_validate, os; d = os.path.join(os.path.dirname(kubernetes_validate.__file__), 'kubernetes-json-schema'); print('\\n'.join(sorted(os.listdir(d))))",
        ])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "kubernetes-validate is not installed (README's set-up installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut releases: Vec<(u32, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|dir| dir.strip_suffix("-local-strict")?.strip_prefix("v1."))
        .filter_map(|rest| {
            let minor: u32 = rest.split('.').next()?.parse().ok()?;
            (minor >= 30).then(|| (minor, format!("1.{rest}")))
        })
        .collect();
    releases.sort();
    releases.into_iter().map(|(_, v)| v).collect()
}

fn validate(file: &Path, release: &str) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", release])
        .arg(file)
        .output()
        .expect("running kubernetes-validate (README's set-up installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn every_overlay_and_the_uninstaller_validate_strictly_against_kubernetes_1_30_to_the_newest() {
    let releases = kubernetes_releases();
    assert!(
        releases.len() >= 8 && releases[0] == "1.30.0",
        "kubernetes-validate carries {releases:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for overlay in ["overlays/companion", "overlays/replacement", "uninstall"] {
        let (text, _) = deploy::render(overlay);
        let file = dir
            .path()
            .join(format!("{}.yaml", overlay.replace('/', "-")));
        std::fs::write(&file, &text).unwrap();
        for release in &releases {
            let (ok, report) = validate(&file, release);
            assert!(ok, "{overlay} against Kubernetes {release}:\n{report}");
        }
    }
    // Strict means strict: a field no schema has is refused.
    let (text, _) = render("replacement");
    let misspelt = text.replacen("hostPID: true", "hostPID: true\n      hostPIDs: true", 1);
    assert_ne!(misspelt, text);
    let file = dir.path().join("misspelt.yaml");
    std::fs::write(&file, misspelt).unwrap();
    let (ok, report) = validate(&file, &releases[0]);
    assert!(!ok, "an unknown field passed: {report}");
}

/// What the rendered roles grant, as the calls they allow.
fn granted(objects: &[Value]) -> BTreeSet<ApiCall> {
    let mut out = BTreeSet::new();
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        // A Role grants in its own namespace only.
        let namespace = role["metadata"]["namespace"].as_str().map(String::from);
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap_or_else(|| panic!("a list in {role}"))
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        for rule in role["rules"].as_array().unwrap() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        out.insert(ApiCall {
                            verb,
                            group: group.clone(),
                            resource: resource.clone(),
                            namespace: namespace.clone(),
                        });
                    }
                }
            }
        }
    }
    out
}

/// Whether `grants` allow `call`: a cluster-wide grant allows it in every
/// namespace.
fn allows(grants: &BTreeSet<ApiCall>, call: &ApiCall) -> bool {
    grants.contains(call)
        || grants.contains(&ApiCall {
            namespace: None,
            ..call.clone()
        })
}

/// Whether some call in `calls` uses `grant`.
fn used(calls: &BTreeSet<ApiCall>, grant: &ApiCall) -> bool {
    calls.iter().any(|call| {
        call.verb == grant.verb
            && call.group == grant.group
            && call.resource == grant.resource
            && (grant.namespace.is_none() || grant.namespace == call.namespace)
    })
}

/// Runs the daemon of `overlay`'s mode against a local API server until it
/// has done everything it does for an enrolled pod (and, serving ZDS,
/// marked it), and returns the calls it made.
fn calls_of(overlay: &str) -> BTreeSet<ApiCall> {
    let mut node = Node::new();
    let uid = ambridge_conformance::kubelet_pod_uid();
    for dir in ["kubepods", "kubepods/besteffort"] {
        node.add_cgroup(dir);
    }
    let pod = node.add_pod_in("client", &format!("kubepods/besteffort/pod{uid}"));
    let api = KubeApi::start();
    api.put_namespace(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    api.put_daemonset(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "ztunnel", "namespace": "istio-system", "uid": "ds-1"}}));
    api.put_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": "default", "uid": uid},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": pod.ip4.to_string()}
    }));
    let mut args = api.source_args(&node, NODE);
    let socket = ambridge_conformance::zds_socket(&node);
    args.extend(
        [
            "--zds",
            if overlay == "replacement" {
                "serve"
            } else {
                "off"
            },
            "--zds-socket",
            &socket.display().to_string(),
        ]
        .map(String::from),
    );
    let daemon = Daemon::start_with(&node, &args.iter().map(String::as_str).collect::<Vec<_>>());
    if overlay == "companion" {
        daemon.wait_for_mode(&uid, Some("ambient"));
    } else {
        // Held until a ztunnel has it: marked pending once in the maps.
        let marked = eventually(Duration::from_secs(15), || {
            api.pod_annotation(&uid, "ambient.istio.io/redirection")
        });
        assert_eq!(marked.as_deref(), Some("pending"));
    }
    drop(daemon);
    api.calls()
}

#[test]
fn each_overlay_grants_exactly_the_calls_its_daemon_makes() {
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        let grants = granted(&objects);
        let calls = calls_of(overlay);
        for call in &calls {
            assert!(
                allows(&grants, call),
                "{overlay}: the daemon calls {call:?}, which its roles do not grant: {grants:#?}"
            );
        }
        for grant in &grants {
            assert!(
                used(&calls, grant),
                "{overlay}: its roles grant {grant:?}, which the daemon never calls: {calls:#?}"
            );
        }
    }
}

/// The container's arguments with the ConfigMap's values and the downward
/// API's (made up: `pod_ip`) put in, as the kubelet expands `$(VAR)`.
fn expanded_args(objects: &[Value], pod_ip: &str) -> Vec<String> {
    let config = deploy::object(objects, "ConfigMap", "ambridge-config");
    let container = &deploy::object(objects, "DaemonSet", "ambridge")["spec"]["template"]["spec"]["containers"]
        [0];
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let mut arg = a.as_str().unwrap().replace("$(INSTANCE_IP)", pod_ip);
            for (key, value) in config["data"].as_object().unwrap() {
                arg = arg.replace(&format!("$({key})"), value.as_str().unwrap());
            }
            assert!(
                !arg.contains("$("),
                "{arg}: a variable no ConfigMap key sets"
            );
            arg
        })
        .collect()
}

#[test]
fn each_daemonsets_arguments_parse_on_either_family_and_its_probes_name_its_monitoring_port() {
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        for pod_ip in ["10.0.0.7", "fd00::7"] {
            let args = expanded_args(&objects, pod_ip);
            // clap checks each value as it parses; `--help` then stops it
            // before anything runs (and before clap checks which flags
            // need which: those are checked below).
            let out = Command::new(workspace_bin("ambridge"))
                .args(&args)
                .arg("--help")
                .env("NODE_NAME", NODE)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{overlay}: ambridge {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let has = |flag: &str| args.iter().any(|a| a.starts_with(&format!("{flag}=")));
            assert!(
                has("--cni-bin-dir") && has("--cni-conf-dir"),
                "{overlay}: the CNI flags go in pairs: {args:?}"
            );
        }
        let args = expanded_args(&objects, "10.0.0.7");
        let address = args
            .iter()
            .find_map(|a| a.strip_prefix("--monitoring-address="))
            .expect("a monitoring address");
        let (ip, port) = address.rsplit_once(':').unwrap();
        assert_eq!(ip, "10.0.0.7", "{overlay}: bound to the pod IP only");
        let port: u16 = port.parse().unwrap();
        let spec = &deploy::object(&objects, "DaemonSet", "ambridge")["spec"]["template"];
        let container = &spec["spec"]["containers"][0];
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["port"], port,
                "{overlay} {probe}"
            );
        }
        assert_eq!(container["ports"][0]["containerPort"], port, "{overlay}");
        assert_eq!(
            spec["metadata"]["annotations"]["prometheus.io/port"],
            port.to_string(),
            "{overlay}"
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{overlay}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{overlay}"
        );
    }
}

/// The `RUN` commands of the Dockerfile's build stage, continuation lines
/// joined.
fn build_stage_runs(dockerfile: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let build_stage = joined
        .split("\nFROM ")
        .find(|stage| stage.contains(" AS build"))
        .expect("a build stage");
    build_stage
        .lines()
        .filter_map(|l| l.strip_prefix("RUN "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn the_image_builds_as_the_readme_does_and_holds_what_the_daemonsets_run() {
    let dockerfile = std::fs::read_to_string(deploy::dir().join("Dockerfile")).unwrap();
    let runs = build_stage_runs(&dockerfile);
    assert_eq!(
        runs[runs.len() - 2..],
        [
            "scripts/setup.sh --build-only",
            "cargo build --release --locked --bins"
        ],
        "{runs:?}"
    );
    // The test command builds the same way (scripts/test.sh runs setup.sh
    // and cargo build; --build-only is a subset, tried here).
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup.sh"))
        .arg("--build-only")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setup.sh --build-only: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the binaries copied out of the build stage");
    for binary in ["ambridge", "ambridge-cni"] {
        assert!(
            copied.contains(&format!("/src/target/release/{binary} ")),
            "{copied}"
        );
    }
    assert!(copied.ends_with(" /usr/local/bin/"), "{copied}");
    // Every command the DaemonSets run is in the image.
    for (dir, name) in [
        ("overlays/replacement", "ambridge"),
        ("overlays/companion", "ambridge"),
        ("uninstall", "ambridge-uninstall"),
    ] {
        let (_, objects) = deploy::render(dir);
        let spec = &deploy::object(&objects, "DaemonSet", name)["spec"]["template"]["spec"];
        for container in spec["containers"]
            .as_array()
            .into_iter()
            .chain(spec["initContainers"].as_array())
            .flatten()
            .filter(|c| {
                c["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("ambridge:"))
            })
        {
            assert_eq!(
                container["command"][0], "/usr/local/bin/ambridge",
                "{dir}: {container}"
            );
        }
    }
}
