//! The live system the decisions look up: cgroupfs and the pods' network
//! namespaces. [`resolver::SystemResolver`] answers [`crate::node::desired::Resolve`]
//! from them, with caches kept between reconciles.

pub mod cgroup;
pub mod misses;
pub mod netns;
pub mod resolver;
pub mod survey;
