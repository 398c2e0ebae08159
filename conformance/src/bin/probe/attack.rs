//! Roles for the security tests: a victim's long-lived session, and a
//! tenant trying to take it over from a network namespace of its own.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use socket2::{Domain, Socket, Type};

use crate::{original_dst, polled, report};

/// One connection to `to`: every `interval` a numbered message goes out and
/// its echo is read back (event-loop style reads, as an accelerated socket
/// needs), `messages` times; each exchange is reported with whether the
/// bytes that came back were exactly the ones sent.
pub fn session(to: SocketAddr, messages: usize, interval: Duration) -> io::Result<()> {
    let s = TcpStream::connect_timeout(&to, crate::io_timeout())?;
    s.set_nodelay(true)?;
    report(json!({
        "event": "session", "local": s.local_addr()?.to_string(),
        "peer": s.peer_addr()?.to_string(),
    }));
    for i in 0..messages {
        let sent = format!("victim message {i:04} ........\n").into_bytes();
        polled::send_all(&s, &sent)?;
        let mut got = Vec::with_capacity(sent.len());
        let mut buf = [0u8; 256];
        while got.len() < sent.len() {
            let n = polled::recv(&s, &mut buf[..sent.len() - got.len()])?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        report(json!({
            "event": "exchange", "i": i, "intact": got == sent,
            "received": String::from_utf8_lossy(&got),
        }));
        thread::sleep(interval);
    }
    Ok(())
}

/// In the current netns, which holds `addr` (the victim's address) on
/// `lo`: listen on `addr:port`, connect to it from `addr:source_port` (the
/// victim's own 4-tuple) and, for `duration`, write into the accepted
/// socket and read whatever either end receives; also ask the accepted
/// socket for `SO_ORIGINAL_DST`. Reports what the attacker got.
pub fn hijack(
    addr: std::net::IpAddr,
    source_port: u16,
    port: u16,
    duration: Duration,
) -> io::Result<()> {
    let listen_at = SocketAddr::new(addr, port);
    let listener = TcpListener::bind(listen_at)?;
    let client = Socket::new(Domain::for_address(listen_at), Type::STREAM, None)?;
    client.set_reuse_address(true)?;
    client.bind(&SocketAddr::new(addr, source_port).into())?;
    client.connect(&listen_at.into())?;
    let client: TcpStream = client.into();
    let (accepted, from) = listener.accept()?;
    let orig_dst = original_dst(&Socket::from(accepted.try_clone()?))
        .ok()
        .map(|a| a.to_string());
    let injection = b"INJECTED BY THE ATTACKER\n";
    let mut injected = 0;
    let mut received_by_accepted = Vec::new();
    let mut received_by_client = Vec::new();
    for s in [&accepted, &client] {
        s.set_nonblocking(true)?;
    }
    let deadline = Instant::now() + duration;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match io::Write::write(&mut &accepted, injection) {
            Ok(n) => injected += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        for (s, into) in [
            (&accepted, &mut received_by_accepted),
            (&client, &mut received_by_client),
        ] {
            match io::Read::read(&mut &*s, &mut buf) {
                Ok(n) => into.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    // What the attacker's own client received is its own injection, if the
    // loop connection works normally; anything else came from the victim.
    let foreign_to_client = String::from_utf8_lossy(&received_by_client)
        .replace(std::str::from_utf8(injection).unwrap(), "");
    report(json!({
        "event": "hijack", "accepted_from": from.to_string(), "orig_dst": orig_dst,
        "injected": injected,
        "received_by_accepted": String::from_utf8_lossy(&received_by_accepted),
        "foreign_to_client": foreign_to_client,
    }));
    Ok(())
}
