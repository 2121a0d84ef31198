"""Answer agreement between engine configurations: the same model and prompts, greedy, bf16 the baseline.

    python -m bench.agreement --model <dir or hub id> --out agreement        # bf16 vs fp8_weights vs fp8_kv
    python -m bench.agreement --model <dir> --configs bf16,fp8_kv --out kv    # a subset; the first is the baseline
    python -m bench.agreement --model <dir> --config 'fp8_both=quantization=fp8;kv_cache_dtype=fp8' --out a
    python -m bench.agreement --model <dir> --config bf16_again= --out noise  # the baseline against itself
    python -m bench.agreement --model <dir> --configs bf16 --config float32=dtype=float32 \\
        --num-prompts 8 --max-tokens 16 --out /tmp/agree                      # CPU: FP8 weights need a GPU

The smoke model (SmolLM2-135M-Instruct) is built with
`python -c "from util.model_dirs.smol_model import smol_model_dir; print(smol_model_dir())"`; any local model
directory or hub id works as well.

Configurations (CONFIGS), each over the engine arguments every one shares (dtype bfloat16, seed 0,
max_model_len 2048, on CPU util/engine.py's CPU settings, then each --engine-arg):
  bf16         nothing more: the baseline
  fp8_weights  quantization="fp8": the weights cast to FP8 as they load
  fp8_kv       kv_cache_dtype="fp8": the KV cache in FP8
  NAME         `--config NAME=key=value;key=value`, added to the run (values as Python literals where
               they parse, else strings, as bench/run.py's --variant takes them)

Prompts: the standard workload's first --num-prompts texts (bench/workload.py), each one user turn through
the model's chat template (util/prompt_format.py, as the pipeline sends it); greedy (temperature 0),
--max-tokens new tokens at most, EOS honoured. Each configuration runs in a fresh process, one engine at a
time, so that each finds the device free; its log goes to <out>/logs/NAME.log. Output tokens/s is the
configuration's output tokens over its one `generate` call on all prompts (engine start excluded).

Writes under --out: answers.json (the prompts, and per configuration its engine arguments, timings and
every answer's text, token ids and finish reason) and summary.json (per configuration the share of
answers identical to the baseline's by text and by token ids, the median position of the first differing
token among the answers that differ, output tokens/s, and the log's error lines if it failed); prints
the same as a table.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from util.config import parse_engine_arg

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"bf16": {}, "fp8_weights": {"quantization": "fp8"}, "fp8_kv": {"kv_cache_dtype": "fp8"}}
SHARED_ENGINE_ARGS = {"dtype": "bfloat16", "seed": 0, "max_model_len": 2048}


def parse_config(text: str) -> tuple[str, dict]:
    """`NAME=key=value;key=value` -> (name, engine arguments); `NAME=` is the shared arguments alone."""
    name, sep, settings = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--config takes NAME=key=value;key=value, got {text!r}")
    try:
        return name.strip(), dict(parse_engine_arg(kv) for kv in settings.split(";") if kv.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--config {name.strip()}: each setting takes key=value, got {text!r}")


def first_difference(a: list, b: list) -> int | None:
    """The first position where two token id lists differ (one ending early counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(baseline: list[dict], answers: list[dict]) -> dict:
    """How far `answers` match `baseline`, prompt by prompt (each answer {"text", "token_ids"})."""
    if len(baseline) != len(answers):
        raise ValueError(f"{len(answers)} answers against the baseline's {len(baseline)}")
    pairs = list(zip(baseline, answers))
    same_text = sum(a["text"] == b["text"] for a, b in pairs)
    same_ids = sum(a["token_ids"] == b["token_ids"] for a, b in pairs)
    parted = [d for a, b in pairs if (d := first_difference(a["token_ids"], b["token_ids"])) is not None]
    return {"compared": len(pairs), "identical_text": same_text, "identical_token_ids": same_ids,
            "identical_text_share": round(same_text / len(pairs), 3) if pairs else None,
            "identical_token_ids_share": round(same_ids / len(pairs), 3) if pairs else None,
            "first_difference_median": statistics.median(parted) if parted else None}


def summarize(runs: dict[str, dict], baseline: str) -> dict:
    """Per configuration, in run order: timings and agreement with `baseline`, or, for a run that failed
    ({"failed": why}), why. Without the baseline's answers there is nothing to compare against."""
    base = runs.get(baseline, {}).get("answers")
    configs = {}
    for name, run in runs.items():
        if "failed" in run:
            configs[name] = {"failed": run["failed"]}
            continue
        configs[name] = {k: run[k] for k in ("engine_start_s", "generate_s", "output_tokens", "output_tok_per_s")}
        if name != baseline and base is not None:
            configs[name].update(agreement(base, run["answers"]))
    return {"baseline": baseline, "baseline_failed": base is None, "configs": configs}


def failure_cause(failure: dict) -> str:
    """The first exception in the log (its root cause: the engine process's, above the client's "see root
    cause above"), else the log's last line."""
    for line in failure["error_lines"]:
        if exception := re.search(r"\w+(?:Error|Exception): .*", line):
            return exception[0].strip()
    return (failure["log_tail"] or [""])[-1].strip()


def table(summary: dict) -> str:
    lines = [f"{'configuration':16} {'same text':>10} {'same ids':>10} {'1st diff (median)':>18} {'out tok/s':>10}"]
    for name, row in summary["configs"].items():
        if "failed" in row:
            lines.append(f"{name:16} FAILED (exit {row['failed']['exit_code']}): {failure_cause(row['failed'])[:120]}")
            continue
        if name == summary["baseline"]:
            text = ids = "baseline"
            first = ""
        elif "compared" not in row:
            text = ids = first = "-"
        else:
            text, ids = f"{row['identical_text_share']:.1%}", f"{row['identical_token_ids_share']:.1%}"
            first = "-" if row["first_difference_median"] is None else f"{row['first_difference_median']:g}"
        lines.append(f"{name:16} {text:>10} {ids:>10} {first:>18} {row['output_tok_per_s']:>10.1f}")
    return "\n".join(lines)


def run_child(spec_path: str) -> None:
    """One configuration: start its engine, answer every prompt in one `generate`, write the result."""
    spec = json.loads(Path(spec_path).read_text())
    import pyarrow as pa
    import torch

    from bench.workload import make_workload
    from util.engine import CPU_ENGINE_KWARGS, CPU_ENV_VARS
    from util.prompt_format import PromptFormatter

    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # read by vLLM as it starts: the KV cache's share of RAM
        os.environ.update(CPU_ENV_VARS)
    from vllm import LLM, SamplingParams

    engine = {"model": spec["model"], **SHARED_ENGINE_ARGS, **(CPU_ENGINE_KWARGS if on_cpu else {}),
              **spec["engine_args"], **spec["settings"]}
    texts = [row["text"] for row in make_workload(spec["num_prompts"])]
    formatted = PromptFormatter(spec["model"], "text")(pa.Table.from_pylist([{"text": t} for t in texts]))
    errors = [e for e in formatted["error"].to_pylist() if e]
    if errors:
        raise SystemExit(f"{len(errors)} prompt(s) could not be formatted; the first: {errors[0]}")
    prompts = [{"prompt_token_ids": ids} for ids in formatted["prompt_token_ids"].to_pylist()]
    began = time.time()
    llm = LLM(**engine)
    ready = time.time()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=spec["max_tokens"]), use_tqdm=False)
    done = time.time()
    answers = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason} for o in outputs]
    tokens = sum(len(a["token_ids"]) for a in answers)
    result = {"engine": engine, "engine_start_s": round(ready - began, 1), "generate_s": round(done - ready, 2),
              "output_tokens": tokens, "output_tok_per_s": round(tokens / (done - ready), 1), "answers": answers}
    Path(spec["result"]).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}), flush=True)


def run_config(name: str, settings: dict, args, work: Path, logs: Path) -> tuple[dict | None, dict | None]:
    """(result, None), or (None, why it failed) from the configuration's own process and log."""
    spec, result, log = work / f"{name}.spec.json", work / f"{name}.result.json", logs / f"{name}.log"
    spec.write_text(json.dumps({"model": args.model, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                                "engine_args": dict(args.engine_arg), "settings": settings, "result": str(result)}))
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "bench.agreement", "--child", str(spec)], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    if code == 0 and result.exists():
        return json.loads(result.read_text()), None
    lines = log.read_text(errors="replace").splitlines()
    # The cause is often far above the tail (vLLM's engine process dies first, then the client's traceback).
    causes = [line for line in lines if "Error" in line or "error:" in line][-10:]
    return None, {"exit_code": code, "log": str(log), "error_lines": causes, "log_tail": lines[-25:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model directory or hub id")
    parser.add_argument("--out", help="folder for answers.json, summary.json and logs/")
    parser.add_argument("--num-prompts", type=int, default=200, help="the standard workload's first N prompts")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer at most")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="configurations to run, in order; the first is the baseline")
    parser.add_argument("--config", action="append", default=[], type=parse_config,
                        help="NAME=key=value;key=value: define a configuration and add it to the run")
    parser.add_argument("--engine-arg", action="append", default=[], type=parse_engine_arg,
                        help="key=value for every configuration (a configuration's own settings win)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, in its own process
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return
    if not args.model or not args.out:
        parser.error("--model and --out are required")
    configs = dict(CONFIGS)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for name, settings in args.config:
        configs[name] = settings
        names += [] if name in names else [name]
    unknown = [n for n in names if n not in configs]
    if unknown or not names:
        parser.error(f"unknown configuration(s) {', '.join(unknown) or '(none given)'}: one of "
                     f"{', '.join(configs)}, or define one with --config NAME=key=value;...")

    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="agreement-") as work:
        for name in names:
            print(f"--- {name} {configs[name]} at {time.strftime('%H:%M:%S')}", flush=True)
            result, failure = run_config(name, configs[name], args, Path(work), logs)
            runs[name] = result or {"failed": failure}
            if result:
                print(json.dumps({k: v for k, v in result.items() if k not in ("answers", "engine")}), flush=True)
            else:
                print(f"{name} failed (exit {failure['exit_code']}), see {failure['log']}:\n"
                      + "\n".join(failure["error_lines"] or failure["log_tail"]), flush=True)

    from bench.workload import make_workload

    prompts = [row["text"] for row in make_workload(args.num_prompts)]
    answered = {name: run for name, run in runs.items() if "failed" not in run}
    (out / "answers.json").write_text(json.dumps({"prompts": prompts, "configs": answered}))
    summary = {"model": args.model, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
               **summarize(runs, baseline=names[0])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{args.model}: {args.num_prompts} prompts, greedy, up to {args.max_tokens} tokens each; "
          f"agreement with {names[0]}{' (which failed: nothing to compare)' if summary['baseline_failed'] else ''}")
    print(table(summary))
    print(f"-> {out / 'summary.json'}, {out / 'answers.json'}")


if __name__ == "__main__":
    main()
