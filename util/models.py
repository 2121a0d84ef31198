"""What this template knows about specific models: prompt formats and engine defaults, each verified with
its model. Any other model uses its tokenizer's chat template and vLLM's own defaults.
"""

# Prompt formats verified with each model. `{}` is replaced by the raw input text.
MODEL_PROMPT_FORMATS: dict[str, str] = {
    "meta-llama/Llama-2-7b-chat-hf": "[INST] {} [/INST]",
    "mistralai/Mistral-7B-Instruct-v0.1": "[INST] {} [/INST]",
    "google/gemma-7b-it": "<start_of_turn>model\n{}<end_of_turn>\n",
    "mlabonne/NeuralHermes-2.5-Mistral-7B": (
        "<|im_start|>system\nYou are a helpful assistant that will complete the sentence in the given "
        "input prompt.<|im_end|>\n<|im_start|>user{}<|im_end|>\n<|im_start|>assistant"
    ),
    "meta-llama/Meta-Llama-3-8B-Instruct": (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. Complete the given "
        "prompt in several concise sentences.<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}

# Engine arguments that make each model fit an A10G/L4-class (24 GB) GPU.
MODEL_ENGINE_DEFAULTS: dict[str, dict] = {
    "mistralai/Mistral-7B-Instruct-v0.1": {"max_model_len": 16832},
    "google/gemma-7b-it": {"max_model_len": 2432},
    "mlabonne/NeuralHermes-2.5-Mistral-7B": {"max_model_len": 16800},
}


def table_prompt_format(model_id: str) -> str | None:
    """The verified prompt format for `model_id`, or None when the table has no entry."""
    return MODEL_PROMPT_FORMATS.get(model_id)


def engine_defaults(model_id: str) -> dict:
    """A copy of the per-model engine defaults, so callers can override keys freely."""
    return dict(MODEL_ENGINE_DEFAULTS.get(model_id, {}))
