//! Pod start through a chained CNI plugin, `ambridge-cni`: the container
//! runtime runs it at each sandbox's ADD, after the pod network is set up
//! and before any container starts, and it returns only once the daemon has
//! the pod in the datapath. Without it a pod's containers could connect in
//! the window before the daemon has seen the pod in a feed, uncaptured.
//!
//! [`install`] puts the plugin on the node and keeps it there; [`plugin`]
//! speaks the CNI protocol to the runtime (environment, stdin
//! config, result or error on stdout); the daemon's side (what the plugin
//! reports about each sandbox, and when an ADD is answered) is the source
//! [`crate::sources::cni`].

pub mod install;
pub mod plugin;
