"""Write results, one row per input row, and read them back.

    from util.output import write_results, read_results
    write_results(ds, "s3://bucket/run/", "parquet")
    rows = read_results("s3://bucket/run/").take(5)

Every output row has the columns of OUTPUT_SCHEMA first, then the input's own columns.
`error` is null for rows that succeeded, and says why a row failed otherwise.
"""

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import ray

from util.storage import is_remote, resolve

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("generated_text", pa.string()),
    ("finish_reason", pa.string()),
    ("num_input_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()),
    ("error", pa.string()),
    ("model", pa.string()),
])


def conform(table: pa.Table) -> pa.Table:
    """Contract columns first, with fixed types, so every file of a run has the same schema
    (a batch whose `error` values are all null would otherwise be typed `null`)."""
    contract = [table[f.name].cast(f.type) for f in OUTPUT_SCHEMA]
    rest = [c for c in table.column_names if c not in OUTPUT_SCHEMA.names]
    return pa.Table.from_arrays(contract + [table[c] for c in rest], names=OUTPUT_SCHEMA.names + rest)


def write_results(ds: ray.data.Dataset, output_path: str, output_format: str = "parquet") -> None:
    filesystem, path = resolve(output_path)
    ds = ds.map_batches(conform, batch_format="pyarrow", batch_size=None)
    # Object stores have no folders. Ray skips creating them for s3:// URIs, but it sees only a bare path
    # here; creating them writes marker objects up to the bucket root, which a policy that allows
    # writes under one prefix only (as on Anyscale's artifact storage) refuses.
    create_dir = not is_remote(output_path)
    existed = filesystem.get_file_info(path).type != pafs.FileType.NotFound
    try:
        if output_format == "jsonl":
            ds.write_json(path, filesystem=filesystem, try_create_dir=create_dir)
        else:
            ds.write_parquet(path, filesystem=filesystem, try_create_dir=create_dir)
    except BaseException:
        # A run that failed before writing a row leaves no empty output folder that looks like a result.
        created_empty = (not existed and filesystem.get_file_info(path).type == pafs.FileType.Directory
                         and not filesystem.get_file_info(pafs.FileSelector(path)))
        if created_empty:
            filesystem.delete_dir(path)
        raise


def read_results(output_path: str, output_format: str = "parquet") -> ray.data.Dataset:
    filesystem, path = resolve(output_path)
    if output_format == "jsonl":
        # Arrow's reader, which reads JSON lines too (lines=True picks pandas, which takes no filesystem).
        # The contract's types are given, not inferred: a file whose `error`s are all null would read as null.
        return ray.data.read_json(path, filesystem=filesystem,
                                  parse_options=pajson.ParseOptions(explicit_schema=OUTPUT_SCHEMA))
    return ray.data.read_parquet(path, filesystem=filesystem)


def written_ids(output_path: str, output_format: str = "parquet") -> set[str]:
    """Ids already in the output, so a re-run skips them. Only the id column is read; the set lives on
    the driver (about 100 bytes an id: fine for millions of rows)."""
    import pyarrow.dataset as pads

    filesystem, path = resolve(output_path)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return set()
    files = pads.dataset(path, filesystem=filesystem, format="json" if output_format == "jsonl" else "parquet",
                         exclude_invalid_files=False)
    return set(files.to_table(columns=["id"])["id"].to_pylist()) if files.files else set()


def summarize(ds: ray.data.Dataset) -> dict:
    """Row and token counts of a finished run's output."""
    stats = {"rows": 0, "ok": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
    for batch in ds.select_columns(["error", "num_input_tokens", "num_generated_tokens"]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        ok = batch["error"].null_count
        stats["rows"] += batch.num_rows
        stats["ok"] += ok
        stats["errors"] += batch.num_rows - ok
        stats["input_tokens"] += pc.sum(batch["num_input_tokens"]).as_py() or 0
        stats["output_tokens"] += pc.sum(batch["num_generated_tokens"]).as_py() or 0
    return stats
