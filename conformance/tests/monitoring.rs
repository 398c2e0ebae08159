//! Issue 14: the metrics and health port (`--monitoring-address`), checked
//! with Prometheus's own tools: `promtool check metrics` on what it serves,
//! and a real Prometheus server scraping it.

use std::{
    io::Write,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambridge_conformance::{Daemon, Fixture, Node, PodRole, eventually};

/// `GET url`: the status code and the body, whatever the code.
fn get(url: &str) -> (u16, String) {
    let mut response = ureq::get(url)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
    (code, body)
}

/// The value of the sample `name` (its whole name with labels, as
/// written) in a metrics text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// client enrolled, with a ztunnel stand-in in it, and an echo server on
/// the server's 8080.
fn redirecting() -> Fixture {
    Fixture::three_pods()
        .app()
        .ztunnel(&[PodRole::Client], &[])
        .wait_enrolled()
        .start()
}

fn connect_through_ztunnel(f: &Fixture) {
    let result = f.client.connect(&format!("{}:8080", f.server.ip4), 1024);
    assert!(result.ok, "connect through ztunnel failed: {result}");
}

#[test]
fn metrics_pass_promtool_and_show_the_datapath_as_status_does() {
    let f = redirecting();
    connect_through_ztunnel(&f);
    let (code, metrics) = get(&format!("{}/metrics", f.daemon.monitoring_url()));
    assert_eq!(code, 200, "{metrics}");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (README's set-up installs Debian's prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let stats = f.daemon.stats();
    for event in ["connect_redirected_ipv4", "orig_dst_answered"] {
        assert_eq!(
            sample(
                &metrics,
                &format!("ambridge_datapath_events_total{{event=\"{event}\"}}")
            ),
            Some(stats[event] as f64),
            "{event}:\n{metrics}"
        );
    }
    let expected = [
        ("ambridge_pods{state=\"enrolled\"}", 1.0),
        ("ambridge_pods{state=\"not_enrolled\"}", 2.0),
        ("ambridge_pods{state=\"unresolved\"}", 0.0),
        ("ambridge_ztunnels", 1.0),
        ("ambridge_ready", 1.0),
        ("ambridge_datapath_attached", 1.0),
        ("ambridge_sources_synced", 1.0),
        ("ambridge_component_up{component=\"workloads-file\"}", 1.0),
        ("ambridge_component_up{component=\"monitoring\"}", 1.0),
        ("ambridge_map_capacity{map=\"cgroups\"}", 16384.0),
        // The three pods and ztunnel.
        ("ambridge_map_entries{map=\"cgroups\"}", 4.0),
        ("ambridge_build_info{version=\"0.1.0\"}", 1.0),
    ];
    for (name, value) in expected {
        assert_eq!(sample(&metrics, name), Some(value), "{name}:\n{metrics}");
    }
    let reconciles = sample(&metrics, "ambridge_reconcile_duration_seconds_count").unwrap();
    assert!(reconciles >= 1.0, "{metrics}");
}

#[test]
fn healthz_answers_at_once_and_readyz_only_once_every_source_delivered() {
    let node = Node::new();
    // A Kubernetes API that refuses every connection: the source never
    // delivers, so the daemon serves but is not ready.
    let refused = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", refused.local_addr().unwrap());
    drop(refused);
    let mut waiting = Daemon::spawn_with(
        &node,
        &[
            "--source",
            "kubernetes",
            "--node-name",
            "n",
            "--kube-api",
            &api,
        ],
    );
    waiting.wait_serving();
    let base = waiting.monitoring_url();
    assert_eq!(get(&format!("{base}/healthz")), (200, "ok\n".into()));
    let (code, why) = get(&format!("{base}/readyz"));
    assert_eq!(code, 503, "{why}");
    assert!(
        why.contains("a configured source has not delivered yet"),
        "{why}"
    );
    let (_, metrics) = get(&format!("{base}/metrics"));
    assert_eq!(sample(&metrics, "ambridge_ready"), Some(0.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "ambridge_sources_synced"),
        Some(0.0),
        "{metrics}"
    );
    drop(waiting);

    node.write_workloads_text("workloads: []\n");
    let ready = Daemon::start(&node);
    let base = ready.monitoring_url();
    assert_eq!(get(&format!("{base}/readyz")), (200, "ready\n".into()));
    assert_eq!(get(&format!("{base}/healthz")), (200, "ok\n".into()));
}

#[test]
fn a_monitoring_address_in_use_stops_the_daemon_at_start_naming_it() {
    let node = Node::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let out = Command::new(ambridge_conformance::workspace_bin("ambridge"))
        .args(Daemon::run_args(&node))
        .args(["--node-netns", "none", "--monitoring-address", &address])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the daemon ran with its port taken");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("binding the monitoring address {address}")),
        "{stderr}"
    );
    let _ = Command::new(ambridge_conformance::workspace_bin("ambridge"))
        .arg("uninstall")
        .arg("--bpffs")
        .arg(node.bpffs())
        .output();
}

/// A Prometheus server on loopback, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) every second.
    fn scraping(target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ambridge\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running prometheus (README's set-up installs Debian's prometheus)");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// The value of the instant query `query`, if it has one.
    fn value(&self, query: &str) -> Option<f64> {
        let mut response = ureq::get(&format!("{}/api/v1/query", self.url))
            .query("query", query)
            .call()
            .ok()?;
        let body: serde_json::Value =
            serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query` answers `want`.
    fn wait_for(&self, query: &str, want: f64) {
        let seen = eventually(Duration::from_secs(60), || {
            (self.value(query) == Some(want)).then_some(())
        });
        assert!(
            seen.is_some(),
            "Prometheus never answered {want} to {query} (last: {:?})",
            self.value(query)
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_server_scrapes_the_daemon_and_sees_a_counter_move() {
    let f = redirecting();
    let target = f
        .daemon
        .monitoring_url()
        .trim_start_matches("http://")
        .to_string();
    let prometheus = Prometheus::scraping(&target);
    let redirected =
        r#"ambridge_datapath_events_total{event="connect_redirected_ipv4",job="ambridge"}"#;
    prometheus.wait_for("up{job=\"ambridge\"}", 1.0);
    prometheus.wait_for(redirected, 0.0);
    connect_through_ztunnel(&f);
    connect_through_ztunnel(&f);
    prometheus.wait_for(redirected, 2.0);
    prometheus.wait_for(
        "sum(ambridge_pods{job=\"ambridge\",state=\"enrolled\"})",
        1.0,
    );
}
