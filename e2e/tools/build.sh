#!/usr/bin/env bash
# Builds the real e2e test tools (kube-apiserver, etcd, helm) from the versions
# pinned in go.mod/go.sum next to this script, into e2e/tools/bin/ (or
# $FERRY_TOOLS_BIN). A stamp file records a hash of go.mod, go.sum and this
# script; while that hash is unchanged and the binaries exist, a re-run does
# nothing. Needs only Go and the Go module proxy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${FERRY_TOOLS_BIN:-$here/bin}"
tools=(kube-apiserver etcd helm)
stamp="$bin/.stamp"

want="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -f "$stamp" && "$(<"$stamp")" == "$want" ]] || return 1
  local t
  for t in "${tools[@]}"; do [[ -x "$bin/$t" ]] || return 1; done
}

up_to_date && exit 0

mkdir -p "$bin"
# Serialise concurrent runs (e.g. parallel test processes); re-check after the lock.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$bin/.lock"
  flock 9
  up_to_date && exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build.sh: 'go' not found in PATH" >&2; exit 1; }

cd "$here"
export GOWORK=off CGO_ENABLED=0
# -mod=readonly: go.sum is complete, so a fresh clone only downloads; never edits go.mod.
goflags=(-mod=readonly -trimpath -buildvcs=false)

vers="$(go list "${goflags[@]}" -m -f '{{with .Replace}}{{.Version}}{{else}}{{.Version}}{{end}}' \
  k8s.io/kubernetes helm.sh/helm/v3 go.etcd.io/etcd/server/v3 k8s.io/client-go)"
read -r k8s_ver helm_ver etcd_ver client_go_ver <<<"${vers//$'\n'/ }"
# client-go v0.36.3 -> Kubernetes 1.36 (what `helm template` assumes without a cluster).
IFS=. read -r cg_major cg_minor _ <<<"${client_go_ver#v}"
k8s_major="${k8s_ver#v}"; k8s_major="${k8s_major%%.*}"
k8s_minor="${k8s_ver#v*.}"; k8s_minor="${k8s_minor%%.*}"

tmp="$(mktemp -d "$bin/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

build() { # name version package ldflags...
  local name="$1" ver="$2" pkg="$3"; shift 3
  echo "build.sh: building $name $ver ($pkg)"
  # Hide the (many) "go: downloading" lines of a cold module cache; keep everything else.
  local rc=0
  go build "${goflags[@]}" -ldflags "-s -w $*" -o "$tmp/$name" "$pkg" 2>"$tmp/$name.log" || rc=$?
  grep -v '^go: downloading ' "$tmp/$name.log" >&2 || true
  if ((rc != 0)); then echo "build.sh: building $name failed (go build exit $rc)" >&2; exit "$rc"; fi
}

kv=()
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kv+=("-X $p.gitVersion=$k8s_ver" "-X $p.gitMajor=$k8s_major" "-X $p.gitMinor=$k8s_minor"
       "-X $p.gitTreeState=clean" "-X $p.gitCommit=0000000000000000000000000000000000000000"
       "-X $p.buildDate=1970-01-01T00:00:00Z")
done
build kube-apiserver "$k8s_ver" k8s.io/kubernetes/cmd/kube-apiserver "${kv[*]}"
build etcd "$etcd_ver" go.etcd.io/etcd/server/v3
build helm "$helm_ver" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$helm_ver" \
  "-X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$((cg_major + 1))" \
  "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$cg_minor"

for t in "${tools[@]}"; do mv -f "$tmp/$t" "$bin/$t"; done
echo "$want" >"$stamp"
