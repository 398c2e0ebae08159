//! Pure decisions, no I/O: unit-tested with synthetic inputs.
//!
//! - [`spec`]: the node state every source contributes to;
//! - [`merge`]: the sources' views merged into one [`spec::NodeSpec`];
//! - [`membership`]: Istio's enrollment rules for a Kubernetes pod;
//! - [`sidecar`]: Istio's sidecar capture annotations, for the sidecar-mode
//!   fallback;
//! - [`claims`]: map entries owned by pods and ztunnels, for updates pod
//!   by pod;
//! - [`entries`]: the map value for one pod, ztunnel or namespace;
//! - [`desired`]: the whole node's map contents, with the ids and cookies
//!   it needs found through the [`desired::Resolve`] trait, and the diff
//!   against what the kernel holds.

pub mod claims;
pub mod desired;
pub mod entries;
pub mod membership;
pub mod merge;
pub mod sidecar;
pub mod spec;
