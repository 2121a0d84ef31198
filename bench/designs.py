"""The designs that bench/run.py times, each on the same workload file: vLLM alone (raw, plain), this
project's pipeline, the seed template's predictor, and ray.data.llm. bench/run.py's docstring says what each is.

    from bench.designs import run_pipeline, AsyncTimed     # as bench/run.py calls them
"""

import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray

from util.config import Config
from util.replica.internals import wait_for_replicas_to_exit
from util.predictor import LLMPredictor, finish_batch, row_sampling
from util.prompt_format import PromptFormatter
from util.pipeline import build_pipeline, order_rows, pipeline_stages
from util.plan import make_plan
from util.model_dirs.tiny_model import build_adapter_dir

# A replica's start, in order; each a column of the predictor's output (the same value on every row).
START_MARKS = ("t_process_start", "t_init_entered", "t_vllm_imported", "t_tokenizer_loaded", "t_engine_ready")


def _stamp(table: pa.Table, start: float, marks: dict) -> pa.Table:
    n, replica = table.num_rows, ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    table = table.append_column("t_start", pa.array([start] * n)).append_column("t_end", pa.array([time.time()] * n))
    table = table.append_column("replica", pa.array([replica] * n, pa.string()))  # which replica answered
    for name in START_MARKS:
        table = table.append_column(name, pa.array([marks.get(name)] * n, pa.float64()))
    return table


def _process_start() -> float | None:
    """When this process was created (wall clock), to tell the worker's own start from Ray's scheduling."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:
        return None


@contextlib.contextmanager
def _mark_tokenizer_load(marks: dict):
    """Stamps the end of the replica's tokenizer load (util/predictor.py `_tokenizer`, when it has one)."""
    import util.predictor as predictor

    load = getattr(predictor, "_tokenizer", None)
    if load is None:
        yield
        return

    def timed(*args, **kwargs):
        tokenizer = load(*args, **kwargs)
        marks["t_tokenizer_loaded"] = time.time()
        return tokenizer

    predictor._tokenizer = timed
    try:
        yield
    finally:
        predictor._tokenizer = load


def _start_marks() -> dict:
    marks = {"t_init_entered": time.time(), "t_process_start": _process_start()}
    import vllm  # noqa: F401  (the import the parent's __init__ does first, timed on its own)
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

    marks["t_vllm_imported"] = time.time()
    return marks


class AsyncTimed(LLMPredictor):
    def __init__(self, *args, **kwargs):
        marks = _start_marks()
        with _mark_tokenizer_load(marks):
            super().__init__(*args, **kwargs)
        self.marks = {**marks, "t_engine_ready": time.time()}

    async def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        return _stamp(await super().__call__(batch), start, self.marks)


class SpawnTimed(AsyncTimed):
    """The replica's start as it was before util/replica/internals.py's engine_process_forked: vLLM spawns the engine
    process from the Ray actor, and the new interpreter imports torch and vLLM again."""

    def __init__(self, *args, **kwargs):
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # vLLM's own switch; it then spawns regardless
        try:
            super().__init__(*args, **kwargs)
        finally:
            os.environ.pop("VLLM_WORKER_MULTIPROC_METHOD", None)


class SeedPredictor:
    """The seed template's predictor: one blocking `LLM.generate` call per batch, so each batch waits for its
    longest row while the GPU idles, and vLLM never sees more than one batch of sequences."""

    def __init__(self, model: str, engine_kwargs: dict, sampling: dict, parts: list = (), **_):
        from vllm import LLM

        marks = _start_marks()
        self.model, self.sampling = model, sampling
        self.llm = LLM(model=model, **engine_kwargs)
        self.marks = {**marks, "t_engine_ready": time.time()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vllm import SamplingParams

        start, rows = time.time(), batch.to_pylist()
        params = [SamplingParams(**row_sampling(self.sampling, row.get("sampling_params"))) for row in rows]
        outputs = self.llm.generate([{"prompt_token_ids": row["prompt_token_ids"]} for row in rows], params,
                                    use_tqdm=False)
        results = [{"generated_text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason,
                    "num_generated_tokens": len(o.outputs[0].token_ids), "model": self.model} for o in outputs]
        return _stamp(finish_batch(batch, results, LLMPredictor.COLUMNS), start, self.marks)


def _result(name: str, tokens: int, rows: int, first: float, last: float, began: float, wall: float,
            **extra) -> dict:
    return {"design": name, "rows": rows, "output_tokens": tokens, "generate_s": round(last - first, 2),
            "output_tok_per_s": round(tokens / (last - first), 1), "ttft_s": round(first - began, 1),
            "wall_s": round(wall, 1), **extra}


def _wait_gpu_free(use_gpu: bool, timeout_s: float = 120.0) -> float:
    """Seconds waited until the GPUs hold under 2 GiB: the last run's engine must be gone before the next
    one sizes its KV cache from the free memory."""
    if not use_gpu:
        return 0.0
    began = time.time()
    while time.time() - began < timeout_s:
        used = os.popen("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits").read().split()
        if not used or max(float(u) for u in used) < 2048:
            break
        time.sleep(1)
    return round(time.time() - began, 1)


def run_raw(name: str, model: str, workload: Path, engine: dict, sampling: dict, generates: int, out: Path,
            tag: str) -> list[dict]:
    """Raw vLLM in a fresh process, so that its TTFT counts the imports as the Ray designs' does, and its
    engine is surely gone (GPU memory and all) when the process ends."""
    spec, result = out / f"raw-{tag}.spec.json", out / f"raw-{tag}.result.json"
    began = time.time()
    spec.write_text(json.dumps({"name": name, "model": model, "workload": str(workload), "engine": engine, "sampling": sampling, "generates": generates, "began": began,
                                "result": str(result)}))
    code = subprocess.run([sys.executable, "-m", "bench.run", "--child", str(spec)]).returncode
    if code != 0:
        raise SystemExit(f"{name}: the raw process exited with {code}")
    return json.loads(result.read_text())


def raw_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    began = spec["began"]
    from vllm import LLM, SamplingParams

    imported = time.time()
    rows = read_rows(Path(spec["workload"]))
    llm = LLM(model=spec["model"], **spec["engine"])
    ready = time.time()
    # The same prompts, token for token, as the pipeline sends: the chat template, tokenized once.
    token_ids = PromptFormatter(spec["model"], "text")(pa.Table.from_pylist([{"text": r["text"]} for r in rows]))
    prompts = [{"prompt_token_ids": ids} for ids in token_ids["prompt_token_ids"].to_pylist()]
    params = [SamplingParams(**row_sampling(spec["sampling"], r["sampling_params"])) for r in rows]
    results = []
    for i in range(spec["generates"]):
        if i:  # the same prompts again: without the reset their prefill would come from the cache
            llm.reset_prefix_cache()
        first = time.time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        last = time.time()
        marks = {"vllm_imported": round(imported - began, 1), "engine_ready": round(ready - began, 1)} if not i else {}
        results.append(_result(spec["name"], sum(len(o.outputs[0].token_ids) for o in outputs), len(outputs),
                               first, last, began, last - began, generate_index=i, start_marks=marks))
        if i:
            results[-1]["ttft_s"] = None  # the engine was started by the first pass
    Path(spec["result"]).write_text(json.dumps(results))
    del llm


def run_pipeline(name: str, model: str, rows: list[dict], cfg: Config, predictor) -> dict:
    began = time.time()
    plan = make_plan(dataclasses.replace(cfg, id_column="id"), source=rows)  # as main.py plans a run: part of its start
    order_rows(plan, source=rows)  # grouped, or as read: --row-order (util/grouping.py)
    ds = build_pipeline(plan, source=rows, stages=pipeline_stages(plan, predictor=predictor))
    executing = time.time()
    columns = ["id", "num_generated_tokens", "model", "error", "t_start", "t_end", "replica", *START_MARKS]
    refs = ds.select_columns(columns).to_arrow_refs()
    table = pa.concat_tables(ray.get(refs))
    ended = time.time()
    wait_for_replicas_to_exit()
    first, last = min(table["t_start"].to_pylist()), max(table["t_end"].to_pylist())
    # Time since the run's start: the first replica's marks (with several replicas, each mark's earliest).
    marks = {"execution_start": executing - began}
    for mark in START_MARKS:
        values = [v for v in table[mark].to_pylist() if v is not None]
        if values:
            marks[mark[2:]] = min(values) - began
    marks.update(first_batch_in=first - began, first_batch_out=min(table["t_end"].to_pylist()) - began)
    marks = {k: round(v, 1) for k, v in marks.items()}
    # Rows by the model that answered them (a LoRA adapter's name, or "base"), and rows that failed.
    answered = collections.Counter("base" if m == model else m for m in table["model"].to_pylist())
    ready = min(v for v in table["t_engine_ready"].to_pylist() if v is not None)
    spread = replica_spread(table) if table["replica"].null_count < table.num_rows else {}
    return _result(name, sum(table["num_generated_tokens"].to_pylist()), table.num_rows, first, last, began,
                   ended - began, start_marks=marks, rows_by_model=dict(sorted(answered.items())),
                   errors=table.num_rows - table["error"].null_count, ready_to_last_s=round(last - ready, 2),
                   row_order=plan.row_order, sample_shared_share=plan.sample_shared_share, **spread)


def replica_spread(table: pa.Table) -> dict:
    """With several replicas: the share of documents (the prefix workload's `doc-N-qM` ids) whose rows one
    replica answered, and how long before the last replica's last answer each replica answered its own."""
    rows = table.select(["id", "replica", "t_end"]).to_pylist()
    replicas_of = collections.defaultdict(set)
    for row in rows:
        if row["id"].startswith("doc-"):
            replicas_of[row["id"].rsplit("-", 1)[0]].add(row["replica"])
    last = collections.defaultdict(float)
    for row in rows:
        last[row["replica"]] = max(last[row["replica"]], row["t_end"])
    end = max(last.values())
    return {"documents_on_one_replica": round(sum(len(r) == 1 for r in replicas_of.values()) / len(replicas_of), 4)
            if replicas_of else None, "replica_ended_before_last_s": {k[:8]: round(end - t, 1) for k, t in last.items()}}


def run_ray_llm(name: str, model: str, rows: list[dict], engine: dict, sampling: dict, use_gpu: bool,
                concurrency: int, batch_size: int = 256) -> dict:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(model_source=model, engine_kwargs=dict(engine), batch_size=batch_size,
                                       concurrency=concurrency,
                                       **({} if use_gpu else {"placement_group_config": {"bundles": [{"CPU": 0.5}]}}))
    processor = build_processor(
        config,
        preprocess=lambda row: {"messages": [{"role": "user", "content": row["text"]}],
                                "sampling_params": row_sampling(sampling, row["sampling_params"])},
        postprocess=lambda row: {"num_generated_tokens": len(row["generated_tokens"]), "t_end": time.time(),
                                 "time_taken_llm": row["time_taken_llm"]})
    began = time.time()
    out = processor(ray.data.from_items(rows)).to_pandas()
    ended = time.time()
    wait_for_replicas_to_exit()
    first = float((out["t_end"] - out["time_taken_llm"]).min())
    return _result(name, int(out["num_generated_tokens"].sum()), len(out), first, float(out["t_end"].max()),
                   began, ended - began, start_marks={"first_batch_out": round(float(out["t_end"].min()) - began, 1)})


def run_plain(name: str, model: str, workload: Path, engine: dict, out: Path, tag: str) -> dict:
    """bench/plain.py, the plain vLLM script main.py replaces, in a process of its own, launch to exit."""
    command = [sys.executable, "-m", "bench.plain", str(workload), str(out / f"plain-{tag}.jsonl"), "--model", model,
               *[f"--engine-arg={key}={value!r}" for key, value in engine.items()]]
    began = time.time()
    run = subprocess.run(command, capture_output=True, text=True)
    ended = time.time()
    if run.returncode != 0:
        raise SystemExit(f"{name}: bench.plain exited with {run.returncode}: {run.stderr[-3000:]}")
    report = json.loads(next(line for line in reversed(run.stdout.splitlines()) if line.startswith('{"rows"')))  # after vLLM's log lines
    first, last = began + report["engine_ready_s"], began + report["answered_s"]
    return _result(name, report["output_tokens"], report["rows"], first, last, began, ended - began,
                   ready_to_last_s=round(last - first, 2), start_marks={"engine_ready": report["engine_ready_s"]})


def read_rows(path: Path) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def job_sampling(cfg: Config) -> dict:
    """The job's sampling, as the plan resolves it (with no model files: the sampling needs none)."""
    return make_plan(cfg, resolve_model_files=False).sampling


def with_adapters(cfg: Config, rows: list[dict], own: dict, shape: str) -> tuple[Config, list[dict]]:
    """For `loras=N`: N random adapters for the model's shape, registered (--lora a0=... a1=...), and
    the rows spread over them in turn, each row's `lora` column naming its adapter. Else as they were."""
    count = int(own.get("loras") or 0)
    if not count:
        return cfg, rows
    rank = int(own.get("lora_rank", 16))
    folder = Path(tempfile.gettempdir()) / f"bench-{shape}-lora-r{rank}"
    adapters = {f"a{k}": build_adapter_dir(folder / f"a{k}", shape, rank, seed=k) for k in range(count)}
    names = list(adapters)
    return (dataclasses.replace(cfg, lora=adapters),
            [{**row, "lora": names[i % count]} for i, row in enumerate(rows)])


