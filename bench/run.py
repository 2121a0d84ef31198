"""Throughput benchmark: one workload, four designs, the same GPU, one invocation.

    python -m bench.run --out bench-results                     # GPU: Mistral-7B-shaped dummy model, 4000 prompts
    python -m bench.run --designs raw,pipeline --out results    # a subset of the designs
    python -m bench.run --tiny --num-prompts 24 --out /tmp/b    # CPU: tiny model (what the tests run)
    python -m bench.run --designs pipeline --concurrency 2 --out dp2                  # 2 data-parallel replicas
    python -m bench.run --designs pipeline --shape mixtral-8x7b --tensor-parallel-size 2 --out tp2

Designs:
  raw       vLLM `LLM.generate` on the whole workload in one call
  pipeline  this project's pipeline with its shipped defaults (util/stages.py, as main.py runs it)
  seed      the original template: synchronous `LLM.generate` per batch of 5 (on --seed-prompts rows)
  ray_llm   ray.data.llm `build_processor` (batch 256, max_num_seqs 1024)

The workload (bench/workload.py): prompts of about 100 tokens, output lengths 16-512 fixed per prompt with
ignore_eos, so every design generates exactly the same number of tokens. Every design is timed the same
way: output tokens / (last output - first request), so engine start is excluded; engine start is reported
separately (the LLM constructor for raw; first request - execution start for the Ray designs).
Writes results.json and throughput.png under --out.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import ray

from bench.workload import make_workload
from util.accelerator import choose_accelerator
from util.config import Config, parse_engine_arg
from util.predictor import LLMPredictor, SyncLLMPredictor, row_sampling
from util.prompt_format import PromptFormatter
from util.pipeline import build_pipeline
from util.stages import CPU_ENV_VARS, engine_kwargs
from util.tiny_model import build_model_dir, tiny_model_dir

# vLLM arguments every design shares: dummy weights, and the offline batch limits for an 80 GB card.
GPU_ENGINE_ARGS = {"load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 1024}


def _stamp(table: pa.Table, start: float) -> pa.Table:
    n = table.num_rows
    return table.append_column("t_start", pa.array([start] * n)).append_column("t_end", pa.array([time.time()] * n))


class AsyncTimed(LLMPredictor):
    async def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        return _stamp(await super().__call__(batch), start)


class SyncTimed(SyncLLMPredictor):
    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        return _stamp(super().__call__(batch), start)


def _result(name: str, tokens: int, rows: int, first: float, last: float, engine_start: float, wall: float) -> dict:
    return {"design": name, "rows": rows, "output_tokens": tokens, "generate_s": round(last - first, 2),
            "output_tok_per_s": round(tokens / (last - first), 1), "engine_start_s": round(engine_start, 1),
            "wall_s": round(wall, 1)}


def run_raw(model: str, rows: list[dict], engine: dict, sampling: dict) -> dict:
    from vllm import LLM, SamplingParams

    began = time.time()
    llm = LLM(model=model, **engine)
    ready = time.time()
    # The same prompts, token for token, as the pipeline sends: the chat template, tokenized once.
    token_ids = PromptFormatter(model, "text")(pa.Table.from_pylist([{"text": r["text"]} for r in rows]))
    prompts = [{"prompt_token_ids": ids} for ids in token_ids["prompt_token_ids"].to_pylist()]
    params = [SamplingParams(**row_sampling(sampling, r["sampling_params"])) for r in rows]
    first = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    last = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    return _result("raw", tokens, len(outputs), first, last, ready - began, last - began)


def run_pipeline(name: str, model: str, rows: list[dict], cfg: Config, predictor) -> dict:
    choice = choose_accelerator("any")
    began = time.time()
    ds = build_pipeline(dataclasses.replace(cfg, id_column="id"), choice, source=rows, predictor=predictor)
    table = ds.select_columns(["num_generated_tokens", "t_start", "t_end"]).to_arrow_refs()
    table = pa.concat_tables(ray.get(table))
    first, last = min(table["t_start"].to_pylist()), max(table["t_end"].to_pylist())
    tokens = sum(table["num_generated_tokens"].to_pylist())
    return _result(name, tokens, table.num_rows, first, last, first - began, time.time() - began)


def run_ray_llm(model: str, rows: list[dict], engine: dict, sampling: dict, use_gpu: bool, concurrency: int) -> dict:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(model_source=model, engine_kwargs=dict(engine), batch_size=256,
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
    first = float((out["t_end"] - out["time_taken_llm"]).min())
    return _result("ray_llm", int(out["num_generated_tokens"].sum()), len(out), first, float(out["t_end"].max()),
                   first - began, time.time() - began)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar([r["design"] for r in results], [r["output_tok_per_s"] for r in results], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{r['output_tok_per_s']:,.0f}" for r in results])
    ax.set_ylabel("output tokens / s (engine start excluded)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--designs", default="raw,pipeline,seed,ray_llm")
    parser.add_argument("--num-prompts", type=int, default=4000)
    parser.add_argument("--seed-prompts", type=int, default=100, help="rows for the slow seed design")
    parser.add_argument("--max-output", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU instead of a 7B shape on GPU")
    parser.add_argument("--shape", default="mistral-7b", help="model shape (util/tiny_model.py SHAPES)")
    parser.add_argument("--model-dir", default=None, help="where to build it (default /tmp/bench-<shape>)")
    parser.add_argument("--concurrency", type=int, default=1, help="replicas for the Ray designs")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--stop", action="append", default=[], help="stop strings for every row")
    parser.add_argument("--engine-arg", action="append", default=[], help="key=value for every design")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = tiny_model_dir() if args.tiny else build_model_dir(args.model_dir or f"/tmp/bench-{args.shape}", args.shape)
    rows = make_workload(args.num_prompts, max_tokens=args.max_output)
    if args.tiny:  # the raw design runs vLLM in this process; the Ray designs get it from util/stages.py
        os.environ.update(CPU_ENV_VARS)
    ray.init()
    use_gpu = choose_accelerator("any").use_gpu
    cfg = Config(model=model, concurrency=args.concurrency, tensor_parallel_size=args.tensor_parallel_size,
                 accelerator_type="any", temperature=0, stop=args.stop,
                 engine_arg={**({} if args.tiny else GPU_ENGINE_ARGS),
                             **dict(parse_engine_arg(kv) for kv in args.engine_arg)})
    engine = engine_kwargs(cfg, use_gpu)
    results = []
    for design in args.designs.split(","):
        print(f"--- {design}", flush=True)
        if design == "raw":
            results.append(run_raw(model, rows, engine, cfg.sampling()))
        elif design == "pipeline":
            results.append(run_pipeline("pipeline", model, rows, cfg, AsyncTimed))
        elif design == "seed":
            seed_cfg = dataclasses.replace(cfg, batch_size=5, batches_in_flight=1)
            results.append(run_pipeline("seed", model, rows[: args.seed_prompts], seed_cfg, SyncTimed))
        elif design == "ray_llm":
            results.append(run_ray_llm(model, rows, engine, cfg.sampling(), use_gpu, cfg.concurrency))
        else:
            raise SystemExit(f"unknown design {design!r}")
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"engine_kwargs": engine, "num_prompts": len(rows),
                                                      "shape": args.shape, "concurrency": cfg.concurrency,
                                                      "results": results}, indent=2))
    device = "CPU" if not use_gpu else ", ".join(sorted(set(
        os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().split("\n")) - {""}))
    layout = f"{cfg.concurrency} replica(s) x TP {cfg.tensor_parallel_size}" if cfg.concurrency > 1 or \
        cfg.tensor_parallel_size > 1 else "1 GPU"
    plot(results, out / "throughput.png",
         f"{args.shape if not args.tiny else 'tiny'}, {len(rows)} prompts, 16-{args.max_output} output tokens, "
         f"{layout}, {device}")
    print(f"{'design':10} {'rows':>6} {'out tok':>9} {'tok/s':>9} {'start s':>8} {'wall s':>7}")
    for r in results:
        print(f"{r['design']:10} {r['rows']:>6} {r['output_tokens']:>9} {r['output_tok_per_s']:>9.0f} "
              f"{r['engine_start_s']:>8.1f} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
