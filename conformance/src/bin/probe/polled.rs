//! Non-blocking reads and writes driven by poll(2), as an event-loop
//! runtime (tokio, Go, Node) does them: a wakeup without data just polls
//! again. The socket's file flags are left alone (other threads may use it
//! blocking); each call passes `MSG_DONTWAIT`.

use std::{io, net::TcpStream, os::fd::AsRawFd};

fn wait(s: &TcpStream, events: libc::c_short) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, crate::io_timeout().as_millis() as i32) };
    match n {
        0 => Err(io::Error::new(io::ErrorKind::TimedOut, "poll timed out")),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

pub fn recv(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        wait(s, libc::POLLIN)?;
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ) {
            return Err(e);
        }
    }
}

pub fn send_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        wait(s, libc::POLLOUT)?;
        // SAFETY: data is valid for reads of its length.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            data = &data[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ) {
            return Err(e);
        }
    }
    Ok(())
}

pub fn read_to_end(s: &TcpStream, out: &mut Vec<u8>) -> io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let start = out.len();
    loop {
        match recv(s, &mut buf)? {
            0 => return Ok(out.len() - start),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

pub fn copy(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match recv(from, &mut buf)? {
            0 => return Ok(total),
            n => {
                send_all(to, &buf[..n])?;
                total += n as u64;
            }
        }
    }
}
