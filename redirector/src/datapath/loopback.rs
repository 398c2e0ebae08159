//! Addresses on the calling thread's loopback interface, over rtnetlink
//! (`RTM_NEWADDR`, the request `ip addr add` sends).

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::{io, net::IpAddr};

/// The loopback interface's index: 1 in every network namespace, as the
/// first device each one registers (`LOOPBACK_IFINDEX`).
const LOOPBACK_INDEX: u32 = 1;

/// Adds `addr` as a host address of `lo` in the calling thread's network
/// namespace; `EEXIST` (the address is there) counts as done.
pub fn add_address(addr: IpAddr) -> io::Result<()> {
    let mut message = AddressMessage::default();
    message.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.prefix_len = if addr.is_ipv4() { 32 } else { 128 };
    message.header.scope = AddressScope::Host;
    message.header.index = LOOPBACK_INDEX;
    message.attributes.push(AddressAttribute::Local(addr));
    message.attributes.push(AddressAttribute::Address(addr));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::NewAddress(message)),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut reply = vec![0; 4096];
    let len = socket.recv(&mut &mut reply[..], 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink reply: {e}")))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) if -code.get() == libc::EEXIST => Ok(()),
            Some(_) => Err(e.to_io()),
        },
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("rtnetlink answered RTM_NEWADDR with {other:?}, not an acknowledgement"),
        )),
    }
}
