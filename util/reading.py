"""Read prompts into a Ray Dataset with a stable `id` per row.

    from util.reading import SAMPLE_PROMPTS, read_prompts
    ds = read_prompts(SAMPLE_PROMPTS)                                      # a Python list
    ds = read_prompts("assets/prompts_100.txt")                            # one prompt per line
    ds = read_prompts("s3://bucket/prompts/", input_format="jsonl", text_column="question")

Formats: text (one prompt per line), jsonl, csv, parquet and openai (OpenAI Batch API request lines,
util/openai_batch.py), from local paths, s3:// and gs://, a single file or a folder of them. Every
input column passes through to the output.

Ray Data reads each file whole (`read_binary_files`) and this module parses it, so every row knows
its file and line. That makes ids stable across runs (resume depends on it) and lets errors name
the file and line. Without an id column, a row's id is `<file>:<line or row>:<content hash>`.
With one, a file (or list) that repeats an id is refused, naming both lines; util.validation.scan_input
finds an id repeated across files.
"""

import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from util.openai_batch import request_row, request_table
from util.storage import resolve

SAMPLE_PROMPTS = [
    "I always wanted to be a ...",
    "The best way to learn a new language is ...",
    "The biggest challenge facing our society today is ...",
    "One thing I would change about my past is ...",
    "The key to a happy life is ...",
]
EXTENSIONS = {"text": [".txt", ".text"], "jsonl": [".jsonl", ".json"], "csv": [".csv"],
              "parquet": [".parquet", ".pq"], "openai": [".jsonl", ".json"]}  # openai: never picked by auto


class InputError(ValueError):
    """Input that cannot be read as asked. The message names the file and line, or the column."""


def unwrap_input_error(exc: BaseException) -> InputError | None:
    """The InputError behind `exc`, which may be Ray's wrapper of an error in a worker; None if none."""
    seen, todo = set(), [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, InputError) and not isinstance(error, ray.exceptions.RayError):
            return error
        todo += [getattr(error, "cause", None), error.__cause__, error.__context__]
    # Ray Data re-raises a worker's exception as a UserCodeException, and the pickled copy that reaches
    # the driver loses its __cause__: only the worker's traceback text still holds the message.
    text = str(exc)
    start = text.rfind("InputError: ")
    if start < 0:
        return None
    return InputError(text[start + len("InputError: "):].split("\n\n")[0].strip())


def refusal_reason(exc: BaseException) -> Exception | None:
    """Why a run is refused (exit code 2): bad input, a bad flag value, or a gated model without a
    token. None for anything else, which is a crash."""
    return unwrap_input_error(exc) or (exc if isinstance(exc, (ValueError, PermissionError)) else None)


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def row_id(source: str, position: int, text) -> str:
    digest = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{source}:{position}:{digest}"


def detect_format(path: str, input_format: str = "auto") -> str:
    if input_format != "auto":
        return input_format
    extension = os.path.splitext(path.rstrip("/"))[1].lower()
    for name, extensions in EXTENSIONS.items():
        if extension in extensions:
            return name
    raise InputError(f"{path}: cannot tell the format from the extension {extension or '(none)'}; "
                     "pass --input-format text, jsonl, csv or parquet")


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as Windows tools write, is not part of line 1
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InputError(f"{name}:{line}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _table_from_rows(rows: list[dict], name: str) -> pa.Table:
    # Every key of every row, in first-seen order: Table.from_pylist would keep only the first row's keys.
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = []
    for key in keys:
        try:
            columns.append(pa.array([row.get(key) for row in rows]))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise InputError(f"{name}: column '{key}' holds values of different types ({error})") from None
    return pa.Table.from_arrays(columns, names=keys)


def parse_file(data: bytes, name: str, input_format: str, text_column: str = "text",
               id_column: str | None = None) -> pa.Table:
    """One file's bytes → a table with a `__position` column (1-based line, or row for csv/parquet)."""
    try:
        if input_format == "parquet":
            table = pq.read_table(io.BytesIO(data))
        elif input_format == "csv":
            _decode(data, name)
            # Text and ids as written: inferred types would turn an id "007" into 7, and "7" into 7 as well.
            types = {c: pa.string() for c in (text_column, id_column) if c}
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types))
    except pa.ArrowException as error:  # a file that is not what its format says
        raise InputError(f"{name}: not a readable {input_format} file ({error})") from None
    if input_format in ("parquet", "csv"):
        positions = range(1, table.num_rows + 1)
    else:
        # Split on newlines only: str.splitlines() also splits on form feeds, U+2028 and the like, which
        # JSON strings and prompts may hold, and that would break rows and shift line numbers.
        lines = _decode(data, name).split("\n")
        rows, positions = [], []
        for number, line in enumerate(lines, start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue  # blank lines separate rows; they are not prompts
            if input_format == "text":
                rows.append({text_column: line})
            elif input_format == "openai":  # a bad request is an error record, not a refused file
                rows.append(request_row(line, f"{os.path.basename(name)}:{number}"))
            else:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{name}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{name}:{number}: each line must be a JSON object, got {type(row).__name__}")
                rows.append(row)
            positions.append(number)
        table = request_table(rows) if input_format == "openai" else _table_from_rows(rows, name)
    return table.append_column("__position", pa.array(list(positions), pa.int64()))


def _with_ids(table: pa.Table, source: str, text_column: str, id_column: str | None) -> pa.Table:
    if text_column not in table.column_names:
        raise InputError(f"{source}: no column '{text_column}'; columns are: "
                         f"{', '.join(c for c in table.column_names if c != '__position')}")
    if id_column:
        if id_column not in table.column_names:
            raise InputError(f"{source}: no id column '{id_column}'; columns are: "
                             f"{', '.join(c for c in table.column_names if c != '__position')}")
        ids = [None if v is None else str(v) for v in table[id_column].to_pylist()]
        first_position: dict[str, int] = {}
        for value, position in zip(ids, table["__position"].to_pylist()):
            if value is not None and first_position.setdefault(value, position) != position:
                raise InputError(f"duplicate id '{value}' in column '{id_column}': "
                                 f"{source}:{first_position[value]} and {source}:{position}")
    else:
        positions, texts = table["__position"].to_pylist(), table[text_column].to_pylist()
        ids = [row_id(source, p, t) for p, t in zip(positions, texts)]
    table = table.drop_columns(["__position"])
    if "id" in table.column_names:
        table = table.drop_columns(["id"]) if id_column == "id" else table.rename_columns(
            ["input_id" if c == "id" else c for c in table.column_names])
    return table.add_column(0, "id", pa.array(ids, pa.string()))


def _parse_batch(batch: pa.Table, root: str, input_format: str, text_column: str, id_column: str | None):
    tables = []
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist()):
        source = os.path.relpath(path, root) if path != root else os.path.basename(path)
        table = parse_file(data, path, detect_format(path, input_format), text_column, id_column)
        if not table.num_rows:  # most likely a write that failed or has not finished
            raise InputError(f"{path}: empty file, no prompts in it")
        tables.append(_with_ids(table, source, text_column, id_column))
    return pa.concat_tables(tables, promote_options="permissive")


def read_prompts(source: str | list, input_format: str = "auto", text_column: str = "text",
                 id_column: str | None = None, limit: int | None = None) -> ray.data.Dataset:
    if input_format == "openai":  # OpenAI Batch API requests (util/openai_batch.py)
        text_column, id_column = "messages", "custom_id"
    if isinstance(source, (list, tuple)):  # in-memory items: strings or dicts
        rows = [item if isinstance(item, dict) else {text_column: item} for item in source]
        if not rows:
            raise InputError("items: the list holds no prompts")
        table = _table_from_rows(rows, "items")
        table = table.append_column("__position", pa.array(range(1, len(rows) + 1), pa.int64()))
        ds = ray.data.from_items(_with_ids(table, "items", text_column, id_column).to_pylist())
    else:
        if input_format != "auto" and input_format not in EXTENSIONS:
            raise InputError(f"unknown input format '{input_format}'; use auto, {', '.join(EXTENSIONS)}")
        filesystem, path = resolve(source)
        try:
            info = filesystem.get_file_info(path)
            if info.type == pafs.FileType.File:
                filesystem.open_input_stream(path).close()  # permission is checked on open, not by stat
        except OSError as error:
            raise InputError(f"{source}: not readable ({_reason(error)})") from None
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{source}: no such file or folder")
        if info.type == pafs.FileType.File:
            # A single file: check its format name now, not inside a worker, and read it whatever its
            # extension, since an explicit --input-format is how to read e.g. prompts.log.
            detect_format(path, input_format)
            extensions = None
        else:  # a folder: only files of the format, so a stray README.md does not fail the run
            extensions = (list(dict.fromkeys(sum(EXTENSIONS.values(), []))) if input_format == "auto"
                          else EXTENSIONS[input_format])
        try:  # Ray lists the files now, on the driver
            ds = ray.data.read_binary_files(path, filesystem=filesystem, include_paths=True,
                                            file_extensions=extensions)
        except OSError as error:
            raise InputError(f"{source}: not readable ({_reason(error)})") from None
        except ValueError as error:
            if not str(error).startswith("No input files found"):
                raise
            raise InputError(f"{source}: no files ending in {', '.join(extensions)} in this folder") from None
        ds = ds.map_batches(_parse_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={
            "root": path, "input_format": input_format, "text_column": text_column, "id_column": id_column})
    if limit is not None:
        ds.context.execution_options.preserve_order = True  # so --limit always takes the same rows
        ds = ds.limit(limit)
    return ds
