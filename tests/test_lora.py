"""LoRA adapters per row (util/features/lora.py): adapters made for the tiny model with peft, one main.py run (in this
process, on the test session's Ray) over
rows that use none, a zero adapter (peft's default init: B = 0), a random one (by name, by local path
and by s3:// path on moto), a wider one, and adapters that cannot be used. The random and wide adapters'
greedy outputs equal transformers + peft's, merged, in float32: the adapter really applies. Then the
flags, the plan's refusals (exit 2), --preflight's count and OpenAI requests' `model`, without an engine.

    .venv/bin/python -m pytest tests/test_lora.py -q
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from util.config import Config, parse_args
from util.errors import InputError
from util.features.lora import Lora, plan_lora
from util.features.openai_batch import request_row, request_table
from util.plan import make_plan
from util.predictor import checked_request
from util.model_dirs.tiny_model import tiny_model_dir

CAPITAL, COLORS = "What is the capital of France?", "Name three colors."
MAX_TOKENS = 12


def make_adapter(folder: Path, rank: int = 8, targets=("q_proj", "v_proj"), seed: int | None = None) -> str:
    """A LoRA adapter for the tiny model, saved by peft. seed None: peft's own init (B = 0, a no-op);
    else B drawn from N(0, 0.5^2), large enough to change the tiny model's greedy answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    torch.manual_seed(0)  # peft draws A from torch's global generator: the same adapter on every run
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=list(targets)))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    found = {"zero": make_adapter(root / "zero"), "rand": make_adapter(root / "rand", seed=1),
             "wide": make_adapter(root / "wide", rank=16, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))}
    config = json.loads((root / "rand" / "adapter_config.json").read_text())
    for name, changes in {"rank32": {"r": 32}, "no-weights": {}}.items():  # configs only: never loaded
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        found[name] = str(root / name)
    found["missing"] = str(root / "missing")
    return found


@pytest.fixture(scope="module")
def s3_adapter(s3_server, adapters) -> str:
    """The random adapter's files, uploaded to moto's S3."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="lora-adapters")
    for path in Path(adapters["rand"]).iterdir():
        client.upload_file(str(path), "lora-adapters", f"adapters/rand/{path.name}")
    return "s3://lora-adapters/adapters/rand"


def lora_rows(adapters: dict, s3_adapter: str) -> list[dict]:
    return [
        {"id": "base-a", "text": CAPITAL}, {"id": "base-b", "text": COLORS, "lora": ""},
        {"id": "zero-a", "text": CAPITAL, "lora": "zero"}, {"id": "zero-b", "text": COLORS, "lora": "zero"},
        {"id": "rand-a", "text": CAPITAL, "lora": "rand"}, {"id": "rand-a2", "text": CAPITAL, "lora": "rand"},
        {"id": "rand-b", "text": COLORS, "lora": "rand"}, {"id": "wide-a", "text": CAPITAL, "lora": "wide"},
        {"id": "path-a", "text": CAPITAL, "lora": adapters["rand"]},
        {"id": "s3-a", "text": CAPITAL, "lora": s3_adapter},
        {"id": "unknown", "text": CAPITAL, "lora": "nosuch"},
        {"id": "missing", "text": CAPITAL, "lora": adapters["missing"]},
        {"id": "missing-s3", "text": CAPITAL, "lora": "s3://lora-adapters/adapters/none"},
        {"id": "rank32", "text": CAPITAL, "lora": adapters["rank32"]},
        {"id": "no-weights", "text": CAPITAL, "lora": adapters["no-weights"]},
    ]


@pytest.fixture(scope="module")
def run(main_here, adapters, s3_adapter, tmp_path_factory) -> dict:
    """One main.py run over every case; its output rows by id, its manifest and its stdout."""
    folder = tmp_path_factory.mktemp("lora-run")
    write_jsonl(folder / "in.jsonl", lora_rows(adapters, s3_adapter))
    # --max-loras 6: the five adapters this run loads, plus the spare slot that keeps base rows exact on
    # vLLM's CPU backend (util/features/lora.py CPU_SPARE_SLOT); float32, for parity with transformers.
    job = main_here("--model", tiny_model_dir(), "--input-path", folder / "in.jsonl", "--id-column", "id",
                    "--lora", f"zero={adapters['zero']}", "--lora", f"rand={adapters['rand']}",
                    "--lora", f"wide={adapters['wide']}", "--max-loras", 6, "--concurrency", 1,
                    "--max-tokens", MAX_TOKENS, "--engine-arg", "dtype=float32", "--max-error-fraction", 0.5,
                    "--output-path", folder / "out")
    assert job.code == 0, job.out[-3000:] + job.err[-3000:]
    rows = {row["id"]: row for row in pq.read_table(folder / "out").to_pylist()}
    return {"rows": rows, "manifest": json.loads((folder / "out" / "_manifest.json").read_text()), "stdout": job.out}


@pytest.mark.engine
def test_every_row_is_written_once_and_the_adapters_shape_the_engine(run, adapters):
    assert "summary: 15 rows: 10 ok, 5 errors, 0 already done" in run["stdout"]
    assert len(run["rows"]) == 15
    fingerprint = run["manifest"]["fingerprint"]
    assert fingerprint["adapters"] == {name: adapters[name] for name in ("zero", "rand", "wide")}
    engine = fingerprint["engine"]  # max_lora_rank: wide's 16, the largest registered
    assert (engine["enable_lora"], engine["max_loras"], engine["max_lora_rank"]) == (True, 6, 16)


@pytest.mark.engine
def test_a_zero_adapter_gives_the_base_models_output(run):
    rows = run["rows"]
    for prompt in "ab":
        base, zero = rows[f"base-{prompt}"], rows[f"zero-{prompt}"]
        assert base["num_generated_tokens"] == MAX_TOKENS
        assert (zero["generated_text"], zero["num_generated_tokens"]) == (base["generated_text"], MAX_TOKENS)
        assert (base["model"], zero["model"]) == (tiny_model_dir(), "zero")


@pytest.mark.engine
def test_a_random_adapter_changes_the_output_the_same_way_every_time(run, adapters, s3_adapter):
    rows = run["rows"]
    assert rows["rand-a"]["generated_text"] != rows["base-a"]["generated_text"]
    assert rows["rand-b"]["generated_text"] != rows["base-b"]["generated_text"]
    assert rows["wide-a"]["generated_text"] not in (rows["base-a"]["generated_text"], rows["rand-a"]["generated_text"])
    # The same adapter by name, by local path and by s3 path (copied into the replica): the same answer.
    for row_id in ("rand-a2", "path-a", "s3-a"):
        assert rows[row_id]["generated_text"] == rows["rand-a"]["generated_text"], row_id
    assert [rows[i]["model"] for i in ("rand-a", "path-a", "s3-a")] == ["rand", adapters["rand"], s3_adapter]


@pytest.mark.engine
def test_adapters_that_cannot_be_used_are_error_rows_naming_them(run, adapters):
    rows = run["rows"]
    expected = {
        "unknown": "unknown adapter 'nosuch': not registered with --lora (zero, rand, wide), and not a path (no '/')",
        "missing": f"unknown adapter '{adapters['missing']}': no adapter_config.json in {adapters['missing']}",
        "missing-s3": "unknown adapter 's3://lora-adapters/adapters/none': no adapter_config.json in "
                      "s3://lora-adapters/adapters/none",
        "rank32": f"unknown adapter '{adapters['rank32']}': rank 32 is over max_lora_rank 16 (--max-lora-rank)",
    }
    for row_id, message in expected.items():
        assert rows[row_id]["error"] == message, row_id
        assert rows[row_id]["model"] == rows[row_id]["lora"] and rows[row_id]["generated_text"] is None
    # One the engine itself refuses to load: its add_lora raised, the engine ran on for every other row.
    assert rows["no-weights"]["error"].startswith(f"adapter '{adapters['no-weights']}' failed to load: ")
    assert "doesn't contain tensors" in rows["no-weights"]["error"]
    assert sorted(i for i, row in rows.items() if row["error"] is None) == sorted(
        ["base-a", "base-b", "zero-a", "zero-b", "rand-a", "rand-a2", "rand-b", "wide-a", "path-a", "s3-a"])


@pytest.mark.engine
def test_the_adapters_outputs_equal_transformers_with_peft_merged(run, adapters):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine torch's two OpenMP threads wait on each other
    try:
        for row_id, adapter in (("base-a", None), ("rand-a", "rand"), ("wide-a", "wide")):
            row = run["rows"][row_id]
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
            if adapter:
                model = PeftModel.from_pretrained(model, adapters[adapter]).merge_and_unload()
            prompt = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                generated = model.eval().generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False)
            assert row["generated_text"] == tokenizer.decode(generated[0, prompt.shape[1]:],
                                                             skip_special_tokens=True), row_id
    finally:
        torch.set_num_threads(threads)


# --- without an engine: flags, the plan, --preflight, OpenAI requests ---

def test_lora_flags_parse_and_are_checked_without_io():
    cfg = parse_args(["--lora", "a=/x", "--lora", " b = s3://bucket/b ", "--max-loras", "2", "--max-lora-rank", "64"])
    assert (cfg.lora, cfg.max_loras, cfg.max_lora_rank) == ({"a": "/x", "b": "s3://bucket/b"}, 2, 64)
    assert (Config().lora, Config().max_loras, Config().max_lora_rank) == ({}, None, None)
    refusals = {
        "--max-lora-rank must be one of vLLM's ranks (1, 8, 16, 32, 64, 128, 256, 320, 512), got 12":
            {"max_lora_rank": 12},
        "--max-loras must be >= 1, got 0": {"max_loras": 0},
        "--lora takes NAME=PATH with a NAME without '/' (a row's `lora` value with a '/' is a path), got a/b=/x":
            {"lora": {"a/b": "/x"}},
    }
    for message, fields in refusals.items():
        with pytest.raises(ValueError) as info:
            Config(**fields)
        assert str(info.value) == message


@pytest.mark.parametrize("argv, message", [
    (["--lora", "a=/x", "--lora", "a=/y"], "--lora names an adapter twice: ['a']"),
    (["--lora", "a"], "argument --lora: --lora takes NAME=PATH, got 'a'"),
])
def test_bad_lora_flags_exit_2_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_the_plan_sizes_the_engine_from_the_adapters(adapters):
    zero, wide = adapters["zero"], adapters["wide"]
    assert plan_lora({}, None, None) == ({}, {})  # no LoRA: the engine arguments as before
    assert plan_lora({"zero": zero, "wide": wide}, None, None) == (
        {"zero": zero, "wide": wide}, {"enable_lora": True, "max_loras": 2, "max_lora_rank": 16})
    assert plan_lora({"zero": zero}, None, None, use_gpu=False)[1] == {  # a spare slot on CPU
        "enable_lora": True, "max_loras": 2, "max_lora_rank": 8}
    assert plan_lora({"zero": zero}, 4, 64)[1] == {"enable_lora": True, "max_loras": 4, "max_lora_rank": 64}
    assert plan_lora({}, 3, None) == ({}, {"enable_lora": True, "max_loras": 3})  # paths only: vLLM's rank


@pytest.mark.parametrize("lora, max_rank, task, message", [
    ({"gone": "MISSING"}, None, "generate", "--lora gone=MISSING: no adapter_config.json in MISSING"),
    ({"wide": "WIDE"}, 8, "generate", "--lora wide=WIDE: rank 16 is over max_lora_rank 8 (--max-lora-rank)"),
    ({"wide": "WIDE"}, None, "embed", "--lora, --max-loras and --max-lora-rank are for generation, not the embed task"),
])
def test_the_plan_refuses_an_adapter_it_cannot_use(adapters, lora, max_rank, task, message):
    paths = {"MISSING": adapters["missing"], "WIDE": adapters["wide"]}
    lora = {name: paths[path] for name, path in lora.items()}
    with pytest.raises(InputError) as info:
        plan_lora(lora, None, max_rank, task)
    assert str(info.value) == message.replace("MISSING", paths["MISSING"]).replace("WIDE", paths["WIDE"])


def test_a_job_without_lora_keeps_its_engine_arguments_and_fingerprint(adapters):
    before = {"model", "revision", "prompt_format", "system_prompt", "text_column", "id_column", "id_scheme",
              "output_format", "sampling", "engine"}  # the fingerprint's keys before LoRA existed
    plain = make_plan(Config(model="org/model"), cluster={"CPU": 8.0}, resolve_model_files=False)
    assert set(plain.fingerprint) == before
    assert not {"enable_lora", "max_loras", "max_lora_rank"} & set(plain.engine_kwargs)
    lora = make_plan(Config(model="org/model", lora={"zero": adapters["zero"]}), cluster={"CPU": 8.0},
                     resolve_model_files=False)
    assert lora.fingerprint["adapters"] == {"zero": adapters["zero"]}
    assert {k: v for k, v in lora.engine_kwargs.items() if k not in plain.engine_kwargs} == {
        "enable_lora": True, "max_loras": 2, "max_lora_rank": 8}


def test_a_missing_adapter_refuses_the_run_with_exit_2(main_here, adapters, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": CAPITAL}])
    job = main_here("--model", tiny_model_dir(), "--input-path", tmp_path / "in.jsonl", "--concurrency", 1,
                    "--lora", f"zero={adapters['zero']}", "--lora", f"gone={adapters['missing']}",
                    "--output-path", tmp_path / "out")
    assert job.code == 2
    assert job.err.strip().splitlines()[-1] == (
        f"error: --lora gone={adapters['missing']}: no adapter_config.json in {adapters['missing']}")
    assert not (tmp_path / "out").exists()


def test_preflight_counts_rows_whose_adapter_cannot_be_used(main_here, adapters, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [
        {"text": CAPITAL, "lora": "zero"}, {"text": CAPITAL}, {"text": CAPITAL, "lora": "nosuch"},
        {"text": COLORS, "lora": adapters["missing"]}, {"text": COLORS, "lora": adapters["rank32"]}])
    job = main_here("--preflight", "--model", tiny_model_dir(), "--input-path", tmp_path / "in.jsonl",
                    "--concurrency", 1, "--lora", f"zero={adapters['zero']}",
                    "--output-path", tmp_path / "out", "--preflight-report-dir", tmp_path / "pre")
    report = json.loads((tmp_path / "pre" / "preflight.json").read_text())
    assert job.code == 1 and report["failing"]["rows"] == 3
    assert report["failing"]["by_reason"] == {"unknown adapter": 3}


def test_an_openai_requests_model_names_its_adapter_when_lora_is_on(adapters):
    def line(custom_id: str, model: str | None) -> str:
        body = {"messages": [{"role": "user", "content": CAPITAL}], **({"model": model} if model else {})}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})

    rows = request_table([request_row(line(i, model), f"in.jsonl:{n}") for n, (i, model) in enumerate(
        [("adapter", "rand"), ("base", "org/base"), ("none", None), ("other", "gpt-4o-mini")], 1)]).to_pylist()

    def plan(**config):  # rows that name adapters: the part is on without --lora too
        return make_plan(Config(model="org/base", concurrency=1, **config), cluster={"CPU": 2.0},
                         resolve_model_files=False, source=[{"text": CAPITAL, "lora": "rand"}])

    on = plan(lora={"rand": adapters["rand"]})
    [lora] = [part for part in on.parts if isinstance(part, Lora)]
    assert [lora.adapter(row) for row in rows] == [
        ("rand", None), (None, None), (None, None),
        ("gpt-4o-mini", "unknown adapter 'gpt-4o-mini': body.model names neither the base model nor an adapter "
                        "registered with --lora (rand)")]
    [off] = [part for part in plan().parts if isinstance(part, Lora)]
    assert [off.adapter(row) for row in rows] == [(None, None)] * 4  # without LoRA: ignored
    # The row's model (in the output, and the OpenAI record) is its adapter's name.
    assert checked_request(rows[0], on.sampling, on.parts).model == "rand"
    assert checked_request(rows[1], on.sampling, on.parts).model is None  # the job's model answers
