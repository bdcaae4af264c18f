"""Fixtures for datapath tests: a real lab (netns + OVS + agent) torn down even on failure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flowcni.lab.lab import Lab


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "datapath tests need root"
    for tool in ("ovs-vswitchd", "ovsdb-server", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = _why_not()
    for item in items:
        if "datapath" in str(item.fspath):
            item.add_marker(pytest.mark.datapath)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


def make_lab(tag: str, **kwargs: Any) -> Lab:
    """A lab with its own state dir and netns prefix, so tests never touch a user's lab.

    FLOWCNI_TEST_PREFIX (default "fct") separates concurrent test runs on one machine
    (two checkouts): pick values neither of which starts with the other."""
    run = os.environ.get("FLOWCNI_TEST_PREFIX", "fct")
    return Lab(base=f"/run/flowcni-test-{run}-{tag}", prefix=f"{run}{tag}-", **kwargs)


Pods = Iterable[tuple[str, str, dict[str, str]]]


@contextmanager
def running_lab(tag: str, nodes: int = 1, encap: str = "geneve", pods: Pods = (),
                proxy: str = "flowcni") -> Iterator[Lab]:
    """A lab with pods (name, node, labels) for the block; torn down even on failure,
    and leftovers of a crashed earlier run are removed first."""
    lab = make_lab(tag)
    lab.down()
    try:
        lab.up(nodes=nodes, encap=encap, proxy=proxy)
        for name, node, labels in pods:
            lab.pod_add(name, node, labels=labels)
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab1(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One node, three pods."""
    tag = request.module.__name__.rsplit(".", 1)[-1][-6:].replace("_", "")
    with running_lab(tag, pods=[(n, "node1", {}) for n in ("a", "b", "c")]) as lab:
        yield lab
