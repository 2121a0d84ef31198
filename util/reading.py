"""Read prompts into a Ray Dataset with a stable `id` per row, in blocks of bounded size.

    ds = read_prompts(["What is Ray?", "What is vLLM?"])                   # a Python list
    ds = read_prompts("s3://bucket/prompts/", input_format="jsonl", text_column="question")

Formats: text (a prompt a line), jsonl, csv, parquet (a feature may add one: INPUT_FORMATS), local, s3://
or gs://, a file or a folder. Every input column passes through. Text and JSONL files are read in byte
ranges of CHUNK_BYTES, a task each, so a huge file is read in parallel; CSV and Parquet files (a CSV field
may hold a newline) a task per file. Ids: your --id-column, else `<file>:<position>:<content hash>` (the
position: a line's byte offset, which a range's task knows without reading what comes before, or the row
number). Errors name the file and line, counted only when one happens.
"""

import functools
import hashlib
import itertools
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.context import DataContext
from ray.data.datasource import Datasource, ReadTask

from util import columns as col
from util.errors import InputError
from util.parts import RowAsks, registry, row_asks
from util.resources import TASK_CPUS
from util.storage import resolve

SAMPLE_PROMPTS = ["I always wanted to be a ...", "The best way to learn a new language is ...",
                  "The biggest challenge facing our society today is ...",
                  "One thing I would change about my past is ...", "The key to a happy life is ..."]
EXTENSIONS = {"text": [".txt", ".text"], "jsonl": [".jsonl", ".json"], "csv": [".csv"],
              "parquet": [".parquet", ".pq"]}  # what `auto` goes by
CHUNK_BYTES = 16 * 1024**2  # a text or JSONL read task's share of a file: bounds its memory
BLOCK_ROWS = 1024  # rows per block out of the reader
WHERE_COLUMN = "__where"  # a hidden column util/scan.py asks for: where a row is, to name a duplicate id


def row_id(source: str, position: int, text) -> str:
    return f"{source}:{position}:{hashlib.sha1(str(text).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def where(source: str, position: int) -> str:
    """A sortable location: file, then position (util/scan.py keeps the first and last of an id)."""
    return f"{source}\0{position:020d}"


def describe_where(value: str, input_path: str | None, input_format: str = "auto") -> str:
    """`<file>:<line or row>` for a WHERE_COLUMN value: a byte offset becomes its line number."""
    from util.where import line_number

    source, _, position = value.partition("\0")
    position = int(position)
    if input_path is None or source == "items":
        return f"{source}:{position}"
    filesystem, root = resolve(input_path)
    path = root if os.path.basename(root) == source and filesystem.get_file_info(root).is_file else f"{root}/{source}"
    if detect_format(path, input_format) in ("text", "jsonl"):
        position = line_number(filesystem, path, position)
    return f"{source}:{position}"


def extensions(input_format: str) -> list[str]:
    """The file endings of a format: the core's, or those a feature's reader (INPUT_FORMATS) names."""
    return EXTENSIONS[input_format] if input_format in EXTENSIONS else registry("INPUT_FORMATS")[input_format].extensions


def detect_format(path: str, input_format: str = "auto") -> str:
    if input_format != "auto":
        return input_format
    extension = os.path.splitext(path.rstrip("/"))[1].lower()
    for name, endings in EXTENSIONS.items():
        if extension in endings:
            return name
    raise InputError(f"{path}: cannot tell the format from the extension {extension or '(none)'}; "
                     "pass --input-format text, jsonl, csv or parquet")


def _table_from_rows(rows: list[dict], name: str) -> pa.Table:
    # Every key of every row, in first-seen order: Table.from_pylist would keep only the first row's keys.
    keys, columns = list(dict.fromkeys(key for row in rows for key in row)), []
    for key in keys:
        try:
            columns.append(pa.array([row.get(key) for row in rows]))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise InputError(f"{name}: column '{key}' holds values of different types ({error})") from None
    return pa.Table.from_arrays(columns, names=keys)


def unplanned_ask(table: pa.Table, unplanned: RowAsks, locate) -> None:
    """InputError naming the first row of `table` (`locate(i)`: where row i is) that asks a feature for what
    the job's plan left out (`unplanned`: what no row of the first block asked for, util/plan.py)."""
    if not row_asks(table).ask(unplanned):
        return
    first = next(i for i in range(table.num_rows) if row_asks(table.slice(i, 1)).ask(unplanned))
    asked = row_asks(table.slice(first, 1)) & unplanned
    names = [*sorted(asked.columns), *(f"{col.SAMPLING_PARAMS}.{key}" for key in sorted(asked.sampling))]
    raise InputError(f"{locate(first)}: the row sets {', '.join(names)}, which none of the rows the job was planned "
                     f"from sets (the first file's first {BLOCK_ROWS}); put a row that sets it among those")


@dataclass(frozen=True)
class Columns:
    """The columns a read checks, and how it adds `id`: from the id column, or from file, position and text."""
    text: str = "text"
    id: str | None = None
    required: tuple = ()  # columns a feature reads (an image column), besides the text column
    with_where: bool = False  # add WHERE_COLUMN (util/scan.py names a duplicate id's rows by it)
    unplanned: RowAsks | None = None  # what rows may not ask for (util/scan.py's pass refuses such a row)

    def with_ids(self, table: pa.Table, positions: list[int], source: str, locate=None) -> pa.Table:
        """`table` with `id` first (the input's own `id`, when it is not the id column, kept as input_id).
        `locate(position)`: where a row is, for an error (else `source:position`)."""
        for needed in (self.text, *self.required, *([self.id] if self.id else [])):
            if needed not in table.column_names:
                raise InputError(f"{source}: no {'id column' if needed == self.id else 'column'} '{needed}'; "
                                 f"columns are: {', '.join(c for c in table.column_names if c != WHERE_COLUMN)}")
        if self.unplanned is not None:
            unplanned_ask(table, self.unplanned, lambda i: locate(positions[i]) if locate else f"{source}:{positions[i]}")
        ids = ([None if v is None else str(v) for v in table[self.id].to_pylist()] if self.id
               else [row_id(source, p, t) for p, t in zip(positions, table[self.text].to_pylist())])
        if col.ID in table.column_names:
            table = table.drop_columns([col.ID]) if self.id == col.ID else table.rename_columns(
                ["input_id" if c == col.ID else c for c in table.column_names])
        table = table.add_column(0, col.ID, pa.array(ids, pa.string()))
        if self.with_where:
            table = table.append_column(WHERE_COLUMN, pa.array([where(source, p) for p in positions], pa.string()))
        return table


def _lines(filesystem: pafs.FileSystem, path: str, start: int, end: int):
    """(byte offset, raw line) for every line that starts in [start, end): a line that crosses `end` is
    read whole here, and the next range skips it."""
    with filesystem.open_input_file(path) as file:
        size, begin = file.size(), max(0, start - 1)  # the byte before `start` tells if a line starts there
        data, tail = file.read_at(end - begin, begin), end
        while not data.endswith(b"\n") and tail < size:  # finish the last line
            piece = file.read_at(min(64 * 1024, size - tail), tail)
            data, tail = data + piece, tail + len(piece)
            if b"\n" in piece:
                data = data[: len(data) - len(piece) + piece.index(b"\n") + 1]
                break
    position = 0
    if start > 0:
        position = data.find(b"\n") + 1  # the first whole line of this range
        if not position:
            return
    while position < len(data) and begin + position < end:
        newline = data.find(b"\n", position)
        stop = len(data) if newline < 0 else newline
        yield begin + position, data[position:stop]
        position = stop + 1


def _rows_in_range(filesystem, path: str, start: int, end: int, input_format: str, text_column: str):
    """(byte offset, row) for each line of a text or JSONL file's range; blank lines separate rows."""
    from util.where import line_number, utf8_error  # where a bad row is: only errors need it
    for offset, raw in _lines(filesystem, path, start, end):
        try:
            line = raw.decode("utf-8-sig" if offset == 0 else "utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise utf8_error(filesystem, path) from None
        if not line.strip():
            continue
        if input_format == "text":
            yield offset, {text_column: line}
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{line_number(filesystem, path, offset)}: malformed JSON "
                             f"({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line_number(filesystem, path, offset)}: each line must be a "
                             f"JSON object, got {type(row).__name__}")
        yield offset, row


def _read_range(filesystem, path: str, source: str, start: int, end: int, input_format: str, columns: Columns):
    from util.where import line_number

    rows = _rows_in_range(filesystem, path, start, end, input_format, columns.text)
    locate = lambda offset: f"{path}:{line_number(filesystem, path, offset)}"  # noqa: E731
    while block := list(itertools.islice(rows, BLOCK_ROWS)):
        yield columns.with_ids(_table_from_rows([row for _, row in block], path), [at for at, _ in block], source,
                               locate)


def _read_file(filesystem, path: str, source: str, input_format: str, columns: Columns):
    from util.where import utf8_error

    locate = lambda row: f"{path}:{row}"  # noqa: E731  a row by its number, for an error
    try:
        if input_format not in EXTENSIONS:  # a feature's format: its reader gives rows and their positions
            for table, positions in registry("INPUT_FORMATS")[input_format].read(filesystem, path, BLOCK_ROWS):
                yield columns.with_ids(table, positions, source, locate)
            return
        if input_format == "parquet":
            batches = pq.ParquetFile(filesystem.open_input_file(path)).iter_batches(batch_size=BLOCK_ROWS)
        else:  # text, ids and a feature's columns (image paths) as written: inferred, "007" would become 7
            types = {c: pa.string() for c in (columns.text, columns.id, *columns.required) if c}
            batches = pacsv.open_csv(filesystem.open_input_stream(path),
                                     convert_options=pacsv.ConvertOptions(column_types=types))
        position = 0
        for batch in batches:
            for at in range(0, batch.num_rows, BLOCK_ROWS):
                part = pa.Table.from_batches([batch.slice(at, BLOCK_ROWS)])
                yield columns.with_ids(part, list(range(position + 1, position + part.num_rows + 1)), source, locate)
                position += part.num_rows
    except UnicodeDecodeError:
        raise utf8_error(filesystem, path) from None
    except pa.ArrowException as error:  # a file that is not what its format says
        if "UTF8" in str(error) or "UTF-8" in str(error):
            raise utf8_error(filesystem, path) from None
        raise InputError(f"{path}: not a readable {input_format} file ({error})") from None


def _read_task(filesystem, path: str, source: str, start: int | None, end: int | None, whole_file: bool,
               row_filter, input_format: str, columns: Columns):
    """One read task's blocks, through `row_filter` (resume's: without the rows an earlier run wrote); a
    file with no rows at all is refused (a write that failed, most likely)."""
    rows = 0
    for table in (_read_file(filesystem, path, source, input_format, columns) if start is None
                  else _read_range(filesystem, path, source, start, end, input_format, columns)):
        rows += table.num_rows
        table = table if row_filter is None else row_filter(table)
        if table.num_rows:
            yield table
    if not rows and whole_file:
        raise InputError(f"{path}: empty file, no prompts in it")


class PromptFiles(Datasource):
    """Ray Data datasource over the listed files: byte ranges of text and JSONL files, whole CSV and Parquet
    files (and a feature's) streamed; blocks of at most BLOCK_ROWS rows with an `id` column."""

    def __init__(self, source: str, files: list[tuple[str, int]], root: str, input_format: str,
                 columns: Columns = Columns(), chunk_bytes: int = CHUNK_BYTES, row_filter=None):
        self.filesystem, _ = resolve(source)
        self.files, self.root, self.input_format, self.columns = files, root, input_format, columns
        self.chunk_bytes, self.row_filter = chunk_bytes, row_filter

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, size in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        for path, size in self.files:
            input_format = detect_format(path, self.input_format)
            source = os.path.relpath(path, self.root) if path != self.root else os.path.basename(path)
            ranges = ([(start, min(start + self.chunk_bytes, size)) for start in range(0, max(size, 1), self.chunk_bytes)]
                      if input_format in ("text", "jsonl") else [(None, None)])
            for start, end in ranges:
                read = functools.partial(_read_task, self.filesystem, path, source, start, end, len(ranges) == 1,
                                         self.row_filter, input_format, self.columns)
                metadata = BlockMetadata(num_rows=None, exec_stats=None, input_files=[path],
                                         size_bytes=(end - start) if start is not None else size)
                tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks


def list_files(source: str, input_format: str = "auto") -> tuple[list[tuple[str, int]], str]:
    """The input files (path, size), sorted, and the folder ids are relative to. InputError for a path that
    is missing, unreadable, or a folder with no files of the format."""
    formats = [*EXTENSIONS, *registry("INPUT_FORMATS")]
    if input_format != "auto" and input_format not in formats:
        raise InputError(f"unknown input format '{input_format}'; use auto, {', '.join(formats)}")
    filesystem, path = resolve(source)
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            filesystem.open_input_stream(path).close()  # permission is checked on open, not by stat
            detect_format(path, input_format)  # a file is read whatever its extension once a format is given
            files = [info]
        elif info.type == pafs.FileType.NotFound:
            raise InputError(f"{source}: no such file or folder")
        else:  # a folder: only files of the format, so a stray README.md does not fail the run
            endings = (list(dict.fromkeys(sum(EXTENSIONS.values(), []))) if input_format == "auto"
                       else extensions(input_format))
            files = [f for f in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                     if f.is_file and f.base_name.lower().endswith(tuple(endings))
                     and not any(part.startswith((".", "_")) for part in f.path[len(path):].split("/"))]
            if not files:
                raise InputError(f"{source}: no files ending in {', '.join(endings)} in this folder")
    except OSError as error:
        raise InputError(f"{source}: not readable ({os.strerror(error.errno) if error.errno else error})") from None
    for f in files:
        if f.size == 0:
            raise InputError(f"{f.path}: empty file, no prompts in it")
    return sorted((f.path, f.size) for f in files), path


def first_rows(source: str | list, input_format: str = "auto", text_column: str = "text",
               id_column: str | None = None) -> pa.Table:
    """The input's first block (at most BLOCK_ROWS rows of its first file), read here, without Ray: what a plan
    learns its rows ask for from (util/plan.py). InputError as the whole read would raise it."""
    reader = registry("INPUT_FORMATS").get(input_format)
    if reader is not None:
        text_column, id_column = reader.text_column, reader.id_column
    columns = Columns(text_column, id_column)
    if isinstance(source, (list, tuple)):
        rows = [item if isinstance(item, dict) else {text_column: item} for item in source[:BLOCK_ROWS]]
        return _table_from_rows(rows, "items") if rows else pa.table({})
    files, root = list_files(source, input_format)
    (path, size), (filesystem, _) = files[0], resolve(source)
    name, input_format = os.path.relpath(path, root) if path != root else os.path.basename(path), detect_format(path, input_format)
    end = min(size, CHUNK_BYTES) if input_format in ("text", "jsonl") else None  # as the first read task reads it
    blocks = _read_task(filesystem, path, name, 0 if end else None, end, False, None, input_format, columns)
    return next(blocks, pa.table({}))


def read_prompts(source: str | list, input_format: str = "auto", text_column: str = "text",
                 id_column: str | None = None, limit: int | None = None, with_where: bool = False,
                 row_filter=None, required: tuple = (), unplanned: RowAsks | None = None) -> ray.data.Dataset:
    """The prompts as a lazy Dataset: `id` first, then the input's columns. `with_where` adds a hidden
    WHERE_COLUMN (file and position); `row_filter` (a table -> table function, such as DoneIndex.drop_done)
    runs in each read task; `required`: columns every file must have besides the text column; `unplanned`:
    what no row may ask for (InputError naming the first row that does)."""
    reader = registry("INPUT_FORMATS").get(input_format)
    if reader is not None:  # a feature's format names its own prompt and id columns (openai: messages, custom_id)
        text_column, id_column = reader.text_column, reader.id_column
    columns = Columns(text_column, id_column, tuple(required), with_where, unplanned)
    context = DataContext.get_current().copy()  # this dataset's own: a global change would outlive the call
    context.raise_original_map_exception = True  # a task's InputError reaches the driver as itself
    if limit is not None:
        context.execution_options.preserve_order = True  # so --limit always takes the same rows
    with DataContext.current(context):
        if isinstance(source, (list, tuple)):  # in-memory items: strings or dicts
            if not source:
                raise InputError("items: the list holds no prompts")
            rows = [item if isinstance(item, dict) else {text_column: item} for item in source]
            table = columns.with_ids(_table_from_rows(rows, "items"), list(range(1, len(rows) + 1)), "items")
            table = table if row_filter is None else row_filter(table)
            ds = ray.data.from_arrow([table.slice(i, BLOCK_ROWS) for i in range(0, len(table), BLOCK_ROWS)])
        else:
            files, root = list_files(source, input_format)
            ds = ray.data.read_datasource(PromptFiles(source, files, root, input_format, columns, row_filter=row_filter),
                                          num_cpus=TASK_CPUS)
        return ds.limit(limit) if limit is not None else ds
