"""Makes the optional features' folder, util/features/, unimportable, as if it had been deleted, in each
Python process that starts with this folder on its path: main.py, Ray's workers, vLLM's engine. The
template must then still run its core: tests/test_structure.py runs the core's tests, and main.py --smoke,
so.

    PYTHONPATH=tests/no_features python main.py --smoke --limit 3
"""

import importlib.abc
import sys

FEATURES_PACKAGE = "util.features"


class _Deleted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == FEATURES_PACKAGE or name.startswith(FEATURES_PACKAGE + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Deleted())
