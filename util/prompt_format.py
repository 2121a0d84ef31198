"""Turn raw input text into the exact prompt a model expects, and tokenize it once.

    from util.prompt_format import PromptFormatter, format_prompts
    ds = ds.map_batches(format_prompts, fn_kwargs={"model": "mistralai/Mistral-7B-Instruct-v0.1",
                        "text_column": "text"}, batch_format="pyarrow")          # as tasks (the pipeline's way)
    PromptFormatter("mistralai/Mistral-7B-Instruct-v0.1", "text")(table)     # the same, on one pyarrow table

How a prompt is formatted (`prompt_format`):
  - chat_template: the tokenizer's own chat template, with an optional system message;
  - table: the per-model format verified with this template (util/models.py);
  - plain: the text as it is, for base models;
  - auto: chat_template when the tokenizer has one, else the table's entry, else plain.

Adds the columns `prompt`, `prompt_token_ids`, `num_input_tokens` and `error`. A row that cannot be
sent to the engine (empty, or longer than the model allows) gets a reason in `error` instead of
failing the batch; the predictor passes such rows through untouched.
"""

import functools
import json

import pyarrow as pa
from transformers import AutoConfig, AutoTokenizer

from util import columns as col
from util.errors import EMPTY_PROMPT, TOO_LONG, row_error
from util.models import table_prompt_format


def choose_prompt_format(model: str, tokenizer, requested: str = "auto") -> str:
    has_template, has_table = bool(getattr(tokenizer, "chat_template", None)), bool(table_prompt_format(model))
    if requested == "chat_template" and not has_template:
        raise ValueError(f"{model} has no chat template; use --prompt-format plain or table")
    if requested == "table" and not has_table:
        raise ValueError(f"{model} has no entry in util/models.py MODEL_PROMPT_FORMATS; "
                         "use --prompt-format chat_template or plain")
    if requested != "auto":
        return requested
    return "chat_template" if has_template else "table" if has_table else "plain"


def model_max_length(model: str, revision: str | None = None, override: int | None = None) -> int | None:
    """The longest sequence the engine accepts: an explicit max_model_len, else the model's config."""
    if override:
        return int(override)
    config = AutoConfig.from_pretrained(model, revision=revision)
    return getattr(config, "max_position_embeddings", None)


def _has_content(content) -> bool:
    """For the empty-prompt check. A part other than text counts as content, so that the formatter
    refuses it by name (join_text_parts) instead of calling the prompt empty."""
    if isinstance(content, list):
        return any(str(p.get("text") or "").strip() if isinstance(p, dict) and p.get("type") == "text" else True
                   for p in content)
    return bool(str(content or "").strip())


class PromptFormatter:
    """Ray Data stage. Needs `text_column`; adds prompt, prompt_token_ids, num_input_tokens, error."""

    def __init__(self, model: str, text_column: str, system_prompt: str | None = None,
                 prompt_format: str = "auto", revision: str | None = None, max_model_len: int | None = None):
        self.model, self.text_column, self.system_prompt = model, text_column, system_prompt
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        self.prompt_format = choose_prompt_format(model, self.tokenizer, prompt_format)
        self.max_model_len = model_max_length(model, revision, max_model_len)

    def format(self, text: str) -> str:
        if self.prompt_format == "table":
            return table_prompt_format(self.model).format(text)
        if self.prompt_format == "plain":
            return text if not self.system_prompt else f"{self.system_prompt}\n\n{text}"
        messages = [{"role": "user", "content": text}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # Some templates (Gemma's) refuse a system role: fold it into the user turn.
            if not self.system_prompt:
                raise
            merged = [{"role": "user", "content": f"{self.system_prompt}\n\n{text}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def format_messages(self, messages: list[dict]) -> str:
        """A conversation (OpenAI-style messages) → the prompt, through the chat template only."""
        if self.prompt_format != "chat_template":
            raise ValueError("a list of messages needs the model's chat template (--prompt-format chat_template)")
        messages = [join_text_parts(m, i) for i, m in enumerate(messages)]
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _prompt(self, value) -> tuple[str, str | None]:
        """(prompt, why the row cannot go to the engine) for a text or a list of messages."""
        if isinstance(value, str) and self.text_column == "messages":
            value = json.loads(value)  # messages kept as JSON text, as util/openai_batch.py does
        if isinstance(value, list):
            if not any(_has_content(m.get("content")) for m in value if isinstance(m, dict)):
                return "", row_error(EMPTY_PROMPT, column=self.text_column)
            try:
                return self.format_messages(value), None
            except Exception as error:  # a template that refuses these roles, say: this row only
                return "", f"cannot format the messages: {error}"
        if value is None or not str(value).strip():
            return "", row_error(EMPTY_PROMPT, column=self.text_column)
        return self.format(str(value)), None

    def __call__(self, batch: pa.Table) -> pa.Table:
        # A row may arrive refused already (a bad OpenAI batch request line); it stays refused.
        earlier = [None] * batch.num_rows
        if col.REQUEST_ERROR in batch.column_names:
            earlier, batch = batch[col.REQUEST_ERROR].to_pylist(), batch.drop_columns([col.REQUEST_ERROR])
        formatted = [("", reason) if reason else self._prompt(value)
                     for value, reason in zip(batch[self.text_column].to_pylist(), earlier)]
        prompts = [prompt for prompt, _ in formatted]
        # Chat templates already emit the BOS token; adding it again would change the model's input.
        token_ids = self.tokenizer(prompts, add_special_tokens=self.prompt_format != "chat_template")["input_ids"]
        errors = []
        for (_, refused), ids in zip(formatted, token_ids):
            if refused:
                errors.append(refused)
            elif self.max_model_len and len(ids) >= self.max_model_len:
                errors.append(row_error(TOO_LONG, tokens=len(ids), most=self.max_model_len - 1,
                                        max_model_len=self.max_model_len))
            else:
                errors.append(None)
        return set_columns(batch, {
            col.PROMPT: pa.array(prompts, pa.string()),
            col.PROMPT_TOKEN_IDS: pa.array(token_ids, pa.list_(pa.int32())),
            col.NUM_INPUT_TOKENS: pa.array([len(ids) for ids in token_ids], pa.int64()),
            col.ERROR: pa.array(errors, pa.string()),
        })


def join_text_parts(message: dict, index: int = 0) -> dict:
    """A message whose content is a list of text parts, with that content as one string: the parts
    joined with "\n", as vLLM's OpenAI server joins them (vllm/renderers/chat_utils.py,
    _parse_chat_message_content_parts), so a template that expects text gets the prompt vLLM would send.
    Other parts (images, audio, files) are refused: ValueError, naming the part."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):  # an assistant's earlier refusal
            texts.append(part["refusal"])
        else:
            raise ValueError(f"messages[{index}].content[{j}] is a {kind!r} part; only text parts are supported")
    return {**message, "content": "\n".join(texts)}


@functools.lru_cache(maxsize=8)
def cached_formatter(**options) -> PromptFormatter:
    return PromptFormatter(**options)


def format_prompts(batch: pa.Table, **options) -> pa.Table:
    """The formatter as a Ray Data task: each worker process loads the tokenizer once, on its first batch,
    and keeps it. Tasks, unlike a pool of actors, spread over every free CPU, and Ray Data fuses them
    with the read before and the repartition after (util/pipeline.py)."""
    return cached_formatter(**options)(batch)


def set_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` added, or replaced where they already exist."""
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, values) if index >= 0 else table.append_column(name, values)
    return table
