"""The checks before any row runs: the output (check_output), then one distributed pass over the input,
which main.py runs beside the replicas' start (ScanBeside), and --preflight on its own (check_before_run).

The pass reads and parses every row, so a file-level error (malformed JSONL, non-UTF-8, a missing column,
an empty file) refuses the run before a row is generated. It counts rows, and rows an earlier run wrote, with
Ray Data aggregations; with an --id-column it finds duplicate ids with a `groupby` over the ids alone. The
driver receives a few numbers, never the ids.
"""

import functools
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.aggregate import Count, Max, Min, Sum
from ray.data.context import ShuffleStrategy

from util import columns as col
from util.errors import InputError, original
from util.output import output_dataset
from util.reading import SAMPLE_PROMPTS, WHERE_COLUMN, describe_where, read_prompts
from util.resources import TASK_CPUS
from util.resume import DoneIndex, check_fingerprint, mark_done

if TYPE_CHECKING:
    from util.plan import Plan


@dataclass
class InputScan:
    rows: int  # input rows (after --limit)
    already_done: int  # how many of them have ids in the output
    done: DoneIndex | None = None  # the output's ids, for the run to skip


def check_before_run(plan: "Plan") -> InputScan:
    """Everything a run checks before it writes a row, in order: the input's files are listed (a missing
    path stops here), the output (check_output), and the input reads cleanly, with unique ids."""
    ds = scanned_input(plan)
    done = check_output(plan)
    scan = scan_input(ds, plan.cfg.id_column, done, plan.cfg.input_path, plan.cfg.input_format)
    return InputScan(scan.rows, scan.already_done, done)


def scanned_input(plan: "Plan") -> ray.data.Dataset:
    cfg = plan.cfg
    return read_prompts(cfg.input_path or SAMPLE_PROMPTS, cfg.input_format, cfg.text_column, cfg.id_column,
                        cfg.limit, with_where=bool(cfg.id_column), required=plan.input_columns, unplanned=plan.unplanned)


def check_output(plan: "Plan") -> DoneIndex | None:
    """The output path can be written, and an earlier output there was made with the same settings (unless
    --overwrite). The rows it holds, for the run to skip."""
    from util.cloud import check_output_writable

    cfg = plan.cfg
    check_output_writable(plan.output_path)
    if cfg.overwrite:
        return None
    for warning in check_fingerprint(plan.output_path, plan.fingerprint, plan.provenance):
        print(warning, file=sys.stderr)
    return DoneIndex.build(*output_dataset(plan.output_path, cfg.output_format))


class ScanBeside:
    """The input's pass in a thread, while the `with` body runs the job: its replicas start their engines
    meanwhile, and answer no row until `on_pass(scan)` lets them (ProgressReporter(held=True)). A refusal, or
    `on_pass` returning False (no row left to run), calls `stop(reason)` instead: the held replicas fail their
    first batch with RunStopped, so Ray Data ends the run and its replicas. The `with` then raises the refusal,
    or, with nothing to run, ends quietly. No signal carries the verdict, so it reaches the run from any
    thread, and under a launcher that ignores SIGINT (a background job, a supervisor)."""

    def __init__(self, plan: "Plan", done: DoneIndex | None, on_pass, stop):
        self.ds, self.plan, self.done, self.on_pass, self.stop = scanned_input(plan), plan, done, on_pass, stop
        self.scan = self.refusal = None
        self.stopped = False

    def __enter__(self) -> "ScanBeside":
        self.thread = threading.Thread(target=self._check, daemon=True)
        self.thread.start()
        return self

    def _check(self) -> None:
        cfg = self.plan.cfg
        try:
            self.scan = scan_input(self.ds, cfg.id_column, self.done, cfg.input_path, cfg.input_format)
            go_on = self.on_pass(self.scan)
        except BaseException as error:
            self.refusal, go_on = error, False
        if not go_on:
            self.stopped = True
            self.stop(str(self.refusal) if self.refusal is not None else "no row is left to run")

    def __exit__(self, kind, error, traceback) -> bool:
        self.thread.join()
        if self.refusal is not None:
            raise self.refusal  # the run's own failure, if any, followed from it
        # Nothing was left to run: the run's failure followed from our stop (Ray Data's wrapping of RunStopped
        # keeps it only as text), and a Ctrl-C still ends the job.
        return self.stopped and kind is not None and issubclass(kind, Exception)


def _block_counts(batch: pa.Table) -> pa.Table:
    """A block's partial counts: the driver adds one small row per block, never sees an id."""
    return pa.table({"rows": [batch.num_rows], "done": [int(pc.sum(batch["done"]).as_py() or 0)]})


def _keep_duplicates(batch):
    return batch.filter(pc.and_(pc.greater(batch["rows"], 1), pc.is_valid(batch["id"])))


def scan_input(ds: ray.data.Dataset, id_column: str | None, done: DoneIndex | None,
               input_path: str | None = None, input_format: str = "auto") -> InputScan:
    """`ds`: the input as util.reading.read_prompts gives it (with_where=True when there is an id column)."""
    columns = [col.ID, WHERE_COLUMN] if id_column else [col.ID]
    mark = done.mark_done if done else functools.partial(mark_done, index_ref=None)  # a `done` column
    ids = ds.select_columns(columns).map_batches(mark, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS)
    try:
        if not id_column:  # derived ids cannot repeat: counting is all, and a per-block sum needs no shuffle
            rows = done_rows = 0
            for partial in ids.map_batches(_block_counts, batch_format="pyarrow", batch_size=None,
                                           num_cpus=TASK_CPUS).iter_batches(batch_format="pyarrow", batch_size=None):
                rows += pc.sum(partial["rows"]).as_py()
                done_rows += pc.sum(partial["done"]).as_py()
            return InputScan(rows=rows, already_done=done_rows)
        # A sort-based shuffle, in tasks: the hash shuffle's aggregating actors took 6-18 s to start for 50
        # rows on 2 CPUs. A few large partitions: Ray's default, 200, took a minute for 100 rows there.
        ids.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        partitions = max(2, int(ray.cluster_resources().get("CPU", 2)))
        grouped = ids.groupby("id", num_partitions=partitions).aggregate(
            Count(alias_name="rows"), Max("done", alias_name="done"),
            Min(WHERE_COLUMN, alias_name="first"), Max(WHERE_COLUMN, alias_name="last")).materialize()
        duplicates = grouped.map_batches(_keep_duplicates, batch_format="pyarrow", batch_size=None).take(1)
        if duplicates:
            row = duplicates[0]
            raise InputError(f"duplicate id '{row['id']}' in column '{id_column}': "
                             f"{describe_where(row['first'], input_path, input_format)} and "
                             f"{describe_where(row['last'], input_path, input_format)}")
        totals = grouped.aggregate(Sum("rows", alias_name="rows"), Sum("done", alias_name="done"))
        return InputScan(rows=totals["rows"] or 0, already_done=totals["done"] or 0)
    except Exception as error:  # Ray's wrapper of a read task's error keeps it as `cause`
        cause = original(error)
        if isinstance(cause, InputError):
            raise cause from None
        if isinstance(cause, OSError):  # a read task could not open a file: permissions, a vanished file
            raise InputError(f"an input file is not readable: {cause.strerror or cause}") from None
        raise
