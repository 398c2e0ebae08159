//! Running `ambridge-probe` inside pods.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    Pod,
    event::{self, Connect, ConnectSummary, Kind, Listening, ProbeEvent},
    eventually, workspace_bin,
};

fn command(cgroup: Option<&Path>, netns: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_bin("ambridge-probe"));
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    cmd.arg("--netns").arg(netns).args(args);
    cmd
}

/// The events a probe printed; a line that is not one fails the test.
fn parse_lines(stdout: &[u8]) -> Vec<ProbeEvent> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| ProbeEvent::parse(l).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Runs a probe to completion in `netns`, in `cgroup` (or, with `None`, in
/// the test runner's own cgroup, outside the node) and returns its events.
pub fn run_in(cgroup: Option<&Path>, netns: &Path, args: &[&str]) -> Vec<ProbeEvent> {
    let out = command(cgroup, netns, args)
        .stderr(Stdio::inherit())
        .output()
        .expect("running ambridge-probe");
    let events = parse_lines(&out.stdout);
    assert!(
        out.status.success(),
        "ambridge-probe {args:?} failed ({}): {events:?}",
        out.status
    );
    events
}

impl Pod {
    /// Runs a probe in this pod's app container.
    pub fn run(&self, args: &[&str]) -> Vec<ProbeEvent> {
        run_in(Some(&self.container), &self.netns, args)
    }

    /// Connects from this pod to `to`, sending `bytes` and expecting them
    /// echoed; returns the probe's `connect` event.
    pub fn connect(&self, to: &str, bytes: usize) -> Connect {
        self.connect_with(to, bytes, &[])
    }

    /// As [`Pod::connect`], with extra `connect` arguments (`--io poll`).
    pub fn connect_with(&self, to: &str, bytes: usize, extra: &[&str]) -> Connect {
        let bytes = bytes.to_string();
        let mut args = vec!["connect", "--to", to, "--bytes", &bytes];
        args.extend_from_slice(extra);
        let events = self.run(&args);
        event::first(&events).unwrap_or_else(|| panic!("no connect event: {events:?}"))
    }

    /// Starts sequential 16-byte connects from this pod to `to` that go on
    /// until [`ConnectLoop::stop`]; `scratch` is a directory for the stop
    /// file.
    pub fn connect_until_stopped(&self, to: &str, scratch: &Path) -> ConnectLoop {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stop = scratch.join(format!("stop-connect-loop-{}-{n}", self.name));
        let stop_arg = stop.display().to_string();
        let probe = self.spawn(&["connect", "--to", to, "--bytes", "16", "--until", &stop_arg]);
        ConnectLoop { probe, stop }
    }

    /// Starts `count` sequential 16-byte connects from this pod to `to`;
    /// the probe ends with a `connect-summary` event.
    pub fn connect_loop(&self, to: &str, count: usize) -> Background {
        let count = count.to_string();
        self.spawn(&["connect", "--to", to, "--bytes", "16", "--count", &count])
    }

    /// Starts a long-running probe in this pod's app container.
    pub fn spawn(&self, args: &[&str]) -> Background {
        Background::spawn(command(Some(&self.container), &self.netns, args))
    }

    /// Starts an echo server on `addr` (e.g. `[::]:8080`) and waits until it
    /// listens.
    pub fn echo_server(&self, addr: &str) -> Background {
        let server = self.spawn(&["echo", "--listen", addr]);
        server.wait_first::<Listening>(Duration::from_secs(10));
        server
    }
}

/// A connect loop running until told to stop.
pub struct ConnectLoop {
    probe: Background,
    stop: std::path::PathBuf,
}

impl ConnectLoop {
    /// Asserts that the loop runs across `event`: `through()` (ztunnel's
    /// connections since the loop started) grows before it and again after
    /// it ends, so the event happened while connects were being made; then
    /// stops the loop and asserts no connect failed and every one went
    /// through ztunnel.
    pub fn assert_through_across(self, through: impl Fn() -> usize, event: impl FnOnce()) {
        const SEEN: usize = 20;
        let grown = |past: usize, when: &str| {
            eventually(Duration::from_secs(30), || (through() >= past + SEEN).then_some(()))
                .unwrap_or_else(|| {
                    panic!(
                        "the connect loop made no {SEEN} connects through ztunnel {when} ({} so far): {:?}",
                        through(),
                        self.probe.events()
                    )
                });
        };
        grown(0, "before the event");
        event();
        grown(through(), "after the event");
        std::fs::write(&self.stop, b"").expect("writing the loop's stop file");
        let summary = self
            .probe
            .wait_first::<ConnectSummary>(Duration::from_secs(30));
        assert_eq!(summary.failed, 0, "failed connects: {summary}");
        let ok = summary.ok as usize;
        let all = eventually(Duration::from_secs(5), || (through() == ok).then_some(()));
        assert!(
            all.is_some(),
            "{} of {ok} connects bypassed ztunnel",
            ok.saturating_sub(through())
        );
    }
}

/// A probe running in the background; killed on drop.
pub struct Background {
    child: Child,
    events: Arc<Mutex<Reported>>,
}

/// What a background probe printed so far.
#[derive(Default)]
struct Reported {
    events: Vec<ProbeEvent>,
    /// The first line that was not an event, with why.
    unparsed: Option<String>,
}

impl Background {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning ambridge-probe");
        let stdout = child.stdout.take().expect("piped stdout");
        let events = Arc::new(Mutex::new(Reported::default()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut reported = sink.lock().unwrap();
                match ProbeEvent::parse(&line) {
                    Ok(event) => reported.events.push(event),
                    Err(e) => {
                        reported.unparsed.get_or_insert(e);
                    }
                }
            }
        });
        Background { child, events }
    }

    /// The probe's stdin, for a probe spawned with it piped.
    pub fn take_stdin(&mut self) -> std::process::ChildStdin {
        self.child.stdin.take().expect("spawned with a piped stdin")
    }

    /// The probe's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every event reported so far; panics, naming the line, once the
    /// probe printed a line that is not an event.
    pub fn events(&self) -> Vec<ProbeEvent> {
        let reported = self.events.lock().unwrap();
        if let Some(unparsed) = reported.unparsed.clone() {
            // Unlocked first, so that the panic leaves the lock usable.
            drop(reported);
            panic!("{unparsed}");
        }
        reported.events.clone()
    }

    /// Every event of kind `K` reported so far, in order.
    pub fn all<K: Kind>(&self) -> Vec<K> {
        event::all(&self.events())
    }

    /// Waits for the first event of kind `K`; panics with all events on
    /// timeout.
    pub fn wait_first<K: Kind>(&self, timeout: Duration) -> K {
        self.wait_for(|_: &K| true, timeout)
    }

    /// Waits for an event of kind `K` matching `pred`; panics with all
    /// events on timeout.
    pub fn wait_for<K: Kind>(&self, pred: impl Fn(&K) -> bool, timeout: Duration) -> K {
        eventually(timeout, || self.all::<K>().into_iter().find(|e| pred(e))).unwrap_or_else(|| {
            panic!(
                "no matching {} event within {timeout:?}; got {:?}",
                K::NAME,
                self.events()
            )
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
