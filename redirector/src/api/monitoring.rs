//! Prometheus metrics and health over HTTP, for the kubelet's probes and
//! for scraping (istio-cni's monitoring port by default):
//!
//! - `/metrics`: the datapath's counters (summed over CPUs), map
//!   occupancy and capacity, each component's state and restarts,
//!   readiness, pods by state, ZDS connections and acknowledgements, the
//!   reconcile duration, build info; Prometheus text format 0.0.4;
//! - `/healthz`: the process answers;
//! - `/readyz`: 200 once the programs are attached, every configured
//!   source has delivered, and the ZDS server and the chained CNI plugin
//!   (where the daemon runs them) are in place (the [`Health::ready`] of
//!   `ambridge status`), 503 with what is missing before.
//!
//! One scrape renders at a time (each walks the maps): scrapers that come
//! together wait in turn rather than each starting a walk.
//!
//! Everything is read when scraped, from the API's view, the health
//! record and the datapath's read-only maps: nothing here writes the
//! datapath. The reconcile duration and ztunnel's acknowledgements are
//! the controller's, recorded by [`Recorder`] as a publisher.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

use super::Context;
use crate::{
    publish::{Publish, Reconciled},
    supervise::{Component, Health, State as ComponentState},
};

/// istio-cni's monitoring port.
pub const DEFAULT_PORT: u16 = 15014;

/// What the controller's reconciles add to the metrics.
#[derive(Clone, Debug)]
pub struct Recorder {
    /// From a reconcile's start to its maps written.
    reconcile: Histogram,
    /// Pods ztunnel has acknowledged (`--zds serve`).
    acknowledged: Gauge,
}

impl Default for Recorder {
    fn default() -> Self {
        // 100 us to about 3.3 s: a one-pod change is well under a
        // millisecond, a 10,000-pod fill a few hundred.
        let buckets = prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 16);
        Self {
            reconcile: Histogram::new(buckets),
            acknowledged: Gauge::default(),
        }
    }
}

impl Publish for Recorder {
    fn reconciled(&mut self, r: &Reconciled) {
        self.reconcile.observe(r.applied_in.as_secs_f64());
        if let Some(acked) = r.acknowledged {
            self.acknowledged.set(acked.len() as i64);
        }
    }
}

/// Binds the monitoring port; an address in use or not on this host is an
/// error at start, naming the address.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("binding the monitoring address {address}: {e}"))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task
/// is dropped.
pub async fn serve(
    listener: TcpListener,
    context: Context,
    recorder: Recorder,
) -> anyhow::Result<()> {
    let health = context.reports.health.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Scraped {
            context,
            recorder,
            rendering: tokio::sync::Mutex::new(()),
        }));
    health.running(Component::Monitoring);
    axum::serve(listener, app)
        .await
        .map_err(|e| anyhow::anyhow!("serving the monitoring port: {e}"))
}

/// What the handlers read.
struct Scraped {
    context: Context,
    recorder: Recorder,
    /// Held while `/metrics` renders.
    rendering: tokio::sync::Mutex<()>,
}

async fn readyz(State(state): State<Arc<Scraped>>) -> impl IntoResponse {
    let health = &state.context.reports.health;
    if health.ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, not_ready(health))
    }
}

/// What keeps the daemon from being ready, one reason a line.
fn not_ready(health: &Health) -> String {
    let gates = health.gates();
    let mut out = String::new();
    if !gates.attached {
        out.push_str("the programs are not attached yet\n");
    }
    if !gates.sources_synced {
        out.push_str("a configured source has not delivered yet\n");
    }
    for (component, h) in health.components() {
        if h.state == ComponentState::Running {
            continue;
        }
        match component {
            Component::ZdsServer => out.push_str("the ZDS server is not listening\n"),
            Component::CniPlugin => out.push_str("the chained CNI plugin is not installed\n"),
            _ => {}
        }
    }
    out
}

async fn metrics(State(state): State<Arc<Scraped>>) -> impl IntoResponse {
    let _turn = state.rendering.lock().await;
    // Walking maps of up to 65,536 entries: off the reactor.
    let scraped = state.clone();
    let rendered =
        tokio::task::spawn_blocking(move || render(&scraped.context, &scraped.recorder)).await;
    match rendered {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the metrics: {e}\n"),
        )
            .into_response(),
    }
}

type Labels = Vec<(&'static str, String)>;

/// One gauge a label value.
fn gauges<'a>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl IntoIterator<Item = (&'a str, i64)>,
) {
    let family = Family::<Labels, Gauge>::default();
    for (value, n) in values {
        family
            .get_or_create(&vec![(label, value.to_string())])
            .set(n);
    }
    registry.register(name, help, family);
}

/// One counter a label value.
fn counters<'a>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (value, n) in values {
        family
            .get_or_create(&vec![(label, value.to_string())])
            .inc_by(n);
    }
    registry.register(name, help, family);
}

/// The metrics as they stand, in Prometheus text format.
pub fn render(context: &Context, recorder: &Recorder) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("ambridge");
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
        .set(1);
    registry.register("build_info", "The running build (always 1).", build);

    let counted = context
        .maps
        .counters()
        .map_err(|e| anyhow::anyhow!("reading the datapath counters: {e}"))?;
    counters(
        &mut registry,
        "datapath_events",
        "Events the kernel programs counted, summed over CPUs, by event.",
        "event",
        counted.iter().map(|(c, n)| (c.name(), *n)),
    );
    let occupancy = context.maps.occupancy();
    gauges(
        &mut registry,
        "map_entries",
        "Entries each datapath map holds.",
        "map",
        occupancy.iter().map(|(map, n)| (*map, *n as i64)),
    );
    let capacity = context.maps.capacity();
    gauges(
        &mut registry,
        "map_capacity",
        "Entries each datapath map can hold.",
        "map",
        capacity.iter().map(|(map, n)| (*map, i64::from(*n))),
    );

    let health = &context.reports.health;
    let components = health.components();
    gauges(
        &mut registry,
        "component_up",
        "Whether each configured component runs (1) or is starting or failing (0).",
        "component",
        components
            .iter()
            .map(|(c, h)| (c.name(), i64::from(h.state == ComponentState::Running))),
    );
    counters(
        &mut registry,
        "component_restarts",
        "Failures of each component, each retried.",
        "component",
        components.iter().map(|(c, h)| (c.name(), h.restarts)),
    );
    let last_failure = Family::<Labels, Gauge>::default();
    for (c, h) in &components {
        if let ComponentState::Failed(_) = h.state
            && let Ok(since) = h.since.duration_since(std::time::UNIX_EPOCH)
        {
            last_failure
                .get_or_create(&vec![("component", c.name().to_string())])
                .set(since.as_secs() as i64);
        }
    }
    registry.register_with_unit(
        "component_failing_since",
        "When each failing component failed, as a Unix time (its error is in `ambridge status`).",
        Unit::Seconds,
        last_failure,
    );
    let gates = health.gates();
    for (name, help, value) in [
        (
            "ready",
            "Whether the daemon is ready (what /readyz answers).",
            health.ready(),
        ),
        (
            "datapath_attached",
            "Whether the programs are attached.",
            gates.attached,
        ),
        (
            "sources_synced",
            "Whether every configured source has delivered since the daemon started.",
            gates.sources_synced,
        ),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::from(value));
        registry.register(name, help, gauge);
    }

    let mut by_state = [
        ("enrolled", 0),
        ("held", 0),
        ("unresolved", 0),
        ("not_enrolled", 0),
        ("sidecar", 0),
    ];
    let ztunnel_count = {
        // Counted under the lock, which the encoding below need not hold.
        let view = context.view.read().expect("view lock");
        for pod in view.pods.values() {
            let state = if !pod.problems.is_empty() {
                2
            } else if pod.flags & ambridge_common::flags::SIDECAR != 0 {
                4
            } else if pod.spec.mode != crate::node::spec::Mode::Ambient {
                3
            } else if pod.held() {
                1
            } else {
                0
            };
            by_state[state].1 += 1;
        }
        view.ztunnels
    };
    gauges(
        &mut registry,
        "pods",
        "Pods of the node state by where they stand: enrolled (captured), held (enrolled, connects refused until ztunnel acknowledges it), unresolved (not fully found on the node yet), not_enrolled, sidecar (captured to its own sidecar proxy, --sidecar on).",
        "state",
        by_state,
    );
    let ztunnels = Gauge::<i64>::default();
    ztunnels.set(i64::from(ztunnel_count));
    registry.register(
        "ztunnels",
        "ztunnel instances the node state names.",
        ztunnels,
    );

    if let Some(zds) = &context.reports.zds {
        let connections = Counter::<u64>::default();
        connections.inc_by(zds.connections());
        registry.register(
            "zds_connections",
            "ztunnel connections to the ZDS server past their hello.",
            connections,
        );
        let refused = Counter::<u64>::default();
        refused.inc_by(zds.refused());
        registry.register(
            "zds_peers_refused",
            "ZDS peers refused for not being (provably) ztunnel.",
            refused,
        );
        registry.register(
            "zds_pods_acknowledged",
            "Pods ztunnel has acknowledged.",
            recorder.acknowledged.clone(),
        );
    }
    registry.register_with_unit(
        "reconcile_duration",
        "From a reconcile's start to its changes written into the kernel maps.",
        Unit::Seconds,
        recorder.reconcile.clone(),
    );

    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)
        .map_err(|e| anyhow::anyhow!("encoding the metrics: {e}"))?;
    Ok(out)
}
