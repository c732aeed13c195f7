#!/usr/bin/env bash
# The randomized fault harness, many runs; writes the summary into docs/results.md.
# Usage: e2e/bench/chaos.sh [--runs N] [--first-seed S] [--steps K]
set -euo pipefail
cd "$(dirname "$0")/../.."

bash e2e/tools/build.sh
cargo build --locked -p ferry-operator -p ferry-e2e --bins
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
target/debug/ferry-chaos "$@" | tee "$out" || status=$?
summary="$(grep '^#' "$out" | sed 's/^# /- /')"

section="$(cat <<MD
<!-- chaos:start -->
## Randomized faults: the invariants across many schedules

Command: \`e2e/bench/chaos.sh $*\` — $(date -u +%Y-%m-%d), $(nproc) cores, debug build.
Each run draws a schedule from its seed: Service creations (some asking for an address or
sharing one), port changes, deletions and class moves, node churn; SIGKILL and SIGTERM of
the tested instance's two replicas (also between an AWS call and its answer), drops,
outages, latency and black holes on one replica's API connection, AWS throttling and 5xx.
Beside it run a second ferry instance of another class and Services of a class nobody
serves; AWS runs also hold another cluster's balancer with the same \`--cluster-id\`. After the
schedule every fault is lifted and the invariants are checked once the system settles, and
again after everything is deleted; a watcher checks the address invariant at every update.

$summary
<!-- chaos:end -->
MD
)"
bash e2e/bench/write-results.sh chaos "$section"
exit "$status"
