#!/usr/bin/env bash
# ferry's one test command: installs what the tests need on a fresh machine (idempotent,
# quick when already there), then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")"

need_cmd() { command -v "$1" >/dev/null 2>&1; }

if ! need_cmd cargo; then
    echo "error: cargo is required (https://rustup.rs)" >&2
    exit 1
fi

echo "==> cargo test --workspace --locked"
cargo test --workspace --locked
