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
    python -m bench.run --workload prefix --designs plain,pipeline,input --variant input=pipeline:row_order=input \
        --engine-arg max_num_seqs=2048 --out prefix                # documents x questions, shuffled: grouping
    python -m bench.run --workload table --designs plain,pipeline,input --variant input=pipeline:row_order=input --out table

Designs:
  raw       vLLM `LLM.generate` on the whole workload in one call, in a fresh process per run
  plain     bench/plain.py, the plain vLLM script main.py replaces (`LLM.chat` on the file's rows in its order)
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

The workload (bench/workload.py, --workload): standard (prompts of about 100 tokens, output lengths 16-512),
prefix (documents x questions, shuffled) or table (one long instruction over short rows); output lengths are
fixed per row with ignore_eos, so every design generates exactly the same number of tokens. Every run is
timed the same way: output tokens / (last output - first request), so engine start is excluded; and
`ready_to_last_s`, from the engine being ready to the last answer (plain and pipeline: the generation time
that grouping shortens, its wait for the sort included). Time to first request (TTFT
below: the first token follows within the first prefill step) is measured from the run's start: for raw
the launch of its process (imports, engine start, tokenizing the prompts); for the Ray designs the call
that builds the dataset (actor start, imports, tokenizer load, engine start). For the pipeline each
replica also stamps when it started, entered __init__, imported vLLM, loaded its tokenizer and had its
engine ready, so the start can be broken down.

Writes results.json (every run, and per design the median and min-max, and ratios of medians) and
throughput.png under --out.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import ray

from bench.designs import (AsyncTimed, SeedPredictor, SpawnTimed, _wait_gpu_free, job_sampling, raw_child, run_pipeline,
                           run_plain, run_ray_llm, run_raw, with_adapters)
from bench.workload import make_rows, workload_flags, write_rows
from util.config import Config, parse_engine_arg
from util.engine import CPU_ENV_VARS, choose_accelerator, engine_kwargs
from util.model_dirs.tiny_model import build_model_dir, tiny_model_dir

# vLLM arguments every design shares: dummy weights, and the offline batch limits for an 80 GB card.
GPU_ENGINE_ARGS = {"load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 1024}
BASES = ("raw", "plain", "pipeline", "seed", "ray_llm")
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
                      "ttft_s": _spread([r["ttft_s"] for r in rs if r.get("ttft_s") is not None]),
                      "ready_to_last_s": _spread([r["ready_to_last_s"] for r in rs if r.get("ready_to_last_s")]),
                      "wall_s": _spread([r["wall_s"] for r in rs if r.get("wall_s")])}
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
    generation = {name: s["ready_to_last_s"]["median"] for name, s in summary.items() if s["ready_to_last_s"]}
    ratios.update({f"{name}/plain generation time": round(t / generation["plain"], 3) for name, t in generation.items()
                   if "plain" in generation and name != "plain"})
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
    workload_flags(parser)
    parser.add_argument("--seed-prompts", type=int, default=100, help="rows for the slow seed design")
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
    rows = make_rows(args)
    workload = write_rows(rows, out / "workload.jsonl")  # what raw and plain read, in their own processes
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
            warm = write_rows(rows[:warmup], out / "warmup.jsonl")
            new = run_raw("raw", model, warm, engine, job_sampling(cfg), 1, out, "warmup")
            new = [{**r, "warmup": True} for r in new]
        elif base == "raw":
            new = run_raw(design, model, workload, engine, job_sampling(design_cfg), int(own.get("generates", 1)),
                          out, f"{index}")
        elif base == "plain":
            new = [run_plain(design, model, workload, engine, out, f"{index}")]
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
         f"{args.shape if not args.tiny else 'tiny'}, {args.workload} workload, {len(rows)} prompts, "
         f"{layout}, {device}")
    print(f"{'design':14} {'runs':>4} {'tok/s median':>12} {'min-max':>15} {'TTFT median':>11} {'min-max':>13}")
    for name, s in summary["designs"].items():
        t, f = s["output_tok_per_s"], s["ttft_s"]
        ttft = (f"{f['median']:>11.1f} {f['min']:>6.1f}-{f['max']:<6.1f}" if f else f"{'':>11} {'':>13}")
        print(f"{name:14} {t['n']:>4} {t['median']:>12.0f} {t['min']:>7.0f}-{t['max']:<7.0f} {ttft}")
    print(json.dumps(summary["ratios_of_medians"]))


if __name__ == "__main__":
    main()
