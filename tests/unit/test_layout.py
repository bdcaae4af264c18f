"""The package graph: product code never imports the lab, and the API schema is stdlib only.

A static scan (ast) of every module, so an import hidden in a function body
counts as much as one at the top.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("api", "controller", "datastore", "ctl", "flows", "cni", "ovsdb")


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
    return out


def offenders(packages: tuple[str, ...], bad: object) -> list[str]:
    found = []
    for pkg in packages:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for line, mod in imports(f):
                if callable(bad) and bad(mod):
                    found.append(f"{f.relative_to(ROOT)}:{line}: imports {mod}")
    return found


def test_product_code_never_imports_the_lab() -> None:
    assert offenders(PRODUCT, lambda m: m == "flowcni.lab" or m.startswith(
        ("flowcni.lab.", "lab.", "tests."))) == []


def test_the_scan_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from flowcni.lab.lab import Lab\n    return Lab\n")
    assert imports(f) == [(2, "flowcni.lab.lab")]


def test_api_schema_is_stdlib_only() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found = offenders(("api",), lambda m: m.split(".")[0] not in stdlib)
    assert found == []


def test_agent_does_not_import_the_cli() -> None:
    assert offenders(("controller", "datastore", "flows", "cni", "ovsdb"),
                     lambda m: m.startswith("flowcni.ctl")) == []


def test_agent_does_not_import_the_kubernetes_package() -> None:
    """Its models and dependencies cost the agent about 60 MB of RSS; the agent's own
    client (datastore.kubeapi) speaks the little HTTP it needs. ctl may use it (pod exec)."""
    assert offenders(("controller", "datastore", "flows", "cni", "ovsdb"),
                     lambda m: m.split(".")[0] in ("kubernetes", "urllib3")) == []
