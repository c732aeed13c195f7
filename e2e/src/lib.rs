//! ferry's test substrate: a real kube-apiserver and etcd (`control_plane`), simulated nodes
//! with NodePort responders (`nodes`), a TCP fault proxy (`fault_proxy`), the operator as a
//! process that can be killed (`operator`), forwarders in network namespaces (`netns`,
//! `forwarder`), the randomized fault harness (`chaos`), a Compute Engine REST fake (`gce`),
//! and the sandbox that puts them together.
//! Test-only: nothing here ships.

pub mod aws;
pub mod bench;
pub mod chaos;
pub mod chart;
pub mod cluster;
pub mod control_plane;
pub mod fault_proxy;
pub mod forwarder;
pub mod gce;
pub mod http_server;
pub mod netns;
pub mod nodes;
pub mod operator;
pub mod pki;
pub mod process;
pub mod sandbox;
pub mod scenario;
pub mod tools;

use std::path::{Path, PathBuf};

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}
