//! The Helm chart as its tests drive it: the real `helm` (built with the other test tools),
//! with none of the machine's own helm settings, rendering the chart into documents, and
//! reading what it rendered (a document's kind, a workload's container environment).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;

use crate::{repo_root, tools};

/// The chart's folder.
pub fn chart() -> PathBuf {
    repo_root().join("helm").join("ferry")
}

/// Runs the real `helm` with `args`, against `kubeconfig` or no cluster at all.
pub fn helm(args: &[&str], kubeconfig: Option<&Path>) -> Output {
    let bin = tools::ensure_built().expect("test tools").join("helm");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        // Nothing from the machine's own helm setup.
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("ferry-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("ferry-helm-config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("ferry-helm-data"),
        );
    match kubeconfig {
        Some(k) => cmd.env("KUBECONFIG", k),
        None => cmd.env_remove("KUBECONFIG"),
    };
    cmd.output().expect("helm runs")
}

/// `helm template` with `set` values; the rendered documents, or helm's error text.
pub fn render(set: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart();
    let mut args = vec![
        "template",
        "ferry",
        chart.to_str().unwrap_or_default(),
        "--namespace",
        "ferry-system",
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    let out = helm(&args, None);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(documents(&String::from_utf8_lossy(&out.stdout)))
}

/// The documents of a multi-document YAML stream, empty ones left out.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// A rendered document's kind.
pub fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

/// The first container's env of a rendered workload, in order, as (name, value); a value from
/// the downward API reads `fieldRef:<path>`.
pub fn container_env(workload: &Value) -> Vec<(String, String)> {
    let container = &workload["spec"]["template"]["spec"]["containers"][0];
    container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| {
            let value = e["value"].as_str().map(str::to_string).unwrap_or_else(|| {
                format!(
                    "fieldRef:{}",
                    e["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()
                        .unwrap_or_default()
                )
            });
            (e["name"].as_str().unwrap_or_default().to_string(), value)
        })
        .collect()
}
