//! The compute v1 discovery document, as shipped inside PyPI's `google-api-python-client`
//! (`test.sh` installs it), and a check of a JSON answer against the schema a method
//! declares: every field the answer has must be one the schema has, with its type (uint64
//! and int64 as strings of digits, enums within their values), recursively. The fake's
//! answers pass through this, so the fake cannot drift from what GCE documents.

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::Value;

pub struct Discovery {
    doc: Value,
}

/// Where the discovery document is: `FERRY_COMPUTE_DISCOVERY`, else inside the installed
/// `googleapiclient` package.
pub fn document_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_COMPUTE_DISCOVERY") {
        return Ok(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import googleapiclient, os; print(os.path.join(os.path.dirname(googleapiclient.__file__), 'discovery_cache', 'documents', 'compute.v1.json'))",
        ])
        .output()
        .context("running python3 to find googleapiclient")?;
    anyhow::ensure!(
        out.status.success(),
        "googleapiclient is not installed (test.sh installs google-api-python-client): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

impl Discovery {
    pub fn load() -> anyhow::Result<Discovery> {
        let path = document_path()?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Discovery {
            doc: serde_json::from_str(&text)?,
        })
    }

    /// The schema the method `call` (`addresses.insert`) answers with.
    pub fn response_schema(&self, call: &str) -> Option<String> {
        let (collection, method) = call.split_once('.')?;
        self.doc["resources"][collection]["methods"][method]["response"]["$ref"]
            .as_str()
            .map(str::to_string)
    }

    /// The HTTP method and path template of `call`, e.g. (`POST`, `projects/{project}/regions/{region}/addresses`).
    pub fn method(&self, call: &str) -> Option<(String, String)> {
        let (collection, method) = call.split_once('.')?;
        let m = &self.doc["resources"][collection]["methods"][method];
        Some((m["httpMethod"].as_str()?.into(), m["path"].as_str()?.into()))
    }

    /// What in `value` disagrees with schema `name`; empty when nothing does.
    pub fn check(&self, name: &str, value: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        let schema = serde_json::json!({ "$ref": name });
        self.check_at(&schema, value, name, &mut problems);
        problems
    }

    fn check_at(&self, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
        if let Some(r) = schema["$ref"].as_str() {
            match self.doc["schemas"].get(r) {
                Some(s) => self.check_at(s, value, at, problems),
                None => problems.push(format!("{at}: unknown schema {r}")),
            }
            return;
        }
        match schema["type"].as_str() {
            Some("object") => {
                let Some(obj) = value.as_object() else {
                    problems.push(format!("{at}: {value} is not an object"));
                    return;
                };
                for (k, v) in obj {
                    let field = format!("{at}.{k}");
                    if let Some(s) = schema["properties"].get(k) {
                        self.check_at(s, v, &field, problems);
                    } else if let Some(s) = schema.get("additionalProperties") {
                        self.check_at(s, v, &field, problems);
                    } else {
                        problems.push(format!("{field}: not a field of the schema"));
                    }
                }
            }
            Some("array") => match value.as_array() {
                Some(items) => {
                    for (i, v) in items.iter().enumerate() {
                        self.check_at(&schema["items"], v, &format!("{at}[{i}]"), problems);
                    }
                }
                None => problems.push(format!("{at}: {value} is not an array")),
            },
            Some("string") => {
                let Some(s) = value.as_str() else {
                    problems.push(format!("{at}: {value} is not a string"));
                    return;
                };
                if matches!(schema["format"].as_str(), Some("uint64" | "int64"))
                    && (s.is_empty()
                        || !s
                            .trim_start_matches('-')
                            .chars()
                            .all(|c| c.is_ascii_digit()))
                {
                    problems.push(format!("{at}: {s:?} is not a 64-bit integer string"));
                }
                if let Some(values) = schema["enum"].as_array()
                    && !values.iter().any(|v| v == s)
                {
                    problems.push(format!("{at}: {s:?} is not one of its enum values"));
                }
            }
            Some("integer") => {
                if !value.is_i64() && !value.is_u64() {
                    problems.push(format!("{at}: {value} is not an integer"));
                }
            }
            Some("number") => {
                if !value.is_number() {
                    problems.push(format!("{at}: {value} is not a number"));
                }
            }
            Some("boolean") => {
                if !value.is_boolean() {
                    problems.push(format!("{at}: {value} is not a boolean"));
                }
            }
            Some("any") | None => {}
            Some(other) => problems.push(format!("{at}: schema type {other} not understood")),
        }
    }
}
