#!/usr/bin/env bash
# Delete the kind cluster made by up.sh (CLUSTER=flowcni by default).
set -euo pipefail
CLUSTER=${CLUSTER:-flowcni}
if kind get clusters | grep -qx "$CLUSTER"; then
    kind delete cluster --name "$CLUSTER"
else
    echo "no kind cluster named $CLUSTER"
fi
