"""setup.sh's Python part on a stock Debian 12 root filesystem (debootstrap, chroot).

Stock means: Debian's python3 marked externally managed (PEP 668), no pip, no
compiler, no pip configuration, nothing but python3-venv and CA certificates
added. The checkout's files are copied in as a clone would have them; then
setup.sh (apt part skipped: only Python is under test here) must make the
venv, link the commands onto PATH and have them start, and the plugin that
`flowctl install-cni` writes must keep working once the checkout and the venv
are gone.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.conftest import REPO
from tests.support import debian_root

pytestmark = pytest.mark.install

CHECKS = r"""
test -f /usr/lib/python3.11/EXTERNALLY-MANAGED          # stock Debian python3
if /usr/bin/python3 -m pip --version; then exit 10; fi  # without pip
if command -v gcc; then exit 11; fi                     # and without a compiler
cd /src && FLOWCNI_SKIP_APT=1 bash setup.sh
for cmd in flowctl flowcni-agent flowcni; do
  test "$(readlink "/usr/local/bin/$cmd")" = "/opt/flowcni/venv/bin/$cmd"
done
flowctl --help | head -1
flowcni-agent --help | head -1
CNI_COMMAND=VERSION flowcni > /tmp/version-entry-point.json
/opt/flowcni/venv/bin/python -m pytest --version
flowctl install-cni --dest /opt/cni/bin
rm -rf /src /opt/flowcni/venv                            # checkout and venv gone
CNI_COMMAND=VERSION /opt/cni/bin/flowcni < /dev/null
"""


def test_setup_on_stock_debian12(debian12: tuple[str, str]) -> None:
    root, _ = debian12
    files = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True,
                           text=True, check=True).stdout.split()
    debian_root.copy_in(root, files, str(REPO), "/src")
    p = debian_root.chroot_run(root, CHECKS)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    lines = p.stdout.splitlines()
    assert any(line.startswith("usage: flowctl ") for line in lines), lines
    assert any(line.startswith("usage: flowcni-agent ") for line in lines), lines
    assert any(line.startswith("pytest ") for line in lines), lines
    with open(f"{root}/tmp/version-entry-point.json") as f:
        assert json.load(f)["cniVersion"] == "1.1.0"
    version = json.loads(p.stdout[p.stdout.rindex('{\n  "cniVersion"'):])
    assert version["cniVersion"] == "1.1.0" and "1.0.0" in version["supportedVersions"]
