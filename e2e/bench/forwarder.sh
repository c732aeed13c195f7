#!/usr/bin/env bash
# The forwarder's data plane against direct, nftables by hand, HAProxy, nginx stream and socat,
# and VIP failover time, on network namespaces; writes docs/results.md. Needs root.
# Usage: e2e/bench/forwarder.sh [--runs N] [--seconds N] [--slices N] [--failovers N]
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
for pair in iperf3:iperf3 wrk:wrk haproxy:haproxy nginx:nginx-light socat:socat nft:nftables \
    arping:arping curl:curl ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash e2e/tools/build.sh
cargo build --release --locked -p ferry-operator -p ferry-forwarder -p ferry-e2e --bins

table="$(target/release/ferry-bench-forwarder "$@")"
echo "$table"

section="$(cat <<MD
<!-- forwarder-bench:start -->
## Forwarder: data plane and failover on network namespaces

Command: \`e2e/bench/forwarder.sh $*\` — $(date -u +%Y-%m-%d), $(nproc) cores, release build,
$(uname -r). A client namespace and a node namespace on a bridge (its own namespace); the
backends (iperf3, and nginx with one worker answering a 3-byte body) listen on the node's
NodePorts; every path forwards to them on the node itself. HAProxy $(haproxy -v | head -1 | awk '{print $3}')
(TCP mode, 2 threads), nginx $(nginx -v 2>&1 | sed 's|.*/||') stream (auto workers), socat (fork),
ferry-forwarder (one data-plane thread per core, each pinned to its CPU and taking that
CPU's connections) driven by the real control plane and
operator; the forwarder runs through every path, as its DaemonSet would, so its heartbeats
load the control plane during every measurement alike. All paths in one run, medians of the
runs; wrk: 2 threads, 32 connections. Within a run each figure is measured in slices of 1 s,
the paths compared with each other taking turns (direct, ferry kernel and nftables by hand
with the forwarder in kernel mode; HAProxy, ferry userspace, the floor proxy (threads placed
as the forwarder's), the same floor proxy with its threads left to the scheduler, nginx and
socat with it in userspace mode), each round starting one path further on; a path's figure is the
mean of its slices. conntrack's TIME_WAIT timeout in the node namespace is 1 s and each
new-connection slice waits 1.5 s first, so no path inherits the previous one's closed
connections; the paths that reach the backend from the client's own address (direct, nftables
by hand, ferry kernel) each reach it on a port of their own, so none meets the TIME_WAIT
sockets another left there. Proxy CPU is the process's user + system time (all threads, from
/proc) over its wrk slices, divided by the requests or connections wrk completed.

$table
<!-- forwarder-bench:end -->
MD
)"

bash e2e/bench/write-results.sh forwarder-bench "$section"
