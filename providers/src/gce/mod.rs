//! Google Compute Engine: external passthrough Network Load Balancers on target pools.
//!
//! `spec::plan` turns a `DesiredLoadBalancer` into the resources the balancer should have —
//! a regional static address, a target pool of the nodes' instances with a legacy HTTP
//! health check, one forwarding rule per protocol on that address, and the firewall rules
//! that let clients and the health checkers reach the nodes — pure, so it is tested on
//! plain values. The calls that make them exist (through google-cloud-compute-v1, every
//! write an Operation) build on this plan; until they land, `--provider gce` is refused at
//! start (see `registry`).

pub mod spec;
