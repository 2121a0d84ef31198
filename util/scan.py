"""The input scan: one distributed pass over the input before any GPU is taken.

    from util.scan import scan_input
    scan = scan_input(ids_ds, id_column="uid", done=done_index)   # InputError on bad input
    print(scan.rows, scan.already_done)

It reads and parses every row, so every file-level error (malformed JSONL, non-UTF-8, a missing column,
an empty or unreadable file) stops the run before an engine starts. It counts the rows, and the rows
whose ids an earlier run wrote (util/resume.py), with Ray Data aggregations. With an --id-column it
also finds duplicate ids with a `groupby("id")` over the id column alone, a hash shuffle spread over
the cluster. The driver receives a few numbers, never the ids. Derived ids name file and position, so
they cannot repeat, and then no shuffle is needed.

The run reads the input again: a scan that kept the rows for the run would hold the whole input in
the object store (a 10M-row file is several GB), and one that feeds the run directly could not stop a
bad file before the engines start. BENCHMARKS.md gives what the scan costs.
"""

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.aggregate import Count, Max, Min, Sum

from util.reading import WHERE_COLUMN, InputError, describe_where, unwrap_input_error
from util.resume import DoneIndex, mark_done


@dataclass
class InputScan:
    rows: int  # input rows (after --limit)
    already_done: int  # how many of them have ids in the output


def _block_counts(batch: pa.Table) -> pa.Table:
    """A block's partial counts: the driver adds one small row per block, never sees an id."""
    return pa.table({"rows": [batch.num_rows], "done": [int(pc.sum(batch["done"]).as_py() or 0)]})


def _keep_duplicates(batch):
    return batch.filter(pc.and_(pc.greater(batch["rows"], 1), pc.is_valid(batch["id"])))


def scan_input(ds: ray.data.Dataset, id_column: str | None, done: DoneIndex | None,
               input_path: str | None = None, input_format: str = "auto") -> InputScan:
    """`ds`: the input as util.reading.read_prompts gives it (with_where=True when there is an id column)."""
    columns = ["id", WHERE_COLUMN] if id_column else ["id"]
    ids = ds.select_columns(columns).map_batches(
        mark_done, fn_kwargs={"index_ref": [done.ref] if done else None}, batch_format="pyarrow",
        batch_size=None, num_cpus=0.5)
    try:
        if not id_column:  # derived ids cannot repeat: counting is all, and a per-block sum needs no shuffle
            rows = done_rows = 0
            for partial in ids.map_batches(_block_counts, batch_format="pyarrow", batch_size=None,
                                           num_cpus=0.5).iter_batches(batch_format="pyarrow", batch_size=None):
                rows += pc.sum(partial["rows"]).as_py()
                done_rows += pc.sum(partial["done"]).as_py()
            return InputScan(rows=rows, already_done=done_rows)
        # A few large partitions: each is an aggregating actor, and on a small cluster their start is
        # most of the pass (Ray's default, 200, took a minute for 100 rows on 2 CPUs).
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
    except Exception as error:  # Ray's RayTaskError(InputError) is an InputError too: unwrap it
        input_error = unwrap_input_error(error)
        if input_error is not None:
            raise input_error from None
        cause = getattr(error, "cause", error)  # Ray's wrapper keeps the worker's exception as `cause`
        if isinstance(cause, OSError):  # a read task could not open a file: permissions, a vanished file
            raise InputError(f"an input file is not readable: {cause.strerror or cause}") from None
        raise
