"""Turn raw input text into the exact prompt a model expects, and tokenize it once.

    ds = ds.map_batches(format_prompts, fn_kwargs={"model": "mistralai/Mistral-7B-Instruct-v0.1",
                        "text_column": "text"}, batch_format="pyarrow")
    PromptFormatter("mistralai/Mistral-7B-Instruct-v0.1", "text")(table)     # the same, on one table

`prompt_format`: chat_template (the tokenizer's own, with an optional system message), table (the verified
per-model format: util/models.py), plain (the text as it is), or auto (the first of these the model has).
Adds prompt, prompt_token_ids, num_input_tokens and error: a row that cannot go to the engine (empty, too
long) gets a reason instead of failing the batch.
"""

import functools
import json
import logging

import pyarrow as pa

from util import columns as col
from util.columns import set_columns
from util.errors import EMPTY_PROMPT, TOO_LONG, InputError, RowError, row_error
from util.models import table_prompt_format

logger = logging.getLogger(__name__)


def choose_prompt_format(model: str, tokenizer, requested: str = "auto") -> str:
    has_template, has_table = bool(getattr(tokenizer, "chat_template", None)), bool(table_prompt_format(model))
    if requested == "chat_template" and not has_template:
        raise InputError(f"{model} has no chat template; use --prompt-format plain or table")
    if requested == "table" and not has_table:
        raise InputError(f"{model} has no entry in util/models.py MODEL_PROMPT_FORMATS; "
                         "use --prompt-format chat_template or plain")
    if requested != "auto":
        return requested
    return "chat_template" if has_template else "table" if has_table else "plain"


def model_max_length(model: str, revision: str | None = None, override: int | None = None) -> int | None:
    """The longest sequence the engine accepts: an explicit max_model_len, else the model's config."""
    if override:
        return int(override)
    from transformers.utils.hub import cached_file  # not AutoConfig: its import takes torch (the driver has none)

    with open(cached_file(model, "config.json", revision=revision), encoding="utf-8") as file:
        config = json.load(file)
    # A vision-language model's config holds its text model's: the length is that model's.
    return config.get("text_config", config).get("max_position_embeddings")


def tokenizer_args(model: str, engine_kwargs: dict) -> dict:
    """The tokenizer the engine uses, as its arguments name it (vLLM's defaults: the model's, at its revision):
    the plan, the formatter and the predictor each load this one, so the token ids the formatter makes are
    the ones the engine would make."""
    return {"pretrained_model_name_or_path": engine_kwargs.get("tokenizer") or model,
            "revision": engine_kwargs.get("tokenizer_revision") or engine_kwargs.get("revision"),
            "trust_remote_code": bool(engine_kwargs.get("trust_remote_code", False))}


def load_tokenizer(tokenizer: dict):
    """`tokenizer`: tokenizer_args'. InputError, naming the tokenizer, when it does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(**tokenizer)
    except Exception as error:
        raise InputError(f"the tokenizer {tokenizer['pretrained_model_name_or_path']!r} does not load: "
                         f"{type(error).__name__}: {error}") from error


class PromptFormatter:
    """Ray Data stage. Needs `text_column`; adds prompt, prompt_token_ids, num_input_tokens, error.
    `tokenizer`: tokenizer_args' items (the engine's); by default the model's at `revision`."""

    def __init__(self, model: str, text_column: str, system_prompt: str | None = None, prompt_format: str = "auto",
                 revision: str | None = None, max_model_len: int | None = None, tokenizer: tuple = (),
                 loaded_tokenizer=None):
        self.model, self.text_column, self.system_prompt = model, text_column, system_prompt
        self.warned_system_role = False
        # `loaded_tokenizer`: the same tokenizer, loaded already (the driver's, which has no torch to import)
        self.tokenizer = loaded_tokenizer or load_tokenizer(dict(tokenizer) or tokenizer_args(model, {"revision": revision}))
        self.templates = self.chat_templates(model, revision)
        self.prompt_format = choose_prompt_format(model, self.templates, prompt_format)
        self.max_model_len = model_max_length(model, revision, max_model_len)

    def chat_templates(self, model: str, revision: str | None):
        """What holds the chat template and applies it: the tokenizer (a vision job's: its processor)."""
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.templates.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def content(self, text: str):
        """A message's content for the chat template (a vision job's: a list of parts)."""
        return text

    def chat(self, messages: list[dict]) -> str:
        """A conversation through the chat template, the system prompt first unless it has one. Some
        templates (Gemma's) refuse a system role: the system prompt then opens the first user turn."""
        from jinja2.exceptions import TemplateError

        if not self.system_prompt or any(m.get("role") == "system" for m in messages):
            return self.apply_chat_template(messages)
        try:
            return self.apply_chat_template([{"role": "system", "content": self.content(self.system_prompt)}, *messages])
        except TemplateError as refused:  # the template's own refusal (raise_exception); any other error is raised
            if not self.warned_system_role:
                self.warned_system_role = True
                logger.warning("%s's chat template refuses a system message (%s): the system prompt opens the first "
                               "user turn instead", self.model, refused)
            first, prefix = messages[0], f"{self.system_prompt}\n\n"
            content = prefix + first["content"] if isinstance(first["content"], str) else [
                {"type": "text", "text": prefix}, *first["content"]]
            return self.apply_chat_template([{**first, "content": content}, *messages[1:]])

    def format(self, text: str) -> str:
        """The prompt for one text."""
        if self.prompt_format == "table":
            return table_prompt_format(self.model).format(text)
        if self.prompt_format == "plain":
            return text if not self.system_prompt else f"{self.system_prompt}\n\n{text}"
        return self.chat([{"role": "user", "content": self.content(text)}])

    def prompt(self, value) -> str:
        """The prompt for a row's text; RowError when the row cannot have one."""
        if value is None or not str(value).strip():
            raise RowError(row_error(EMPTY_PROMPT, column=self.text_column))
        return self.format(str(value))

    def too_long(self, tokens: int) -> str | None:
        if self.max_model_len and tokens >= self.max_model_len:
            return row_error(TOO_LONG, tokens=tokens, most=self.max_model_len - 1, max_model_len=self.max_model_len)
        return None

    def prompts(self, batch: pa.Table, errors: list) -> list[str]:
        """Each row's prompt ("" for a row that cannot have one, its reason put in `errors`)."""
        prompts = [""] * batch.num_rows
        for i, value in enumerate(batch[self.text_column].to_pylist()):
            if errors[i] is None:
                try:
                    prompts[i] = self.prompt(value)
                except RowError as error:
                    errors[i] = str(error)
        return prompts

    def counts(self, prompts: list[str], token_ids: list, errors: list) -> list[int]:
        """Each prompt's length as the engine sees it."""
        return [len(ids) for ids in token_ids]

    def __call__(self, batch: pa.Table) -> pa.Table:
        # A row may arrive refused by the reader (a bad request line); it stays refused.
        errors = [None] * batch.num_rows
        if col.REQUEST_ERROR in batch.column_names:
            errors, batch = batch[col.REQUEST_ERROR].to_pylist(), batch.drop_columns([col.REQUEST_ERROR])
        prompts = self.prompts(batch, errors)
        # Chat templates already emit the BOS token; adding it again would change the model's input.
        token_ids = self.tokenizer(prompts, add_special_tokens=self.prompt_format != "chat_template")["input_ids"]
        counts = self.counts(prompts, token_ids, errors)
        errors = [error or self.too_long(count) for error, count in zip(errors, counts)]
        return set_columns(batch, {
            col.PROMPT: pa.array(prompts, pa.string()),
            col.PROMPT_TOKEN_IDS: pa.array(token_ids, pa.list_(pa.int32())),
            col.NUM_INPUT_TOKENS: pa.array(counts, pa.int64()),
            col.ERROR: pa.array(errors, pa.string()),
            **self.more_columns(errors),
        })

    def more_columns(self, errors: list) -> dict:
        """Columns a subclass adds for the engine (a vision job's images)."""
        return {}


@functools.lru_cache(maxsize=8)
def cached_formatter(formatter: type = PromptFormatter, **options) -> PromptFormatter:
    return formatter(**options)


def format_prompts(batch: pa.Table, **options) -> pa.Table:
    """The formatter as a Ray Data task: each worker process builds it once, on its first batch, and keeps
    it. Tasks, unlike a pool of actors, spread over every free CPU, and Ray Data fuses them with the read
    before and the repartition after (util/pipeline.py). `formatter`: a feature's subclass (images')."""
    return cached_formatter(**options)(batch)
