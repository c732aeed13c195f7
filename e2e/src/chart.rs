//! Reading what the Helm chart renders, for the chart's tests: a workload's container
//! environment as the chart wrote it.

use serde_yaml::Value;

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
