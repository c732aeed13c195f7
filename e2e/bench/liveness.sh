#!/usr/bin/env bash
# The data plane when things go wrong: requests through an API outage, failover with the API
# up and down, how long a killed forwarder's VIP lingers. Root (network namespaces); writes
# docs/results.md.
# Usage: e2e/bench/liveness.sh [--failovers N] [--outage SECONDS] [--soak SECONDS] [--mode kernel|userspace]
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v wrk >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null
}

bash e2e/tools/build.sh
cargo build --locked -p ferry-operator -p ferry-forwarder -p ferry-e2e --bins

table="$(target/debug/ferry-bench-liveness "$@")"
echo "$table"

section="$(cat <<MD
<!-- liveness-bench:start -->
## Forwarder: liveness and fail-static

Command: \`e2e/bench/liveness.sh $*\` — $(date -u +%Y-%m-%d), $(nproc) cores, debug build.
Three node namespaces and a client on a bridge, the real control plane (API server stopped
with SIGSTOP for the outages), one forwarder per node, NodePort backends. A failover loses
the owner's node whole (its switch port and its processes), and is timed from then until the
client's next request through the VIP is answered. The soak runs full request load through
one VIP while Services are created and deleted without pause (the control plane busy, every
forwarder re-planning), and counts VIP moves, which must be none.

$table
<!-- liveness-bench:end -->
MD
)"
bash e2e/bench/write-results.sh liveness-bench "$section"
