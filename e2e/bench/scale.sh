#!/usr/bin/env bash
# The forwarder's data plane with 1,000 VIPs x 4 ports on one node, in each mode: time to apply
# single-Service changes, the process's RSS, and throughput / new connections through one VIP
# with one VIP and with all present; writes docs/results.md. Needs root, nft, iperf3.
# Drives the forwarder library's Kernel / Userspace directly (ferry-bench-scale), in a network
# namespace the bench makes for itself (gone when it exits).
# Usage: e2e/bench/scale.sh [--vips N] [--ports N] [--changes N] [--runs N] [--seconds N]
set -euo pipefail
cd "$(dirname "$0")/../.."

for pair in iperf3:iperf3 nft:nftables ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || {
        echo "==> apt-get install ${pair#*:}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pair#*:}" >/dev/null
    }
done

# The forwarder library optimised (what is timed is its code and nft), the rest as tests
# build it, so the shared debug cache is reused.
profile=(--config 'profile.dev.package.ferry-forwarder.opt-level=3'
    --config 'profile.dev.package.ferry-forwarder.debug-assertions=false'
    --config 'profile.dev.package.ferry-forwarder.overflow-checks=false')
cargo build --locked -p ferry-e2e --bin ferry-bench-scale "${profile[@]}"
bin="${CARGO_TARGET_DIR:-target}/debug/ferry-bench-scale"

rows=""
for mode in kernel userspace; do
    out="$(nice -n -5 "$bin" --mode "$mode" "$@")"
    echo "$out"
    rows+="$out"$'\n'
done

# A quarter of the VIPs, kernel mode: what a change costs should not depend on how many
# there are (skipped when the VIPs are given).
if [[ " $* " != *" --vips "* ]]; then
    out="$(nice -n -5 "$bin" --mode kernel "$@" --vips 250 | grep -v 'nftables DNAT by hand' |
        sed 's/^| kernel |/| kernel, 250 VIPs |/')"
    echo "$out"
    rows+="$out"$'\n'
fi

# A/B against an earlier build of the same bench (FERRY_SCALE_BEFORE=path, e.g. built from the
# previous commit): kernel mode with the same arguments, in the same invocation.
if [[ -n "${FERRY_SCALE_BEFORE:-}" ]]; then
    label="kernel, before"
    if out="$(nice -n -5 "$FERRY_SCALE_BEFORE" --mode kernel "$@" 2>/tmp/ferry-scale-before.err)"; then
        out="$(grep -v 'computing the transaction' <<<"$out" | sed "s/^| kernel |/| $label |/")"
    else
        out="| $label | failed | $(sed -n '/^Error/,/^Stack backtrace/p' /tmp/ferry-scale-before.err | grep -v '^Stack' | tr -s '\n ' ' ' | sed 's/|/\\|/g') |"
    fi
    echo "$out"
    rows+="$out"$'\n'
    rm -f /tmp/ferry-scale-before.err
fi

section="$(cat <<MD
<!-- scale-bench:start -->
## Forwarder: 1,000 VIPs × 4 ports on one node

Command: \`${FERRY_SCALE_BEFORE:+FERRY_SCALE_BEFORE=<the previous build> }e2e/bench/scale.sh $*\` — $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r),
$(nft --version). \`ferry-bench-scale\` drives the forwarder library's data plane (\`Kernel\`
or \`Userspace\`, as the forwarder's \`dataplane\` does) in a network namespace of its own,
with the VIPs on its loopback interface and two backends per frontend sharing a NodePort;
iperf3 and an accept-and-close server behind the measured VIP, clients in the same
namespace (so the steering runs in the output hook). Changes are to VIPs other than the
measured one, in rounds of: a port added, a Service's backends changed, a port removed, the
port added back; each timed from the call to its return (for kernel mode: finding what
changed, the transaction, and its run by libnftables and commit by the kernel). Traffic
figures are medians of the runs; new connections are opened and closed one at a time by one
client, through the last VIP (where a dispatch that scans the VIPs in order finds it last).
Rows "250 VIPs" are this build with a quarter of the VIPs. Rows "before" come from the
previous kernel mode (a chain and a named counter per frontend, each transaction run by the
\`nft\` program), built from the commit before these changes and run in the same invocation.

| mode | figure | value |
| --- | --- | --- |
${rows%$'\n'}
<!-- scale-bench:end -->
MD
)"

bash e2e/bench/write-results.sh scale-bench "$section"
