//! What `ambridge-probe` reports, one JSON line per event: written by the
//! probe (client, echo servers, ztunnel stand-in, benchmark roles) and read
//! back by the tests, the demo and the benchmark through the same types.
//!
//! Each event is a struct of its own, wrapped in a [`ProbeEvent`] variant
//! of the same name, so a reader asks a probe for the kind it wants
//! ([`Kind`]) and gets its typed fields. On the wire the variant's name, in
//! kebab-case, is the `event` field, next to the struct's fields:
//! `{"event":"connect-summary","to":"198.18.0.3:8080","ok":3,...}`.

use std::{fmt, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// One kind of probe event: a struct wrapped in the [`ProbeEvent`] variant
/// of its name.
pub trait Kind: Clone {
    /// The `event` field of this kind on the wire.
    const NAME: &'static str;

    /// `event` if it is of this kind.
    fn of(event: &ProbeEvent) -> Option<&Self>;
}

macro_rules! probe_events {
    ($($(#[$doc:meta])* $kind:ident = $name:literal,)*) => {
        /// One line an `ambridge-probe` reports.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "event")]
        pub enum ProbeEvent {
            $($(#[$doc])* #[serde(rename = $name)] $kind($kind),)*
        }

        $(
            impl Kind for $kind {
                const NAME: &'static str = $name;

                fn of(event: &ProbeEvent) -> Option<&Self> {
                    match event {
                        ProbeEvent::$kind(e) => Some(e),
                        _ => None,
                    }
                }
            }

            impl From<$kind> for ProbeEvent {
                fn from(e: $kind) -> Self {
                    ProbeEvent::$kind(e)
                }
            }

            impl fmt::Display for $kind {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    ProbeEvent::from(self.clone()).fmt(f)
                }
            }
        )*
    };
}

probe_events! {
    /// The probe failed; it exits non-zero after this.
    Error = "error",
    /// `--start-on-stdin`: the line arrived, before the cgroup and netns
    /// were joined.
    Released = "released",
    /// One `connect` (or `fd-connect`) exchange.
    Connect = "connect",
    /// The end of a `connect` loop (`--count`, `--until`, `--write-only`).
    ConnectSummary = "connect-summary",
    /// A server (`echo`, `udp-echo`, `dns-server`, `bench-echo`,
    /// `bench-dns`) listens.
    Listening = "listening",
    /// `fd-connect` listens on its unix socket for the socket to connect.
    AwaitingSocket = "awaiting-socket",
    /// The `echo` server accepted a connection.
    Accepted = "accepted",
    /// The `udp-echo` server received a datagram.
    Datagram = "datagram",
    /// The `udp` client's answer.
    Udp = "udp",
    /// The ztunnel stand-in listens in every pod it was given.
    ZtunnelListening = "ztunnel-listening",
    /// The stand-in accepted a connection on its outbound capture port.
    OutboundAccepted = "outbound-accepted",
    /// The stand-in relayed an outbound connection to its end.
    OutboundRelayed = "outbound-relayed",
    /// The stand-in accepted a connection on plaintext inbound (15006).
    InboundAccepted = "inbound-accepted",
    /// The stand-in's inbound leg connected to the application.
    InboundConnected = "inbound-connected",
    /// The stand-in relayed an inbound connection to its end.
    InboundRelayed = "inbound-relayed",
    /// The stand-in failed to serve one connection on a capture port.
    RelayError = "relay-error",
    /// A DNS query reached the stand-in's proxy or the `dns-server`.
    DnsQuery = "dns-query",
    /// A DNS proxy or server failed to answer one client.
    DnsError = "dns-error",
    /// The `dns` client's answer, or why it got none.
    Dns = "dns",
    /// One socket option as `sockopts` read it.
    Sockopt = "sockopt",
    /// A victim's `session` is connected.
    Session = "session",
    /// One message of a `session` and its echo.
    Exchange = "exchange",
    /// What the `hijack` attacker got.
    Hijack = "hijack",
    /// `fd-send` handed its socket over.
    FdSent = "fd-sent",
    /// The stand-in applied a ZDS Add.
    ZdsAdd = "zds-add",
    /// The stand-in refused a ZDS Add on purpose (`--zds-nack`).
    ZdsNack = "zds-nack",
    /// The stand-in kept a pod on a ZDS Keep.
    ZdsKeep = "zds-keep",
    /// The stand-in applied a ZDS Del.
    ZdsDel = "zds-del",
    /// The node agent's snapshot is complete; pods it did not name went.
    ZdsSnapshotSent = "zds-snapshot-sent",
    /// The stand-in refused a ZDS request it could not apply.
    ZdsError = "zds-error",
    /// The stand-in closes its ZDS connection on purpose
    /// (`--zds-drop-after`).
    ZdsDropping = "zds-dropping",
    /// The node agent closed the stand-in's ZDS connection.
    ZdsClosed = "zds-closed",
    /// The stand-in connected to the node agent again and said hello.
    ZdsReconnected = "zds-reconnected",
    /// A scripted `zds-peer` connected.
    ZdsPeerConnected = "zds-peer-connected",
    /// A scripted `zds-peer` received a datagram.
    ZdsPeerReceived = "zds-peer-received",
    /// The node agent closed a scripted `zds-peer`'s connection.
    ZdsPeerClosed = "zds-peer-closed",
    /// The benchmark relay listens in its pods.
    RelayListening = "relay-listening",
    /// A benchmark connection-rate run.
    Cps = "cps",
    /// A benchmark request-response run.
    Rr = "rr",
    /// A benchmark bulk transfer.
    Bulk = "bulk",
    /// A benchmark DNS query-rate run.
    DnsLoad = "dns-load",
}

impl fmt::Display for ProbeEvent {
    /// The event as the probe printed it: one JSON line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&line)
    }
}

impl ProbeEvent {
    /// Parses one line a probe printed, naming the line when it is not an
    /// event.
    pub fn parse(line: &str) -> Result<Self, String> {
        serde_json::from_str(line).map_err(|e| {
            format!("ambridge-probe printed a line that is not a probe event ({e}): {line}")
        })
    }
}

/// The first event of kind `K` in `events`.
pub fn first<K: Kind>(events: &[ProbeEvent]) -> Option<K> {
    events.iter().find_map(K::of).cloned()
}

/// Every event of kind `K` in `events`, in order.
pub fn all<K: Kind>(events: &[ProbeEvent]) -> Vec<K> {
    events.iter().filter_map(K::of).cloned().collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Error {
    pub error: String,
    /// The pod netns a benchmark server failed in.
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Released {
    /// CLOCK_MONOTONIC when the line arrived.
    pub monotonic_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Connect {
    /// Connected, and the bytes sent came back intact.
    pub ok: bool,
    pub to: SocketAddr,
    /// Both ends of the connection, once connected.
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub sent: u64,
    pub received: u64,
    /// What came back is exactly what was sent.
    pub intact: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub to: SocketAddr,
    pub ok: u64,
    pub failed: u64,
    /// Why connects failed: when looping, the first five distinct reasons.
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listening {
    pub addr: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AwaitingSocket {
    /// The unix socket the socket is handed over on.
    pub at: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    /// The peer as `accept()` returned it.
    pub accept_addr: SocketAddr,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Datagram {
    pub from: SocketAddr,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Udp {
    /// The answer echoed the datagram sent.
    pub ok: bool,
    pub peer: SocketAddr,
    pub to: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZtunnelListening {
    /// How many pods it was given with `--pod-netns`.
    pub pods: u64,
    pub port: u16,
    pub hbone: bool,
    pub inbound: bool,
    pub dns: bool,
    pub dns_upstream: Option<SocketAddr>,
    /// The node agent's ZDS socket it took its pods from.
    pub zds: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboundAccepted {
    /// The pod's netns path, or its UID when handed over ZDS.
    pub pod: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST`, or why there was none.
    pub orig_dst: Option<SocketAddr>,
    pub orig_dst_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboundRelayed {
    pub orig_dst: SocketAddr,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboundAccepted {
    pub pod: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    pub orig_dst_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboundConnected {
    pub pod: String,
    /// The application's address.
    pub target: SocketAddr,
    /// The client's address, which the leg binds (ORIGINAL_SRC).
    pub client: std::net::IpAddr,
    /// Why binding the client's address failed, if it did.
    pub bind_error: Option<String>,
    /// The leg's source address as the kernel gave it.
    pub source: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboundRelayed {
    pub target: SocketAddr,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayError {
    pub pod: String,
    pub error: String,
}

/// How a DNS query travelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsTransport {
    /// UDP on an unconnected socket.
    Udp,
    /// UDP on a connected socket.
    UdpConnected,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsQuery {
    /// The pod whose proxy answered; `None` for the `dns-server`.
    pub pod: Option<String>,
    pub transport: DnsTransport,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub query: String,
    /// Where the proxy forwarded it, and what came back.
    pub upstream: Option<SocketAddr>,
    pub upstream_reply: Option<String>,
    pub upstream_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsError {
    pub pod: Option<String>,
    /// The client, when known.
    pub peer: Option<SocketAddr>,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    pub ok: bool,
    pub transport: DnsTransport,
    pub to: SocketAddr,
    pub reply: Option<String>,
    /// Where the answer came from, and the socket's ends.
    pub from: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sockopt {
    /// `client` or `server`.
    pub end: String,
    pub name: String,
    pub ret: i32,
    pub errno: Option<i32>,
    pub optlen: u32,
    /// The value's bytes in hex (none for TCP_INFO, whose counters move).
    pub value: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub i: u64,
    /// The echo was exactly the message sent.
    pub intact: bool,
    pub received: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hijack {
    pub accepted_from: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    /// Bytes the attacker wrote into the accepted socket.
    pub injected: u64,
    pub received_by_accepted: String,
    /// What the attacker's own client received besides its injection.
    pub foreign_to_client: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FdSent {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsAdd {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns_ino: u64,
    /// The pod was already served in that netns: its listeners stayed.
    pub kept: bool,
    /// The pod was served in another netns: those listeners closed.
    pub replaced: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsNack {
    pub uid: String,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsKeep {
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsDel {
    pub uid: String,
    /// The pod was being served.
    pub known: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsSnapshotSent {
    /// Pods served before that the snapshot did not name.
    pub dropped: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsError {
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsDropping {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsClosed {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsReconnected {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsPeerConnected {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsPeerReceived {
    pub len: u64,
    /// File descriptors the datagram carried.
    pub fds: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZdsPeerClosed {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayListening {
    pub pods: u64,
    pub port: u16,
    pub inbound_pods: u64,
    pub dns_pods: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cps {
    pub ok: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    pub per_second: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rr {
    pub count: u64,
    pub elapsed_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// The latency at every percentile, 0 to 100.
    pub cdf_us: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bulk {
    pub bytes: u64,
    pub elapsed_s: f64,
    pub gbit_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsLoad {
    pub ok: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back_as_it_was_written_with_its_kind_in_the_event_field() {
        let event = ProbeEvent::from(ConnectSummary {
            to: "198.18.0.3:8080".parse().unwrap(),
            ok: 2,
            failed: 1,
            failures: vec!["Connection refused (os error 111)".into()],
        });
        let line = event.to_string();
        assert!(line.starts_with(r#"{"event":"connect-summary","#), "{line}");
        assert_eq!(ProbeEvent::parse(&line), Ok(event));
    }

    #[test]
    fn an_empty_event_is_its_kind_alone() {
        let line = ProbeEvent::from(ZdsClosed {}).to_string();
        assert_eq!(line, r#"{"event":"zds-closed"}"#);
        assert_eq!(
            first::<ZdsClosed>(&[ProbeEvent::parse(&line).unwrap()]),
            Some(ZdsClosed {})
        );
    }

    #[test]
    fn a_line_that_is_not_an_event_is_named_in_the_error() {
        let e = ProbeEvent::parse(r#"{"event":"conect","ok":true}"#).unwrap_err();
        assert!(e.contains(r#"{"event":"conect","ok":true}"#), "{e}");
    }
}
