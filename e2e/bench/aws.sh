#!/usr/bin/env bash
# AWS API calls per node change (ferry vs re-ensuring every balancer), against moto; writes
# docs/results.md. Usage: e2e/bench/aws.sh [--services N] [--nodes N] [--change N] [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/../.."

python3 -c "import moto" 2>/dev/null || python3 -m pip install --quiet "moto[server]==5.2.5"
bash e2e/tools/build.sh
cargo build --release --locked -p ferry-operator -p ferry-e2e --bins

table="$(target/release/ferry-bench-aws "$@")"
echo "$table"

section="$(cat <<MD
<!-- aws-bench:start -->
## AWS: API calls per node change

Command: \`e2e/bench/aws.sh $*\` — $(date -u +%Y-%m-%d), $(nproc) cores, release build, moto 5.2.5.
The operator (a real process, \`--provider aws\`) runs against moto through a proxy that counts
every request. Each node change is measured twice in the same run: ferry's operator reacting by
itself, and the naive pattern (the same provider's \`ensure\` of every balancer, as controllers
that re-sync all balancers on a node change do) while the operator is stopped. Targets: at most
2 registration calls per changed target group per batch, and at most 3 calls per target group
touched in all.

$table
<!-- aws-bench:end -->
MD
)"

bash e2e/bench/write-results.sh aws-bench "$section"
