#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for flowcni: OVS, network tools,
# container runtimes for the end-to-end tests, and the flowcni package.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")"
apt-get update -q
apt-get install -y -q --no-install-recommends \
  openvswitch-switch openvswitch-common iproute2 iputils-ping iputils-arping \
  tcpdump iperf3 ethtool procps kmod busybox-static containernetworking-plugins \
  podman containerd runc conmon util-linux nftables shellcheck ca-certificates >/dev/null
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -c "import flowcni.controller.agent, flowcni.cni.plugin" # installed and importable
