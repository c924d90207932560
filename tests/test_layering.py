"""The house's layering, read from the imports of ``src/relayrace`` (every import: module level,
inside functions and under ``TYPE_CHECKING``):

- no import cycle anywhere;
- ``providers`` is pure: from relayrace it imports only ``_failure`` and ``_values`` (and its own
  modules), and nothing of trio, httpx, httpcore or anyio;
- ``actors`` never imports ``supervisor``, ``server``, ``testing`` or ``bench``; ``_config`` never
  imports ``actors`` or ``testing``;
- ``supervisor`` imports only the public names of ``relayrace.actors``;
- ``server`` imports only public names: those ``relayrace``, ``relayrace.supervisor`` and
  ``relayrace.providers`` export, besides its own modules;
- no module over 600 lines, and no private internals of our dependencies in ``src`` or ``tests``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "relayrace"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names taken from it)`` for every import in ``module``."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            # `from . import x` imports the module `x` when there is one.
            for name in names:
                if f"{target}.{name}" in MODULES:
                    found.append((f"{target}.{name}", []))
            found.append((target, names))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in _imports(module):
            if target in MODULES and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    return edges


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle() -> None:
    edges = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert cycles == []


FORBIDDEN = {
    "actors": {"supervisor", "server", "testing", "bench"},
    "providers": {"actors", "supervisor", "server", "testing", "bench"},
    "supervisor": {"server", "testing", "bench"},
    "_config": {"actors", "testing"},
}


def test_packages_import_only_downward() -> None:
    broken = [
        f"{module} imports {target}"
        for module, targets in _edges().items()
        for target in targets
        if _package(target) in FORBIDDEN.get(_package(module), ())
    ]
    assert broken == []


def test_providers_are_pure_wire_formats() -> None:
    # _errors: BadRequest, what a translated caller request (anthropic_inbound) is refused with.
    allowed = {"relayrace._failure", "relayrace._values", "relayrace._errors"}
    broken = []
    for module in MODULES:
        if _package(module) != "providers":
            continue
        for target, _ in _imports(module):
            top = target.split(".")[0]
            if top in ("trio", "httpx", "httpcore", "anyio"):
                broken.append(f"{module} imports {target}")
            elif (
                top == "relayrace"
                and _package(target) != "providers"
                and target not in allowed
            ):
                broken.append(f"{module} imports {target}")
    assert broken == []


def test_supervisor_uses_only_public_names_of_actors() -> None:
    broken = [
        f"{module} imports {target}"
        for module in MODULES
        if _package(module) in ("supervisor", "server", "bench")
        for target, _ in _imports(module)
        if _package(target) == "actors" and target.split(".")[-1].startswith("_")
    ]
    assert broken == []


def _public(package: str) -> set[str]:
    return set(importlib.import_module(package).__all__)


def test_server_uses_only_public_api() -> None:
    public = {
        "relayrace": _public("relayrace"),
        "relayrace.supervisor": _public("relayrace.supervisor"),
        "relayrace.providers": _public("relayrace.providers"),
    }
    broken = []
    for module in MODULES:
        if _package(module) != "server":
            continue
        for target, names in _imports(module):
            if not target.startswith("relayrace") or _package(target) == "server":
                continue
            # A name taken from a private module must be one the package exports publicly.
            home = next(
                (package for package in ("relayrace.supervisor", "relayrace.providers")
                 if target == package or target.startswith(package + ".")),
                "relayrace",
            )
            for name in names or [target]:
                if name not in public[home]:
                    broken.append(f"{module} takes {name} from {target}")
    assert broken == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_600_lines(module: str) -> None:
    assert len(MODULES[module].read_text().splitlines()) <= 600


def test_no_private_internals_of_dependencies() -> None:
    # Spelled in pieces so that this file does not find itself.
    needles = ["_ws" + "proto", "_stream" + "_lock", "_pool" + "._", "__di" + "ct__"]
    found = [
        f"{path.relative_to(ROOT)}: {needle}"
        for folder in ("src", "tests")
        for path in (ROOT / folder).rglob("*.py")
        for needle in needles
        if needle in path.read_text()
    ]
    assert found == []
