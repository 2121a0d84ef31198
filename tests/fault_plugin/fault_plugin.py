"""A vLLM plugin for tests/test_faults.py only: the engine process dies, or hangs, on a marked request.
vLLM runs every `vllm.general_plugins` entry point in each of its processes, the engine's included; this
folder is on PYTHONPATH only for the fault tests' runs, so no product code knows of it.

- FAULT_KILL_SEED: a request with this sampling seed ends the engine process (os._exit), every time.
- FAULT_STALL_SEED: a request with this seed hangs the engine process, the first time only (FAULT_DIR
  holds the mark of that first time).
"""

import os
import time


def register() -> None:
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore.add_request, "fault_plugin", False):
        return
    original = EngineCore.add_request

    def add_request(self, request, *args, **kwargs):
        seed = str(getattr(request.sampling_params, "seed", None))
        if seed == os.environ.get("FAULT_KILL_SEED"):
            os._exit(1)
        if seed == os.environ.get("FAULT_STALL_SEED"):
            mark = os.path.join(os.environ["FAULT_DIR"], "stalled")
            if not os.path.exists(mark):
                open(mark, "w").close()
                time.sleep(3600)
        return original(self, request, *args, **kwargs)

    add_request.fault_plugin = True
    EngineCore.add_request = add_request
