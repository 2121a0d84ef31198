"""Prompt formatting: chat template, the per-model table, plain text, and per-row refusals."""

import pyarrow as pa
import pytest

from util.models import MODEL_PROMPT_FORMATS, engine_defaults, table_prompt_format
from util.prompt_format import PromptFormatter, choose_prompt_format
from util.model_dirs.tiny_model import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir()


def test_chat_template_with_and_without_system_prompt(model_dir):
    plain = PromptFormatter(model_dir, "text")
    assert plain.prompt_format == "chat_template"
    assert plain.format("Hi there") == "<s>[INST] Hi there [/INST]"
    with_system = PromptFormatter(model_dir, "text", system_prompt="Answer briefly.")
    assert with_system.format("Hi there") == "<s>[INST] Answer briefly.\n\nHi there [/INST]"


def test_chat_template_prompt_is_tokenized_without_a_second_bos(model_dir):
    formatter = PromptFormatter(model_dir, "text")
    out = formatter(pa.table({"text": ["Hi there"]}))
    ids = out["prompt_token_ids"].to_pylist()[0]
    assert ids[0] == 1 and ids[1] != 1  # exactly one <s>
    assert out["num_input_tokens"].to_pylist() == [len(ids)]


def test_plain_and_table_formats(model_dir):
    plain = PromptFormatter(model_dir, "text", prompt_format="plain", system_prompt="Be kind.")
    assert plain.format("Hello") == "Be kind.\n\nHello"
    assert table_prompt_format("google/gemma-7b-it").format("Hi") == "<start_of_turn>model\nHi<end_of_turn>\n"
    assert set(MODEL_PROMPT_FORMATS) == {
        "meta-llama/Llama-2-7b-chat-hf", "mistralai/Mistral-7B-Instruct-v0.1", "google/gemma-7b-it",
        "mlabonne/NeuralHermes-2.5-Mistral-7B", "meta-llama/Meta-Llama-3-8B-Instruct"}


class _Tokenizer:
    def __init__(self, chat_template=None):
        self.chat_template = chat_template


def test_choice_order_and_errors():
    mistral = "mistralai/Mistral-7B-Instruct-v0.1"
    assert choose_prompt_format(mistral, _Tokenizer("{{x}}")) == "chat_template"
    assert choose_prompt_format(mistral, _Tokenizer()) == "table"
    assert choose_prompt_format("some/base-model", _Tokenizer()) == "plain"
    assert choose_prompt_format(mistral, _Tokenizer("{{x}}"), "table") == "table"
    with pytest.raises(ValueError, match="has no chat template"):
        choose_prompt_format("some/base-model", _Tokenizer(), "chat_template")
    with pytest.raises(ValueError, match="no entry in util/models.py"):
        choose_prompt_format("some/base-model", _Tokenizer(), "table")


def test_engine_defaults_are_copies():
    defaults = engine_defaults("google/gemma-7b-it")
    assert defaults == {"max_model_len": 2432}
    defaults["max_model_len"] = 1
    assert engine_defaults("google/gemma-7b-it") == {"max_model_len": 2432}
    assert engine_defaults("unknown/model") == {}


def test_empty_and_over_length_rows_get_errors_not_exceptions(model_dir):
    formatter = PromptFormatter(model_dir, "text", max_model_len=16)
    out = formatter(pa.table({"text": ["short", "   ", None, "word " * 40]}))
    errors = out["error"].to_pylist()
    assert errors[0] is None
    assert errors[1] == errors[2] == "empty prompt in column 'text'"
    assert errors[3].startswith("prompt has ") and "at most 15 (max_model_len 16)" in errors[3]
