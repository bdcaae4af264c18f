#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for flowcni: OVS, network tools,
# container runtimes for the end-to-end tests (debian-packages.txt), and the
# flowcni package with its test tools. FLOWCNI_SKIP_APT=1 skips the Debian part
# (for callers that installed the list themselves, like .ci/run).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")"
if [ "${FLOWCNI_SKIP_APT:-0}" != 1 ]; then
  apt-get update -q
  xargs apt-get install -y -q --no-install-recommends < debian-packages.txt >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -c "import flowcni.controller.agent, flowcni.cni.plugin" # installed and importable
