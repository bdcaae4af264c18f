#!/usr/bin/env bash
# A kind cluster running flowcni as its CNI, checked end to end:
#   kind-config/up.sh        (CLUSTER=flowcni IMAGE=flowcni:dev by default)
# Creates the cluster (or reuses it), builds and loads the image, deploys
# flowcni, waits for every agent and node to be ready, then proves that a
# pod on one worker reaches a pod on the other (ping and HTTP).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
CLUSTER=${CLUSTER:-flowcni}
IMAGE=${IMAGE:-flowcni:dev}
TEST_IMAGE=${TEST_IMAGE:-busybox:1.36}
CTX="kind-$CLUSTER"
kc() { kubectl --context "$CTX" "$@"; }

for tool in kind kubectl docker; do
    command -v "$tool" >/dev/null || { echo "up.sh: $tool is not installed" >&2; exit 1; }
done

if kind get clusters | grep -qx "$CLUSTER"; then
    echo "== reusing kind cluster $CLUSTER"
else
    echo "== creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config "$here/cluster.yaml"
fi

echo "== building $IMAGE"
docker build -t "$IMAGE" -f "$here/Dockerfile" "$repo"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# The upstream cluster policy CRDs (policy.networking.k8s.io: AdminNetworkPolicy and
# BaselineAdminNetworkPolicy v1alpha1, ClusterNetworkPolicy v1alpha2), referenced, not
# copied: set NETPOL_API_CRDS to your release's install manifest(s), or to "" to skip
# (the agent treats CRDs that are not installed as "no such policies").
NETPOL_API_CRDS=${NETPOL_API_CRDS-https://raw.githubusercontent.com/kubernetes-sigs/network-policy-api/main/config/crd/standard/policy.networking.k8s.io_adminnetworkpolicies.yaml https://raw.githubusercontent.com/kubernetes-sigs/network-policy-api/main/config/crd/standard/policy.networking.k8s.io_baselineadminnetworkpolicies.yaml https://raw.githubusercontent.com/kubernetes-sigs/network-policy-api/main/config/crd/standard/policy.networking.k8s.io_clusternetworkpolicies.yaml}
for crd in $NETPOL_API_CRDS; do
    echo "== cluster policy CRD $crd"
    kc apply -f "$crd"
done

echo "== deploying flowcni"
existed=$(kc -n flowcni-system get daemonset flowcni-agent -o name 2>/dev/null || true)
kc apply -f "$here/tenantnetwork-crd.yaml"  # optional: agents run without it
sed "s#image: flowcni:dev#image: $IMAGE#" "$here/flowcni.yaml" | kc apply -f -
if [ -n "$existed" ]; then
    kc -n flowcni-system rollout restart daemonset/flowcni-agent  # run the image just loaded
fi
kc -n flowcni-system rollout status daemonset/flowcni-agent --timeout=300s
kc wait --for=condition=Ready nodes --all --timeout=300s

echo "== cross-node check"
workers=()
while IFS= read -r w; do workers+=("$w"); done < <(
    kc get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sed 's#^node/##')
if [ "${#workers[@]}" -lt 2 ]; then
    echo "up.sh: need two worker nodes, found ${#workers[@]}" >&2
    exit 1
fi
kc delete namespace flowcni-check --ignore-not-found --wait=true
kc create namespace flowcni-check
for i in 0 1; do
    kc apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: check-$i
  namespace: flowcni-check
  labels: {app: flowcni-check}
spec:
  nodeName: ${workers[$i]}
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: $TEST_IMAGE
      command: [sh, -c, "mkdir -p /www && echo flowcni-ok > /www/index.html && exec httpd -f -p 8080 -h /www"]
      ports: [{name: http, containerPort: 8080}]
YAML
done
kc -n flowcni-check wait --for=condition=Ready pod/check-0 pod/check-1 --timeout=180s
ip1=$(kc -n flowcni-check get pod check-1 -o jsonpath='{.status.podIP}')
echo "check-0 on ${workers[0]} -> check-1 ($ip1) on ${workers[1]}"
kc -n flowcni-check exec check-0 -- ping -c 3 -W 2 "$ip1"
reply=$(kc -n flowcni-check exec check-0 -- wget -qO- -T 5 "http://$ip1:8080/")
if [ "$reply" != "flowcni-ok" ]; then
    echo "up.sh: HTTP across nodes answered '$reply'" >&2
    exit 1
fi
kc delete namespace flowcni-check --wait=false
echo "== flowcni is up on kind cluster $CLUSTER (kubectl context $CTX)"
