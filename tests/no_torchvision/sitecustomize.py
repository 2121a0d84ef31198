"""Lets vLLM 0.32's CPU build load LLaVA without torchvision, for the tests of tests/test_images.py.

    PYTHONPATH=tests/no_torchvision python main.py --model <tiny LLaVA> ...   # each Python process runs this

vLLM's LLaVA module imports its Pixtral module, which imports `_num_image_tokens` from transformers'
Pixtral image processor for torchvision (transformers 5.19: models/pixtral/image_processing_pixtral.py),
and that module imports torchvision. The CPU stack cannot have torchvision (it breaks beside the CPU build
of torch: requirements-cpu.txt), so without this no vLLM process there can load a LLaVA model. Where
torchvision is missing, this points that one module at its PIL twin, image_processing_pil_pixtral.py,
which defines the same `_num_image_tokens`. Nothing else changes: the LLaVA path under test (CLIP, the
projector, the processor, LLaVA's placeholder expansion) is vLLM's own. A GPU host has torchvision and
needs none of this. Python imports `sitecustomize` from its path at start, so setting PYTHONPATH reaches
every process of a run: main.py, Ray's workers, vLLM's engine and its model-inspection subprocess.
"""

import importlib.abc
import importlib.util
import sys

TORCHVISION_ONLY = "transformers.models.pixtral.image_processing_pixtral"
PIL_TWIN = "transformers.models.pixtral.image_processing_pil_pixtral"


class _PilTwin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TORCHVISION_ONLY:
            return None
        spec = importlib.util.find_spec(PIL_TWIN)
        return importlib.util.spec_from_file_location(name, spec.origin) if spec else None


if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, _PilTwin())
