"""The project's shape: the import graph of main.py and util/ stays shallow (at most 6 modules from main.py
down to a module that imports no other), so a reader follows any call in a few hops, and has no cycle.

    .venv/bin/python -m pytest tests/test_structure.py
"""

import ast
import functools
from pathlib import Path

from conftest import REPO
MOST_MODULES_DEEP = 6


def util_imports(path: Path) -> set[str]:
    """The util modules a file imports anywhere (in functions too), except under `if TYPE_CHECKING:`."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("util."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "util":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("util."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {path.stem: util_imports(path) for path in (REPO / "util").glob("*.py") if path.stem != "__init__"}
    graph["main"] = util_imports(REPO / "main.py")
    return graph


def longest_chain(graph: dict[str, set[str]], start: str = "main") -> list[str]:
    @functools.lru_cache(maxsize=None)
    def chain(module: str, seen: frozenset) -> tuple:
        assert module not in seen, f"import cycle through {module}: {sorted(seen)}"
        below = [chain(child, seen | {module}) for child in sorted(graph[module])]
        return (module, *max(below, key=len, default=()))

    return list(chain(start, frozenset()))


def test_longest_import_chain_is_at_most_six_modules():
    chain = longest_chain(import_graph())
    assert len(chain) <= MOST_MODULES_DEEP, " -> ".join(chain)


def test_the_chain_is_measured_through_imports_inside_functions():
    graph = {"main": {"a"}, "a": {"b"}, "b": set()}
    assert longest_chain(graph) == ["main", "a", "b"]
    assert "tiny_model" in util_imports(REPO / "util" / "smol_model.py")


if __name__ == "__main__":
    print(" -> ".join(longest_chain(import_graph())))
