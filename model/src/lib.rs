//! What every part of ferry agrees on, with no cloud and no controller in it: the
//! provider-neutral model (`model`), which Services are whose (`class`), which nodes are
//! targets (`eligibility`), the desired balancer of a Service (`desired`), address pools and
//! ranges (`pools`, `ranges`), how published addresses are read back (`ingress`) and which
//! node announces a VIP (`announce`).
//!
//! The operator and its providers build on it; the forwarder depends on it alone, so a cloud
//! SDK never reaches the data plane (see the dependency check in `test.sh`).

pub mod announce;
pub mod class;
pub mod desired;
pub mod eligibility;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod ingress;
pub mod model;
pub mod pools;
pub mod ranges;

pub use model::*;
