#!/usr/bin/env bash
# Operator throughput and restart latency on a real kube-apiserver; writes docs/results.md.
# Usage: e2e/bench/services.sh [--services N] [--runs N] [--concurrency N]
set -euo pipefail
cd "$(dirname "$0")/../.."

bash e2e/tools/build.sh
cargo build --release --locked -p ferry-operator -p ferry-e2e --bins

table="$(target/release/ferry-bench-services "$@")"
echo "$table"

section="$(cat <<MD
<!-- services-bench:start -->
## Operator: many Services on a real kube-apiserver

Command: \`e2e/bench/services.sh $*\` — $(date -u +%Y-%m-%d), $(nproc) cores, release build.
Each run starts a fresh kube-apiserver and etcd, measures the floor (the same number of bare
status patches by the benchmark's own client, same concurrency), then the operator (a real
process with ferry's RBAC, local provider) turning freshly created Services into published
addresses; then SIGTERMs it, starts it again with all of them present and creates one more.

$table
<!-- services-bench:end -->
MD
)"

bash e2e/bench/write-results.sh services-bench "$section"
