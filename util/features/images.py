"""Images for vision-language models (a feature, util/parts.py): where a row's images come from, fetched
and checked on CPU by the formatter, placed by the model's own chat template, and decoded for vLLM in the
replica.

    python main.py --model llava-hf/llava-1.5-7b-hf --input-path photos.parquet --image-column image
    from util.features.images import ImageError, engine_images, fetch_images, image_sources, open_image
    sources = image_sources(row["image"])        # ["s3://bucket/cat.jpg"], [b"\\x89PNG..."], ...
    blobs = fetch_images(sources, most=20 * 1024**2)   # each the encoded bytes, or the ImageError
    open_image(blobs[0])                         # decoded and checked (PIL), or ImageError
    engine_images(blobs)                         # in the replica: vLLM's own decoding, for multi_modal_data

An image is a local path (or file://), an s3:// or gs:// path, an http(s):// URL, a data: URL (base64),
or the encoded bytes themselves (a Parquet binary column; a Hugging Face datasets Image struct
{"bytes", "path"} too); a row may hold a list of them. Fetching and checking happen in the formatter's Ray
tasks, on CPUs, so a bad image is an error row before any GPU sees it. The row error names the image (its
place in the row and its source) and why: not found, cannot fetch (the HTTP status or network error),
over --max-image-bytes, over vLLM's pixel limit (VLLM_MAX_IMAGE_PIXELS), not an image, not readable. Only
the encoded bytes travel through Ray Data to the replica; it decodes them with vLLM's ImageMediaIO, as
vLLM's OpenAI server decodes an image_url, so hashing for vLLM's caches works on the bytes too.

The job: --image-column (or an OpenAI batch file's image_url parts) makes it a vision job. The plan loads
the model's processor and refuses a model that takes no images (exit 2, before any engine), except for an
OpenAI batch file: there each request with an image is an error record saying so, and the others run, as
OpenAI's Batch API and vLLM's run-batch answer a request the model cannot serve; the prompt is
the processor's chat template with an image part per image (before the text), so the placeholder is the
model's own; the row's token ids keep one placeholder per image, which vLLM expands, and
`num_input_tokens` counts the prompt as the engine sees it (the processor's count).
"""

import asyncio
import base64
import binascii
import dataclasses
import functools
import io
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from util.errors import ROW_ERRORS, RowError, error_text, row_error
from util.parts import Part, flag
from util.replica.internals import image_media_io
from util.prompt_format import PromptFormatter, choose_prompt_format
from util.storage import resolve, s3_location

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024**2  # OpenAI's limit for one image of a chat request
# vLLM refuses larger images in the replica (its VLLM_MAX_IMAGE_PIXELS, 178,956,970 by default, which is
# also where PIL stops opening a file as a decompression bomb); refused here first, from the header alone.
MAX_IMAGE_PIXELS = int(os.environ.get("VLLM_MAX_IMAGE_PIXELS", "178956970"))
HTTP_TIMEOUT_S = 30.0
FETCH_THREADS = 16  # a formatter task fetches a batch's images at once: the wait is the network's, not the CPU's
PROMPT_IMAGES = "prompt_images"  # a row's images, encoded, in prompt order: for the replica, not written
PROMPT_IMAGES_TYPE = pa.list_(pa.large_binary())  # large: a batch's images may pass 2 GiB
IMAGE_PART = "image_url"  # an OpenAI content part holding an image: {"type": "image_url", "image_url": {"url": ...}}
BAD_IMAGE, TOO_MANY_IMAGES = "bad image", "too many images"
ROW_ERRORS.update({BAD_IMAGE: "image {number} of the row ({source}): {reason}",
                   TOO_MANY_IMAGES: "too many images: {count}; at most {most} per row (--max-images-per-row)"})


class ImageError(ValueError):
    """Why an image cannot go to the model; util/errors.py's BAD_IMAGE message puts it in the row's error."""


def image_sources(value) -> list:
    """An image column's value as its images' sources in order: strings (paths, URLs) or bytes. None, an
    empty string or an empty list: no image."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, (list, tuple)):
        return [source for item in value for source in image_sources(item)]
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: the bytes, else the path
        return image_sources(value.get("bytes") if value.get("bytes") is not None else value.get("path"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, str):
        return [value.strip()]
    raise ImageError(f"a {type(value).__name__} is not an image: give a path, a URL or the image's bytes")


def describe(source) -> str:
    """An image's source as an error message names it: bytes by their size, a data: URL by its media type."""
    if isinstance(source, bytes):
        return f"{len(source)} bytes"
    if source.startswith("data:"):
        return source.split(",", 1)[0] + ",..."
    return source


def _too_large(most: int, size: int | None = None) -> ImageError:
    return ImageError(f"{'' if size is None else f'{size} bytes, '}over the limit of {most} bytes (--max-image-bytes)")


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(root: str) -> pafs.FileSystem:
    """One filesystem per bucket and worker: resolving an s3:// path asks S3 for the bucket's region."""
    return resolve(root)[0]


def _read_file(source: str, most: int) -> bytes:
    parsed = urlparse(source)
    if parsed.scheme in ("s3", "gs", "gcs"):
        filesystem = _bucket_filesystem(f"{parsed.scheme}://{parsed.netloc}")
        bucket, key, _ = s3_location(source)  # the one parser of a bucket URL (gs:// reads the same way)
        path = f"{bucket}/{key}"
    else:
        filesystem, path = resolve(source)
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ImageError("not found")
        if info.type != pafs.FileType.File:
            raise ImageError("a folder, not a file")
        if info.size is not None and info.size > most:
            raise _too_large(most, info.size)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:  # permissions, a vanished file, a bucket we may not read
        raise ImageError(f"cannot read ({error.strerror or error_text(error)})") from None


def _fetch_url(url: str, most: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "batch-llm"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > most:
                raise _too_large(most, int(length))
            data = response.read(most + 1)
    except urllib.error.HTTPError as error:
        raise ImageError(f"cannot fetch (HTTP {error.code} {error.reason})") from None
    except urllib.error.URLError as error:
        reason = error.reason  # a string, or the socket's error
        if isinstance(reason, BaseException):
            reason = getattr(reason, "strerror", None) or error_text(reason)
        raise ImageError(f"cannot fetch ({reason})") from None
    except (socket.timeout, TimeoutError):
        raise ImageError(f"cannot fetch (no answer in {HTTP_TIMEOUT_S:g} s)") from None
    except OSError as error:  # a connection reset while reading, say
        raise ImageError(f"cannot fetch ({error.strerror or error_text(error)})") from None
    if len(data) > most:
        raise _too_large(most)
    return data


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError("a data: URL must be data:<media type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("a data: URL whose data is not valid base64") from None


def read_image_bytes(source, most: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The encoded image of one source (see image_sources), at most `most` bytes; ImageError why not."""
    if isinstance(source, bytes):
        data = source
    elif source.startswith("data:"):
        data = _decode_data_url(source)
    elif urlparse(source).scheme in ("http", "https"):
        data = _fetch_url(source, most)
    else:
        data = _read_file(source, most)
    if len(data) > most:
        raise _too_large(most, len(data))
    return data


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """The decoded image (PIL), checked: an image format PIL knows, at most `max_pixels` (read from the
    header before decoding), and readable whole (a truncated file fails here, not in the replica)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's own limit, the same number as vLLM's default
        raise ImageError(f"over the limit of {max_pixels} pixels (VLLM_MAX_IMAGE_PIXELS)") from None
    except (Image.UnidentifiedImageError, OSError, ValueError):
        raise ImageError("not an image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} pixels, over the limit of {max_pixels} (VLLM_MAX_IMAGE_PIXELS)")
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data: PIL raises OSError, ValueError, SyntaxError...
        raise ImageError(f"not a readable image ({error_text(error)})") from None
    return image


def fetch_images(sources: list, most: int = DEFAULT_MAX_IMAGE_BYTES) -> list:
    """read_image_bytes of every source, fetched concurrently: each the bytes or the ImageError."""
    def attempt(source):
        try:
            return read_image_bytes(source, most)
        except ImageError as error:
            return error

    if len(sources) <= 1:
        return [attempt(source) for source in sources]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(sources))) as pool:
        return list(pool.map(attempt, sources))


def engine_images(blobs: list[bytes]) -> list:
    """The replica's side: encoded images decoded by vLLM's ImageMediaIO (RGB, a transparent background
    made white, EXIF orientation applied), as vLLM's server decodes an image_url. Each keeps its bytes
    (MediaWithBytes), which vLLM hashes for its caches instead of the pixels."""
    loader = image_media_io()()
    return [loader.load_bytes(data) for data in blobs]


def bad_image(number: int, where: str, reason) -> str:
    """The error of a row whose image `number` (1-based, in prompt order), from `where`, fails for `reason`."""
    return row_error(BAD_IMAGE, number=number, source=where, reason=reason)


# --- the feature: flags, checks, the plan's part ---------------------------------------------------------

@dataclasses.dataclass
class Flags:
    image_column: str | None = flag("Column holding each row's image: a local path (read by the workers: on a "
                                    "cluster, one every node has), an s3:// or gs:// path, an http(s):// or data: "
                                    "URL, or the image's bytes (a Parquet binary column), or a list of them. The "
                                    "model must take images. OpenAI batch files need no flag: their image_url parts "
                                    "are the images.", default=None)
    max_images_per_row: int = flag("Most images one row may hold (vLLM's limit_mm_per_prompt); a row with more is "
                                   "an error row.", default=1)
    max_image_bytes: int = flag("Largest image accepted, in bytes, as a file or a download; a larger one is an "
                                "error row.", default=DEFAULT_MAX_IMAGE_BYTES)


def check(cfg) -> None:
    if cfg.image_column is not None and cfg.input_format == "openai":
        raise ValueError("--image-column does not apply to --input-format openai: a request's images are its "
                         "image_url parts")
    if not cfg.max_images_per_row >= 1:
        raise ValueError(f"--max-images-per-row must be >= 1, got {cfg.max_images_per_row}")
    if not cfg.max_image_bytes >= 1:
        raise ValueError(f"--max-image-bytes must be >= 1, got {cfg.max_image_bytes}")
    if cfg.task == "embed" and cfg.image_column is not None:
        raise ValueError("--task embed embeds text only; --image-column is for generation")


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


class Images(Part):
    """A vision job: its formatter fetches, checks and places each row's images; its replicas decode them."""

    def __init__(self, cfg, most: int):
        self.options = {"image_column": cfg.image_column, "max_images_per_row": most,
                        "max_image_bytes": cfg.max_image_bytes}
        self.engine_kwargs = {"limit_mm_per_prompt": {"image": cfg.max_images_per_row}}
        # Which column holds them, and which are too large: they decide which rows fail.
        self.fingerprint = {"images": {"image_column": cfg.image_column, "max_image_bytes": cfg.max_image_bytes}}
        self.input_columns = (cfg.image_column,) if cfg.image_column else ()
        self.engine_inputs = (PROMPT_IMAGES,)

    def stages(self, plan, stages: list) -> list:
        return [stage if stage.name != "format" else dataclasses.replace(
            stage.with_options(fn_kwargs={**stage.map_batches["fn_kwargs"], "formatter": VisionFormatter, **self.options}),
            needs=stage.needs + self.input_columns, adds=stage.adds + (PROMPT_IMAGES,)) for stage in stages]

    async def prepare(self, request) -> None:
        blobs = request.row.get(PROMPT_IMAGES)
        if blobs:  # decoded off the event loop, which meanwhile feeds the engine the other rows
            request.prompt["multi_modal_data"] = {"image": await asyncio.to_thread(engine_images, blobs)}


class NoImages(Part):
    """An OpenAI batch job whose model takes no images: the formatter makes each request that holds one an
    error record saying why (util/features/openai_batch.py ChatFormatter), and the others run."""

    def __init__(self, reason: str):
        self.reason = reason

    def stages(self, plan, stages: list) -> list:
        return [stage.with_options(fn_kwargs={**stage.map_batches["fn_kwargs"], "no_images": self.reason})
                if stage.name == "format" else stage for stage in stages]


def part(plan) -> Images | NoImages | None:
    """A vision job's part: --image-column, or an OpenAI batch file with image_url parts. A model that takes
    no images, or whose prompt format cannot place them, is refused (ValueError: exit 2) before any engine;
    but a text-only model given an OpenAI batch file answers its other requests (NoImages)."""
    cfg = plan.cfg
    request = next((p.first_image for p in plan.parts if getattr(p, "first_image", None)), None)
    if cfg.image_column is None and request is None:
        return None
    given = f"--image-column {cfg.image_column}" if cfg.image_column else f"{request} has an image_url part"
    try:
        processor = model_processor(cfg.model, cfg.revision)
    except TextOnlyModel as error:
        if cfg.image_column is None:  # one request is not the job: that line's error record, as the Batch API has it
            return NoImages(str(error))
        raise ValueError(f"{given}, but {error}") from None
    except Exception:  # cannot be loaded on the driver: left to the formatter, as a tokenizer is
        processor = None
    if processor is not None:
        if choose_prompt_format(cfg.model, processor, cfg.prompt_format) != "chat_template":
            raise ValueError(f"{given}, but images need the model's chat template to place them: --prompt-format "
                             f"{cfg.prompt_format} and {cfg.model} has "
                             f"{'a' if getattr(processor, 'chat_template', None) else 'no'} chat template")
        from util.plan import template_hash

        plan.prompt_format = plan.provenance["prompt_format"] = "chat_template"
        template_hash(plan, processor)  # the processor's template formats a vision job's prompts
    most = (cfg.engine_arg.get("limit_mm_per_prompt") or {}).get("image", cfg.max_images_per_row)
    return Images(cfg, most)


# --- the formatter of a vision job ----------------------------------------------------------------------

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
                raise ValueError(f"messages[{i}].content[{j}] is a {kind!r} part; only text and image_url parts "
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
