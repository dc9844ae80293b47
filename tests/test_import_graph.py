"""The packages' imports run one way, as docs/architecture.md draws them.

Read from the source with ``ast`` (nothing is imported, so a slow or broken module cannot
hide an edge): every ``import`` and ``from ... import`` counts, at module level or inside a
function (a deferred import still runs, and the circle that issue 31 found ran through one);
only ``if TYPE_CHECKING:`` blocks, which never run, are left out. A cycle between modules,
or an import of ``server`` from ``plugins`` or ``client`` (they reach the server over gRPC
only), fails with the path that closes it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.paths import REPO

PACKAGES = ("models", "server", "plugins", "client", "diarization")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (not under ``if TYPE_CHECKING:``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules of our packages that ``node`` (in ``module``) imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if not MODULES[module].name == "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    out = set()
    for name in names:
        while name and name not in MODULES:  # ``import a.b.c`` of a name inside a module
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set().union(*(_resolve(module, n) for n in _imports(tree)))
    return graph


GRAPH = _graph()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``a -> b -> ... -> a``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read_from_every_package() -> None:
    """A broken walk (no modules, no edges) would pass the tests below: it must see the
    edges everyone knows of, deferred ones included."""
    assert {p.split(".")[0] for p in GRAPH} == set(PACKAGES)
    assert "models.architectures.scorer" in GRAPH["models.checkpoint"]
    assert "models.checkpoint" in GRAPH["models.inference"]
    assert "models.inference" in GRAPH["server.app"]
    assert "diarization.models" in GRAPH["server.speakers"]  # a deferred import


def test_a_cycle_is_found_when_there_is_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back() -> None:
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH) or [])


def test_the_scorers_import_neither_training_nor_the_loader() -> None:
    """An architecture builds and scores a model; the trainers (``models.tasks``) and the
    checkpoint format import the scorers, never the reverse."""
    for module, imported in GRAPH.items():
        if module.startswith("models.architectures"):
            assert not {m for m in imported if m.startswith("models.tasks")}, module
            assert "models.checkpoint" not in imported, module


def _server_imports(package: str) -> dict[str, set[str]]:
    return {m: {i for i in imported if i.split(".")[0] == "server"}
            for m, imported in GRAPH.items() if m.split(".")[0] == package
            and any(i.split(".")[0] == "server" for i in imported)}


def test_the_client_imports_nothing_from_the_server() -> None:
    assert _server_imports("client") == {}


def test_the_plugins_import_nothing_from_the_server() -> None:
    assert _server_imports("plugins") == {}


def test_the_models_import_nothing_from_the_server() -> None:
    """The models sit below the server (the server loads them; recalibration replays the
    verdict rules, which live in ``models.verdicts`` for that reason), never the reverse."""
    assert _server_imports("models") == {}


def test_diarization_imports_nothing_from_the_services() -> None:
    """The diarizer sits below the services: the server imports it, not the reverse."""
    for module, imported in GRAPH.items():
        if module.split(".")[0] == "diarization":
            assert not {i for i in imported
                        if i.split(".")[0] in {"server", "plugins", "client"}}, module


def test_every_room_of_the_map_exists() -> None:
    """docs/architecture.md names files and folders in the first column of its rooms table:
    each must be there, so a move or a rename that forgets the map fails here."""
    import re

    rooms = []
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        if line.startswith("| `"):
            rooms += re.findall(r"`([^`]+)`", line.split("|")[1])
    assert len(rooms) > 20
    missing = [r for r in rooms if not (REPO / r).exists()]
    assert not missing, missing
