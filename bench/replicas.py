"""Data-parallel scaling through main.py: one input file, 1 vs N replicas, runs interleaved and repeated.

    python -m bench.replicas --out dp --num-prompts 8000 --concurrency 1,2 --repeats 2   # GPU, 7B shape
    python -m bench.replicas --out /tmp/dp --tiny --num-prompts 64 --concurrency 1 --repeats 1  # CPU check

Writes the standard workload (bench/workload.py) as one JSONL file, then runs `main.py` on it once per
concurrency per repeat, in the order 1, 2, 1, 2, ... so that a drift of the machine hits every setting
alike. Each run's output tok/s is its output tokens over the time from the first replica's engine being
ready to the last replica's last batch (from the run's _report.json), so engine start is excluded as
in bench/run.py. Prints, and writes to results.json: per run the rows each replica answered, and per
concurrency the median tok/s and its ratio to one replica's.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.run import GPU_ENGINE_ARGS
from bench.workload import make_workload


def generation_rate(report: dict) -> float:
    replicas = report["replicas"]
    first_ready = min(r["ready_s"] for r in replicas)
    last_batch = max(r["last_batch_s"] for r in replicas)
    return report["output_tokens"] / (last_batch - first_ready)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-prompts", type=int, default=8000)
    parser.add_argument("--concurrency", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU instead of a 7B shape on GPU")
    parser.add_argument("--shape", default="mistral-7b")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from util.model_dirs.tiny_model import build_model_dir, tiny_model_dir

    model = tiny_model_dir() if args.tiny else build_model_dir(f"/tmp/bench-{args.shape}", args.shape)
    workload = out / "workload.jsonl"
    with open(workload, "w") as file:
        for row in make_workload(args.num_prompts):
            file.write(json.dumps(row) + "\n")
    engine = [] if args.tiny else [f"--engine-arg={k}={v}" for k, v in GPU_ENGINE_ARGS.items()]
    runs = []
    for repeat in range(args.repeats):
        for concurrency in map(int, args.concurrency.split(",")):
            output = out / f"out-c{concurrency}-r{repeat}"
            command = [sys.executable, "main.py", "--model", model, "--input-path", str(workload),
                       "--id-column", "id", "--concurrency", str(concurrency), "--accelerator-type", "any",
                       "--output-path", str(output), "--overwrite", "--progress-interval-s", "600", *engine]
            with open(out / f"log-c{concurrency}-r{repeat}.txt", "w") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            report = json.loads((output / "_report.json").read_text()) if code == 0 else None
            run = {"concurrency": concurrency, "repeat": repeat, "exit_code": code,
                   "output_tok_per_s": round(generation_rate(report), 1) if report else None,
                   "rows_per_replica": sorted(r["rows"] for r in report["replicas"]) if report else None,
                   "wall_s": report["wall_s"] if report else None}
            runs.append(run)
            print(json.dumps(run), flush=True)
            (out / "results.json").write_text(json.dumps({"runs": runs}, indent=2))
    medians = {c: statistics.median(r["output_tok_per_s"] for r in runs if r["concurrency"] == c and r["output_tok_per_s"])
               for c in {r["concurrency"] for r in runs if r["output_tok_per_s"]}}
    one = medians.get(1)
    summary = {c: {"median_output_tok_per_s": m, "vs_one_replica": round(m / one, 3) if one else None}
               for c, m in sorted(medians.items())}
    print(json.dumps(summary), flush=True)
    (out / "results.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
