//! Roles for the security and edge tests: a victim's long-lived session, a
//! tenant trying to take it over from a network namespace of its own, and
//! a socket handed from one pod's process to another's.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use ambridge_conformance::event as ev;
use socket2::{Domain, Socket, Type};

use crate::{original_dst, polled, report};

/// One connection to `to`: every `interval` a numbered message goes out and
/// its echo is read back (event-loop style reads, as an accelerated socket
/// needs), `messages` times; each exchange is reported with whether the
/// bytes that came back were exactly the ones sent.
pub fn session(to: SocketAddr, messages: usize, interval: Duration) -> io::Result<()> {
    let s = TcpStream::connect_timeout(&to, crate::io_timeout())?;
    s.set_nodelay(true)?;
    report(ev::Session {
        local: s.local_addr()?,
        peer: s.peer_addr()?,
    });
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
        report(ev::Exchange {
            i: i as u64,
            intact: got == sent,
            received: String::from_utf8_lossy(&got).into_owned(),
        });
        thread::sleep(interval);
    }
    Ok(())
}

/// In the current netns, which holds `source`'s address (the victim's) on
/// `lo`: listen on `listen_at` (where the victim's connection landed),
/// connect to it from `source` (the victim's own 4-tuple) and, for
/// `duration`, write into the accepted socket and read whatever either end
/// receives; also ask the accepted socket for `SO_ORIGINAL_DST`. Reports
/// what the attacker got.
pub fn hijack(
    (addr, source_port): (std::net::IpAddr, u16),
    listen_at: SocketAddr,
    duration: Duration,
) -> io::Result<()> {
    let listener = TcpListener::bind(listen_at)?;
    let client = Socket::new(Domain::for_address(listen_at), Type::STREAM, None)?;
    client.set_reuse_address(true)?;
    client.bind(&SocketAddr::new(addr, source_port).into())?;
    client.connect(&listen_at.into())?;
    let client: TcpStream = client.into();
    let (accepted, from) = listener.accept()?;
    let orig_dst = original_dst(&Socket::from(accepted.try_clone()?)).ok();
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
    report(ev::Hijack {
        accepted_from: from,
        orig_dst,
        injected: injected as u64,
        received_by_accepted: String::from_utf8_lossy(&received_by_accepted).into_owned(),
        foreign_to_client,
    });
    Ok(())
}

/// Creates an unconnected TCP socket of `to`'s family and hands it to the
/// process listening on the unix socket `via` (`SCM_RIGHTS`).
pub fn fd_send(via: &std::path::Path, to: SocketAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    let unix = std::os::unix::net::UnixStream::connect(via)?;
    let fds = [socket.as_raw_fd()];
    sendmsg::<()>(
        unix.as_raw_fd(),
        &[io::IoSlice::new(b"fd")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    report(ev::FdSent {});
    Ok(())
}

/// Listens on the unix socket `at`, takes one TCP socket handed over, and
/// connects it to `to` from this process (sending `bytes` and reading the
/// echo), as [`crate::Role::Connect`] reports.
pub fn fd_connect(at: &std::path::Path, to: SocketAddr, bytes: usize) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let _ = std::fs::remove_file(at);
    let listener = std::os::unix::net::UnixListener::bind(at)?;
    report(ev::AwaitingSocket { at: at.into() });
    let (unix, _) = listener.accept()?;
    let mut buf = [0u8; 8];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        unix.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let fd = msg
        .cmsgs()
        .map_err(io::Error::from)?
        .find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .ok_or_else(|| io::Error::other("no socket was handed over"))?;
    // SAFETY: the kernel just installed `fd` in this process for us alone.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    let step =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    socket
        .connect_timeout(&to.into(), crate::io_timeout())
        .map_err(step("connect"))?;
    let stream: TcpStream = socket.into();
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    stream.set_read_timeout(Some(crate::io_timeout()))?;
    let sent = vec![7u8; bytes];
    io::Write::write_all(&mut &stream, &sent).map_err(step("write"))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(step("shutdown"))?;
    let mut got = Vec::new();
    io::Read::read_to_end(&mut &stream, &mut got).map_err(step("read"))?;
    report(ev::Connect {
        ok: got == sent,
        to,
        local: Some(local),
        peer: Some(peer),
        sent: sent.len() as u64,
        received: got.len() as u64,
        intact: got == sent,
        error: None,
    });
    Ok(())
}
