#!/bin/sh
# Entry point of the flowcni DaemonSet's agent container: record the agent's
# pid where the node's plugin shim (cni-shim.sh) looks for it, then become
# the agent (exec keeps the pid). With hostPID, the pid is the node's.
set -eu
echo "$$" > /run/flowcni/agent.pid
exec flowcni-agent "$@"
