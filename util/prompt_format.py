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

Images (`images=True`: a vision-language model; --image-column, or OpenAI `image_url` parts): the prompt
is the model's processor's chat template with an image part ({"type": "image"}) per image, so the
placeholder is the model's own; the images are fetched and checked here, on CPU (util/images.py), and a
bad one fails its row, naming it. `prompt_token_ids` keeps one placeholder per image (vLLM expands it),
`num_input_tokens` counts the prompt as the engine sees it, each image's tokens included (the
processor's count), and `prompt_images` holds the images' encoded bytes for the replica.
"""

import functools
import json

import pyarrow as pa
from transformers import AutoConfig, AutoTokenizer

from util import columns as col
from util.columns import set_columns
from util.errors import BAD_IMAGE, EMPTY_PROMPT, TOO_LONG, TOO_MANY_IMAGES, row_error
from util.images import DEFAULT_MAX_IMAGE_BYTES, ImageError, describe, fetch_images, image_sources, open_image
from util.models import table_prompt_format
from util.openai_batch import IMAGE_PART


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
    # A vision-language model's config holds its text model's: the length is that model's.
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def _has_content(content) -> bool:
    """For the empty-prompt check. A part other than text counts as content, so that the formatter
    refuses it by name (join_text_parts) instead of calling the prompt empty."""
    if isinstance(content, list):
        return any(str(p.get("text") or "").strip() if isinstance(p, dict) and p.get("type") == "text" else True
                   for p in content)
    return bool(str(content or "").strip())


class PromptFormatter:
    """Ray Data stage. Needs `text_column` (and `image_column`, if given); adds prompt, prompt_token_ids,
    num_input_tokens, error, and for a vision job (`images`) prompt_images."""

    def __init__(self, model: str, text_column: str, system_prompt: str | None = None,
                 prompt_format: str = "auto", revision: str | None = None, max_model_len: int | None = None,
                 images: bool = False, image_column: str | None = None, max_images_per_row: int = 1,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.model, self.text_column, self.system_prompt = model, text_column, system_prompt
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        # A vision job formats with the model's processor: its chat template places the images, and it
        # counts the tokens each image becomes.
        self.processor = model_processor(model, revision) if images else None
        self.image_column, self.max_images_per_row = image_column, max_images_per_row
        self.max_image_bytes = max_image_bytes
        self.prompt_format = choose_prompt_format(model, self.processor or self.tokenizer, prompt_format)
        self.max_model_len = model_max_length(model, revision, max_model_len)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return (self.processor or self.tokenizer).apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)

    def format(self, text: str, images: int = 0) -> str:
        """The prompt for `text` (and, for a vision job, `images` images before it, as image parts)."""
        if self.prompt_format == "table":
            return table_prompt_format(self.model).format(text)
        if self.prompt_format == "plain":
            return text if not self.system_prompt else f"{self.system_prompt}\n\n{text}"
        messages = [{"role": "user", "content": self.content(text, images)}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.content(self.system_prompt)})
        try:
            return self.apply_chat_template(messages)
        except Exception:  # Some templates (Gemma's) refuse a system role: fold it into the user turn.
            if not self.system_prompt:
                raise
            merged = [{"role": "user", "content": self.content(f"{self.system_prompt}\n\n{text}", images)}]
            return self.apply_chat_template(merged)

    def content(self, text: str, images: int = 0):
        """A message's content: the text; for a vision job a list of parts, the images first (as LLaVA's
        prompts have them), since vision templates expect parts."""
        if self.processor is None:
            return text
        return [{"type": "image"}] * images + ([{"type": "text", "text": text}] if text else [])

    def format_messages(self, messages: list[dict]) -> tuple[str, list]:
        """A conversation (OpenAI-style messages) → the prompt, through the chat template only, and the
        sources of its images in order (a vision job's; other jobs refuse image parts)."""
        if self.prompt_format != "chat_template":
            raise ValueError("a list of messages needs the model's chat template (--prompt-format chat_template)")
        if self.processor is None:
            messages, sources = [join_text_parts(m, i) for i, m in enumerate(messages)], []
        else:
            messages, sources = image_parts(messages)
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.content(self.system_prompt)}, *messages]
        return self.apply_chat_template(messages), sources

    def _prompt(self, value, image_value=None) -> tuple[str, list, str | None]:
        """(prompt, its images' sources, why the row cannot go to the engine) for a text or a list of
        messages, with the row's image column value."""
        if isinstance(value, str) and self.text_column == "messages":
            value = json.loads(value)  # messages kept as JSON text, as util/openai_batch.py does
        try:
            sources = image_sources(image_value)
        except ImageError as error:
            return "", [], bad_image(1, f"column '{self.image_column}'", error)
        if isinstance(value, list):
            if sources:
                return "", [], (f"a list of messages holds its images as image_url parts, not in column "
                                f"'{self.image_column}'")
            if not any(_has_content(m.get("content")) for m in value if isinstance(m, dict)):
                return "", [], row_error(EMPTY_PROMPT, column=self.text_column)
            try:
                return (*self.format_messages(value), None)
            except Exception as error:  # a template that refuses these roles, say: this row only
                return "", [], f"cannot format the messages: {error}"
        if (value is None or not str(value).strip()) and not sources:  # an image alone is a prompt
            return "", [], row_error(EMPTY_PROMPT, column=self.text_column)
        return self.format("" if value is None else str(value), len(sources)), sources, None

    def _fetch_images(self, formatted: list) -> list[tuple[list, str | None]]:
        """Per row of `formatted`: (its images' encoded bytes, why the row cannot go to the engine). A
        batch's images are fetched at once; a row with too many is refused before any is fetched."""
        wanted = [sources if not refused and len(sources) <= self.max_images_per_row else []
                  for _, sources, refused in formatted]
        fetched = iter(fetch_images([s for sources in wanted for s in sources], self.max_image_bytes))
        rows = []
        for (_, sources, refused), row_wanted in zip(formatted, wanted):
            blobs = [next(fetched) for _ in row_wanted]
            if not refused and len(sources) > self.max_images_per_row:
                refused = row_error(TOO_MANY_IMAGES, count=len(sources), most=self.max_images_per_row)
            rows.append((blobs, refused or self._first_bad(sources, blobs)))
        return rows

    @staticmethod
    def _first_bad(sources: list, blobs: list) -> str | None:
        return next((bad_image(number, describe(source), blob)
                     for number, (source, blob) in enumerate(zip(sources, blobs), 1) if isinstance(blob, ImageError)), None)

    def _count_with_images(self, prompt: str, sources: list, blobs: list, add_special_tokens: bool) -> int:
        """The prompt's length as the engine sees it: each image placeholder expanded to that image's
        tokens by the model's processor, as vLLM expands it. Decodes and checks each image (ImageError,
        a row error, naming it); the decoded images are dropped as soon as they are counted."""
        images = []
        for number, (source, blob) in enumerate(zip(sources, blobs), start=1):
            try:
                images.append(open_image(blob))
            except ImageError as error:
                raise ImageError(bad_image(number, describe(source), error)) from None
        inputs = self.processor(text=[prompt], images=images, add_special_tokens=add_special_tokens)
        return len(inputs["input_ids"][0])

    def __call__(self, batch: pa.Table) -> pa.Table:
        # A row may arrive refused already (a bad OpenAI batch request line); it stays refused.
        earlier = [None] * batch.num_rows
        if col.REQUEST_ERROR in batch.column_names:
            earlier, batch = batch[col.REQUEST_ERROR].to_pylist(), batch.drop_columns([col.REQUEST_ERROR])
        image_values = batch[self.image_column].to_pylist() if self.image_column else [None] * batch.num_rows
        formatted = [("", [], reason) if reason else self._prompt(value, image_value)
                     for value, image_value, reason in zip(batch[self.text_column].to_pylist(), image_values, earlier)]
        fetched = self._fetch_images(formatted) if self.processor is not None else [([], r) for *_, r in formatted]
        prompts = [prompt for prompt, _, _ in formatted]
        # Chat templates already emit the BOS token; adding it again would change the model's input.
        add_special_tokens = self.prompt_format != "chat_template"
        token_ids = self.tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
        errors, counts = [], []
        for (prompt, sources, _), (blobs, refused), ids in zip(formatted, fetched, token_ids):
            count = len(ids)
            if blobs and not refused:
                try:
                    count = self._count_with_images(prompt, sources, blobs, add_special_tokens)
                except ImageError as error:
                    refused = str(error)
                except Exception as error:  # the processor refuses what PIL read: this row only
                    refused = f"the model's processor cannot take the row's images ({type(error).__name__}: {error})"
            counts.append(count)
            if refused:
                errors.append(refused)
            elif self.max_model_len and count >= self.max_model_len:
                errors.append(row_error(TOO_LONG, tokens=count, most=self.max_model_len - 1,
                                        max_model_len=self.max_model_len))
            else:
                errors.append(None)
        columns = {
            col.PROMPT: pa.array(prompts, pa.string()),
            col.PROMPT_TOKEN_IDS: pa.array(token_ids, pa.list_(pa.int32())),
            col.NUM_INPUT_TOKENS: pa.array(counts, pa.int64()),
            col.ERROR: pa.array(errors, pa.string()),
        }
        if self.processor is not None:  # only what the engine takes: a failed row's images stay behind
            columns[col.PROMPT_IMAGES] = pa.array([blobs if blobs and error is None else None
                                                   for (blobs, _), error in zip(fetched, errors)],
                                                  col.PROMPT_IMAGES_TYPE)
        return set_columns(batch, columns)


def bad_image(number: int, where: str, reason) -> str:
    """The error of a row whose image `number` (1-based, in prompt order), from `where`, fails for `reason`."""
    return row_error(BAD_IMAGE, number=number, source=where, reason=reason)


class TextOnlyModel(ValueError):
    """A model given images that takes none."""


def model_processor(model: str, revision: str | None = None):
    """The model's processor (AutoProcessor), which must handle images: TextOnlyModel if it has no image
    processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model, revision=revision)
    if getattr(processor, "image_processor", None) is None:
        raise TextOnlyModel(f"{model} takes no images: it has no image processor (a text-only model); use a "
                            "vision-language model such as LLaVA")
    return processor


def content_parts(content: list, index: int, images: bool = False) -> tuple[list[dict], list]:
    """The parts of message `index`'s list content as text parts (an assistant's earlier refusal as text)
    and, when `images`, image parts ({"type": "image"}) for its image_url parts, with their urls in order.
    Other parts (audio, files; images when not `images`) are refused: ValueError, naming the part."""
    parts, sources = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif images and kind == IMAGE_PART and isinstance((part.get(IMAGE_PART) or {}).get("url"), str):
            parts.append({"type": "image"})
            sources.append(part[IMAGE_PART]["url"])
        else:
            supported = "text and image_url parts (with a url) are" if images else "text parts are"
            raise ValueError(f"messages[{index}].content[{j}] is a {kind!r} part; only {supported} supported")
    return parts, sources


def image_parts(messages: list[dict]) -> tuple[list[dict], list]:
    """OpenAI-style messages for a vision model's chat template, and the sources of their images in order:
    each `image_url` part becomes an image part where it stands, text parts stay text parts, a string
    content becomes one text part (content_parts refuses other parts)."""
    converted, sources = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if content is None or isinstance(content, str):
            converted.append({**message, "content": [{"type": "text", "text": content or ""}]})
            continue
        parts, found = content_parts(content if isinstance(content, list) else [content], i, images=True)
        converted.append({**message, "content": parts})
        sources.extend(found)
    return converted, sources


def join_text_parts(message: dict, index: int = 0) -> dict:
    """A message whose content is a list of text parts, with that content as one string: the parts
    joined with "\n", as vLLM's OpenAI server joins them (vllm/renderers/chat_utils.py,
    _parse_chat_message_content_parts), so a template that expects text gets the prompt vLLM would send.
    Other parts (images, audio, files) are refused: ValueError, naming the part."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts, _ = content_parts(content, index)
    return {**message, "content": "\n".join(part["text"] for part in parts)}


@functools.lru_cache(maxsize=8)
def cached_formatter(**options) -> PromptFormatter:
    return PromptFormatter(**options)


def format_prompts(batch: pa.Table, **options) -> pa.Table:
    """The formatter as a Ray Data task: each worker process loads the tokenizer once, on its first batch,
    and keeps it. Tasks, unlike a pool of actors, spread over every free CPU, and Ray Data fuses them
    with the read before and the repartition after (util/pipeline.py)."""
    return cached_formatter(**options)(batch)
