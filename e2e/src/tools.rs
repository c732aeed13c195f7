//! The Go-built test tools (kube-apiserver, etcd, helm): built once by `e2e/tools/build.sh`
//! into a git-ignored folder and reused while their pinned versions do not change.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

use crate::repo_root;

/// Builds the tools if needed (a no-op when current) and returns their folder.
pub fn ensure_built() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> anyhow::Result<PathBuf> {
    let tools = repo_root().join("e2e").join("tools");
    let bin = std::env::var_os("FERRY_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools.join("bin"));
    let status = Command::new("bash")
        .arg(tools.join("build.sh"))
        .status()
        .context("running e2e/tools/build.sh (needs Go)")?;
    if !status.success() {
        bail!("e2e/tools/build.sh failed with {status}");
    }
    Ok(bin)
}
