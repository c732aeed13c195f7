#!/usr/bin/env bash
# ferry on kind (needs Docker, kind, kubectl, helm and python3): builds the image, creates a three-node
# cluster, installs the chart with a pool carved from the end of kind's Docker network, and
# serves a small web Deployment through a LoadBalancer Service, reachable from this machine.
# Usage: e2e/kind/up.sh            (e2e/kind/down.sh removes the cluster)
set -euo pipefail
cd "$(dirname "$0")/../.."

for tool in docker kind kubectl helm python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required" >&2; exit 1; }
done

version="$(awk -F'"' '/^appVersion:/ {print $2}' helm/ferry/Chart.yaml)"
image="ferry:${version}"
echo "==> docker build -t ${image}"
docker build -t "${image}" .

if ! kind get clusters 2>/dev/null | grep -qx ferry; then
    kind create cluster --config e2e/kind/cluster.yaml
fi
kind load docker-image "${image}" --name ferry

# The last 16 addresses of kind's IPv4 subnet: outside the range Docker hands to containers
# as long as the network has fewer containers than that.
subnet="$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' \
    | tr ' ' '\n' | grep -m1 '\.')"
pool="$(python3 - "$subnet" <<'PY'
import ipaddress, sys
net = ipaddress.ip_network(sys.argv[1])
last = list(net.subnets(new_prefix=28))[-1]
print(last)
PY
)"
echo "==> pool ${pool} (from kind's network ${subnet})"

helm upgrade --install ferry helm/ferry -n ferry-system --create-namespace \
    --set image.tag="${version}" \
    --set "pools[0].name=kind" \
    --set "pools[0].addresses[0]=${pool}" \
    --set "pools[0].autoAssign=true" \
    --set "pools[0].avoidBuggyIPs=true" \
    --wait --timeout 3m

kubectl apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: { app: web }
  template:
    metadata:
      labels: { app: web }
    spec:
      containers:
        - name: web
          image: registry.k8s.io/e2e-test-images/agnhost:2.52
          args: ["netexec", "--http-port=8080"]
          ports: [{ containerPort: 8080 }]
YAML
kubectl apply -f examples/web.yaml
kubectl rollout status deployment/web --timeout 3m

echo "==> waiting for the Service's address"
for _ in $(seq 1 60); do
    ip="$(kubectl get svc web -o jsonpath='{.status.loadBalancer.ingress[0].ip}')"
    [[ -n "$ip" ]] && break
    sleep 1
done
[[ -n "${ip:-}" ]] || { echo "error: no address for Service web" >&2; kubectl describe svc web; exit 1; }
echo "==> curl http://${ip}/hostname"
for _ in $(seq 1 30); do
    if curl -sf --max-time 2 "http://${ip}/hostname"; then
        echo
        echo "ferry serves ${ip}. kubectl get svc,lbpool; e2e/kind/down.sh removes the cluster."
        exit 0
    fi
    sleep 1
done
echo "error: ${ip} does not answer" >&2
kubectl -n ferry-system logs -l app.kubernetes.io/component=forwarder --tail 20 >&2
exit 1
