"""A finished run's output, read back: every row (those that succeeded and those under errors/), its
counts, and a few rows at a glance, which main.py prints at the end of a run.

    rows = read_results("s3://bucket/run/").take(5)
    summarize(read_results("s3://bucket/run/"))        # {"rows": 100, "ok": 98, "errors": 2, ...}
    sample_rows("s3://bucket/run/")                     # [{"id": ..., "generated_text": ..., ...}, ...]
"""

import pyarrow.dataset as pads
import pyarrow.json as pajson
import ray

from util import columns as col
from util.output import EMPTY_COUNTS, add_counts, data_files, output_dataset, output_format_of, row_counts
from util.storage import resolve


def read_results(output_path: str, output_format: str = "parquet") -> ray.data.Dataset:
    """Every row of the output, those that succeeded and those under errors/."""
    filesystem, path = resolve(output_path)
    if output_format == "parquet":
        return ray.data.read_parquet(path, filesystem=filesystem, file_extensions=["parquet"])
    # The core columns' types are given: a file whose `error`s are all null would read as null.
    schema = output_format_of(output_format).read_schema if output_format == "jsonl" else None
    return ray.data.read_json(path, filesystem=filesystem, file_extensions=["jsonl"],
                              **({"parse_options": pajson.ParseOptions(explicit_schema=schema)} if schema else {}))


def summarize(ds: ray.data.Dataset) -> dict:
    """Row and token counts of a finished run's output."""
    total = dict(EMPTY_COUNTS)
    for batch in ds.select_columns([col.ERROR, col.NUM_INPUT_TOKENS, col.NUM_GENERATED_TOKENS]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        add_counts(total, row_counts(batch))
    return {"rows": total["ok"] + total["error"], "ok": total["ok"], "errors": total["error"],
            "input_tokens": total["input_tokens"], "output_tokens": total["output_tokens"]}


GLANCE_COLUMNS = (col.ID, col.GENERATED_TEXT, col.FINISH_REASON, col.NUM_GENERATED_TOKENS, col.ERROR)


def glance(row: dict, columns: tuple = GLANCE_COLUMNS) -> dict:
    """The columns of an output row worth a look; a long list (an embedding) as its size and first values."""
    def short(value):
        return f"{len(value)} values {value[:3]} ..." if isinstance(value, list) and len(value) > 8 else value

    return {k: short(row.get(k)) for k in columns}


def sample_rows(output_path: str, output_format: str = "parquet", count: int = 3,
                columns: tuple | None = None) -> list[dict]:
    """A few rows of the output, each at a glance (`columns`, else GLANCE_COLUMNS), read on the driver:
    quicker than starting a Ray read."""
    fmt = output_format_of(output_format)
    if fmt.preview is dict:  # rows as the pipeline wrote them
        files, _ = output_dataset(output_path, output_format)
        rows = files.head(count).to_pylist() if files else []
    else:  # records of a feature's format, their types as they come
        filesystem, paths = data_files(output_path, output_format)
        rows = [fmt.preview(record) for record in
                pads.dataset(paths, filesystem=filesystem, format="json").head(count).to_pylist()] if paths else []
    return [glance(row, columns or GLANCE_COLUMNS) for row in rows]
