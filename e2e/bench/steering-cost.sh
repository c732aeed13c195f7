#!/usr/bin/env bash
# What nftables costs a new connection in kernel mode: ferry's table against DNAT by hand.
# Runs the forwarder bench on those two paths (one slice per measurement) and records the
# whole machine with `perf record -a -g` during each new-connection measurement; prints, per
# run and path, the CPU time spent under nft_do_chain (every chain of every table, inclusive)
# per new connection, and the medians; then what that time is spent on: per hook kind (NAT
# chains, which see a connection's first packet, or filter chains, which see every packet)
# and per expression nft_do_chain calls (rules it evaluates inline, such as comparisons and
# jumps, count as the chain's own). Needs root and the forwarder bench's tools
# (e2e/bench/forwarder.sh installs them). Figures carry perf's own overhead: compare paths
# and variants measured in one run, not against other tools.
# Usage: e2e/bench/steering-cost.sh [--runs N] [--hand-rules FILE]
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v perf >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
}
bash e2e/tools/build.sh
cargo build --release --locked -p ferry-operator -p ferry-forwarder -p ferry-e2e --bins

runs=3
bench_args=()
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --hand-rules) bench_args+=(--hand-rules "$2"); shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

out="$(mktemp -d)"
trap 'kill "$watcher" 2>/dev/null || true; rm -rf "$out"' EXIT
# One perf record per new-connection measurement (wrk with Connection: close), tagged with
# the path it measures by its address (10.213.0.150 is "by hand").
(
    i=0
    while true; do
        line="$(pgrep -af 'wrk.*Connection: close' | head -1 || true)"
        if [[ -n "$line" ]]; then
            i=$((i + 1))
            if [[ "$line" == *10.213.0.150* ]]; then tag=hand; else tag=kernel; fi
            echo "$i $tag" >>"$out/tags"
            sleep 0.5
            perf record -q -a -g -F 1999 -o "$out/$i.data" -- sleep 4 >/dev/null 2>&1 || true
            while pgrep -f 'wrk.*Connection: close' >/dev/null; do sleep 0.2; done
        fi
        sleep 0.1
    done
) &
watcher=$!

target/release/ferry-bench-forwarder --only ferry-kernel,nftables-dnat --runs "$runs" \
    --seconds 6 --slices 1 --failovers 0 "${bench_args[@]}" >"$out/bench.txt" 2>&1 ||
    { cat "$out/bench.txt" >&2; exit 1; }
grep '^run ' "$out/bench.txt" >&2 || true

python3 - "$out" <<'PY'
import re, statistics, subprocess, sys

out = sys.argv[1]
bench = open(f"{out}/bench.txt").read()
rates = {
    "kernel": [int(x) for x in re.findall(r"ferry kernel .* (\d+) conn/s", bench)],
    "hand": [int(x) for x in re.findall(r"nftables DNAT .* (\d+) conn/s", bench)],
}
cost = {"kernel": [], "hand": []}
parts = {"kernel": [], "hand": []}
cpus = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)


def spent_on(data, rate):
    """µs per new connection by (hook kind, what nft_do_chain called), from the call stacks."""
    script = subprocess.run(
        ["perf", "script", "-i", data, "-F", "ip,sym"], capture_output=True, text=True
    ).stdout
    counts, samples = {}, 0
    for stack in script.split("\n\n"):
        frames = [f.split(None, 1)[-1] for f in stack.strip().splitlines()]
        if not frames:
            continue
        samples += 1
        if "nft_do_chain" not in frames:
            continue
        at = frames.index("nft_do_chain")
        callee = frames[at - 1] if at > 0 else "the chain's own rules"
        kind = "NAT" if "nft_nat_do_chain" in frames[at:] else "filter"
        counts[(kind, callee)] = counts.get((kind, callee), 0) + 1
    return {k: c / max(samples, 1) * cpus / rate * 1e6 for k, c in counts.items()}


for line in open(f"{out}/tags"):
    i, tag = line.split()
    n = len(cost[tag])
    if n >= len(rates[tag]):
        continue
    parts[tag].append(spent_on(f"{out}/{i}.data", rates[tag][n]))
    report = subprocess.run(
        ["perf", "report", "-i", f"{out}/{i}.data", "--children", "--sort", "sym", "-q", "-g", "none"],
        capture_output=True, text=True,
    ).stdout
    share = sum(float(m.group(1)) for m in re.finditer(r"^\s*([\d.]+)%\s+[\d.]+%\s+\[k\] nft_do_chain$", report, re.M))
    cost[tag].append(share / 100 * cpus / rates[tag][n] * 1e6)
print("| path | µs under nft_do_chain per new connection, median | runs | new connections/s |")
print("| --- | --- | --- | --- |")
for tag, name in [("kernel", "ferry kernel"), ("hand", "nftables by hand")]:
    runs = cost[tag]
    median = f"{statistics.median(runs):.2f}" if runs else "—"
    print(f"| {name} | {median} | {', '.join(f'{c:.2f}' for c in runs)} | {', '.join(map(str, rates[tag]))} |")

keys = {k for tag in parts for run in parts[tag] for k in run}
median = {
    tag: {k: statistics.median(run.get(k, 0.0) for run in parts[tag]) for k in keys}
    for tag in parts if parts[tag]
}
print()
print("| chains | spent on | ferry kernel, µs per new connection (median) | nftables by hand |")
print("| --- | --- | --- | --- |")
for kind, callee in sorted(keys, key=lambda k: -median.get("kernel", {}).get(k, 0.0)):
    cells = [f"{median[t][(kind, callee)]:.2f}" if t in median else "—" for t in ("kernel", "hand")]
    if max(float(c) for c in cells if c != "—") >= 0.01:
        print(f"| {kind} | {callee} | {cells[0]} | {cells[1]} |")
PY
