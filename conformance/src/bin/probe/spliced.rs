//! Zero-copy relaying with splice(2) through a pipe, as older ztunnel and
//! other L4 proxies do. It reads the socket's normal receive queue only.

use std::{io, net::TcpStream, os::fd::AsFd};

use nix::fcntl::{SpliceFFlags, splice};

pub fn copy(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pipe_r, pipe_w) = nix::unistd::pipe().map_err(io::Error::from)?;
    let mut total = 0u64;
    loop {
        let n = splice(
            from.as_fd(),
            None,
            pipe_w.as_fd(),
            None,
            64 * 1024,
            SpliceFFlags::SPLICE_F_MOVE,
        )
        .map_err(io::Error::from)?;
        if n == 0 {
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            let m = splice(
                pipe_r.as_fd(),
                None,
                to.as_fd(),
                None,
                left,
                SpliceFFlags::SPLICE_F_MOVE,
            )
            .map_err(io::Error::from)?;
            left -= m;
        }
        total += n as u64;
    }
}
