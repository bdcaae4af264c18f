#!/bin/bash
# Open vSwitch for the flowcni DaemonSet: ovsdb-server and ovs-vswitchd on
# the node's network (hostNetwork), their database under /etc/openvswitch
# and their sockets under /var/run/openvswitch (both host paths, so the agent
# container reaches them and a restart keeps bridges and ports).
#
# The kernel datapath needs the openvswitch module from the host's
# /lib/modules; where it cannot be loaded (some kind hosts), ovs-vswitchd
# still runs and the agent picks the userspace (netdev) datapath, since it
# chooses by whether /sys/module/openvswitch exists.
#
# The daemons detach; this script stays in the foreground, exits non-zero
# if one of them dies (so kubelet restarts the container) and stops both on
# SIGTERM.
set -euo pipefail

OVS_CTL=/usr/share/openvswitch/scripts/ovs-ctl
OVS_RUNDIR=/var/run/openvswitch

# shellcheck disable=SC2317  # reached through the trap
stop() {
    "$OVS_CTL" stop || true
    exit 0
}
trap stop TERM INT

"$OVS_CTL" --no-ovs-vswitchd --system-id=random start
if modprobe openvswitch 2>/dev/null || [ -d /sys/module/openvswitch ]; then
    "$OVS_CTL" --no-ovsdb-server start
else
    echo "ovs-start: no openvswitch kernel module; userspace datapath only" >&2
    ovs-vswitchd "unix:$OVS_RUNDIR/db.sock" --pidfile --detach --log-file
fi

while ovs-appctl -t ovsdb-server version >/dev/null &&
    ovs-appctl -t ovs-vswitchd version >/dev/null; do
    sleep 5 &
    wait $!
done
echo "ovs-start: an Open vSwitch daemon has died" >&2
exit 1
