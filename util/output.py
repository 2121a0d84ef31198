"""Write results, one row per input row, and read them back.

    written = write_results(ds, "s3://bucket/run/", "parquet")   # {"ok": 98, "error": 2, ...}
    output_counts("s3://bucket/run/")                            # the folder's rows, from every run

An output path holds `part-<write>-<task>.parquet` (rows that succeeded), `errors/part-...` (rows that
failed, `error` saying why) and `_manifest.json`, which readers skip (a leading `_`). Each write task
commits its file whole, named by the write and the task, so a killed job leaves no half file and a retried
task overwrites its own. The committed output is the checkpoint: a row is done when a committed file holds
it. (Ray Data's CheckpointConfig writes its record after a custom datasink's data: a kill between the two
would have rows written twice.)
"""

import dataclasses
import json
import os
import time
import uuid
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from util import columns as col
from util.columns import TIMINGS
from util.errors import InputError
from util.parts import registry
from util.resources import TASK_CPUS
from util.storage import TEMP_SUFFIX, commit_file, resolve

OUTPUT_SCHEMA = pa.schema([(col.ID, pa.string()), (col.PROMPT, pa.string()), (col.GENERATED_TEXT, pa.string()),
                           (col.FINISH_REASON, pa.string()), (col.NUM_INPUT_TOKENS, pa.int64()),
                           (col.NUM_GENERATED_TOKENS, pa.int64()), (col.ERROR, pa.string()), (col.MODEL, pa.string()),
                           *((name, pa.float64()) for name in TIMINGS)])  # seconds in queue, to first token, generating
ERRORS_FOLDER = "errors"
# Rows a write task gathers into a file: fewer, larger files than one per batch, while a killed run redoes at
# most this many rows a task. main.py passes one replica's rows in flight (batch_size x batches_in_flight).
ROWS_PER_FILE = 1024


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows).encode("utf-8")


def parquet_bytes(table: pa.Table) -> bytes:
    pq.write_table(table, sink := pa.BufferOutputStream())
    return sink.getvalue().to_pybytes()


@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """How output rows become a file, and what reading them back needs."""
    extension: str
    serialize: Callable[[pa.Table], bytes]
    id_column: str = col.ID
    read_schema: pa.Schema | None = None  # JSON lines: the columns resume and the counts read, typed
    preview: Callable[[dict], dict] = dict  # a record read back, in the shape of an output row


FORMATS = {"parquet": OutputFormat(".parquet", parquet_bytes),
           "jsonl": OutputFormat(".jsonl", lambda table: jsonl_bytes(table.to_pylist()), read_schema=OUTPUT_SCHEMA)}


def output_format_of(name: str) -> OutputFormat:
    """The core's formats, or a feature's (OUTPUT_FORMATS)."""
    return FORMATS[name] if name in FORMATS else registry("OUTPUT_FORMATS")[name]


def output_schema(columns: dict | None = None) -> pa.Schema:
    """OUTPUT_SCHEMA, then a job's features' columns (name -> Arrow type)."""
    return pa.schema([*OUTPUT_SCHEMA, *((name, kind) for name, kind in (columns or {}).items()
                                        if name not in OUTPUT_SCHEMA.names)])


def conform(table: pa.Table, schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """`schema`'s columns first, with its types, so every file of a run has the same schema (a batch
    whose `error` values are all null would otherwise be typed `null`); then the input's columns."""
    contract = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                for f in schema]
    rest = [c for c in table.column_names if c not in schema.names]
    return pa.Table.from_arrays(contract + [table[c] for c in rest], names=schema.names + rest)


EMPTY_COUNTS = {"ok": 0, "error": 0, "input_tokens": 0, "output_tokens": 0}


def add_counts(total: dict, counts: dict) -> None:
    for key, value in counts.items():
        total[key] += value


def row_counts(table: pa.Table) -> dict:
    """Rows that succeeded and failed, and their token counts."""
    failed = len(table) - table[col.ERROR].null_count
    return {"ok": len(table) - failed, "error": failed,
            "input_tokens": pc.sum(table[col.NUM_INPUT_TOKENS]).as_py() or 0,
            "output_tokens": pc.sum(table[col.NUM_GENERATED_TOKENS]).as_py() or 0}


class ResultsDatasink(Datasink):
    """Writes each write task's rows as one file of successes and one under errors/ (when there are
    any), named `part-<write_id>-<task index>`, each committed whole (see commit_file)."""

    def __init__(self, output_path: str, output_format: str = "parquet", write_id: str | None = None,
                 rows_per_file: int = ROWS_PER_FILE, schema: pa.Schema = OUTPUT_SCHEMA):
        self.rows_per_file, self.schema = rows_per_file, schema
        self.filesystem, self.path = resolve(output_path)
        self.format = output_format_of(output_format)
        # Names the files of this write; a later write (a resumed run) adds files beside them.
        self.write_id = write_id or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        self.written = dict(EMPTY_COUNTS)

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        tables = [conform(BlockAccessor.for_block(block).to_arrow(), self.schema) for block in blocks]
        table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
        if table.num_rows == 0:
            return dict(EMPTY_COUNTS)
        name = f"part-{self.write_id}-{ctx.task_idx:06d}{self.format.extension}"
        failed = pc.is_valid(table["error"])
        for rows, folder in ((table.filter(pc.invert(failed)), self.path),
                             (table.filter(failed), f"{self.path}/{ERRORS_FOLDER}")):
            if len(rows):
                commit_file(self.filesystem, f"{folder}/{name}", self.format.serialize(rows))
        return row_counts(table)

    def on_write_complete(self, write_result) -> None:
        for counts in write_result.write_returns:
            add_counts(self.written, counts)


def listed_files(filesystem: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Every file under the output folder (none when there is no folder yet)."""
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [f for f in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)) if f.is_file]


def is_temp_file(info: pafs.FileInfo) -> bool:
    return info.base_name.startswith(".") and info.base_name.endswith(TEMP_SUFFIX)


def data_files(output_path: str, output_format: str = "parquet") -> tuple[pafs.FileSystem, list[str]]:
    """The committed data files of an output path, in errors/ too; never temporary files or the manifest."""
    filesystem, path = resolve(output_path)
    extension = output_format_of(output_format).extension
    return filesystem, sorted(f.path for f in listed_files(filesystem, path) if f.base_name.endswith(extension)
                              and not any(part.startswith((".", "_")) for part in f.path[len(path):].split("/")))


def remove_temp_files(output_path: str) -> None:
    """Delete what killed writes left behind (readers skip it anyway)."""
    filesystem, path = resolve(output_path)
    for leftover in [f.path for f in listed_files(filesystem, path) if is_temp_file(f)]:
        filesystem.delete_file(leftover)


def delete_output(output_path: str) -> None:
    """Delete an earlier output (--overwrite). Only a folder that holds nothing but output goes, so a
    mistyped path cannot wipe a folder of other files."""
    filesystem, path = resolve(output_path)
    extensions = tuple({f.extension for f in [*FORMATS.values(), *registry("OUTPUT_FORMATS").values()]})
    foreign = [f.path[len(path) + 1:] for f in listed_files(filesystem, path) if not (
        f.base_name.endswith(extensions) or is_temp_file(f)
        or f.path[len(path) + 1:].startswith("_"))]  # the run's own records: manifest, report, _preflight/
    if foreign:
        raise InputError(f"--overwrite deletes only earlier output, but {output_path} also holds "
                         f"{', '.join(sorted(foreign)[:5])}; move those away or choose another --output-path")
    if not isinstance(filesystem, pafs.LocalFileSystem):
        # delete_dir would leave a folder-marker object in the parent prefix; this leaves one here at most
        filesystem.delete_dir_contents(path, missing_dir_ok=True)
    elif os.path.isdir(path):
        filesystem.delete_dir(path)


def write_results(ds: ray.data.Dataset, output_path: str, output_format: str = "parquet",
                  write_id: str | None = None, rows_per_file: int = ROWS_PER_FILE, columns: dict | None = None) -> dict:
    """Run the pipeline and commit its rows under `output_path`. `columns`: the job's features' output
    columns (plan.columns), after OUTPUT_SCHEMA's. Returns the rows written by this call:
    {"ok", "error", "input_tokens", "output_tokens"}."""
    remove_temp_files(output_path)
    sink = ResultsDatasink(output_path, output_format, write_id, rows_per_file, output_schema(columns))
    existed = sink.filesystem.get_file_info(sink.path).type != pafs.FileType.NotFound
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": TASK_CPUS})
    except BaseException:
        # A run that failed before writing a row leaves no empty output folder that looks like a result.
        # Folders are made only for a file's sake (object stores have none), so only a local one can be left.
        remove_temp_files(output_path)
        if not existed and sink.filesystem.get_file_info(sink.path).type == pafs.FileType.Directory \
                and not listed_files(sink.filesystem, sink.path):
            sink.filesystem.delete_dir(sink.path)
        raise
    return sink.written


def output_dataset(output_path: str, output_format: str = "parquet") -> tuple[pads.Dataset | None, str]:
    """The output's committed files as a pyarrow dataset (None when there are none), and its id column."""
    filesystem, files = data_files(output_path, output_format)
    fmt = output_format_of(output_format)
    if not files:
        return None, fmt.id_column
    if fmt.read_schema is None:
        return pads.dataset(files, filesystem=filesystem, format="parquet"), fmt.id_column
    file_format = pads.JsonFileFormat(parse_options=pajson.ParseOptions(explicit_schema=fmt.read_schema,
                                                                       unexpected_field_behavior="ignore"))
    # The dataset's schema too: else the first file's, where a column null on every row is of type null.
    return pads.dataset(files, filesystem=filesystem, format=file_format, schema=fmt.read_schema), fmt.id_column


def output_counts(output_path: str, output_format: str = "parquet") -> dict:
    """Rows in the whole output, from every run so far: {"ok": ..., "error": ...}."""
    files, _ = output_dataset(output_path, output_format)
    errors = files.count_rows(filter=pc.field("error").is_valid()) if files else 0
    return {"ok": (files.count_rows() if files else 0) - errors, "error": errors}
