"""Throughput benchmark: one workload, several designs, the same GPU, one invocation, every design repeated.

    python -m bench.run --out bench-results                     # GPU: warm-up, then raw, pipeline, ray_llm x 3
    python -m bench.run --designs raw,pipeline --repeats 5 --out r          # a subset, more repeats
    python -m bench.run --workload large --designs raw,pipeline --out large # 20,000 prompts: steady state
    python -m bench.run --then seed --seed-prompts 100 --out r              # the seed design once, after the rounds
    python -m bench.run --designs raw,raw_s2048 --variant 'raw_s2048=raw:max_num_seqs=2048' --out levers
    python -m bench.run --then raw_g --variant 'raw_g=raw:generates=2;compilation_config={"max_cudagraph_capture_size":1024}' --out g
    python -m bench.run --tiny --num-prompts 24 --repeats 1 --out /tmp/b    # CPU: tiny model (what the tests run)
    python -m bench.run --designs pipeline --concurrency 2 --repeats 1 --out dp2          # 2 data-parallel replicas
    python -m bench.run --designs pipeline --shape mixtral-8x7b --tensor-parallel-size 2 --repeats 1 --out tp2
    python -m bench.run --designs pipeline,lora4 --variant lora4=pipeline:loras=4 --repeats 1 --out lora   # LoRA

Designs:
  raw       vLLM `LLM.generate` on the whole workload in one call, in a fresh process per run
  pipeline  this project's pipeline with its shipped defaults (util/pipeline.py, as main.py runs it)
  seed      the original template: synchronous `LLM.generate` per batch of 5 (on --seed-prompts rows: SeedPredictor)
  ray_llm   ray.data.llm `build_processor` (batch 256, the same engine arguments)
  NAME      a variant, `--variant NAME=BASE:key=value;key=value` (BASE one of the above): keys that are
            job settings (batch_size, batches_in_flight) change the job, `generates=N` (raw only) runs the
            workload N times in one engine (prefix cache reset between), `start=spawn` (pipeline only) spawns
            the replica's engine process, as before util/engine.py forked it (SpawnTimed), `loras=N`
            (pipeline only) spreads the rows over N random LoRA adapters of rank `lora_rank` (16), written
            for the model's shape (util/model_dirs/tiny_model.py build_adapter_dir) and registered as --lora does, and
            any other key is an engine argument.

Order: an untimed warm-up (raw on --warmup-prompts rows) fills vLLM's compile cache, so that no timed
run pays for compiling the shared engine configuration; then --repeats rounds of --designs, interleaved
(raw, pipeline, ray_llm, raw, ...) so that a drift of the machine hits every design alike; then each of
--then once.

The workload (bench/workload.py): prompts of about 100 tokens, output lengths 16-512 fixed per prompt with
ignore_eos, so every design generates exactly the same number of tokens. Every run is timed the same way:
output tokens / (last output - first request), so engine start is excluded. Time to first request (TTFT
below: the first token follows within the first prefill step) is measured from the run's start: for raw
the launch of its process (imports, engine start, tokenizing the prompts); for the Ray designs the call
that builds the dataset (actor start, imports, tokenizer load, engine start). For the pipeline each
replica also stamps when it started, entered __init__, imported vLLM, loaded its tokenizer and had its
engine ready, so the start can be broken down.

Writes results.json (every run, and per design the median and min-max, and ratios of medians) and
throughput.png under --out.
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray

from bench.workload import make_workload
from util.engine import choose_accelerator
from util.config import Config, parse_engine_arg
from util.replica.internals import wait_for_replicas_to_exit
from util.predictor import LLMPredictor, finish_batch, row_sampling
from util.prompt_format import PromptFormatter
from util.engine import CPU_ENV_VARS, engine_kwargs
from util.pipeline import build_pipeline, pipeline_stages
from util.plan import make_plan
from util.model_dirs.tiny_model import build_adapter_dir, build_model_dir, tiny_model_dir

# vLLM arguments every design shares: dummy weights, and the offline batch limits for an 80 GB card.
GPU_ENGINE_ARGS = {"load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 1024}
WORKLOADS = {"standard": 4000, "large": 20000}
BASES = ("raw", "pipeline", "seed", "ray_llm")
# A replica's start, in order; each a column of the predictor's output (the same value on every row).
START_MARKS = ("t_process_start", "t_init_entered", "t_vllm_imported", "t_tokenizer_loaded", "t_engine_ready")


def _stamp(table: pa.Table, start: float, marks: dict) -> pa.Table:
    n = table.num_rows
    table = table.append_column("t_start", pa.array([start] * n)).append_column("t_end", pa.array([time.time()] * n))
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


def run_raw(name: str, model: str, num_prompts: int, max_output: int, engine: dict, sampling: dict,
            generates: int, out: Path, tag: str) -> list[dict]:
    """Raw vLLM in a fresh process, so that its TTFT counts the imports as the Ray designs' does, and its
    engine is surely gone (GPU memory and all) when the process ends."""
    spec, result = out / f"raw-{tag}.spec.json", out / f"raw-{tag}.result.json"
    began = time.time()
    spec.write_text(json.dumps({"name": name, "model": model, "num_prompts": num_prompts, "max_output": max_output,
                                "engine": engine, "sampling": sampling, "generates": generates, "began": began,
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
    rows = make_workload(spec["num_prompts"], max_tokens=spec["max_output"])
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
    plan = make_plan(dataclasses.replace(cfg, id_column="id"))  # as main.py plans a run: part of its start
    ds = build_pipeline(plan, source=rows, stages=pipeline_stages(plan, predictor=predictor))
    executing = time.time()
    columns = ["num_generated_tokens", "model", "error", "t_start", "t_end", *START_MARKS]
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
    return _result(name, sum(table["num_generated_tokens"].to_pylist()), table.num_rows, first, last, began,
                   ended - began, start_marks=marks, rows_by_model=dict(sorted(answered.items())),
                   errors=table.num_rows - table["error"].null_count)


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


def parse_variant(text: str) -> tuple[str, str, dict]:
    """`NAME=BASE:key=value;key=value` -> (name, base, settings)."""
    name, _, rest = text.partition("=")
    base, _, settings = rest.partition(":")
    if not name or base not in BASES:
        raise SystemExit(f"--variant takes NAME=BASE:key=value;..., BASE one of {', '.join(BASES)}; got {text!r}")
    return name, base, dict(parse_engine_arg(kv) for kv in settings.split(";") if kv.strip())


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)} if values else {}


def summarize(runs: list[dict]) -> dict:
    designs = {}
    for run in runs:
        if run.get("warmup"):
            continue
        designs.setdefault(run["design"], []).append(run)
    summary = {name: {"output_tok_per_s": _spread([r["output_tok_per_s"] for r in rs]),
                      "ttft_s": _spread([r["ttft_s"] for r in rs if r.get("ttft_s") is not None])}
               for name, rs in designs.items()}
    medians = {name: s["output_tok_per_s"]["median"] for name, s in summary.items()}
    ratios = {f"{name}/raw": round(m / medians["raw"], 3) for name, m in medians.items()
              if "raw" in medians and name != "raw"}
    for base in ("ray_llm", "seed"):
        if "pipeline" in medians and base in medians:
            ratios[f"pipeline/{base}"] = round(medians["pipeline"] / medians[base], 3)
    variants = {run["design"] for run in runs if run.get("base") == "pipeline" and run["design"] != "pipeline"}
    ratios.update({f"{name}/pipeline": round(medians[name] / medians["pipeline"], 3)
                   for name in sorted(variants) if "pipeline" in medians})
    return {"designs": summary, "ratios_of_medians": ratios}


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["designs"])
    stats = [summary["designs"][n]["output_tok_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(names)), 4))
    medians = [s["median"] for s in stats]
    errors = [[m - s["min"] for m, s in zip(medians, stats)], [s["max"] - m for m, s in zip(medians, stats)]]
    bars = ax.bar(names, medians, yerr=errors, capsize=4, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{m:,.0f}" for m in medians], label_type="center", color="white")
    ax.set_ylabel("output tokens / s (median, min-max)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--designs", default="raw,pipeline,ray_llm", help="run in this order, every round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of --designs")
    parser.add_argument("--then", default="", help="designs run once each, after the rounds")
    parser.add_argument("--variant", action="append", default=[], help="NAME=BASE:key=value;key=value")
    parser.add_argument("--warmup-prompts", type=int, default=None,
                        help="rows of the untimed raw warm-up (default 256 on GPU, 0 with --tiny; 0: none)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="standard")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: the workload's")
    parser.add_argument("--seed-prompts", type=int, default=100, help="rows for the slow seed design")
    parser.add_argument("--max-output", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU instead of a 7B shape on GPU")
    parser.add_argument("--shape", default="mistral-7b", help="model shape (util/model_dirs/tiny_model.py SHAPES)")
    parser.add_argument("--model-dir", default=None, help="where to build it (default /tmp/bench-<shape>)")
    parser.add_argument("--concurrency", type=int, default=1, help="replicas for the Ray designs")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--stop", action="append", default=[], help="stop strings for every row")
    parser.add_argument("--engine-arg", action="append", default=[], help="key=value for every design")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one raw run, in its own process
    args = parser.parse_args()
    if args.child:
        raw_child(args.child)
        return
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    model = tiny_model_dir() if args.tiny else build_model_dir(args.model_dir or f"/tmp/bench-{args.shape}", args.shape)
    num_prompts = args.num_prompts or WORKLOADS[args.workload]
    rows = make_workload(num_prompts, max_tokens=args.max_output)
    if args.tiny:  # the raw design's process inherits this; the Ray designs get it from util/engine.py
        os.environ.update(CPU_ENV_VARS)
    ray.init()
    use_gpu = choose_accelerator("any").use_gpu
    cfg = Config(model=model, concurrency=args.concurrency, tensor_parallel_size=args.tensor_parallel_size,
                 accelerator_type="any", temperature=0, stop=args.stop,
                 engine_arg={**({} if args.tiny else GPU_ENGINE_ARGS),
                             **dict(parse_engine_arg(kv) for kv in args.engine_arg)})
    variants = {name: (name, {}) for name in BASES}
    for text in args.variant:
        name, base, settings = parse_variant(text)
        variants[name] = (base, settings)
    rounds = [d for d in args.designs.split(",") if d]
    schedule = [(r, d) for r in range(args.repeats) for d in rounds] + \
               [(0, d) for d in args.then.split(",") if d]
    for _, design in schedule:
        if design not in variants:
            raise SystemExit(f"unknown design {design!r}: one of {', '.join(variants)}, or define it with --variant")
    warmup = args.warmup_prompts if args.warmup_prompts is not None else (0 if args.tiny else 256)
    if warmup:
        schedule.insert(0, (0, "warmup"))

    def setup(design: str) -> tuple[str, Config, dict, dict]:
        """(base design, job settings, engine arguments, the bench's own settings) of a design or variant."""
        base, settings = variants.get(design, ("raw", {}))
        fields = {f.name for f in dataclasses.fields(Config)}
        job = {k: v for k, v in settings.items() if k in fields}
        own = {k: v for k, v in settings.items() if k in ("generates", "start", "loras", "lora_rank")}
        engine_args = {k: v for k, v in settings.items() if k not in fields and k not in own}
        design_cfg = dataclasses.replace(cfg, **job, engine_arg={**cfg.engine_arg, **engine_args})
        return base, design_cfg, engine_kwargs(design_cfg, use_gpu), own

    runs = []
    header = {"num_prompts": len(rows), "workload": args.workload, "shape": args.shape,
              "concurrency": cfg.concurrency, "engine_kwargs": engine_kwargs(cfg, use_gpu),
              "variants": {k: v for k, v in variants.items() if k not in BASES}, "schedule": schedule}
    for index, (repeat, design) in enumerate(schedule):
        base, design_cfg, engine, own = setup(design)
        waited = _wait_gpu_free(use_gpu)
        print(f"--- {design} (round {repeat + 1}) at {time.strftime('%H:%M:%S')}", flush=True)
        if design == "warmup":
            new = run_raw("raw", model, warmup, args.max_output, engine, job_sampling(cfg), 1, out, "warmup")
            new = [{**r, "warmup": True} for r in new]
        elif base == "raw":
            new = run_raw(design, model, len(rows), args.max_output, engine, job_sampling(design_cfg),
                          int(own.get("generates", 1)), out, f"{index}")
        elif base == "pipeline":
            design_cfg, design_rows = with_adapters(design_cfg, rows, own, "tiny" if args.tiny else args.shape)
            new = [run_pipeline(design, model, design_rows, design_cfg,
                                SpawnTimed if own.get("start") == "spawn" else AsyncTimed)]
        elif base == "seed":
            seed_cfg = dataclasses.replace(design_cfg, batch_size=5, batches_in_flight=1)
            new = [run_pipeline(design, model, rows[: args.seed_prompts], seed_cfg, SeedPredictor)]
        else:
            new = [run_ray_llm(design, model, rows, engine, job_sampling(design_cfg), use_gpu, design_cfg.concurrency)]
        for run in new:
            run.update(round=repeat + 1, gpu_wait_s=waited, engine_kwargs=engine, base=base, loras=own.get("loras"))
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "engine_kwargs"}), flush=True)
        (out / "results.json").write_text(json.dumps({**header, "runs": runs, "summary": summarize(runs)}, indent=2))

    summary = summarize(runs)
    device = "CPU" if not use_gpu else ", ".join(sorted(set(
        os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().split("\n")) - {""}))
    layout = f"{cfg.concurrency} replica(s) x TP {cfg.tensor_parallel_size}" if cfg.concurrency > 1 or \
        cfg.tensor_parallel_size > 1 else "1 GPU"
    plot(summary, out / "throughput.png",
         f"{args.shape if not args.tiny else 'tiny'}, {len(rows)} prompts, 16-{args.max_output} output tokens, "
         f"{layout}, {device}")
    print(f"{'design':14} {'runs':>4} {'tok/s median':>12} {'min-max':>15} {'TTFT median':>11} {'min-max':>13}")
    for name, s in summary["designs"].items():
        t, f = s["output_tok_per_s"], s["ttft_s"]
        ttft = (f"{f['median']:>11.1f} {f['min']:>6.1f}-{f['max']:<6.1f}" if f else f"{'':>11} {'':>13}")
        print(f"{name:14} {t['n']:>4} {t['median']:>12.0f} {t['min']:>7.0f}-{t['max']:<7.0f} {ttft}")
    print(json.dumps(summary["ratios_of_medians"]))


if __name__ == "__main__":
    main()
