//! Supervision of the daemon's long-running parts: each source, the local
//! API, the ZDS server and the datapath apply of the reconcile loop. A part
//! that fails is retried (or restarted) with exponential [`Backoff`] rather
//! than ending the daemon or spinning, and its [`ComponentHealth`] is kept
//! in [`Health`] for the local API (`ambridge status`).

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tracing::{error, info};

/// Waits between attempts: doubling from `first` up to `max`, back to
/// `first` once an attempt has stayed healthy for `healthy_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub first: Duration,
    pub max: Duration,
    pub healthy_after: Duration,
}

impl Policy {
    /// For the daemon's tasks and the datapath apply: 100 ms doubling to
    /// 15 s, reset after 30 s of health.
    pub const TASKS: Policy = Policy {
        first: Duration::from_millis(100),
        max: Duration::from_secs(15),
        healthy_after: Duration::from_secs(30),
    };

    /// For a listener's `accept`: a peer is waiting, so the cap is short
    /// (1 s); the accept loop starts over at every accepted connection.
    pub const ACCEPT: Policy = Policy {
        first: Duration::from_millis(100),
        max: Duration::from_secs(1),
        healthy_after: Duration::from_secs(1),
    };
}

/// The wait before the next attempt, from how the last ones went.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: Policy,
    next: Duration,
}

impl Backoff {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            next: policy.first,
        }
    }

    /// An attempt failed after `healthy_for` of health (zero when it never
    /// worked): how long to wait before the next one.
    pub fn failed(&mut self, healthy_for: Duration) -> Duration {
        if healthy_for >= self.policy.healthy_after {
            self.next = self.policy.first;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        wait
    }

    /// Starts over from the first wait (an attempt succeeded).
    pub fn reset(&mut self) {
        self.next = self.policy.first;
    }
}

/// A supervised part of the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The workloads file source (`--source file`).
    WorkloadsFile,
    /// The Kubernetes source.
    Kubernetes,
    /// istiod's workload discovery source.
    Istiod,
    /// The local API server.
    Api,
    /// The ZDS server (`--zds serve`).
    ZdsServer,
    /// The metrics and health port.
    Monitoring,
    /// Keeping the chained CNI plugin installed (`--cni-conf-dir`).
    CniPlugin,
    /// Writing the node state into the kernel maps (each reconcile).
    Datapath,
}

impl Component {
    /// Its name in logs and in `ambridge status`.
    pub fn name(self) -> &'static str {
        match self {
            Component::WorkloadsFile => "workloads-file",
            Component::Kubernetes => "kubernetes",
            Component::Istiod => "istiod",
            Component::Api => "api",
            Component::ZdsServer => "zds-server",
            Component::Monitoring => "monitoring",
            Component::CniPlugin => "cni-plugin",
            Component::Datapath => "datapath",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a component stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Configured, not working yet (a source that has not delivered, a
    /// server not listening yet).
    Starting,
    Running,
    /// Failed with this error; being retried.
    Failed(String),
}

/// One component's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentHealth {
    pub state: State,
    /// The last error, kept after a recovery.
    pub last_error: Option<String>,
    /// How many times it failed and was retried or restarted.
    pub restarts: u64,
    /// When it entered its state.
    pub since: SystemTime,
}

impl ComponentHealth {
    fn starting() -> Self {
        Self {
            state: State::Starting,
            last_error: None,
            restarts: 0,
            since: SystemTime::now(),
        }
    }
}

/// What readiness is made of, beside the components' health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gates {
    /// The programs are attached.
    pub attached: bool,
    /// Every configured source has delivered a state since the daemon
    /// started.
    pub sources_synced: bool,
}

#[derive(Debug, Default)]
struct Inner {
    components: BTreeMap<Component, ComponentHealth>,
    gates: Gates,
}

/// The health of every supervised component, shared between the tasks and
/// the local API.
#[derive(Clone, Debug, Default)]
pub struct Health(Arc<Mutex<Inner>>);

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.0.lock().expect("health lock"))
    }

    /// Registers `component` as configured and starting.
    pub fn register(&self, component: Component) {
        self.with(|inner| {
            inner
                .components
                .entry(component)
                .or_insert_with(ComponentHealth::starting);
        });
    }

    /// `component` works (again). Logs a recovery.
    pub fn running(&self, component: Component) {
        self.with(|inner| {
            let entry = inner
                .components
                .entry(component)
                .or_insert_with(ComponentHealth::starting);
            if entry.state != State::Running {
                if matches!(entry.state, State::Failed(_)) {
                    info!(%component, restarts = entry.restarts, "recovered");
                }
                entry.state = State::Running;
                entry.since = SystemTime::now();
            }
        });
    }

    /// `component` failed with `error` and will be retried. The same error
    /// again while it is failing only counts the retry.
    pub fn failed(&self, component: Component, error: String) {
        self.with(|inner| {
            let entry = inner
                .components
                .entry(component)
                .or_insert_with(ComponentHealth::starting);
            entry.restarts += 1;
            if entry.state != State::Failed(error.clone()) {
                entry.state = State::Failed(error.clone());
                entry.since = SystemTime::now();
            }
            entry.last_error = Some(error);
        });
    }

    /// Whether `component` is running now.
    pub fn is_running(&self, component: Component) -> bool {
        self.with(|inner| {
            inner
                .components
                .get(&component)
                .is_some_and(|c| c.state == State::Running)
        })
    }

    /// The programs are attached.
    pub fn set_attached(&self) {
        self.with(|inner| inner.gates.attached = true);
    }

    /// Every configured source has delivered once.
    pub fn set_sources_synced(&self) {
        self.with(|inner| inner.gates.sources_synced = true);
    }

    /// The readiness gates besides the components.
    pub fn gates(&self) -> Gates {
        self.with(|inner| inner.gates)
    }

    /// Every component, by name order of [`Component`].
    pub fn components(&self) -> Vec<(Component, ComponentHealth)> {
        self.with(|inner| {
            inner
                .components
                .iter()
                .map(|(c, h)| (*c, h.clone()))
                .collect()
        })
    }

    /// Ready: the programs are attached, every configured source has
    /// delivered once, the ZDS server (when configured) is listening and
    /// the chained CNI plugin (when installed by the daemon) is in place.
    pub fn ready(&self) -> bool {
        self.with(|inner| {
            inner.gates.attached
                && inner.gates.sources_synced
                && [Component::ZdsServer, Component::CniPlugin]
                    .iter()
                    .all(|c| {
                        inner
                            .components
                            .get(c)
                            .is_none_or(|h| h.state == State::Running)
                    })
        })
    }
}

/// Why one run of a supervised task ended.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnd {
    #[error("{0:#}")]
    Failed(anyhow::Error),
    #[error("it stopped without an error")]
    Returned,
    #[error("it panicked: {0}")]
    Panicked(String),
}

/// Runs `start()` as a task, again and again with [`Policy::TASKS`]
/// backoff whenever it fails, returns or panics, recording each end in
/// `health` (a task marks itself running when it is). Never returns.
pub async fn supervise<F, Fut>(component: Component, health: Health, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    health.register(component);
    let mut backoff = Backoff::new(Policy::TASKS);
    loop {
        let started = Instant::now();
        let end = match tokio::spawn(start()).await {
            Ok(Ok(())) => TaskEnd::Returned,
            Ok(Err(e)) => TaskEnd::Failed(e),
            Err(join) => TaskEnd::Panicked(panic_message(join)),
        };
        let wait = backoff.failed(started.elapsed());
        error!(%component, retry_in_ms = wait.as_millis() as u64, "stopped, restarting: {end}");
        health.failed(component, end.to_string());
        tokio::time::sleep(wait).await;
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
        Err(join) => join.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_100ms_to_its_15s_cap() {
        let mut b = Backoff::new(Policy::TASKS);
        let waits: Vec<u128> = (0..10)
            .map(|_| b.failed(Duration::ZERO).as_millis())
            .collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 15000, 15000]
        );
    }

    #[test]
    fn backoff_starts_over_after_a_healthy_period_and_not_before() {
        let mut b = Backoff::new(Policy::TASKS);
        for _ in 0..5 {
            b.failed(Duration::ZERO);
        }
        // Healthy for less than 30 s: the next wait keeps doubling.
        assert_eq!(b.failed(Duration::from_secs(29)), 3200 * MS);
        // Healthy for 30 s: back to the first wait.
        assert_eq!(b.failed(Duration::from_secs(30)), 100 * MS);
        assert_eq!(b.failed(Duration::ZERO), 200 * MS);
        b.reset();
        assert_eq!(b.failed(Duration::ZERO), 100 * MS);
    }

    #[test]
    fn accept_backoff_caps_at_one_second() {
        let mut b = Backoff::new(Policy::ACCEPT);
        let waits: Vec<u128> = (0..6)
            .map(|_| b.failed(Duration::ZERO).as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn health_records_failures_recoveries_and_readiness() {
        let health = Health::default();
        health.register(Component::Datapath);
        health.register(Component::ZdsServer);
        health.set_attached();
        health.set_sources_synced();
        assert!(!health.ready(), "the ZDS server is not listening yet");
        health.running(Component::ZdsServer);
        assert!(health.ready());
        health.failed(Component::Datapath, "map full".into());
        health.failed(Component::Datapath, "map full".into());
        let datapath = |h: &Health| {
            h.components()
                .into_iter()
                .find(|(c, _)| *c == Component::Datapath)
                .unwrap()
                .1
        };
        let failed = datapath(&health);
        assert_eq!(failed.state, State::Failed("map full".into()));
        assert_eq!(failed.restarts, 2);
        // A failing datapath keeps its last good state: still ready.
        assert!(health.ready());
        health.running(Component::Datapath);
        let recovered = datapath(&health);
        assert_eq!(recovered.state, State::Running);
        assert_eq!(recovered.last_error.as_deref(), Some("map full"));
        assert_eq!(recovered.restarts, 2);
        health.failed(Component::ZdsServer, "accept: EMFILE".into());
        assert!(!health.ready());
    }
}
