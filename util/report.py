"""How a run is going, and how it went: a progress line while it runs, a report when it is done.

    from util.report import ProgressReporter, check_accounting, format_report, over_error_budget, write_report
    with ProgressReporter(total_rows=10_000, interval_s=30, gpus=plan.gpus_held) as progress:
        written = write_results(ds, output_path)       # prints `progress: 1,234/10,000 rows (12%), ...`
    report = progress.report(written)                   # a dict: rows, tokens, tok/s per replica, GPU-hours
    print(format_report(report))
    write_report(output_path, report)                   # <output>/_report.json and _throughput.png
    check_accounting(input_rows=10_000, written=written, already_done=0)  # RuntimeError if a row is lost
    over_error_budget(output_counts, max_error_fraction=0.1, output_path=output_path)  # why exit 1, or None

While the pipeline runs, a small named Ray actor (PROGRESS_ACTOR) collects what each vLLM replica
reports after every batch: rows, output tokens, time. Replicas find it by name (`ProgressClient`),
and report with a fire-and-forget `.remote()` call, so a batch never waits for the report. A replica
that finds no actor (the notebook's take_all, the benchmark) reports nothing.

The report files start with `_`, like the manifest, so readers of the output folder (Ray Data,
pyarrow, pandas, util.output) never take them for data.
"""

import datetime
import io
import json
import math
import threading
import time

import ray

from util.storage import commit_file, resolve

PROGRESS_ACTOR = "batch-llm-progress"
REPORT_NAME = "_report.json"
PLOT_NAME = "_throughput.png"
FINAL_REPORTS_WAIT_S = 5.0  # the last batches' reports are in flight when the write finishes


class ProgressLog:
    """What the replicas reported: the progress actor's state (plain Python, so it tests without Ray)."""

    def __init__(self):
        self.ready: dict[str, float] = {}  # replica -> when its engine was ready
        self.batches: list[tuple[str, int, int, float]] = []  # (replica, rows, output tokens, finished at)
        self.rows = self.output_tokens = 0

    def replica_ready(self, replica: str, at: float) -> None:
        self.ready.setdefault(replica, at)

    def batch_done(self, replica: str, rows: int, output_tokens: int, at: float) -> None:
        self.batches.append((replica, rows, output_tokens, at))
        self.rows += rows
        self.output_tokens += output_tokens

    def totals(self) -> dict:
        return {"rows": self.rows, "output_tokens": self.output_tokens,
                "first_ready": min(self.ready.values(), default=None), "replicas": len(self.ready)}

    def snapshot(self) -> dict:
        return {"ready": dict(self.ready), "batches": list(self.batches)}


class ProgressClient:
    """A replica's side: reports each batch to the run's progress actor, without waiting. The actor is
    looked up by name at each batch (a millisecond), so a replica kept warm across runs
    (util/replica_pool.py) reports to each run's own actor, and tells it first that it is ready."""

    def __init__(self, replica: str = ""):
        self.replica = replica
        self.reporting_to = None  # the progress actor this replica last said it was ready to

    @classmethod
    def connect(cls) -> "ProgressClient":
        """Call when the engine is ready: that time starts the replica's own tok/s."""
        if not ray.is_initialized():
            return cls()
        client = cls((ray.get_runtime_context().get_actor_id() or "driver")[:8])
        client._actor()
        return client

    def _actor(self):
        try:
            actor = ray.get_actor(PROGRESS_ACTOR)
        except ValueError:  # no run is reporting: the benchmark, a pipeline run without a reporter
            return None
        if actor != self.reporting_to:  # a new run: this replica is ready for it from now on
            self.reporting_to = actor
            actor.replica_ready.remote(self.replica, time.time())
        return actor

    def batch_done(self, rows: int, output_tokens: int) -> None:
        actor = self._actor() if self.replica else None
        if actor is not None:
            actor.batch_done.remote(self.replica, rows, output_tokens, time.time())


def progress_line(rows_done: int, total_rows: int | None, output_tok_per_s: float, eta_s: float | None) -> str:
    """`progress: 1,234/10,000 rows (12%), 5,678 output tok/s, ETA 0:12:34`; without a total (the rows
    were not counted beforehand): `progress: 1,234 rows, 5,678 output tok/s`"""
    if total_rows is None:
        return f"progress: {rows_done:,} rows, {output_tok_per_s:,.0f} output tok/s"
    percent = 100 if total_rows <= 0 else min(100, math.floor(100 * rows_done / total_rows))
    eta = "unknown" if eta_s is None else str(datetime.timedelta(seconds=round(eta_s)))
    return f"progress: {rows_done:,}/{total_rows:,} rows ({percent}%), {output_tok_per_s:,.0f} output tok/s, ETA {eta}"


def eta_seconds(rows_done: int, total_rows: int | None, first_ready: float | None, now: float) -> float | None:
    """Rows left at the pace since the first engine was ready (engine start is no guide to what is left)."""
    if total_rows is None:
        return None
    if rows_done >= total_rows:
        return 0.0
    if not rows_done or first_ready is None or now <= first_ready:
        return None
    return (total_rows - rows_done) * (now - first_ready) / rows_done


class ProgressReporter:
    """Creates the progress actor and prints a progress line every `interval_s` seconds from a driver
    thread while the `with` block runs; Ray Data's own progress bars are left as they are."""

    def __init__(self, total_rows: int | None, interval_s: float = 30.0, gpus: float = 0.0, write=None):
        self.total_rows, self.interval_s, self.gpus = total_rows, interval_s, gpus
        self.write = write or (lambda line: print(line, flush=True))
        self.started = self.finished = None
        self.snapshot = {"ready": {}, "batches": []}
        self._stop = threading.Event()

    def __enter__(self) -> "ProgressReporter":
        try:  # one left behind by an interrupted run in this driver (a notebook) holds the name
            ray.kill(ray.get_actor(PROGRESS_ACTOR))
        except ValueError:
            pass
        # Named and not detached: replicas find it by name, and it ends with the driver at the latest.
        # The name is registered by .remote() itself, before any replica can look for it.
        self.actor = ray.remote(num_cpus=0)(ProgressLog).options(name=PROGRESS_ACTOR).remote()
        self.started = time.time()
        self._thread = threading.Thread(target=self._print_progress, name="progress", daemon=True)
        self._thread.start()
        return self

    def _print_progress(self) -> None:
        last_at, last_tokens = self.started, 0
        while not self._stop.wait(self.interval_s):
            try:
                totals = ray.get(self.actor.totals.remote(), timeout=self.interval_s)
            except (ray.exceptions.RayError, TimeoutError):
                continue  # progress is a courtesy: never fail the run over it
            now = time.time()
            tok_per_s = (totals["output_tokens"] - last_tokens) / max(now - last_at, 1e-9)
            last_at, last_tokens = now, totals["output_tokens"]
            eta = eta_seconds(totals["rows"], self.total_rows, totals["first_ready"], now)
            self.write(progress_line(totals["rows"], self.total_rows, tok_per_s, eta))

    def __exit__(self, error_type, error, traceback) -> None:
        self._stop.set()
        self._thread.join()
        self.finished = time.time()
        try:
            if error_type is None:
                self._wait_for_final_reports()
            self.snapshot = ray.get(self.actor.snapshot.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        finally:
            ray.kill(self.actor)

    def _wait_for_final_reports(self) -> None:
        deadline, last = time.time() + FINAL_REPORTS_WAIT_S, -1
        while time.time() < deadline:
            totals = ray.get(self.actor.totals.remote(), timeout=30)
            if not totals["replicas"] or self.total_rows is not None and totals["rows"] >= self.total_rows:
                return  # no replica reports here (stand-in stages), or every row is in
            if self.total_rows is None and totals["rows"] == last:
                return  # rows not counted beforehand: in once the count stops moving
            last = totals["rows"]
            time.sleep(0.1 if self.total_rows is not None else 0.5)

    def report(self, written: dict) -> dict:
        """The run report; `written` is util.output.write_results' counts."""
        return build_report(self.snapshot, written, self.started, self.finished, self.gpus)


def check_accounting(input_rows: int, written: dict, already_done: int) -> None:
    """Every input row is written now (ok or failed) or was already: anything else is a bug, loudly."""
    if input_rows != written["ok"] + written["error"] + already_done:
        raise RuntimeError(f"row accounting is off: {input_rows} input rows, but {written['ok']} ok + "
                           f"{written['error']} errors + {already_done} already done")


def over_error_budget(output: dict, max_error_fraction: float, output_path: str) -> str | None:
    """Why the run fails although every row is written (too many failed rows in the output), or None."""
    rows = output["ok"] + output["error"]
    failed_share = output["error"] / max(1, rows)
    if failed_share <= max_error_fraction:
        return None
    return (f"{output['error']} of {rows} output rows failed ({failed_share:.0%}), more than "
            f"--max-error-fraction {max_error_fraction} allows; they are in {output_path}/errors")


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat(timespec="seconds")


def throughput_series(batches: list, started: float, finished: float, bins: int = 40) -> dict:
    """Output tok/s over time, per replica and in total: each batch's tokens counted when it finished."""
    wall = max(finished - started, 1e-9)
    bin_s = max(1.0, math.ceil(wall / bins))
    count = max(1, math.ceil(wall / bin_s))
    per_replica: dict[str, list[float]] = {}
    for replica, _, tokens, at in batches:
        index = min(count - 1, max(0, int((at - started) // bin_s)))
        per_replica.setdefault(replica, [0.0] * count)[index] += tokens / bin_s
    total = [sum(values) for values in zip(*per_replica.values())] if per_replica else [0.0] * count
    return {"bin_s": bin_s, "start_s": [i * bin_s for i in range(count)], "total": total,
            "per_replica": dict(sorted(per_replica.items()))}


def build_report(snapshot: dict, written: dict, started: float, finished: float, gpus: float) -> dict:
    wall = max(finished - started, 1e-9)
    replicas = []
    # In the order the replicas joined: an autoscaling pool's later replicas come last, with their own
    # join time (when each engine was ready, from the run's start) and pace from then on.
    for replica, ready in sorted(snapshot["ready"].items(), key=lambda item: (item[1], item[0])):
        mine = [b for b in snapshot["batches"] if b[0] == replica]
        tokens, last = sum(b[2] for b in mine), max((b[3] for b in mine), default=None)
        # From its engine being ready to its last batch: the replica's own pace, engine start excluded.
        busy = None if last is None else last - ready
        replicas.append({"replica": replica, "rows": sum(b[1] for b in mine), "output_tokens": tokens,
                         "output_tok_per_s": round(tokens / busy, 1) if busy and busy > 0 else None,
                         "ready_s": round(ready - started, 1),
                         "last_batch_s": None if last is None else round(last - started, 1)})
    return {
        "rows": {"ok": written["ok"], "error": written["error"]},
        "input_tokens": written["input_tokens"], "output_tokens": written["output_tokens"],
        "wall_s": round(wall, 1),
        "output_tok_per_s": round(written["output_tokens"] / wall, 1),  # engine start included
        "gpus": gpus, "gpu_hours": round(wall * gpus / 3600, 3),
        "started": _iso(started), "finished": _iso(finished),
        "replicas": replicas,
        "throughput": throughput_series(snapshot["batches"], started, finished),
    }


def format_report(report: dict) -> str:
    wall = str(datetime.timedelta(seconds=round(report["wall_s"])))
    lines = [
        "run report",
        f"  rows           {report['rows']['ok']:,} ok, {report['rows']['error']:,} error",
        f"  input tokens   {report['input_tokens']:,}",
        f"  output tokens  {report['output_tokens']:,}",
        f"  output tok/s   {report['output_tok_per_s']:,.1f} overall (wall time, engine start included)",
        f"  wall time      {wall}",
        f"  GPU-hours      {report['gpu_hours']:,.3f} ({report['gpus']:g} GPUs x wall time)",
    ]
    if report["replicas"]:
        # "joined at": seconds from the run's start to the replica's engine being ready
        lines.append(f"  {'replica':<10} {'rows':>10} {'output tokens':>14} {'output tok/s':>13} {'joined at':>9}")
        for r in report["replicas"]:
            speed = "-" if r["output_tok_per_s"] is None else f"{r['output_tok_per_s']:,.1f}"
            lines.append(f"  {r['replica']:<10} {r['rows']:>10,} {r['output_tokens']:>14,} {speed:>13} "
                         f"{r['ready_s']:>8.1f}s")
    return "\n".join(lines)


def plot_throughput(report: dict) -> bytes:
    """A PNG of output tok/s over the run, per replica and in total."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, scale = report["throughput"], 60 if report["wall_s"] > 600 else 1
    minutes = scale == 60
    x = [t / scale for t in series["start_s"] + [series["start_s"][-1] + series["bin_s"]]]  # the last bin's end
    ready = {r["replica"]: r["ready_s"] for r in report["replicas"]}
    fig, ax = plt.subplots(figsize=(8, 4))
    for replica, values in series["per_replica"].items():
        line, = ax.step(x, values + values[-1:], where="post", linewidth=1, label=f"replica {replica}")
        if replica in ready:  # before this line the replica's engine was starting
            ax.axvline(ready[replica] / scale, color=line.get_color(), linestyle=":", linewidth=1)
    ax.step(x, series["total"] + series["total"][-1:], where="post", linewidth=2.5, color="black", label="total")
    ax.set_xlabel(f"{'minutes' if minutes else 'seconds'} since the pipeline started")
    ax.set_ylabel(f"output tokens / s ({series['bin_s']:g} s bins)")
    ax.set_title(f"{report['output_tokens']:,} output tokens in {report['wall_s']:,.0f} s, "
                 f"{len(series['per_replica'])} replica(s); dotted: a replica's engine is ready", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(output_path: str, report: dict) -> list[str]:
    """`_report.json` and `_throughput.png` beside the output's data; returns their paths."""
    filesystem, path = resolve(output_path)
    files = {REPORT_NAME: json.dumps(report, indent=2).encode() + b"\n", PLOT_NAME: plot_throughput(report)}
    for name, data in files.items():
        commit_file(filesystem, f"{path}/{name}", data)
    return [f"{output_path.rstrip('/')}/{name}" for name in files]
