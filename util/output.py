"""Write results, one row per input row, and read them back.

    from util.output import check_output_writable, write_results, read_results
    check_output_writable("s3://bucket/run/")                    # InputError if it cannot be written
    written = write_results(ds, "s3://bucket/run/", "parquet")   # {"ok": 98, "error": 2, ...}
    rows = read_results("s3://bucket/run/").take(5)              # every row, ok and failed

Layout of an output path:

    part-<write>-<task>.parquet          rows that succeeded (`error` is null)
    errors/part-<write>-<task>.parquet   rows that failed, same columns, `error` says why; run them again
                                         with --input-path <out>/errors --input-format parquet --id-column id
    _manifest.json                       status, row counts and settings of the last run (util/manifest.py)

Reading the folder recursively (ray.data.read_parquet, pyarrow.dataset, pandas) gives every row once:
the manifest's leading underscore, like Spark's _SUCCESS, keeps every reader from taking it for data.
JSONL files end in `.jsonl`, and read_results reads only those. With output format `openai` each line is
an OpenAI Batch API output record (util/openai_batch.py) instead: errors/ is then the batch's error file.

Every output row has the columns of OUTPUT_SCHEMA first, then the input's own columns.

Each write task commits its rows whole or not at all, so a killed job never leaves a half file that
looks complete. On a local or mounted filesystem the file is written under a hidden temporary name in
its own folder, then renamed into place; readers skip hidden files, and the next write removes the
leftovers of a killed one. On s3:// and gs:// a file is written directly: an object appears only when
its upload completes. A file's name is fixed by the write and the task's index, so a write task that
Ray retries overwrites its own file rather than adding a second copy of its rows.

The committed output is itself the checkpoint: a re-run reads the ids in it and skips them. Ray Data's
CheckpointConfig (ray.data.checkpoint, alpha/beta in Ray 2.60) is not used, because it keeps the done
ids as a second record beside the output, and a kill between the output write and the checkpoint write
leaves the two disagreeing. For a custom datasink such as this one Ray writes the checkpoint after the
data, so those rows would be redone and written twice (its built-in file writers add pending checkpoints
to repair that, but cannot split rows into errors/). Here a row is done exactly when a committed file
holds it: there is nothing to keep in step.
"""

import json
import os
import time
import uuid

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
from util.columns import COMPLETIONS_TYPE, EMBEDDING_TYPE, TIMINGS, TOKEN_LOGPROBS
from util.errors import InputError
from util.openai_batch import output_record, preview
from util.resources import TASK_CPUS
from util.storage import TEMP_SUFFIX, commit_file, is_remote, join, resolve, s3_location

OUTPUT_SCHEMA = pa.schema([
    (col.ID, pa.string()),
    (col.PROMPT, pa.string()),
    (col.GENERATED_TEXT, pa.string()),
    (col.FINISH_REASON, pa.string()),
    (col.NUM_INPUT_TOKENS, pa.int64()),
    (col.NUM_GENERATED_TOKENS, pa.int64()),
    (col.ERROR, pa.string()),
    (col.MODEL, pa.string()),
    (col.STRUCTURED_OUTPUT_ERROR, pa.string()),  # null unless a structured-output row does not conform
    # Richer outputs (util/request_output.py), each null unless the row asked for it.
    (col.COMPLETIONS, COMPLETIONS_TYPE),  # every sample when n > 1, each with its text, finish reason, tokens, ...
    (col.LOGPROBS, TOKEN_LOGPROBS),  # per generated token (of generated_text): token, logprob, top K
    (col.PROMPT_LOGPROBS, TOKEN_LOGPROBS),  # per prompt token; the first one's logprob is null
    (col.REASONING_CONTENT, pa.string()),  # a reasoning parser's thinking; generated_text holds the rest
    *((name, pa.float64()) for name in TIMINGS),  # seconds in queue, to first token, generating
    (col.EMBEDDING, EMBEDDING_TYPE),  # --task embed: the prompt's embedding; null for generated rows
])
ERRORS_FOLDER = "errors"
EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl", "openai": ".jsonl"}
# What resume and the counts read of an OpenAI batch output record (util/openai_batch.py).
OPENAI_RECORD_KEYS = pa.schema([("custom_id", pa.string()),
                                ("error", pa.struct([("code", pa.string()), ("message", pa.string())]))])
# Rows a write task gathers into one file, unless told otherwise: fewer, larger files than one per predictor
# batch (ten million rows make about ten thousand files), while a killed run redoes at most this many rows
# per write task. main.py passes one replica's rows in flight (batch_size x batches_in_flight).
ROWS_PER_FILE = 1024


def conform(table: pa.Table) -> pa.Table:
    """Contract columns first, with fixed types, so every file of a run has the same schema
    (a batch whose `error` values are all null would otherwise be typed `null`)."""
    contract = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                for f in OUTPUT_SCHEMA]
    rest = [c for c in table.column_names if c not in OUTPUT_SCHEMA.names]
    return pa.Table.from_arrays(contract + [table[c] for c in rest], names=OUTPUT_SCHEMA.names + rest)


def row_counts(table: pa.Table) -> dict:
    """Rows that succeeded and failed, and their token counts."""
    failed = len(table) - table[col.ERROR].null_count
    return {"ok": len(table) - failed, "error": failed,
            "input_tokens": pc.sum(table[col.NUM_INPUT_TOKENS]).as_py() or 0,
            "output_tokens": pc.sum(table[col.NUM_GENERATED_TOKENS]).as_py() or 0}


# --- before a run: can the output path be written? ---

def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def check_output_writable(output_path: str) -> None:
    """Create a small file under `output_path` and delete it again (on S3: start an upload and abort it);
    InputError if that fails. Nothing stays: no probe file, no folder the probe created, no S3 marker object."""
    try:
        if output_path.startswith("s3://"):
            _probe_s3(output_path)
        else:
            _probe_filesystem(output_path)
    except InputError as error:
        raise InputError(f"output path {output_path} is not writable: {error}") from None
    except OSError as error:
        raise InputError(f"output path {output_path} is not writable: {_reason(error)}") from None


def _probe_name() -> str:
    # A dot first: if the probe ever stayed, readers of the output (pyarrow datasets, Ray) would skip it.
    return f".write-probe-{uuid.uuid4().hex[:12]}"


def _probe_filesystem(output_path: str) -> None:
    filesystem, path = resolve(output_path)
    if is_remote(output_path):  # gs://: no folders to create
        _write_and_delete(filesystem, join(path, _probe_name()))
        return
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError("it is a file, not a folder")
    first_missing, parent = None, path
    while filesystem.get_file_info(parent).type == pafs.FileType.NotFound and parent != os.path.dirname(parent):
        first_missing, parent = parent, os.path.dirname(parent)
    try:
        filesystem.create_dir(path, recursive=True)
        _write_and_delete(filesystem, join(path, _probe_name()))
    finally:
        # A refused (or later failed) run must not leave an empty output folder that looks like a result.
        if first_missing and filesystem.get_file_info(first_missing).type == pafs.FileType.Directory:
            filesystem.delete_dir(first_missing)


def _write_and_delete(filesystem: pafs.FileSystem, probe: str) -> None:
    with filesystem.open_output_stream(probe) as stream:
        stream.write(b"probe")
    filesystem.delete_file(probe)


def _probe_s3(output_path: str) -> None:
    """Start a multipart upload, the first request Ray's writer makes, and abort it. Unlike writing and
    deleting an object, this leaves nothing: pyarrow's delete_file writes a marker object for the folder
    it deleted from, and a versioned bucket would keep the deleted object."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError

    location = s3_location(output_path)
    bucket, key = location.bucket, "/".join(part for part in (location.key, _probe_name()) if part)
    anonymous = BotoConfig(signature_version=UNSIGNED) if location.anonymous else None
    # boto3 reads AWS_ENDPOINT_URL(_S3) itself; the region matters only for a custom endpoint's signature.
    client = boto3.client("s3", config=anonymous,
                          region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    try:
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    except ClientError as error:
        raise InputError(error.response.get("Error", {}).get("Message") or str(error)) from None
    except BotoCoreError as error:  # no credentials, no connection
        raise InputError(str(error)) from None
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except (ClientError, BotoCoreError):
        pass  # the path is writable; an unfinished upload is no object, and bucket lifecycle rules expire it



# --- the run's writes ---

def _serialize(table: pa.Table, output_format: str) -> bytes:
    if output_format in ("jsonl", "openai"):
        rows = table.to_pylist()
        if output_format == "openai":
            created = int(time.time())
            rows = [output_record(row, created) for row in rows]
        return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows).encode("utf-8")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class ResultsDatasink(Datasink):
    """Writes each write task's rows as one file of successes and one under errors/ (when there are
    any), named `part-<write_id>-<task index>`, each committed whole (see commit_file)."""

    def __init__(self, output_path: str, output_format: str = "parquet", write_id: str | None = None,
                 rows_per_file: int = ROWS_PER_FILE):
        self.rows_per_file = rows_per_file
        self.filesystem, self.path = resolve(output_path)
        self.output_format = output_format
        # Names the files of this write; a later write (a resumed run) adds files beside them.
        self.write_id = write_id or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        self.written = {"ok": 0, "error": 0, "input_tokens": 0, "output_tokens": 0}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        tables = [conform(BlockAccessor.for_block(block).to_arrow()) for block in blocks]
        table = pa.concat_tables(tables, promote_options="permissive") if tables else None
        if table is None or table.num_rows == 0:
            return {"ok": 0, "error": 0, "input_tokens": 0, "output_tokens": 0}
        name = f"part-{self.write_id}-{ctx.task_idx:06d}{EXTENSIONS[self.output_format]}"
        failed = pc.is_valid(table["error"])
        for rows, folder in ((table.filter(pc.invert(failed)), self.path),
                             (table.filter(failed), f"{self.path}/{ERRORS_FOLDER}")):
            if len(rows):
                commit_file(self.filesystem, f"{folder}/{name}", _serialize(rows, self.output_format))
        return row_counts(table)

    def on_write_complete(self, write_result) -> None:
        for counts in write_result.write_returns:
            for key, value in counts.items():
                self.written[key] += value


def listed_files(filesystem: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [f for f in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)) if f.is_file]


def is_temp_file(info: pafs.FileInfo) -> bool:
    return info.base_name.startswith(".") and info.base_name.endswith(TEMP_SUFFIX)


def data_files(output_path: str, output_format: str = "parquet") -> tuple[pafs.FileSystem, list[str]]:
    """The committed data files of an output path, in errors/ too; never temporary files or the manifest."""
    filesystem, path = resolve(output_path)
    extension = EXTENSIONS[output_format]
    files = [f.path for f in listed_files(filesystem, path) if f.base_name.endswith(extension)
             and not any(part.startswith((".", "_")) for part in f.path[len(path):].split("/"))]
    return filesystem, sorted(files)


def remove_temp_files(output_path: str) -> int:
    """Delete what killed writes left behind (readers skip it anyway); returns how many files."""
    filesystem, path = resolve(output_path)
    leftovers = [f.path for f in listed_files(filesystem, path) if is_temp_file(f)]
    for leftover in leftovers:
        filesystem.delete_file(leftover)
    return len(leftovers)


def delete_output(output_path: str) -> None:
    """Delete an earlier output (--overwrite). Only a folder that holds nothing but output goes, so a
    mistyped path cannot wipe a folder of other files."""
    filesystem, path = resolve(output_path)
    foreign = [f.path[len(path) + 1:] for f in listed_files(filesystem, path) if not (
        f.base_name.endswith(tuple(EXTENSIONS.values())) or is_temp_file(f)
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
                  write_id: str | None = None, rows_per_file: int = ROWS_PER_FILE) -> dict:
    """Run the pipeline and commit its rows under `output_path`. Returns the rows written by this call:
    {"ok", "error", "input_tokens", "output_tokens"}."""
    remove_temp_files(output_path)
    sink = ResultsDatasink(output_path, output_format, write_id, rows_per_file)
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


def read_results(output_path: str, output_format: str = "parquet") -> ray.data.Dataset:
    """Every row of the output, those that succeeded and those under errors/."""
    filesystem, path = resolve(output_path)
    if output_format == "openai":  # nested records: their types are read as they come
        return ray.data.read_json(path, filesystem=filesystem, file_extensions=["jsonl"])
    if output_format == "jsonl":
        # Arrow's reader, which reads JSON lines too (lines=True picks pandas, which takes no filesystem).
        # The contract's types are given, not inferred: a file whose `error`s are all null would read as null.
        return ray.data.read_json(path, filesystem=filesystem, file_extensions=["jsonl"],
                                  parse_options=pajson.ParseOptions(explicit_schema=OUTPUT_SCHEMA))
    return ray.data.read_parquet(path, filesystem=filesystem, file_extensions=["parquet"])


def output_dataset(output_path: str, output_format: str = "parquet") -> tuple[pads.Dataset | None, str]:
    """The output's committed files as a pyarrow dataset (None when there are none), and its id column."""
    filesystem, files = data_files(output_path, output_format)
    id_column = "custom_id" if output_format == "openai" else "id"
    if not files:
        return None, id_column
    if output_format == "parquet":
        return pads.dataset(files, filesystem=filesystem, format="parquet"), id_column
    schema = OPENAI_RECORD_KEYS if output_format == "openai" else OUTPUT_SCHEMA
    file_format = pads.JsonFileFormat(parse_options=pajson.ParseOptions(explicit_schema=schema,
                                                                       unexpected_field_behavior="ignore"))
    # The schema given to the dataset too: else it takes the first file's, in which a column that is null
    # on every row (generated_text in an errors file) is of type null, and the next file fails to read.
    return pads.dataset(files, filesystem=filesystem, format=file_format, schema=schema), id_column


def output_counts(output_path: str, output_format: str = "parquet") -> dict:
    """Rows in the whole output, from every run so far: {"ok": ..., "error": ...}."""
    files, _ = output_dataset(output_path, output_format)
    if files is None:
        return {"ok": 0, "error": 0}
    errors = files.count_rows(filter=pc.field("error").is_valid())
    return {"ok": files.count_rows() - errors, "error": errors}


GLANCE_COLUMNS = (col.ID, col.GENERATED_TEXT, col.FINISH_REASON, col.NUM_GENERATED_TOKENS, col.ERROR)


def glance(row: dict) -> dict:
    """The columns of an output row worth a look; an embedding as its size and first values."""
    vector = row.get(col.EMBEDDING)
    if vector is not None:  # --task embed
        return {col.ID: row[col.ID], col.EMBEDDING: f"{len(vector)} floats {vector[:3]} ...", col.ERROR: row[col.ERROR]}
    return {k: row.get(k) for k in GLANCE_COLUMNS}


def sample_rows(output_path: str, output_format: str = "parquet", count: int = 3) -> list[dict]:
    """A few rows of the output, each at a glance, read on the driver: quicker than starting a Ray read."""
    if output_format == "openai":
        filesystem, files = data_files(output_path, output_format)
        records = pads.dataset(files, filesystem=filesystem, format="json").head(count).to_pylist() if files else []
        return [glance(preview(record)) for record in records]
    files, _ = output_dataset(output_path, output_format)
    return [glance(row) for row in files.head(count).to_pylist()] if files else []


def summarize(ds: ray.data.Dataset) -> dict:
    """Row and token counts of a finished run's output."""
    stats = {"rows": 0, "ok": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
    for batch in ds.select_columns([col.ERROR, col.NUM_INPUT_TOKENS, col.NUM_GENERATED_TOKENS]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        counts = row_counts(batch)
        stats["rows"] += batch.num_rows
        stats["ok"] += counts["ok"]
        stats["errors"] += counts["error"]
        stats["input_tokens"] += counts["input_tokens"]
        stats["output_tokens"] += counts["output_tokens"]
    return stats
