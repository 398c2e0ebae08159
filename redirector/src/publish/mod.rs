//! What the controller's reconciles are published to; no publisher touches
//! a map or cgroupfs.
//!
//! - [`zds`]: the ZDS server, handing ztunnel each enrolled pod's netns
//!   (and reporting back which pods ztunnel has: the readiness input);
//! - [`annotator`]: `ambient.istio.io/redirection` on each pod, through
//!   `pods/status`, as istio-cni writes it.
//!
//! The local API's view and watch stream are in [`crate::api::view`].

pub mod annotator;
pub mod zds;
