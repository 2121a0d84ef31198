"""The project's shape: a core that every job imports, and the optional features, each a module the core
never imports (util/parts.py).

- main.py's module-level import closure within the repo (the core) holds no feature module, and is at most
  CORE_LINES lines; no core module imports a feature, even inside a function;
- the import graph of main.py and util/ is shallow (at most 6 modules from main.py down to a module that
  imports no other), so a reader follows any call in a few hops, and has no cycle;
- with every feature module made unimportable (tests/no_features), the core's tests pass, and
  `main.py --smoke` runs and writes its rows.

    .venv/bin/python -m pytest tests/test_structure.py
"""

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO

MOST_MODULES_DEEP = 6
CORE_LINES = 2875  # main.py's module-level closure; not yet the honest count (every module a plain job runs)
NO_FEATURES = REPO / "tests" / "no_features"
# The core's own tests: none of them needs a feature (each feature's tests are in its own file).
CORE_TESTS = ["test_config.py", "test_plan.py", "test_pipeline.py", "test_predictor.py", "test_prompt_format.py",
              "test_validation.py"]


def module_name(dotted: str) -> str | None:
    """`util.replica.host` -> `replica.host`: a module of ours by its path under util/ (a package: its
    __init__), or None where `dotted` is not one."""
    if not dotted.startswith("util."):
        return None
    name = dotted[len("util."):]
    return name if module_path(name).exists() else None


def util_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The util modules a file imports (`replica.host`, `config`): at module level (in `if` and `try` blocks
    too), or anywhere, in functions too, except under `if TYPE_CHECKING:`."""
    found = set()

    def visit(node, depth: int):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "util":
            for alias in node.names:  # a submodule by name, else the module it comes from
                found.add(module_name(f"{node.module}.{alias.name}") or module_name(node.module))
        elif isinstance(node, ast.Import):
            found.update(module_name(a.name) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, depth + 1)

    visit(ast.parse(path.read_text()), 0)
    return found - {None}


def module_path(name: str) -> Path:
    if name == "main":
        return REPO / "main.py"
    path = REPO / "util" / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    graph = {}
    for path in (REPO / "util").rglob("*.py"):
        name = ".".join(path.relative_to(REPO / "util").with_suffix("").parts)
        graph[name.removesuffix(".__init__") if name != "__init__" else "__init__"] = util_imports(path, top_level_only)
    graph["main"] = util_imports(REPO / "main.py", top_level_only)
    return graph


def core() -> set[str]:
    """main.py and the util modules its module-level imports reach."""
    graph, seen, todo = import_graph(top_level_only=True), set(), ["main"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(graph[module] - seen)
    return seen


def longest_chain(graph: dict[str, set[str]], start: str = "main") -> list[str]:
    @functools.lru_cache(maxsize=None)
    def chain(module: str, seen: frozenset) -> tuple:
        assert module not in seen, f"import cycle through {module}: {sorted(seen)}"
        below = [chain(child, seen | {module}) for child in sorted(graph[module])]
        return (module, *max(below, key=len, default=()))

    return list(chain(start, frozenset()))


FEATURE_NAMES = {name for name in import_graph() if name.split(".")[0] == "features"}  # util/features/ whole


def test_the_core_holds_no_feature_and_reads_in_an_hour():
    modules = core()
    assert not modules & FEATURE_NAMES, sorted(modules & FEATURE_NAMES)
    lines = sum(len(module_path(name).read_text().splitlines()) for name in modules)
    assert lines <= CORE_LINES, f"the core is {lines} lines in {len(modules)} files: {sorted(modules)}"


def test_no_core_module_imports_a_feature_even_inside_a_function():
    graph = import_graph()
    imports = {name: sorted(graph[name] & FEATURE_NAMES) for name in core() if graph[name] & FEATURE_NAMES}
    assert imports == {}


def test_longest_import_chain_is_at_most_six_modules():
    chain = longest_chain(import_graph())
    assert len(chain) <= MOST_MODULES_DEEP, " -> ".join(chain)


def test_the_chain_is_measured_through_imports_inside_functions():
    graph = {"main": {"a"}, "a": {"b"}, "b": set()}
    assert longest_chain(graph) == ["main", "a", "b"]
    assert "model_dirs.tiny_model" in util_imports(REPO / "util" / "model_dirs" / "smol_model.py")
    assert "model_dirs.smol_model" not in util_imports(REPO / "util" / "config.py", top_level_only=True)
    assert util_imports(REPO / "tests" / "test_replica_host.py") == {"replica.host"}


def without_features() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(NO_FEATURES), os.environ.get("PYTHONPATH")]))}


@pytest.mark.harness
def test_the_cores_tests_pass_with_every_feature_deleted():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-m", "not engine and not harness",
                          *(f"tests/{name}" for name in CORE_TESTS)], cwd=REPO, env=without_features(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-5000:]
    assert " passed" in run.stdout and " failed" not in run.stdout and "skipped" not in run.stdout


@pytest.mark.engine
def test_the_smoke_job_runs_with_every_feature_deleted(tmp_path):
    run = subprocess.run([sys.executable, "main.py", "--smoke", "--limit", "3", "--output-path", str(tmp_path / "out"),
                          "--verbose"], cwd=REPO, env=without_features(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    shown = run.stdout + run.stderr  # --verbose: vLLM's INFO lines, and its loading's progress bar
    assert " INFO " in shown and "Loading safetensors checkpoint shards" in shown
    assert "summary: 3 rows: 3 ok, 0 errors, 0 already done" in run.stdout
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 3 and all(table["generated_text"].to_pylist())
    assert not {"completions", "logprobs", "structured_output_error"} & set(table.column_names)  # no feature's columns
    # The run's timeline, from launch: the driver's steps, then its replica's, then its rows, in that order.
    steps = json.loads((tmp_path / "out" / "_report.json").read_text())["timeline"]["steps"]
    assert list(steps) == ["ray_init", "plan", "row_order", "actor_start", "vllm_imported", "engine_ready", "first_row",
                           "last_row", "written", "report"], steps
    assert 0 < steps["ray_init"] and steps["report"] < 600
    assert " timeline       ray init " in run.stdout


if __name__ == "__main__":
    print(" -> ".join(longest_chain(import_graph())))
    print(sorted(core()), sum(len(module_path(name).read_text().splitlines()) for name in core()))
