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
import dataclasses

from util.errors import InputError
from util.parts import Part, flag
from util.prompt_format import choose_prompt_format
# Reading images (sources) and the vision job's formatter (formatter); the names the docstring shows and the
# tests use are imported from here.
from util.features.images.sources import (DEFAULT_MAX_IMAGE_BYTES, ImageError, describe, engine_images, fetch_images,
                                          image_sources, open_image)
from util.features.images.formatter import PROMPT_IMAGES, TextOnlyModel, VisionFormatter, model_processor


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
        raise InputError("--image-column does not apply to --input-format openai: a request's images are its "
                         "image_url parts")
    if not cfg.max_images_per_row >= 1:
        raise InputError(f"--max-images-per-row must be >= 1, got {cfg.max_images_per_row}")
    if not cfg.max_image_bytes >= 1:
        raise InputError(f"--max-image-bytes must be >= 1, got {cfg.max_image_bytes}")
    if cfg.task == "embed" and cfg.image_column is not None:
        raise InputError("--task embed embeds text only; --image-column is for generation")


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
    error record saying why (util/features/openai_batch/ ChatFormatter), and the others run."""

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
        raise InputError(f"{given}, but {error}") from None
    except Exception:  # cannot be loaded on the driver: left to the formatter, as a tokenizer is
        processor = None
    if processor is not None:
        if choose_prompt_format(cfg.model, processor, cfg.prompt_format) != "chat_template":
            raise InputError(f"{given}, but images need the model's chat template to place them: --prompt-format "
                             f"{cfg.prompt_format} and {cfg.model} has "
                             f"{'a' if getattr(processor, 'chat_template', None) else 'no'} chat template")
    most = (cfg.engine_arg.get("limit_mm_per_prompt") or {}).get("image", cfg.max_images_per_row)
    images = Images(cfg, most)
    if processor is not None:  # the processor's template formats a vision job's prompts
        from util.plan import template_provenance

        images.plan = {"prompt_format": "chat_template", "provenance": template_provenance(processor)}
    return images
