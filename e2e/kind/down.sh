#!/usr/bin/env bash
# Removes the kind cluster e2e/kind/up.sh created.
set -euo pipefail
kind delete cluster --name ferry
