"""Scale harness: the data path from 10k to 10M rows on CPU, with stand-in model stages.

    python -m bench.scale --out scale                                    # 10k, 1M, 10M rows; 1 and 10 files
    python -m bench.scale --rows 20000 --files 1 --out /tmp/s            # one small case (the tests run this)
    python -m bench.scale --rows 1000000 --files 1 --kill --out /tmp/k   # SIGKILL the run midway, then rerun
    python -m bench.scale --grouped --files 1 --out scale-grouped         # rows grouped by prompt prefix (a sort)

Real Ray Data and the project's own reader, input scan, resume filter, repartition and writer; only the
two model stages are stand-ins with the same columns: a formatter that does not tokenize and a predictor
that answers at once (so what is measured is the pipeline, not the model). Each case runs in a fresh
process, its own driver and Ray, on a generated JSONL input:

  scan        the checks before any GPU work (util/scan.check_before_run)
  run         read -> format -> predict -> write (util/pipeline.build_pipeline, util/output.write_results)
  rerun_scan  the same, after every other output file was deleted: about half the rows are done
  rerun_run

Per phase it reports wall time, the driver's peak RSS and the largest Ray worker's peak (RSS less shared
pages, so the object store's mapped memory is not counted). Per case: rows per replica, and a check that
the output's ids are the input's, each once. Writes results.json under --out. With --grouped the rows go
through util/grouping.py's sort (the stand-in formatter then gives token ids: the text's first 64 bytes).
"""

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from util.output import ROWS_PER_FILE

ROWS, FILES, REPLICAS = [10_000, 1_000_000, 10_000_000], [1, 10], 4
SECONDS_PER_ROW = 20e-6  # the stand-in predictor's pace: 50k rows/s per replica


def stand_in_formatter(batch: pa.Table, text_column: str = "text", token_ids: bool = False, **_) -> pa.Table:
    """The formatter's columns without a tokenizer: about four characters a token; `token_ids`: the text's
    first 64 bytes as its token ids (for grouping's keys), else none."""
    text = batch[text_column]
    ids = pa.array([list(t.encode()[:64]) for t in text.to_pylist()], pa.list_(pa.int32())) if token_ids else \
        pa.nulls(batch.num_rows, pa.list_(pa.int32()))
    return batch.append_column("prompt", text).append_column(
            "prompt_token_ids", ids).append_column(
            "num_input_tokens", pc.divide(pc.utf8_length(text), 4).cast(pa.int64())).append_column(
            "error", pa.nulls(batch.num_rows, pa.string()))


class StandInPredictor:
    """The predictor's columns, plus the replica that answered, after SECONDS_PER_ROW a row: thousands
    of times faster than an engine, but not instant, or the replica that is asked first would answer
    every batch before the next arrives, and no spread could be seen. Like the real one it tells the run's
    progress actor, when there is one (util/report.py), that it is ready and what each batch did."""

    def __init__(self, model_name: str = "stand-in", **_):
        import ray

        from util.replica.supervisor import ProgressClient

        self.model_name, self.replica = model_name, ray.get_runtime_context().get_actor_id()[:8]
        self.progress = ProgressClient.connect()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.predict(batch)

    def predict(self, batch: pa.Table, sampling: dict | None = None, parts: list | None = None) -> pa.Table:
        """A batch, as a warm replica answers one for any job (util/features/replica_pool.py)."""
        n = batch.num_rows
        time.sleep(n * SECONDS_PER_ROW)
        columns = {"generated_text": pa.array(["ok"] * n), "finish_reason": pa.array(["stop"] * n),
                   "num_generated_tokens": pa.array([1] * n, pa.int64()), "model": pa.array([self.model_name] * n),
                   "structured_output_error": pa.nulls(n, pa.string()), "replica": pa.array([self.replica] * n)}
        batch = batch.drop_columns(["prompt_token_ids"])
        for name, values in columns.items():
            batch = batch.append_column(name, values)
        self.progress.rows_done(n, n, flush=True)
        return batch


class PeakMemory(threading.Thread):
    """Samples this process's RSS and every Ray worker's private memory; `phase()` starts a new maximum."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.driver = self.worker = 0

    def phase(self) -> dict:
        peaks = {"driver_peak_mib": round(self.driver / 2**20), "worker_peak_mib": round(self.worker / 2**20)}
        self.driver = self.worker = 0
        return peaks

    def run(self) -> None:
        while True:
            self.driver = max(self.driver, self.me.memory_info().rss)
            for process in self.psutil.process_iter(["name", "cmdline"]):
                try:
                    if (process.info["cmdline"] or [""])[0].startswith("ray::"):
                        memory = process.memory_info()
                        self.worker = max(self.worker, memory.rss - memory.shared)
                except (self.psutil.Error, IndexError):
                    pass
            time.sleep(0.25)


def make_input(folder: Path, rows: int, files: int) -> Path:
    """`files` JSONL files of `rows` prompts in all, about 100 characters each."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        with open(folder / f"part-{f:03d}.jsonl", "w") as out:
            lines = (json.dumps({"text": f"Write two sentences about item {i}, its history and its uses today."})
                     for i in range(f * per_file, min(rows, (f + 1) * per_file)))
            out.writelines(line + "\n" for line in lines)
    return folder if files > 1 else folder / "part-000.jsonl"


def run_case(input_path: str, output_path: str, replicas: int, batch_size: int, phase: str, row_order: str) -> dict:
    """One case in this process: the driver being measured."""
    import ray

    from util.config import Config
    from util.output import write_results
    from util.pipeline import build_pipeline, pipeline_stages
    from util.plan import make_plan
    from util.scan import check_before_run
    from util.model_dirs.tiny_model import tiny_model_dir

    # Logical CPUs: the stand-ins need none of their own, but Ray counts them like real replicas.
    ray.init(num_cpus=2 + replicas, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()  # this process is the harness's own driver
    context.enable_progress_bars = False
    # Stand-ins answer at once, so the first replica up would take everything while the others start;
    # waiting for all of them measures how the rows are spread, not how the actors started.
    context.wait_for_min_actors_s = 600
    cfg = Config(model=tiny_model_dir(), input_path=input_path, input_format="jsonl", concurrency=replicas,
                 output_path=output_path, batch_size=batch_size)
    plan = make_plan(cfg, resolve_model_files=False)  # the stand-ins load no tokenizer
    plan.row_order = row_order
    memory, result = PeakMemory(), {}
    memory.start()
    memory.phase()
    started = time.perf_counter()
    checked = check_before_run(plan)
    result[f"{phase}scan"] = {"seconds": round(time.perf_counter() - started, 1), "rows": checked.rows,
                              "already_done": checked.already_done, **memory.phase()}
    started = time.perf_counter()
    formatter = functools.partial(stand_in_formatter, token_ids=row_order == "grouped")
    stages = pipeline_stages(plan, checked.done, formatter=formatter, predictor=StandInPredictor)
    ds = build_pipeline(plan, checked.done, stages=stages)
    written = write_results(ds, output_path)
    result[f"{phase}run"] = {"seconds": round(time.perf_counter() - started, 1), "written": written["ok"],
                             **memory.phase()}
    return result


def replica_shares(output_path: str) -> list[float]:
    """Each replica's share of the output's rows, smallest first."""
    table = pads.dataset(output_path, format="parquet").to_table(columns=["replica"])
    per_replica = table.group_by("replica").aggregate([("replica", "count")])
    return sorted(round(n / table.num_rows, 4) for n in per_replica["replica_count"].to_pylist())


def output_check(output_path: str, rows: int) -> dict:
    """Whether the output holds every input id exactly once."""
    ids = pads.dataset(output_path, format="parquet").to_table(columns=["id"])["id"]
    distinct = pc.count_distinct(ids).as_py()
    return {"output_rows": len(ids), "distinct_ids": distinct, "exactly_once": len(ids) == rows == distinct}


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session: Ray's workers take process groups of their own, but stay in it."""
    import psutil

    for process in psutil.process_iter(["pid"]):
        try:
            if os.getsid(process.pid) == sid:
                os.kill(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def delete_every_other_file(output_path: str) -> None:
    files = sorted(p for p in Path(output_path).glob("part-*.parquet"))
    for path in files[::2]:
        path.unlink()


def case_process(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.scale", "--case", *args], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where results.json goes (required)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--files", default=",".join(map(str, FILES)))
    parser.add_argument("--replicas", type=int, default=REPLICAS)
    parser.add_argument("--batch-size", type=int, default=2048,
                        help="rows per predictor batch; larger than main.py's 128 so 10M rows make fewer tasks")
    parser.add_argument("--kill", action="store_true",
                        help="SIGKILL the run (its whole session) once half its files are written, rerun, check exactly-once")
    parser.add_argument("--work-dir", default="/tmp/bench-scale", help="inputs and outputs go here")
    parser.add_argument("--grouped", action="store_true", help="rows grouped by prompt prefix (util/grouping.py)")
    parser.add_argument("--case", nargs=6, metavar=("INPUT", "OUTPUT", "REPLICAS", "BATCH", "PHASE", "ORDER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the measured driver
        input_path, output_path, replicas, batch_size, phase, order = args.case
        print(json.dumps(run_case(input_path, output_path, int(replicas), int(batch_size), phase, order)), flush=True)
        return

    if not args.out:
        parser.error("--out is required")
    out, results = Path(args.out), []
    out.mkdir(parents=True, exist_ok=True)
    for rows in map(int, args.rows.split(",")):
        for files in map(int, args.files.split(",")):
            work = Path(args.work_dir) / f"{rows}x{files}"
            subprocess.run(["rm", "-rf", str(work)], check=True)
            input_path, output_path = make_input(work / "input", rows, files), str(work / "output")
            order = "grouped" if args.grouped else "input"
            case = {"rows": rows, "files": files, "replicas": args.replicas, "batch_size": args.batch_size, "row_order": order}
            if args.kill:  # kill the whole process group once files are committed, then resume
                first = case_process([str(input_path), output_path, str(args.replicas), str(args.batch_size), "", order],
                                     start_new_session=True)
                half = rows // max(ROWS_PER_FILE, args.batch_size) // 2  # midway: half the files committed
                while len(list(Path(output_path).glob("part-*.parquet"))) < half and first.poll() is None:
                    time.sleep(0.2)
                kill_session(first.pid)
                first.wait()
                case["committed_before_kill"] = len(list(Path(output_path).glob("part-*.parquet")))
                runs = ["resumed_"]
            else:  # a fresh run, then a rerun that finds about half the rows done
                runs = ["", "rerun_"]
            for phase in runs:
                if phase == "rerun_":
                    case["replica_shares"] = replica_shares(output_path)  # of the fresh run alone
                    delete_every_other_file(output_path)
                process = case_process([str(input_path), output_path, str(args.replicas), str(args.batch_size), phase,
                                        order])
                stdout, _ = process.communicate()
                if process.returncode:
                    raise SystemExit(f"case {rows}x{files} {phase or 'fresh'} failed: exit code {process.returncode}")
                case.update(json.loads(stdout.strip().splitlines()[-1]))
            case.update(output_check(output_path, rows))
            results.append(case)
            print(json.dumps(case), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
