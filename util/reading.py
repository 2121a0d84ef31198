"""Read prompts into a Ray Dataset with a stable `id` per row, in blocks of bounded size.

    from util.reading import SAMPLE_PROMPTS, read_prompts
    ds = read_prompts(SAMPLE_PROMPTS)                                      # a Python list
    ds = read_prompts("assets/prompts_100.txt")                            # one prompt per line
    ds = read_prompts("s3://bucket/prompts/", input_format="jsonl", text_column="question")

Formats: text (one prompt per line), jsonl, csv, parquet and openai (OpenAI Batch API request lines,
util/openai_batch.py), from local paths, s3:// and gs://, a single file or a folder of them. Every
input column passes through to the output.

`PromptFiles` is a Ray Data datasource. Text and JSONL files are cut into byte ranges of CHUNK_BYTES,
each read and parsed by its own task, so one huge file is read in parallel and no task holds more than
its range. CSV, Parquet and OpenAI files are streamed, one task per file (a CSV field may hold a newline,
and OpenAI error records name lines). Every task yields blocks of at most BLOCK_ROWS rows, so a single
file spreads over every replica.

Ids: your --id-column, else `<file>:<position>:<content hash>`, where the position is the line's byte
offset for text and JSONL (a range's task knows it without reading what comes before) and the row
number for CSV, Parquet and OpenAI files. Errors name the file and line: a failing range counts the
lines before it, which only the error path pays for. Duplicate ids are found by util/scan.py.
"""

import functools
import hashlib
import json
import os
from typing import NamedTuple

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
from util.openai_batch import TASK_OF_URL, request_kind, request_row, request_table
from util.resources import TASK_CPUS
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
CHUNK_BYTES = 16 * 1024**2  # a text or JSONL read task's share of a file: bounds its memory
BLOCK_ROWS = 1024  # rows per block out of the reader
# Hidden columns the reader adds when asked (util/scan.py): where a row is, to name duplicates.
WHERE_COLUMN = "__where"


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def row_id(source: str, position: int, text) -> str:
    digest = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{source}:{position}:{digest}"


def where(source: str, position: int) -> str:
    """A sortable location: file, then position (util/scan.py keeps the first and last of an id)."""
    return f"{source}\0{position:020d}"


def describe_where(value: str, input_path: str | None, input_format: str = "auto") -> str:
    """`<file>:<line or row>` for a WHERE_COLUMN value: a byte offset becomes its line number."""
    source, _, position = value.partition("\0")
    position = int(position)
    if input_path is None or source == "items":
        return f"{source}:{position}"
    filesystem, root = resolve(input_path)
    path = root if os.path.basename(root) == source and filesystem.get_file_info(root).is_file else f"{root}/{source}"
    if detect_format(path, input_format) in ("text", "jsonl"):
        position = _line_number(filesystem, path, position)
    return f"{source}:{position}"


def detect_format(path: str, input_format: str = "auto") -> str:
    if input_format != "auto":
        return input_format
    extension = os.path.splitext(path.rstrip("/"))[1].lower()
    for name, extensions in EXTENSIONS.items():
        if extension in extensions:
            return name
    raise InputError(f"{path}: cannot tell the format from the extension {extension or '(none)'}; "
                     "pass --input-format text, jsonl, csv or parquet")


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


def _with_ids(table: pa.Table, positions: list[int], source: str, text_column: str, id_column: str | None,
              with_where: bool = False, image_column: str | None = None) -> pa.Table:
    """Adds `id` (first) from the id column or from file, position and text; checks the columns."""
    columns = [c for c in table.column_names if c != WHERE_COLUMN]
    for needed in (text_column, image_column):
        if needed and needed not in table.column_names:
            raise InputError(f"{source}: no column '{needed}'; columns are: {', '.join(columns)}")
    if id_column:
        if id_column not in table.column_names:
            raise InputError(f"{source}: no id column '{id_column}'; columns are: {', '.join(columns)}")
        ids = [None if v is None else str(v) for v in table[id_column].to_pylist()]
    else:
        ids = [row_id(source, p, t) for p, t in zip(positions, table[text_column].to_pylist())]
    if col.ID in table.column_names:  # the input's own `id`, when it is not the id column, is kept as input_id
        table = table.drop_columns([col.ID]) if id_column == col.ID else table.rename_columns(
            ["input_id" if c == col.ID else c for c in table.column_names])
    table = table.add_column(0, col.ID, pa.array(ids, pa.string()))
    if with_where:
        table = table.append_column(WHERE_COLUMN, pa.array([where(source, p) for p in positions], pa.string()))
    return table


# --- text and JSONL: byte ranges ---

def _line_number(filesystem: pafs.FileSystem, path: str, offset: int) -> int:
    """The 1-based line that starts at byte `offset`. Reads the file up to there: only errors need it."""
    newlines = 0
    with filesystem.open_input_stream(path) as stream:
        while offset > 0:
            piece = stream.read(min(offset, 8 * 1024**2))
            if not piece:
                break
            newlines += piece.count(b"\n")
            offset -= len(piece)
    return newlines + 1


def _lines(filesystem: pafs.FileSystem, path: str, start: int, end: int):
    """(byte offset, raw line) for every line that starts in [start, end): a line that crosses `end`
    is read whole here, and the next range skips it."""
    with filesystem.open_input_file(path) as file:
        size = file.size()
        # The byte before `start` tells whether a line starts exactly at `start`.
        begin = max(0, start - 1)
        data = file.read_at(end - begin, begin)
        tail = end
        while not data.endswith(b"\n") and tail < size:  # finish the last line
            piece = file.read_at(min(64 * 1024, size - tail), tail)
            data, tail = data + piece, tail + len(piece)
            if b"\n" in piece:
                data = data[: len(data) - len(piece) + piece.index(b"\n") + 1]
                break
    position = 0
    if start > 0:
        newline = data.find(b"\n")
        if newline < 0:
            return
        position = newline + 1  # the first whole line of this range
    while position < len(data) and begin + position < end:
        newline = data.find(b"\n", position)
        stop = len(data) if newline < 0 else newline
        yield begin + position, data[position:stop]
        position = stop + 1


def _read_range(filesystem, path: str, source: str, start: int, end: int, input_format: str,
                text_column: str, id_column: str | None, with_where: bool, image_column: str | None = None):
    rows, positions = [], []

    def block():
        table = _table_from_rows(rows, path) if rows else pa.table({})
        return _with_ids(table, positions, source, text_column, id_column, with_where, image_column)

    for offset, raw in _lines(filesystem, path, start, end):
        try:
            line = raw.decode("utf-8-sig" if offset == 0 else "utf-8").removesuffix("\r")
        except UnicodeDecodeError as error:
            try:  # with its newline, as the whole file would decode: a last byte then reads as cut short
                (raw + b"\n").decode("utf-8")
            except UnicodeDecodeError as in_context:
                error = in_context
            line_number = _line_number(filesystem, path, offset)
            raise InputError(f"{path}:{line_number}: not valid UTF-8 ({error.reason} at byte "
                             f"{offset + error.start})") from None
        if not line.strip():
            continue  # blank lines separate rows; they are not prompts
        if input_format == "text":
            row = {text_column: line}
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{_line_number(filesystem, path, offset)}: malformed JSON "
                                 f"({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{_line_number(filesystem, path, offset)}: each line must be a "
                                 f"JSON object, got {type(row).__name__}")
        rows.append(row)
        positions.append(offset)
        if len(rows) == BLOCK_ROWS:
            yield block()
            rows, positions = [], []
    if rows:
        yield block()


# --- CSV, Parquet, OpenAI: one streaming task per file ---

def _utf8_error(filesystem: pafs.FileSystem, path: str) -> str:
    """`<path>:<line>: not valid UTF-8 (...)` for the first bad byte of a file, read as a stream."""
    import codecs

    decoder, offset, newlines = codecs.getincrementaldecoder("utf-8")(), 0, 0
    with filesystem.open_input_stream(path) as stream:
        while piece := stream.read(1024**2):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as error:
                line = newlines + piece[: error.start].count(b"\n") + 1
                return (f"{path}:{line}: not valid UTF-8 "
                        f"({error.reason} at byte {offset + error.start})")
            offset, newlines = offset + len(piece), newlines + piece.count(b"\n")
    return f"{path}: not valid UTF-8"


def _read_file(filesystem, path: str, source: str, input_format: str, text_column: str,
               id_column: str | None, with_where: bool, image_column: str | None = None):
    position = 0
    try:
        if input_format == "openai":  # a bad request is an error record, not a refused file
            with filesystem.open_input_stream(path) as stream:
                lines = enumerate(stream.read().decode("utf-8-sig").split("\n"), start=1)
                requests = [(n, line.removesuffix("\r")) for n, line in lines if line.strip()]
            for i in range(0, len(requests), BLOCK_ROWS):
                part = requests[i: i + BLOCK_ROWS]
                table = request_table([request_row(line, f"{os.path.basename(path)}:{n}") for n, line in part])
                yield _with_ids(table, [n for n, _ in part], source, text_column, id_column, with_where)
            return
        if input_format == "parquet":
            batches = pq.ParquetFile(filesystem.open_input_file(path)).iter_batches(batch_size=BLOCK_ROWS)
        else:
            # Text, ids and image paths as written: inferred types would turn an id "007" into 7.
            types = {c: pa.string() for c in (text_column, id_column, image_column) if c}
            batches = pacsv.open_csv(filesystem.open_input_stream(path),
                                     convert_options=pacsv.ConvertOptions(column_types=types))
        for batch in batches:
            table = pa.Table.from_batches([batch])
            for part in (table.slice(i, BLOCK_ROWS) for i in range(0, table.num_rows, BLOCK_ROWS)):
                positions = list(range(position + 1, position + part.num_rows + 1))
                position += part.num_rows
                yield _with_ids(part, positions, source, text_column, id_column, with_where, image_column)
    except UnicodeDecodeError:
        raise InputError(_utf8_error(filesystem, path)) from None
    except pa.ArrowException as error:  # a file that is not what its format says
        if "UTF8" in str(error) or "UTF-8" in str(error):
            raise InputError(_utf8_error(filesystem, path)) from None
        raise InputError(f"{path}: not a readable {input_format} file ({error})") from None


def _read_task(filesystem, path: str, source: str, start: int | None, end: int | None, whole_file: bool,
               row_filter, **options):
    """One read task's blocks, through `row_filter` (resume's: without the rows an earlier run wrote); a
    file with no rows at all is refused (a write that failed, most likely)."""
    if start is None:
        blocks = _read_file(filesystem, path, source, **options)
    else:
        blocks = _read_range(filesystem, path, source, start, end, **options)
    rows = 0
    for table in blocks:
        rows += table.num_rows
        if row_filter is not None:
            table = row_filter(table)
        if table.num_rows:
            yield table
    if not rows and whole_file:
        raise InputError(f"{path}: empty file, no prompts in it")


class PromptFiles(Datasource):
    """Ray Data datasource over the listed files: byte ranges of text and JSONL files, whole CSV,
    Parquet and OpenAI files streamed; blocks of at most BLOCK_ROWS rows with an `id` column."""

    def __init__(self, source: str, files: list[tuple[str, int]], root: str, input_format: str,
                 text_column: str, id_column: str | None, with_where: bool = False,
                 chunk_bytes: int = CHUNK_BYTES, row_filter=None, image_column: str | None = None):
        self.filesystem, _ = resolve(source)
        self.row_filter = row_filter
        self.chunk_bytes = chunk_bytes
        self.files, self.root = files, root
        self.options = {"text_column": text_column, "id_column": id_column, "with_where": with_where,
                        "image_column": image_column}
        self.input_format = input_format

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, size in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for path, size in self.files:
            input_format = detect_format(path, self.input_format)
            source = os.path.relpath(path, self.root) if path != self.root else os.path.basename(path)
            step = self.chunk_bytes
            ranges = ([(start, min(start + step, size)) for start in range(0, max(size, 1), step)]
                      if input_format in ("text", "jsonl") else [(None, None)])
            for start, end in ranges:
                read = functools.partial(_read_task, self.filesystem, path, source, start, end,
                                         whole_file=len(ranges) == 1, row_filter=self.row_filter,
                                         input_format=input_format, **self.options)
                metadata = BlockMetadata(num_rows=None, exec_stats=None, input_files=[path],
                                         size_bytes=(end - start) if start is not None else size)
                tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks


def list_files(source: str, input_format: str = "auto") -> tuple[list[tuple[str, int]], str]:
    """The input files (path, size), sorted, and the folder ids are relative to. Raises InputError for
    a path that is missing, unreadable, or a folder with no files of the format."""
    if input_format != "auto" and input_format not in EXTENSIONS:
        raise InputError(f"unknown input format '{input_format}'; use auto, {', '.join(EXTENSIONS)}")
    filesystem, path = resolve(source)
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            filesystem.open_input_stream(path).close()  # permission is checked on open, not by stat
            # A single file: check its format name now, and read it whatever its extension, since an
            # explicit --input-format is how to read e.g. prompts.log.
            detect_format(path, input_format)
            files = [info]
        elif info.type == pafs.FileType.NotFound:
            raise InputError(f"{source}: no such file or folder")
        else:  # a folder: only files of the format, so a stray README.md does not fail the run
            extensions = (list(dict.fromkeys(sum(EXTENSIONS.values(), []))) if input_format == "auto"
                          else EXTENSIONS[input_format])
            files = [f for f in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                     if f.is_file and f.base_name.lower().endswith(tuple(extensions))
                     and not any(part.startswith((".", "_")) for part in f.path[len(path):].split("/"))]
            if not files:
                raise InputError(f"{source}: no files ending in {', '.join(extensions)} in this folder")
    except OSError as error:
        raise InputError(f"{source}: not readable ({_reason(error)})") from None
    for f in files:
        if f.size == 0:
            raise InputError(f"{f.path}: empty file, no prompts in it")
    return sorted((f.path, f.size) for f in files), path


class OpenAIBatchKind(NamedTuple):
    task: str  # generate (/v1/chat/completions) or embed (/v1/embeddings), by the requests' urls
    first_image: str | None  # `file:line` of the first request with an image_url part, None if none has one


def openai_batch_kind(source: str) -> OpenAIBatchKind:
    """The task an OpenAI batch input asks for, by its requests' urls, and where its first image is. One
    run is one task, so a request whose url differs from the first request's refuses the input
    (InputError, naming its file and line) before any engine starts. One pass over the files' lines on the
    driver: a Batch API file holds at most 50,000 requests (200 MB). Lines that are not requests, or ask
    for another url, are left for the reader's error records."""
    files, _ = list_files(source, "openai")
    filesystem, _ = resolve(source)
    first, first_image = None, None  # (url, file:line), file:line
    for path, _ in files:
        with filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode("utf-8-sig", errors="replace").split("\n")
        for number, line in enumerate(lines, start=1):
            url, has_image = request_kind(line) if line.strip() else (None, False)
            if url not in TASK_OF_URL:
                continue
            if has_image and first_image is None:
                first_image = f"{path}:{number}"
            if first is None:
                first = (url, f"{path}:{number}")
            elif url != first[0]:
                raise InputError(f"{path}:{number}: a {url} request in a batch of {first[0]} requests (the "
                                 f"first at {first[1]}); a run is one task: put them in separate files")
    return OpenAIBatchKind(TASK_OF_URL[first[0]] if first else "generate", first_image)


def read_prompts(source: str | list, input_format: str = "auto", text_column: str = "text",
                 id_column: str | None = None, limit: int | None = None,
                 with_where: bool = False, row_filter=None, image_column: str | None = None) -> ray.data.Dataset:
    """The prompts as a lazy Dataset: `id` first, then the input's columns. `with_where` adds a hidden
    WHERE_COLUMN (file and position) for naming duplicates. `row_filter` (a table -> table function, such
    as util.resume.DoneIndex.drop_done) runs in each read task, so rows it drops are never passed on.
    `image_column`, when given, must be in every file, as the text column must."""
    if input_format == "openai":  # OpenAI Batch API requests (util/openai_batch.py)
        text_column, id_column = "messages", "custom_id"
    context = DataContext.get_current().copy()  # this dataset's own: a global change would outlive the call
    if limit is not None:
        context.execution_options.preserve_order = True  # so --limit always takes the same rows
    with DataContext.current(context):
        if isinstance(source, (list, tuple)):  # in-memory items: strings or dicts
            rows = [item if isinstance(item, dict) else {text_column: item} for item in source]
            if not rows:
                raise InputError("items: the list holds no prompts")
            positions = list(range(1, len(rows) + 1))
            table = _with_ids(_table_from_rows(rows, "items"), positions, "items", text_column, id_column,
                              with_where, image_column)
            table = table if row_filter is None else row_filter(table)
            ds = ray.data.from_arrow([table.slice(i, BLOCK_ROWS) for i in range(0, len(table), BLOCK_ROWS)])
        else:
            files, root = list_files(source, input_format)
            datasource = PromptFiles(source, files, root, input_format, text_column, id_column, with_where,
                                     row_filter=row_filter, image_column=image_column)
            ds = ray.data.read_datasource(datasource, num_cpus=TASK_CPUS)
        if limit is not None:
            ds = ds.limit(limit)
    return ds

