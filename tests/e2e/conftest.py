"""End-to-end jobs on a stock Debian 12 made with debootstrap (marked, not run by default)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import debian_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def debian12(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(root directory, tar of it taken before any test changed it), made once."""
    if os.geteuid() != 0:
        pytest.skip("debootstrap and chroot need root")
    assert shutil.which("debootstrap"), "debootstrap missing (debian-packages.txt installs it)"
    base = tmp_path_factory.mktemp("debian12")
    root = str(base / "root")
    debian_root.debootstrap(root)
    tar = debian_root.tarball(root, str(base / "root.tar"))
    yield root, tar
    shutil.rmtree(base, ignore_errors=True)
