"""The formatter of a vision job (util/features/images/): the model's processor places each row's images
with its chat template; the images are fetched and checked (a bad one fails its row, naming it), counted
in the prompt's tokens as the engine counts them, and passed on encoded (prompt_images) to the replica."""

import pyarrow as pa

from util.errors import InputError, RowError, error_text, row_error
from util.prompt_format import PromptFormatter
from util.features.images.sources import (DEFAULT_MAX_IMAGE_BYTES, TOO_MANY_IMAGES, ImageError, bad_image, describe,
                                          fetch_images, image_sources, open_image)

PROMPT_IMAGES = "prompt_images"  # a row's images, encoded, in prompt order: for the replica, not written
PROMPT_IMAGES_TYPE = pa.list_(pa.large_binary())  # large: a batch's images may pass 2 GiB
IMAGE_PART = "image_url"  # an OpenAI content part holding an image: {"type": "image_url", "image_url": {"url": ...}}


class TextOnlyModel(ValueError):
    """A model given images that takes none."""


def model_processor(model: str, revision: str | None = None):
    """The model's processor (AutoProcessor), which must handle images: TextOnlyModel if it has none."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model, revision=revision)
    if getattr(processor, "image_processor", None) is None:
        raise TextOnlyModel(f"{model} takes no images: it has no image processor (a text-only model); use a "
                            "vision-language model such as LLaVA")
    return processor


def image_parts(messages: list[dict]) -> tuple[list[dict], list]:
    """OpenAI-style messages for a vision model's chat template, and the sources of their images in order:
    each `image_url` part becomes an image part where it stands, text parts stay text parts, a string
    content becomes one text part. Other parts are refused: ValueError, naming the part."""
    converted, sources = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if content is None or isinstance(content, str):
            converted.append({**message, "content": [{"type": "text", "text": content or ""}]})
            continue
        parts = []
        for j, part in enumerate(content if isinstance(content, list) else [content]):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind in ("text", "refusal") and isinstance(part.get(kind), str):
                parts.append({"type": "text", "text": part[kind]})
            elif kind == IMAGE_PART and isinstance((part.get(IMAGE_PART) or {}).get("url"), str):
                parts.append({"type": "image"})
                sources.append(part[IMAGE_PART]["url"])
            else:
                raise InputError(f"messages[{i}].content[{j}] is a {kind!r} part; only text and image_url parts "
                                 "(with a url) are supported")
        converted.append({**message, "content": parts})
    return converted, sources


class VisionFormatter(PromptFormatter):
    """The formatter of a vision job: the processor's chat template places each row's images, which it
    fetches and checks (a bad one fails its row, naming it), counts their tokens as the engine will, and
    adds their encoded bytes (prompt_images) for the replica."""

    def __init__(self, model: str, text_column: str, image_column: str | None = None, max_images_per_row: int = 1,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, **options):
        super().__init__(model, text_column, **options)
        self.image_column, self.max_images_per_row, self.max_image_bytes = image_column, max_images_per_row, max_image_bytes
        self.images = []  # the current batch's: per row (sources, encoded bytes)

    def chat_templates(self, model: str, revision: str | None):
        self.processor = model_processor(model, revision)  # its chat template places the images
        return self.processor

    def content(self, text: str, images: int = 0):
        """Images first, as LLaVA's prompts have them, then the text; vision templates expect parts."""
        return [{"type": "image"}] * images + ([{"type": "text", "text": text}] if text else [])

    def row_prompt(self, value, image_value) -> tuple[str, list]:
        """(the prompt, its images' sources in order) for a row's text or messages and its image column value."""
        if isinstance(value, str) and self.text_column == "messages":
            value = __import__("json").loads(value)
        try:
            sources = image_sources(image_value)
        except ImageError as error:
            raise RowError(bad_image(1, f"column '{self.image_column}'", error)) from None
        if isinstance(value, list):
            if sources:
                raise RowError(f"a list of messages holds its images as image_url parts, not in column "
                               f"'{self.image_column}'")
            try:
                messages, sources = image_parts(value)
            except ValueError as error:
                raise RowError(f"cannot format the messages: {error_text(error)}") from None
            if not sources and not any(p["text"].strip() for m in messages for p in m["content"] if p["type"] == "text"):
                raise RowError(self.empty())
            try:
                return self.chat(messages), sources
            except Exception as error:  # a template that refuses these roles, say: this row only
                raise RowError(f"cannot format the messages: {error_text(error)}") from None
        if (value is None or not str(value).strip()) and not sources:  # an image alone is a prompt
            raise RowError(self.empty())
        return self.chat([{"role": "user", "content": self.content("" if value is None else str(value), len(sources))}]), sources

    def empty(self) -> str:
        from util.errors import EMPTY_PROMPT

        return row_error(EMPTY_PROMPT, column=self.text_column)

    def prompts(self, batch: pa.Table, errors: list) -> list[str]:
        values = batch[self.image_column].to_pylist() if self.image_column else [None] * batch.num_rows
        prompts, wanted = [""] * batch.num_rows, [[] for _ in range(batch.num_rows)]
        for i, (value, image_value) in enumerate(zip(batch[self.text_column].to_pylist(), values)):
            if errors[i] is None:
                try:
                    prompts[i], wanted[i] = self.row_prompt(value, image_value)
                except RowError as error:
                    errors[i] = str(error)
                if len(wanted[i]) > self.max_images_per_row:  # refused before any is fetched
                    errors[i] = row_error(TOO_MANY_IMAGES, count=len(wanted[i]), most=self.max_images_per_row)
        fetching = [sources if error is None else [] for sources, error in zip(wanted, errors)]
        fetched = iter(fetch_images([s for sources in fetching for s in sources], self.max_image_bytes))
        self.images = [(sources, [next(fetched) for _ in sources]) for sources in fetching]
        for i, (sources, blobs) in enumerate(self.images):
            errors[i] = errors[i] or next((bad_image(n, describe(source), blob) for n, (source, blob)
                                           in enumerate(zip(sources, blobs), 1) if isinstance(blob, ImageError)), None)
        return prompts

    def counts(self, prompts: list[str], token_ids: list, errors: list) -> list[int]:
        """The prompt's length as the engine sees it: each image placeholder expanded to that image's tokens
        by the model's processor, as vLLM expands it. Each image is decoded and checked here (a row error
        naming it); the decoded images are dropped as soon as they are counted."""
        counts = [len(ids) for ids in token_ids]
        for i, (prompt, (sources, blobs)) in enumerate(zip(prompts, self.images)):
            if not blobs or errors[i] is not None:
                continue
            try:
                images = []
                for number, (source, blob) in enumerate(zip(sources, blobs), start=1):
                    try:
                        images.append(open_image(blob))
                    except ImageError as error:
                        raise RowError(bad_image(number, describe(source), error)) from None
                inputs = self.processor(text=[prompt], images=images,
                                        add_special_tokens=self.prompt_format != "chat_template")
                counts[i] = len(inputs["input_ids"][0])
            except RowError as error:
                errors[i] = str(error)
            except Exception as error:  # the processor refuses what PIL read: this row only
                errors[i] = (f"the model's processor cannot take the row's images "
                             f"({type(error).__name__}: {error_text(error)})")
        return counts

    def more_columns(self, errors: list) -> dict:
        # Only what the engine takes: a failed row's images stay behind.
        return {PROMPT_IMAGES: pa.array([blobs if blobs and error is None else None
                                         for (_, blobs), error in zip(self.images, errors)], PROMPT_IMAGES_TYPE)}
