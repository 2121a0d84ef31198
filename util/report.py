"""How a run is going, and how it went: a progress line while it runs, a report when it is done.

    with ProgressReporter(total_rows=10_000, interval_s=30, gpus=plan.gpus_held) as progress:
        written = write_results(ds, output_path)   # prints `progress: 1,234/10,000 rows (12%), ...`
    report = progress.report(written)   # rows, tokens, tok/s per replica, GPU-hours: util/results.py prints it

Replicas send what they finish to a named actor, without waiting (util/replica/supervisor.py: ProgressClient).
"""

import asyncio
import datetime
import math
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


FIRST_ROW_POLL_S = 1.0  # how soon the first finished row's progress line follows it
FINAL_REPORTS_WAIT_S = 5.0  # the last reports are in flight when the write finishes
# What a run survived (util/replica/supervisor.py counts the first three in each replica; Ray restarts replicas).
SURVIVED = ("engine_restarts", "rows_rerun", "rows_isolated", "replica_restarts", "nodes_lost")


class ProgressLog:
    """What the replicas reported: the progress actor's state (plain Python, so it tests without Ray)."""

    def __init__(self, held: bool = False):
        self.released = asyncio.Event()  # replicas answer no row before it is set (held: until `release`)
        self.stopped: str | None = None  # why no row may run at all (`stop`), once released
        if not held:
            self.released.set()
        self.ready: dict[str, float] = {}  # replica -> when its engine was ready
        self.starts: dict[str, dict] = {}  # replica -> when its start's steps happened (actor_start, vllm_imported)
        self.done: list[tuple[str, int, int, float]] = []  # (replica, rows, output tokens, when)
        self.rows = self.output_tokens = 0
        self.survived = dict.fromkeys(SURVIVED, 0)
        self.prefix_cache: dict[str, list[int]] = {}  # replica -> [prompt tokens, of which the cache held]
        self.grouped_tokens = [0, 0]  # grouped rows' prompt tokens, of which shared with the row before

    def replica_ready(self, replica: str, at: float, marks: dict | None = None) -> None:
        if replica in self.ready:  # Ray restarted its actor (a restart keeps the actor's id)
            self.survived["replica_restarts"] += 1
        self.ready.setdefault(replica, at)
        self.starts.setdefault(replica, {**(marks or {}), "engine_ready": at})

    def count(self, name: str, n: int) -> None:  # a name not in SURVIVED: a feature's count of rows (--repair)
        self.survived[name] = self.survived.get(name, 0) + n

    def release(self) -> None:
        self.released.set()

    def stop(self, reason: str) -> None:  # the run ends before any row runs: each replica's batch raises
        self.stopped = reason
        self.released.set()

    async def wait_released(self) -> str | None:
        """None once rows may run; why not, if the run was stopped instead."""
        await self.released.wait()
        return self.stopped

    def rows_done(self, replica: str, rows: int, output_tokens: int, at: float) -> None:
        self.done.append((replica, rows, output_tokens, at))
        self.rows, self.output_tokens = self.rows + rows, self.output_tokens + output_tokens

    def cached(self, replica: str, prompt_tokens: int, cached_tokens: int) -> None:
        counts = self.prefix_cache.setdefault(replica, [0, 0])
        counts[0], counts[1] = counts[0] + prompt_tokens, counts[1] + cached_tokens

    def grouped(self, prompt_tokens: int, shared_tokens: int) -> None:
        self.grouped_tokens = [self.grouped_tokens[0] + prompt_tokens, self.grouped_tokens[1] + shared_tokens]

    def totals(self) -> dict:
        return {"rows": self.rows, "output_tokens": self.output_tokens, "replicas": len(self.ready),
                "first_ready": min(self.ready.values(), default=None), "restarts": self.survived["engine_restarts"]}

    def snapshot(self) -> dict:  # `counted`: a feature's counts of rows (--repair's), shown beside ok and error,
        # by name: the replicas' reports come in any order
        return {"ready": self.ready, "starts": self.starts, "done": self.done, "survived": {n: self.survived[n] for n in SURVIVED},
                "prefix_cache": self.prefix_cache, "grouped_tokens": self.grouped_tokens,
                "counted": {n: self.survived[n] for n in sorted(self.survived) if n not in SURVIVED}}


def progress_line(rows_done: int, total_rows: int | None, output_tok_per_s: float, eta_s: float | None,
                  restarts: int = 0) -> str:
    """`progress: 1,234/10,000 rows (12%), 5,678 output tok/s, ETA 0:12:34` (`, 2 engine restarts` after
    any); without a total (the rows were not counted beforehand): `progress: 1,234 rows, 5,678 output tok/s`"""
    restarted = f", {restarts} engine restart{'s' * (restarts != 1)}" if restarts else ""
    if total_rows is None:
        return f"progress: {rows_done:,} rows, {output_tok_per_s:,.0f} output tok/s{restarted}"
    percent = 100 if total_rows <= 0 else min(100, math.floor(100 * rows_done / total_rows))
    eta = "unknown" if eta_s is None else str(datetime.timedelta(seconds=round(eta_s)))
    return (f"progress: {rows_done:,}/{total_rows:,} rows ({percent}%), {output_tok_per_s:,.0f} output tok/s, "
            f"ETA {eta}{restarted}")


def eta_seconds(rows_done: int, total_rows: int | None, first_ready: float | None, now: float) -> float | None:
    """Rows left at the pace since the first engine was ready (engine start is no guide to what is left)."""
    if total_rows is not None and rows_done >= total_rows:
        return 0.0
    if total_rows is None or not rows_done or first_ready is None or now <= first_ready:
        return None
    return (total_rows - rows_done) * (now - first_ready) / rows_done


class ProgressReporter:
    """Creates the progress actor and prints a progress line every `interval_s` seconds from a driver thread
    while the `with` block runs; Ray Data's own progress bars are left as they are. `held`: the replicas
    answer no row, and no line is printed, until `release(total_rows)` (the input has passed its check)."""

    def __init__(self, total_rows: int | None, interval_s: float = 30.0, gpus: float = 0.0, write=None,
                 held: bool = False):
        self.total_rows, self.interval_s, self.gpus, self.held = total_rows, interval_s, gpus, held
        self.write = write or (lambda line: print(line, flush=True))
        self.started = self.finished = None
        self._stop = threading.Event()
        self.snapshot = {"ready": {}, "done": [], "survived": dict.fromkeys(SURVIVED, 0)}

    def __enter__(self) -> "ProgressReporter":
        from util.replica.supervisor import PROGRESS_ACTOR

        try:  # one left behind by an interrupted run in this driver (a notebook) holds the name
            ray.kill(ray.get_actor(PROGRESS_ACTOR))
        except ValueError:
            pass
        # Named and not detached: replicas find it by name, and it ends with the driver at the latest.
        # On the driver's node: it is lost only with the driver (a node lost mid-run is survived).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ray.remote(num_cpus=0)(ProgressLog).options(name=PROGRESS_ACTOR, scheduling_strategy=here).remote(
            self.held)  # registered by now (a name is claimed at once): a replica that starts finds it
        self.nodes = alive_nodes()
        self.started, self._thread = time.time(), threading.Thread(target=self._print_progress, daemon=True)
        self._thread.start()
        return self

    def release(self, total_rows: int) -> None:
        self.total_rows, self.held = total_rows, False
        self.actor.release.remote()

    def stop(self, reason: str) -> None:
        """No row will run: the held replicas fail their first batch with RunStopped(reason), so Ray Data
        ends the run and its replicas, whatever thread or signal settings the driver has."""
        ray.get(self.actor.stop.remote(reason), timeout=30)

    def _print_progress(self) -> None:
        last_at, last_tokens, rows_in = self.started, 0, False
        # Until the first row is in, the actor is asked every second: that row's line comes at once, not at
        # the next tick (30 s by default); lines with no row yet still come once a tick.
        while not self._stop.wait(self.interval_s if rows_in else min(self.interval_s, FIRST_ROW_POLL_S)):
            if self.held:
                continue
            try:
                totals = ray.get(self.actor.totals.remote(), timeout=self.interval_s)
            except (ray.exceptions.RayError, TimeoutError):
                continue  # progress is a courtesy: never fail the run over it
            now, tokens, rows_in = time.time(), totals["output_tokens"], totals["rows"] > 0
            if not rows_in and now - last_at < self.interval_s:
                continue
            eta = eta_seconds(totals["rows"], self.total_rows, totals["first_ready"], now)
            self.write(progress_line(totals["rows"], self.total_rows, (tokens - last_tokens) / max(now - last_at, 1e-9),
                                     eta, totals["restarts"]))
            last_at, last_tokens = now, tokens

    def __exit__(self, error_type, error, traceback) -> None:
        self._stop.set()
        self._thread.join()
        self.finished = time.time()
        try:
            if error_type is None:
                self._wait_for_final_reports()
            self.snapshot = ray.get(self.actor.snapshot.remote(), timeout=30)
            self.snapshot["survived"]["nodes_lost"] = len(self.nodes - alive_nodes())
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

    def report(self, written: dict, plan=None, marks: dict | None = None) -> dict:
        """The run report (util/results.py); `written` is util.output.write_results' counts, `plan` the run's
        (its rows' order: util/grouping.py), `marks` the driver's steps (main.py's timeline)."""
        from util.results import build_report

        return build_report(self.snapshot, written, self.started, self.finished, self.gpus,
                            getattr(plan, "row_order", None), getattr(plan, "sample_shared_share", None), marks)


def alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def check_accounting(input_rows: int, written: dict, already_done: int) -> None:
    """Every input row is written now (ok or failed) or was already: anything else is a bug, loudly."""
    if input_rows != written["ok"] + written["error"] + already_done:
        raise RuntimeError(f"row accounting is off: {input_rows} input rows, but {written['ok']} ok + "
                           f"{written['error']} errors + {already_done} already done")


def over_error_budget(output: dict, max_error_fraction: float, output_path: str) -> str | None:
    """Why the run fails although every row is written (too many failed rows in the output), or None."""
    rows = output["ok"] + output["error"]
    failed_share = output["error"] / max(1, rows)
    return None if failed_share <= max_error_fraction else (
        f"{output['error']} of {rows} output rows failed ({failed_share:.0%}), more than --max-error-fraction "
        f"{max_error_fraction} allows; they are in {output_path}/errors")
