"""How sockd's modules depend on one another, read from their source with `ast`: every import
counts, those under `if TYPE_CHECKING:` and inside functions too, since each is a dependency of
the design even where Python would not run it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sockd"


def _modules() -> dict[str, Path]:
    """Every module under sockd/, by dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imported(name: str, path: Path) -> Iterator[str]:
    """The sockd modules `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from sockd.models import iterative` imports a module; `import Stop`, a name.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            if target in MODULES and target != name:
                yield target
            # The packages it lies in, which Python imports first: those that hold `name` too
            # are already importing (a package's __init__ importing its own modules is no cycle).
            parts = target.split(".")
            for end in range(1, len(parts)):
                ancestor = ".".join(parts[:end])
                if ancestor in MODULES and not f"{name}.".startswith(f"{ancestor}."):
                    yield ancestor


GRAPH = {name: set(_imported(name, path)) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle among sockd's modules, as the path that closes it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(GRAPH[name]):
            if found := visit(target):
                return found
        path.pop()
        done.add(name)
        return None

    return next((found for name in sorted(GRAPH) if (found := visit(name))), None)


def test_the_graph_sees_every_kind_of_import() -> None:
    # A from-import of a module, of a name, and one under TYPE_CHECKING, each as an edge.
    assert "sockd.models.iterative" in GRAPH["sockd.models.thread_pool"]
    assert "sockd.config" in GRAPH["sockd.handlers"]
    assert "sockd.stopping" in GRAPH["sockd.models"]  # only under TYPE_CHECKING
    assert "sockd.models" in GRAPH["sockd.models.registry"]  # a module's own package, named
    assert "sockd.models" in GRAPH["sockd.worker"]  # the package of a module imported


def test_no_import_cycle() -> None:
    assert _cycle() is None


def test_the_relay_imports_no_model() -> None:
    """The relay is given what it needs: it runs under any model that relays, and owns no part of one."""
    wrong = {
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name == "sockd.relay" or name.startswith("sockd.relay.")
        for target in targets
        if target == "sockd.models" or target.startswith("sockd.models.")
    }
    assert not wrong
