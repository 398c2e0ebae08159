//! ZDS, the protocol by which the node agent hands each pod's network
//! namespace to ztunnel over a unix socket. ambridge is the server: it
//! listens, ztunnel connects.

pub mod server;
pub mod wire;
