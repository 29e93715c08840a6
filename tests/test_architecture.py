"""The shape of the code, checked from its source: no import runs in a circle, the two faces (MCP server and
CLI) never import each other, the core never imports a face, and each media helper is defined once.

Imports inside functions count too: a lazy import is still a dependency (it only moves the failure from
import time to the first call).
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "flux_mcp"
FACES = {"flux_mcp.server", "flux_mcp.cli"}
#: The core: what both faces build on. None of it may know a face.
CORE = {"flux_mcp.service", "flux_mcp.results", "flux_mcp.jobs", "flux_mcp.grid", "flux_mcp.sheets"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The flux_mcp modules ``name`` imports, anywhere in its source (``from . import x`` names module x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_runs_in_a_circle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_itself_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_faces_never_import_each_other_and_the_core_knows_no_face() -> None:
    graph = _graph()
    assert graph["flux_mcp.server"].isdisjoint(FACES), graph["flux_mcp.server"]
    assert graph["flux_mcp.cli"].isdisjoint(FACES), graph["flux_mcp.cli"]
    for name in CORE | {n for n in graph if n.startswith("flux_mcp.backends")}:
        assert graph[name].isdisjoint(FACES), (name, graph[name] & FACES)
    # Only the entry point composes the two.
    assert graph["flux_mcp.__main__"] | {"flux_mcp.server"} >= FACES


def test_each_media_helper_is_defined_once() -> None:
    """Decoding, probing, data URIs and alpha flattening live in media.py only; untrusted bytes are opened
    there (with the format allow-list) and nowhere else."""
    helpers = {
        "data_uri",
        "decode_data_uri",
        "probe",
        "flatten",
        "open_image",
        "decode_rgb",
        "strip_metadata",
    }
    defined: dict[str, list[str]] = {}
    opens = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                defined.setdefault(node.name.lstrip("_"), []).append(name)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "open"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "Image"
            ):
                opens.append(name)
    for helper in helpers:
        assert defined.get(helper) == ["flux_mcp.media"], (helper, defined.get(helper))
    assert set(opens) == {"flux_mcp.media"}, opens
