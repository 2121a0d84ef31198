"""Makes every optional feature's module unimportable, as if it had been deleted (util/features.py lists
them), in each Python process that starts with this folder on its path: main.py, Ray's workers, vLLM's
engine. The template must then still run its core: tests/test_structure.py runs the core's tests, and
main.py --smoke, so.

    PYTHONPATH=tests/no_features python main.py --smoke --limit 3
"""

import ast
import importlib.abc
import sys
from pathlib import Path

_source = (Path(__file__).resolve().parents[2] / "util" / "features.py").read_text()
FEATURES = next(ast.literal_eval(node.value) for node in ast.parse(_source).body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "FEATURES")


class _Deleted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in FEATURES:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Deleted())
