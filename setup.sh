#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for flowcni: OVS, network tools,
# container runtimes for the end-to-end tests (debian-packages.txt), then
# flowcni with its dependencies and test tools in a virtual environment of
# its own, made with Debian's python3 (python3-venv), and its commands linked
# onto PATH.
#
# Debian's python3 is "externally managed" (PEP 668) and has no pip, and a
# machine may have another Python first on PATH: a venv made from
# /usr/bin/python3 keeps flowcni's dependencies out of both. The install is
# editable (this checkout's code runs), so re-run setup.sh after moving the
# checkout; an installed CNI plugin (`flowctl install-cni`) holds its own
# code and does not care.
#
# FLOWCNI_SKIP_APT=1 skips the Debian part (for callers that installed the
# list themselves, like .ci/run). FLOWCNI_VENV (default /opt/flowcni/venv)
# and FLOWCNI_BIN_DIR (default /usr/local/bin) move the install;
# FLOWCNI_PYTHON picks the interpreter the venv is made from.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")"
venv=${FLOWCNI_VENV:-/opt/flowcni/venv}
bin_dir=${FLOWCNI_BIN_DIR:-/usr/local/bin}
python=${FLOWCNI_PYTHON:-/usr/bin/python3}

if [ "${FLOWCNI_SKIP_APT:-0}" != 1 ]; then
  apt-get update -q
  xargs apt-get install -y -q --no-install-recommends < debian-packages.txt >/dev/null
fi

# A venv from another interpreter (or a half-made one) is made again.
if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.base_prefix != sys.argv[1])' \
    "$("$python" -c 'import sys; print(sys.base_prefix)')" 2>/dev/null; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
mkdir -p "$bin_dir"
for cmd in flowctl flowcni-agent flowcni; do
  ln -sfn "$venv/bin/$cmd" "$bin_dir/$cmd"
done
# Installed and importable, each command starts.
"$venv/bin/python" -c "import flowcni.controller.agent, flowcni.cni.plugin, pytest"
for cmd in flowctl flowcni-agent; do
  "$bin_dir/$cmd" --help >/dev/null
done
echo "flowcni installed in $venv; $bin_dir/{flowctl,flowcni-agent,flowcni};" \
     "tests: $venv/bin/python -m pytest -q"
