"""Install the `flowcni` plugin executable as a self-contained launcher.

A runtime starts the plugin once per CNI call, so start-up is most of its
latency. The launcher runs `python3 -IS` (one shebang argument: no
site-packages scan, ~10 ms instead of ~40 ms) and holds the stdlib-only
plugin modules itself, as code objects compiled at install time (marshal,
base64 text), so it needs neither this checkout nor the virtual environment
flowcni runs from: moving or removing either leaves an installed plugin
working. Compiled code saves the ~8 ms that compiling the source on every
call would cost; it is only valid for the interpreter version that wrote it,
so the launcher names the base interpreter of the installing one in its
shebang and checks the version before loading (a mismatch is a CNI error
that says to reinstall, never a crash).
"""

from __future__ import annotations

import ast
import binascii
import marshal
import os
import sys

#: The module the launcher runs; its flowcni.cni imports are embedded too.
ENTRY = "plugin"
PACKAGE = "flowcni.cni"

TEMPLATE = """#!{python} -IS
# flowcni CNI plugin launcher, written by `flowctl install-cni`; holds {modules}.
# Self-contained: the modules below are compiled for {tag}; re-run install-cni
# after changing the interpreter.
import sys, marshal, binascii
if sys.implementation.cache_tag != {tag!r}:
    sys.stdout.write('{{"cniVersion":"1.0.0","code":50,"msg":"flowcni launcher built for '
                     '{tag}, run by ' + str(sys.implementation.cache_tag) +
                     ': re-run flowctl install-cni"}}\\n')
    sys.exit(1)
_T = type(sys)
_ns = _T("flowcni"); _ns.__path__ = []; sys.modules["flowcni"] = _ns
_pkg = _T({package!r}); _pkg.__path__ = []; sys.modules[{package!r}] = _pkg
_CODE = \"\"\"
{blob}
\"\"\"
for _name, _code in marshal.loads(binascii.a2b_base64(_CODE)):
    _mod = _T({package!r} + "." + _name)
    sys.modules[_mod.__name__] = _mod
    exec(_code, _mod.__dict__)
    setattr(_pkg, _name, _mod)
sys.exit(sys.modules[{package!r} + ".{entry}"].main())
"""


def base_python(executable: str | None = None) -> str:
    """The interpreter a virtual environment was made from (itself outside one).

    The plugin is stdlib-only, so the launcher needs no venv, and naming the
    base interpreter keeps it working when the venv is rebuilt or removed.
    """
    if executable is not None:
        return executable
    return getattr(sys, "_base_executable", None) or sys.executable


def _package_imports(source: str) -> list[str]:
    """Sibling modules (flowcni.cni.X) that `source` imports, in order."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE:
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            names = [(node.module or "")[len(PACKAGE) + 1:].split(".")[0]]
        elif isinstance(node, ast.Import):
            names = [a.name[len(PACKAGE) + 1:].split(".")[0] for a in node.names
                     if a.name.startswith(PACKAGE + ".")]
        found += [n for n in names if n not in found]
    return found


def plugin_modules(pkgdir: str | None = None) -> list[tuple[str, str]]:
    """(name, source) of the entry module and what it imports, dependencies first."""
    pkgdir = pkgdir or os.path.dirname(os.path.abspath(__file__))
    ordered: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        with open(os.path.join(pkgdir, f"{name}.py")) as f:
            source = f.read()
        for dep in _package_imports(source):
            visit(dep)
        ordered.append((name, source))

    visit(ENTRY)
    return ordered


def launcher_text(python: str | None = None, pkgdir: str | None = None) -> str:
    """The launcher for this interpreter's version, naming `python` (default: base).

    `pkgdir` is where the plugin sources are read (default: this package).
    """
    modules = plugin_modules(pkgdir)
    codes = [(name, compile(src, f"<flowcni launcher>/{PACKAGE}.{name}", "exec", optimize=2))
             for name, src in modules]
    b64 = binascii.b2a_base64(marshal.dumps(codes), newline=False).decode()
    blob = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    return TEMPLATE.format(python=base_python(python), tag=sys.implementation.cache_tag,
                           package=PACKAGE, entry=ENTRY, blob=blob,
                           modules=", ".join(f"{PACKAGE}.{n}" for n, _ in modules))


def install(dest_dir: str, name: str = "flowcni", python: str | None = None,
            pkgdir: str | None = None) -> str:
    """Write the launcher into dest_dir atomically; return its path."""
    os.makedirs(dest_dir, exist_ok=True)
    path = os.path.join(dest_dir, name)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(launcher_text(python, pkgdir))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path
