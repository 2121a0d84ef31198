"""Model directories built locally, so the template runs with no download and no real weights.

    python -m util.model_dirs.tiny_model /tmp/tiny                       # tiny random Mistral, with weights
    python -m util.model_dirs.tiny_model /tmp/m7b --shape mistral-7b     # config + tokenizer only: vLLM load_format=dummy
    python -m util.model_dirs.tiny_model /tmp/tl --shape tiny-llava      # tiny random LLaVA (vision-language), with weights
    python -m util.model_dirs.tiny_model /tmp/l7b --shape llava-7b       # LLaVA-1.5-7B-like: config, tokenizer, processor
    python -m util.model_dirs.tiny_model /tmp/a0 --shape mistral-7b --lora-rank 16   # a random LoRA adapter for that shape

Every directory holds the real Mistral-7B v0.1 tokenizer, which ships inside `mistral_common` (a vLLM
dependency), and a Mistral-architecture `config.json`. vLLM loads it like any Hugging Face model
directory. The tiny model writes random weights (seeded, so its outputs are reproducible); the large
shapes are for GPU benchmarks, where `load_format="dummy"` fills the weights in on the GPU. A LoRA adapter
for a shape (`build_adapter_dir`) is written whole, in peft's layout, since vLLM loads adapters from their
files whatever the model's load_format.

The LLaVA shapes (LlavaForConditionalGeneration: a CLIP vision tower, a projector, a Mistral text model)
add what a vision-language model's processor needs to load offline: the `<image>` token (id 32000) in the
tokenizer, a chat template that puts an image part where it stands in the message, a CLIP image processor
configured by its parameters (preprocessor_config.json) and LlavaProcessor's settings (processor_config.json).
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

# A chat template in the style of Mistral's own, with an optional system prompt folded into the
# first user turn, so the chat-template path is exercised end to end.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# The same for a vision-language model: a message's content may be a list of parts, each image part
# becoming the model's `<image>` placeholder (and a newline) where it stands, as LLaVA-Mistral's template.
LLAVA_CHAT_TEMPLATE = (
    "{%- macro render(content) %}{%- if content is string %}{{- content }}{%- else %}"
    "{%- for part in content %}{%- if part['type'] == 'image' %}{{- '<image>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = render(messages[0]['content']) %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{{- '[INST] ' }}"
    "{%- if loop.first and system_message is defined %}{{- system_message + '\\n\\n' }}{%- endif %}"
    "{{- render(message['content']) + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + render(message['content']) + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<image>", 32000

_MISTRAL = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "initializer_range": 0.02,
}
SHAPES: dict[str, dict] = {
    # head_dim 32: the smallest the CPU attention kernel supports.
    "tiny": {**_MISTRAL, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "max_position_embeddings": 2048},
    "mistral-7b": {**_MISTRAL, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 32768},
    # About 93 GB in bf16: needs tensor parallelism across two 80 GB cards.
    "mixtral-8x7b": {**_MISTRAL, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "max_position_embeddings": 32768, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02},
}


def _llava(text: str, vision: dict) -> dict:
    """A LLaVA config: `text` a shape above (its vocabulary padded to 32064 to hold `<image>`, as
    LLaVA-1.5's is), `vision` a CLIP vision tower. Features from the second-last layer, CLS dropped
    ("default"), as LLaVA-1.5's."""
    text_config = {k: v for k, v in SHAPES[text].items() if k not in ("architectures", "torch_dtype")}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": IMAGE_TOKEN_ID, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "text_config": {**text_config, "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **vision}}


SHAPES.update({
    # head_dim 32 in the tower too (the CPU attention kernel's smallest); 32x32 images of 8x8 patches: 16
    # image tokens each.
    "tiny-llava": _llava("tiny", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                                  "projection_dim": 64}),
    # LLaVA-1.5-7B's tower (CLIP ViT-L/14 at 336 px: 576 image tokens) on Mistral-7B, as LLaVA-1.6-Mistral.
    "llava-7b": _llava("mistral-7b", {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                                      "projection_dim": 768}),
})
DEFAULT_CACHE_DIR = Path(os.environ.get("BATCH_LLM_CACHE", Path.home() / ".cache" / "batch-llm"))


def _write_tokenizer(directory: Path, vision: bool = False) -> None:
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copyfile(source, directory / "tokenizer.model")
    # A vision model's tokenizer has the image placeholder as one special token after the vocabulary.
    image_token = {"added_tokens_decoder": {str(IMAGE_TOKEN_ID): {
        "content": IMAGE_TOKEN, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
        "single_word": False}}} if vision else {}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": 32768, "chat_template": LLAVA_CHAT_TEMPLATE if vision else MISTRAL_CHAT_TEMPLATE,
        **image_token,
    }, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def _write_processor(directory: Path, config: dict) -> None:
    """LlavaProcessor's files: the CLIP image processor by its parameters (resize the short side to the
    tower's size, centre-crop a square, scale to [0, 1], normalize by CLIP's mean and std), LlavaProcessor's
    own settings, and the chat template. The image processor type is the base name, which each
    transformers picks a backend for: torchvision where it is installed, else PIL."""
    side = config["vision_config"]["image_size"]
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"shortest_edge": side}, "resample": 3,  # bicubic
        "do_center_crop": True, "crop_size": {"height": side, "width": side},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2))
    (directory / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN,
        "patch_size": config["vision_config"]["patch_size"], "num_additional_image_tokens": 1,  # CLIP's CLS
        "vision_feature_select_strategy": config["vision_feature_select_strategy"],
    }, indent=2))
    (directory / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    # The text model's end of sequence, which a LLaVA config keeps in text_config only.
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


# A LLaVA's weights under the names of LLaVA checkpoints on the hub (llava-hf/llava-1.5-7b-hf), which both
# vLLM and transformers load; transformers 5 keeps them under other names in memory (and would save those).
LLAVA_CHECKPOINT_NAMES = {"model.vision_tower.": "vision_tower.vision_model.",
                          "model.multi_modal_projector.": "multi_modal_projector.",
                          "model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def _write_random_llava_weights(directory: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(directory)).to(torch.bfloat16)
    weights = {}
    for name, tensor in model.state_dict().items():
        prefix = next(p for p in LLAVA_CHECKPOINT_NAMES if name.startswith(p))
        weights[LLAVA_CHECKPOINT_NAMES[prefix] + name[len(prefix):]] = tensor.contiguous()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def _write_random_weights(directory: Path, config: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)  # Same weights on every machine, so outputs at temperature 0 are reproducible.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), torch_dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))  # Keep our exact config.


def build_model_dir(directory: str | Path, shape: str = "tiny", with_weights: bool | None = None) -> str:
    """Write a model directory of `shape` to `directory` (atomically) and return its path."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    with_weights = shape.startswith("tiny") if with_weights is None else with_weights
    config, vision = SHAPES[shape], SHAPES[shape]["model_type"] == "llava"
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(staging, vision)
        if vision:
            _write_processor(staging, config)
        if with_weights and vision:
            _write_random_llava_weights(staging)
        elif with_weights:
            _write_random_weights(staging, config)
        commit_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(directory)


def commit_directory(staging: Path, directory: Path) -> None:
    """`staging`, built whole, becomes `directory` in one rename: a half-built directory never looks finished.
    Where another process (a parallel test worker) committed the same directory meanwhile, theirs stays: it
    may be in use. One left incomplete by an older build is replaced."""
    try:
        staging.rename(directory)
    except OSError:
        if (directory / "config.json").exists():
            return
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)


def build_adapter_dir(directory: str | Path, shape: str = "tiny", rank: int = 16, seed: int = 0,
                      targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> str:
    """Write a LoRA adapter for a model of `shape` to `directory`, as peft saves one (adapter_config.json and
    adapter_model.safetensors): random A and B of `rank` on each layer's attention projections `targets`,
    seeded, small enough to keep a model's activations in range. Returns its path."""
    import torch
    from safetensors.torch import save_file

    config, generator = SHAPES[shape], torch.Generator().manual_seed(seed)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    queries, keys = heads * head_dim, config["num_key_value_heads"] * head_dim
    sizes = {"q_proj": (hidden, queries), "k_proj": (hidden, keys), "v_proj": (hidden, keys),
             "o_proj": (queries, hidden)}  # (in, out) features
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for target in targets:
            fan_in, fan_out = sizes[target]
            name = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            weights[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            weights[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "base_model_name_or_path": None}, indent=2))
    return str(directory)


def tiny_model_dir(cache_dir: str | Path | None = None) -> str:
    """The tiny random-weight model, built on first use and reused from the cache afterwards."""
    directory = Path(cache_dir or DEFAULT_CACHE_DIR) / "tiny-mistral"
    if (directory / "model.safetensors").exists() and (directory / "tokenizer.model").exists():
        return str(directory)
    return build_model_dir(directory, "tiny")


def tiny_llava_dir(cache_dir: str | Path | None = None) -> str:
    """The tiny random-weight LLaVA, built on first use and reused from the cache afterwards."""
    directory = Path(cache_dir or DEFAULT_CACHE_DIR) / "tiny-llava"
    if (directory / "model.safetensors").exists() and (directory / "preprocessor_config.json").exists():
        return str(directory)
    return build_model_dir(directory, "tiny-llava")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--lora-rank", type=int, default=None, help="write a LoRA adapter of this rank instead")
    args = parser.parse_args()
    if args.lora_rank:
        print(build_adapter_dir(args.directory, args.shape, args.lora_rank))
    else:
        print(build_model_dir(args.directory, args.shape))
