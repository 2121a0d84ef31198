"""Images for vision-language models: one main.py run of the tiny random LLaVA (util/model_dirs/tiny_model.py) serves
the run's tests. Its input is a Parquet file whose `image` column holds, per row, a list of images in
Hugging Face datasets' form ({"bytes", "path"}): a local path, the bytes themselves, an http URL (a local
http.server), an s3:// path (moto), two images, none; and bad ones: a missing file, a file that is not an
image, one over --max-image-bytes, an unreachable URL, one image too many. The good rows must answer and
the bad ones be error rows with exact messages; the image must reach the model (different images, different
answers; the same, the same), and the greedy tokens must equal transformers' LlavaForConditionalGeneration
on the same weights, in float32. OpenAI batch files with image_url parts (a data: URL, an http URL) are
checked up to the engine's input: their prompt tokens and image bytes equal those of the run's rows.

vLLM 0.32's CPU build cannot import its LLaVA model without torchvision, which the CPU stack cannot have:
the run's processes get tests/no_torchvision/sitecustomize.py on their path, which says why and what it
changes (one import, to its PIL twin).

    .venv/bin/python -m pytest tests/test_images.py
"""

import base64
import functools
import http.server
import io
import json
import os
import subprocess
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.images import write_workload
from conftest import REPO, closed_local_port_url, run_main
from util import columns as col
from util.features.images import PROMPT_IMAGES, ImageError, Images, VisionFormatter, describe, fetch_images, image_sources, open_image
from util.features.openai_batch import batch_kind, output_record, request_row, request_table
from util.features.preflight import row_error_kind
from util.model_dirs.tiny_model import tiny_llava_dir, tiny_model_dir

MAX_TOKENS, MAX_IMAGE_BYTES = 6, 30_000
SHIM = REPO / "tests" / "no_torchvision"
ASK = "Describe the image."


def png(seed: int, width: int = 40, height: int = 30) -> bytes:
    """A PNG of seeded noise: each seed its own image, and noise does not compress, so size follows area."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory, s3_server):
    """The images, where the run finds them: a folder (local paths, and the http server's root) and an
    S3 bucket; yields (folder, base URL, bucket)."""
    import boto3

    folder = tmp_path_factory.mktemp("images")
    for name, seed in (("a.png", 1), ("c.png", 3), ("d.png", 4)):
        (folder / name).write_bytes(png(seed))
    (folder / "big.png").write_bytes(png(5, 120, 120))  # about 43 kB: over MAX_IMAGE_BYTES
    (folder / "notes.png").write_text("a text file, named like an image")
    bucket = "images-test"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="d.png", Body=(folder / "d.png").read_bytes())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_port}", bucket
    finally:
        server.shutdown()


def input_rows(folder, url: str, bucket: str, unreachable: str) -> list[dict]:
    path = lambda name: {"bytes": None, "path": str(folder / name)}
    return [
        {"key": "path", "text": ASK, "image": [path("a.png")]},
        {"key": "path-again", "text": ASK, "image": [path("a.png")]},
        {"key": "bytes", "text": ASK, "image": [{"bytes": png(2), "path": None}]},
        {"key": "http", "text": ASK, "image": [{"bytes": None, "path": f"{url}/c.png"}]},
        {"key": "s3", "text": ASK, "image": [{"bytes": None, "path": f"s3://{bucket}/d.png"}]},
        {"key": "two", "text": "Compare the two images.", "image": [path("a.png"), path("c.png")]},
        {"key": "text-only", "text": "What is the capital of France?", "image": []},
        {"key": "missing", "text": ASK, "image": [path("missing.png")]},
        {"key": "not-image", "text": ASK, "image": [path("notes.png")]},
        {"key": "too-large", "text": ASK, "image": [path("big.png")]},
        {"key": "unreachable", "text": ASK, "image": [{"bytes": None, "path": f"{unreachable}/a.png"}]},
        {"key": "too-many", "text": ASK, "image": [path("a.png"), path("c.png"), path("d.png")]},
    ]


IMAGE_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


@pytest.fixture(scope="module")
def run(images, tmp_path_factory):
    """The run's output rows by key, its stdout, and its input's unreachable URL."""
    folder, url, bucket = images
    work = tmp_path_factory.mktemp("run")
    unreachable = closed_local_port_url()
    rows = input_rows(folder, url, bucket, unreachable)
    table = pa.table({"key": [r["key"] for r in rows], "text": [r["text"] for r in rows],
                      "image": pa.array([r["image"] for r in rows], IMAGE_TYPE)})
    pq.write_table(table, work / "in.parquet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")]))}
    result = run_main("--model", tiny_llava_dir(), "--input-path", work / "in.parquet", "--image-column", "image",
                      "--max-images-per-row", 2, "--max-image-bytes", MAX_IMAGE_BYTES, "--concurrency", 1,
                      "--max-tokens", MAX_TOKENS, "--logprobs", 0, "--prompt-logprobs", 0, "--engine-arg", "dtype=float32",
                      "--max-error-fraction", 1, "--output-path", work / "out",
                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 0, result.stdout[-5000:]
    output = pq.read_table(work / "out")
    return {row["key"]: row for row in output.to_pylist()}, output.column_names, result.stdout, unreachable


@pytest.mark.engine
def test_good_rows_answer_from_every_kind_of_source(run):
    rows, _, stdout, _ = run
    for key in ("path", "path-again", "bytes", "http", "s3", "two", "text-only"):
        assert rows[key]["error"] is None, (key, rows[key]["error"])
        assert rows[key]["num_generated_tokens"] == MAX_TOKENS and rows[key]["finish_reason"] == "length", key
    assert "summary: 12 rows: 7 ok, 5 errors" in stdout


@pytest.mark.engine
def test_bad_images_are_error_rows_that_name_the_image_and_the_reason(run, images):
    rows, _, _, unreachable = run
    folder = images[0]
    assert {key: rows[key]["error"] for key in ("missing", "not-image", "too-large", "unreachable", "too-many")} == {
        "missing": f"image 1 of the row ({folder}/missing.png): not found",
        "not-image": f"image 1 of the row ({folder}/notes.png): not an image",
        "too-large": f"image 1 of the row ({folder}/big.png): {(folder / 'big.png').stat().st_size} bytes, over the "
                     f"limit of {MAX_IMAGE_BYTES} bytes (--max-image-bytes)",
        "unreachable": f"image 1 of the row ({unreachable}/a.png): cannot fetch (Connection refused)",
        "too-many": "too many images: 3; at most 2 per row (--max-images-per-row)",
    }
    assert {row_error_kind(rows[key]["error"]) for key in ("missing", "too-large")} == {"bad image"}  # --preflight's


@pytest.mark.engine
def test_the_image_reaches_the_model(run):
    rows = run[0]
    text = {key: rows[key]["generated_text"] for key in ("path", "path-again", "bytes", "http", "s3")}
    assert text["path"] == text["path-again"]  # the same image and text: the same greedy answer
    assert len({text[key] for key in ("path", "bytes", "http", "s3")}) == 4  # four images, four answers


@pytest.mark.engine
def test_output_keeps_the_input_columns_and_drops_the_engine_inputs(run):
    rows, names, _, _ = run
    assert "image" in names and PROMPT_IMAGES not in names and col.PROMPT_TOKEN_IDS not in names
    assert rows["bytes"]["image"] == [{"bytes": png(2), "path": None}]


@pytest.fixture(scope="module")
def reference(images):
    """transformers' own LLaVA and processor on the tiny model's weights, in float32."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine torch's two threads wait on each other
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir(), dtype=torch.float32).eval()
    yield model, AutoProcessor.from_pretrained(tiny_llava_dir())
    torch.set_num_threads(threads)


@pytest.mark.engine
def test_prompt_tokens_and_greedy_tokens_match_transformers(run, reference, images):
    """vLLM expands the image placeholder to the image's tokens as LlavaProcessor does, num_input_tokens
    counts them, and the answer is LlavaForConditionalGeneration's, token for token."""
    import torch
    from PIL import Image

    model, processor = reference
    row = run[0]["path"]
    inputs = processor(text=[row["prompt"]], images=[Image.open(images[0] / "a.png")], add_special_tokens=False,
                       return_tensors="pt")
    expected_prompt = inputs["input_ids"][0].tolist()
    assert expected_prompt.count(32000) == 16  # 4x4 patches of the 32-pixel tower, CLS dropped
    assert [t["token_id"] for t in row["prompt_logprobs"]] == expected_prompt  # vLLM's prompt, token for token
    assert row["num_input_tokens"] == len(expected_prompt)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(expected_prompt):]
    assert [t["token_id"] for t in row["logprobs"]] == generated.tolist()
    assert row["generated_text"] == processor.decode(generated, skip_special_tokens=True)


# --- OpenAI batch files: image_url parts, up to the engine's input ---

@pytest.fixture(scope="module")
def formatter():
    return VisionFormatter(tiny_llava_dir(), "messages", max_images_per_row=2, max_image_bytes=MAX_IMAGE_BYTES)


def chat_request(custom_id: str, parts: list[dict]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": parts}]}})


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_openai_image_url_parts_give_the_engine_what_the_image_column_gives(formatter, images, tmp_path):
    folder, url, _ = images
    lines = [chat_request("data", [image_part(data_url(png(1))), {"type": "text", "text": ASK}]),
             chat_request("http", [image_part(f"{url}/c.png"), {"type": "text", "text": ASK}]),
             chat_request("bad-data", [image_part("data:image/png;base64,not base64!"), {"type": "text", "text": ASK}]),
             chat_request("http-404", [image_part(f"{url}/gone.png"), {"type": "text", "text": ASK}])]
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    assert batch_kind(str(tmp_path / "batch.jsonl")).first_image == f"{tmp_path}/batch.jsonl:1"
    requests = formatter(request_table([request_row(line, f"batch.jsonl:{n}") for n, line in enumerate(lines, 1)]))
    same = VisionFormatter(tiny_llava_dir(), "text", image_column="image", max_images_per_row=2)(
        pa.table({"text": [ASK, ASK], "image": [str(folder / "a.png"), str(folder / "c.png")]}))
    by_id = {row["custom_id"]: row for row in requests.to_pylist()}
    for custom_id, row in zip(("data", "http"), same.to_pylist()):
        assert by_id[custom_id]["error"] is None
        assert by_id[custom_id][col.PROMPT_TOKEN_IDS] == row[col.PROMPT_TOKEN_IDS]
        assert by_id[custom_id][PROMPT_IMAGES] == row[PROMPT_IMAGES]
        assert by_id[custom_id][col.NUM_INPUT_TOKENS] == row[col.NUM_INPUT_TOKENS] == len(row[col.PROMPT_TOKEN_IDS]) + 15
    assert by_id["bad-data"]["error"] == ("image 1 of the row (data:image/png;base64,...): a data: URL whose data "
                                          "is not valid base64")
    assert by_id["http-404"]["error"] == f"image 1 of the row ({url}/gone.png): cannot fetch (HTTP 404 File not found)"
    assert by_id["bad-data"][PROMPT_IMAGES] is None
    record = output_record({**by_id["bad-data"], col.ID: "bad-data"})
    assert record["response"]["status_code"] == 400 and record["error"]["message"] == by_id["bad-data"]["error"]


def test_openai_messages_keep_text_and_images_in_order(formatter):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "First:"}, image_part(data_url(png(1))),
                                             {"type": "text", "text": "then:"}, image_part(data_url(png(2)))]}]
    out = formatter(pa.table({"messages": [json.dumps(messages)]})).to_pylist()[0]
    assert out["prompt"] == "<s>[INST] Be brief.\n\nFirst:<image>\nthen:<image>\n [/INST]"
    assert out[PROMPT_IMAGES] == [png(1), png(2)] and out["error"] is None
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    assert formatter(pa.table({"messages": [json.dumps(audio)]}))["error"].to_pylist() == [
        "cannot format the messages: messages[0].content[0] is a 'input_audio' part; only text and image_url parts "
        "(with a url) are supported"]


# --- the model must take images: a table job is refused before any engine; an OpenAI request, on its line ---

TEXT_ONLY = "takes no images: it has no image processor (a text-only model); use a vision-language model such as LLaVA"


def test_a_text_only_model_given_images_is_refused_with_exit_code_2(main_here, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": ASK, "image": "a.png"}) + "\n")
    job = main_here("--model", tiny_model_dir(), "--input-path", tmp_path / "in.jsonl", "--image-column",
                    "image", "--concurrency", 1, "--output-path", tmp_path / "out")
    assert job.code == 2 and job.err.strip() == f"error: --image-column image, but {tiny_model_dir()} {TEXT_ONLY}"
    assert not (tmp_path / "out").exists()


def test_a_text_only_model_refuses_only_the_openai_requests_with_images(tmp_path):
    """As OpenAI's Batch API and vLLM's run-batch answer a request the model cannot serve: the plan is made
    (no exit 2), and its formatter makes each request with an image an error record saying why; the others
    run (tests/test_openai_batch.py runs such a file on the smoke model)."""
    from util.config import parse_args
    from util.features.images import NoImages
    from util.pipeline import pipeline_stages
    from util.plan import make_plan

    (tmp_path / "batch.jsonl").write_text(chat_request("a", [{"type": "text", "text": "hi"}]) + "\n"
                                          + chat_request("b", [image_part(data_url(png(1)))]) + "\n")
    plan = make_plan(parse_args(["--model", tiny_model_dir(), "--input-path", str(tmp_path / "batch.jsonl"),
                                 "--input-format", "openai", "--concurrency", "1"]), cluster={"CPU": 2.0})
    assert [type(part) for part in plan.parts if isinstance(part, (Images, NoImages))] == [NoImages]
    assert "limit_mm_per_prompt" not in plan.engine_kwargs
    (format_stage,) = [stage for stage in pipeline_stages(plan) if stage.name == "format"]
    options = dict(format_stage.map_batches["fn_kwargs"])
    formatter = options.pop("formatter")(**options)
    lines = (tmp_path / "batch.jsonl").read_text().splitlines()
    out = formatter(request_table([request_row(line, f"batch.jsonl:{n}") for n, line in enumerate(lines, 1)]))
    assert out["error"].to_pylist() == [None, f"an image_url part (messages[0].content[0]), but {tiny_model_dir()} "
                                              f"{TEXT_ONLY}"]


def test_an_image_column_missing_from_the_input_is_refused(main_here, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": ASK, "picture": "a.png"}) + "\n")
    job = main_here("--model", tiny_llava_dir(), "--input-path", tmp_path / "in.jsonl", "--image-column",
                    "image", "--concurrency", 1, "--output-path", tmp_path / "out")
    assert (job.code, job.err.strip()) == (2, "error: in.jsonl: no column 'image'; columns are: text, picture")


# --- the image concern on its own ---

def test_image_sources_take_every_documented_shape():
    assert image_sources(None) == image_sources("") == image_sources([]) == []
    assert image_sources(" s3://b/k.png ") == ["s3://b/k.png"]
    assert image_sources(b"\x89PNG") == [b"\x89PNG"]
    assert image_sources({"bytes": None, "path": "a.png"}) == ["a.png"]
    assert image_sources([{"bytes": b"x", "path": "ignored"}, "b.png"]) == [b"x", "b.png"]
    with pytest.raises(ImageError, match="a int is not an image"):
        image_sources(7)
    assert describe(b"abc") == "3 bytes" and describe(data_url(b"abc")) == "data:image/png;base64,..."


def test_a_plain_binary_column_of_bytes_is_read_as_images(tmp_path):
    formatter = VisionFormatter(tiny_llava_dir(), "text", image_column="image")
    table = pa.table({"text": [ASK, ASK], "image": pa.array([png(1), b"not an image"], pa.binary())})
    pq.write_table(table, tmp_path / "in.parquet")
    out = formatter(pq.read_table(tmp_path / "in.parquet")).to_pylist()
    assert out[0]["error"] is None and out[0][PROMPT_IMAGES] == [png(1)]
    assert out[1]["error"] == "image 1 of the row (12 bytes): not an image"


def test_pixel_limit_is_read_from_the_header():
    with pytest.raises(ImageError, match=r"^40x30 pixels, over the limit of 1000 \(VLLM_MAX_IMAGE_PIXELS\)$"):
        open_image(png(1), max_pixels=1000)
    assert open_image(png(1)).size == (40, 30)
    cut = png(1)[:200]
    with pytest.raises(ImageError, match=r"^not a readable image \("):
        open_image(cut)
    fetched = fetch_images([data_url(png(1)), "data:text/plain,hi"], most=10)
    assert str(fetched[0]) == f"{len(png(1))} bytes, over the limit of 10 bytes (--max-image-bytes)"
    assert str(fetched[1]) == "a data: URL must be data:<media type>;base64,<data>"


def test_the_bench_workload_gives_each_row_its_own_image(tmp_path):
    rows = [json.loads(line) for line in write_workload(tmp_path, 4, 32).read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"req-{i:06d}" for i in range(4)]
    blobs = [open(row["image"], "rb").read() for row in rows]
    assert len(set(blobs)) == 4 and all(open_image(blob).size == (336, 336) for blob in blobs)


def test_a_chat_template_held_by_the_processor_alone_formats_the_images(tmp_path):
    """As llava-hf/llava-1.5-7b-hf ships it: the template in the processor's chat_template.json, none in the
    tokenizer. A vision job's plan and formatter take it from the processor."""
    import shutil

    from util.config import Config
    from util.plan import make_plan

    model = shutil.copytree(tiny_llava_dir(), tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "chat_template.json").write_text(json.dumps({"chat_template": config.pop("chat_template")}))
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink()
    plan = make_plan(Config(model=str(model), image_column="image", concurrency=1), cluster={"CPU": 2.0})
    images = lambda plan: any(isinstance(part, Images) for part in plan.parts)
    assert (plan.prompt_format, images(plan), plan.engine_kwargs["limit_mm_per_prompt"]) == ("chat_template", True,
                                                                                            {"image": 1})
    out = VisionFormatter(str(model), "text", prompt_format=plan.prompt_format, image_column="image")(
        pa.table({"text": [ASK], "image": [png(1)]}))
    assert out["prompt"].to_pylist() == ["<s>[INST] <image>\nDescribe the image. [/INST]"]
    text_plan = make_plan(Config(model=str(model), concurrency=1), cluster={"CPU": 2.0})  # a text job: as before
    assert (text_plan.prompt_format, images(text_plan), "images" in text_plan.fingerprint) == ("plain", False, False)
    with pytest.raises(ValueError) as refused:  # plain text has no place for an image
        make_plan(Config(model=str(model), image_column="image", prompt_format="plain", concurrency=1),
                  cluster={"CPU": 2.0})
    assert str(refused.value) == (f"--image-column image, but images need the model's chat template to place them: "
                                  f"--prompt-format plain and {model} has a chat template")
