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

if ! need_cmd go; then
    echo "error: Go is required to build the test control plane (kube-apiserver, etcd, helm)" >&2
    exit 1
fi
if ! need_cmd kubectl; then
    echo "error: kubectl is required by the end-to-end tests" >&2
    exit 1
fi

# The forwarder's tests build a network-namespace cluster (as root) and use these tools.
missing=()
need_cmd ip || missing+=(iproute2)
need_cmd nft || missing+=(nftables)
need_cmd arping || missing+=(arping)
need_cmd curl || missing+=(curl)
# The monitoring tests check the chart's alerting rules with promtool.
need_cmd promtool || missing+=(prometheus)
if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then
        echo "error: installing ${missing[*]} needs root (the forwarder tests need root as well)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The AWS provider's tests run against moto's server (PyPI), started as `python3 -m moto.server`.
if ! need_cmd python3; then
    echo "error: python3 with pip is required for moto (the AWS tests' emulator)" >&2
    exit 1
fi
MOTO_VERSION=5.2.5
if ! python3 -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    echo "==> pip install moto[server]==$MOTO_VERSION"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "moto[server]==$MOTO_VERSION" \
        || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "moto[server]==$MOTO_VERSION"
fi

# The GCE fake is checked against the compute v1 discovery document shipped in PyPI's
# google-api-python-client, whose discovery-based client also drives it in a contract test.
GAPI_VERSION=2.202.0
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('google-api-python-client') != '$GAPI_VERSION')" 2>/dev/null; then
    echo "==> pip install google-api-python-client==$GAPI_VERSION"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "google-api-python-client==$GAPI_VERSION" \
        || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "google-api-python-client==$GAPI_VERSION"
fi

# The real kube-apiserver, etcd and helm, built from their Go modules (a no-op when current).
echo "==> e2e/tools/build.sh"
tools_start=$(date +%s)
bash e2e/tools/build.sh
echo "    test tools ready in $(( $(date +%s) - tools_start ))s"

# The end-to-end tests run the operator and the sandbox as processes. Built with every target
# (--all-targets) so that the features the tests' dependencies switch on (tokio's test-util) are
# unified once: `cargo test` below then reuses this build instead of compiling tokio and
# everything above it a second time.
echo "==> cargo build --workspace --all-targets --locked"
cargo build --workspace --all-targets --locked

# The data plane and the CLI carry no cloud: nothing in their builds is a cloud SDK (they
# depend on ferry-model, never on ferry-providers).
for crate in ferry-forwarder ferry-cli; do
    echo "==> cargo tree -p $crate: no cloud SDK"
    if cloud=$(cargo tree --locked -p "$crate" --all-features -e normal,build --prefix none --format '{p}' \
        | grep -E '^(ferry-providers|aws-|google-cloud-|gcp-)' | sort -u) && [ -n "$cloud" ]; then
        echo "error: $crate depends on cloud crates:" >&2
        echo "$cloud" >&2
        exit 1
    fi
done

echo "==> cargo test --workspace --locked"
cargo test --workspace --locked
