//! The README's flag tables ("Configuration" for the operator, "Forwarder" for the forwarder)
//! against the binaries' own `--help`: every flag and environment variable a binary takes is
//! in its table under the same name, and the table names none that the binary does not take.

use std::collections::BTreeSet;
use std::process::Command;

use ferry_e2e::operator::binary;
use ferry_e2e::repo_root;

/// The flags and environment variables `bin --help` lists (without `--help` and `--version`).
fn from_help(bin: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(binary(bin).unwrap())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin} --help");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let flag = regex::Regex::new(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)").unwrap();
    let env = regex::Regex::new(r"\[env: ([A-Z0-9_]+)=").unwrap();
    let flags = flag
        .captures_iter(&help)
        .map(|c| c[1].to_string())
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    let envs = env.captures_iter(&help).map(|c| c[1].to_string()).collect();
    (flags, envs)
}

/// The flags (first column) and environment variables (second column) of the flag table in
/// the README section `heading`, as written there in backticks.
fn from_readme(heading: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading}"));
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let ticked = regex::Regex::new(r"`([^`]+)`").unwrap();
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for row in section
        .lines()
        .filter(|l| l.starts_with("| `--") || l.starts_with("| `-"))
    {
        let cells: Vec<&str> = row.split('|').collect();
        let (Some(flag_cell), Some(env_cell)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        flags.extend(ticked.captures_iter(flag_cell).map(|c| c[1].to_string()));
        envs.extend(ticked.captures_iter(env_cell).map(|c| c[1].to_string()));
    }
    assert!(!flags.is_empty(), "no flag table under {heading}");
    (flags, envs)
}

fn compare(bin: &str, heading: &str) {
    let (help_flags, help_envs) = from_help(bin);
    let (readme_flags, readme_envs) = from_readme(heading);
    let missing: Vec<_> = help_flags.difference(&readme_flags).collect();
    let unknown: Vec<_> = readme_flags.difference(&help_flags).collect();
    let missing_env: Vec<_> = help_envs.difference(&readme_envs).collect();
    let unknown_env: Vec<_> = readme_envs.difference(&help_envs).collect();
    assert!(
        missing.is_empty()
            && unknown.is_empty()
            && missing_env.is_empty()
            && unknown_env.is_empty(),
        "README \"{heading}\" against {bin} --help:\n\
         flags missing from the README: {missing:?}\n\
         flags the README names that {bin} does not take: {unknown:?}\n\
         variables missing from the README: {missing_env:?}\n\
         variables the README names that {bin} does not read: {unknown_env:?}"
    );
}

#[test]
fn the_operator_flag_table_matches_its_help() {
    compare("ferry-operator", "Configuration");
}

#[test]
fn the_forwarder_flag_table_matches_its_help() {
    compare("ferry-forwarder", "Forwarder");
}
