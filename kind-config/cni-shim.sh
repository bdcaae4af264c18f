#!/bin/sh
# flowcni CNI plugin as installed on a node: /opt/cni/bin/flowcni.
#
# The real plugin is Python, and a node (a kind node, most cloud images) may
# have no Python at all; the flowcni agent's container has it. So the runtime
# runs this POSIX shim, which enters the agent container's mount namespace
# and runs the plugin launcher there, with the same environment, stdin and
# stdout, so the CNI conversation is untouched. The network namespace stays
# the node's (the pod has host networking), which is what a plugin needs.
# The agent container records its pid (the node's pid namespace: hostPID) at
# start. Overrides for tests only: FLOWCNI_AGENT_PIDFILE, FLOWCNI_PLUGIN.
pidfile=${FLOWCNI_AGENT_PIDFILE:-/run/flowcni/agent.pid}
plugin=${FLOWCNI_PLUGIN:-/opt/flowcni/cni/flowcni}

fail() {
    # A CNI error object; 11 = "try again later", since the agent is restarting.
    printf '{"cniVersion":"1.0.0","code":11,"msg":"%s"}\n' "$1"
    exit 1
}

pid=$(cat "$pidfile" 2>/dev/null) || fail "flowcni agent not running on this node (no $pidfile)"
case $pid in
    '' | *[!0-9]*) fail "flowcni agent pid file $pidfile is not a pid" ;;
esac
# A stale pid (agent gone, pid reused) is caught here: the plugin must exist
# in that process's root.
[ -x "/proc/$pid/root$plugin" ] || fail "flowcni agent (pid $pid) is not running"
exec nsenter --target "$pid" --mount -- "$plugin" "$@"
