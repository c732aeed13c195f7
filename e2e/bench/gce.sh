#!/usr/bin/env bash
# Compute Engine API calls per node change (ferry vs re-ensuring every balancer), against the
# Compute Engine fake; writes docs/results.md. Usage: e2e/bench/gce.sh [--services N] [--nodes N] [--change N] [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/../.."

bash e2e/tools/build.sh
cargo build --release --locked -p ferry-operator -p ferry-e2e --bins

table="$(target/release/ferry-bench-gce "$@")"
echo "$table"

section="$(cat <<MD
<!-- gce-bench:start -->
## GCE: API calls per node change

Command: \`e2e/bench/gce.sh $*\` — $(date -u +%Y-%m-%d), $(nproc) cores, release build.
The operator (a real process, \`--provider gce\`, google-cloud-compute-v1) runs against the
Compute Engine fake, which counts every request; each write's Operation is DONE at its first
poll, so a write costs its poll as well. Each node change is measured twice in the same run:
ferry's operator reacting by itself, and the naive pattern (the same provider's \`ensure\` of
every balancer) while the operator is stopped. Target: one \`addInstance\` or
\`removeInstance\` per pool per batch and no read storm (at most 2 calls per pool touched).

$table
<!-- gce-bench:end -->
MD
)"

bash e2e/bench/write-results.sh gce-bench "$section"
