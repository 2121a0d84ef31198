"""Resume: an output path is its own checkpoint. A re-run skips the rows it holds, if it was made with
the same settings (--overwrite deletes it instead: util.output.delete_output).

    from util.resume import DoneIndex, check_fingerprint, fingerprint
    settings = fingerprint(cfg, sampling, engine_kwargs)  # what decides a row's output
    check_fingerprint("outputs/run", settings)            # InputError if the output was made otherwise
    done = DoneIndex.build(*output_dataset("outputs/run", "parquet"))  # None when it holds no rows yet
    ds = read_prompts("prompts.jsonl", row_filter=done.drop_done)  # each read task drops rows written

Resuming into an output generated with other settings would mix two configurations in one result, so
a run refuses to, and says exactly what changed (`sampling.max_tokens: 32 -> 64`).

The output's ids are hashed to 128 bits (two 64-bit SipHash keys), sorted, and held once in Ray's object
store, 16 bytes a row, by a task that reads the output's id column a file at a time. Each filter task maps
that array from shared memory and tests a block's ids with a binary search: vectorized, and nothing the
size of the output travels in a closure or through the driver. Two different ids share a 128-bit hash
with a chance of about n² / 2^129 (1e-25 for ten million rows), so the filter is exact in practice; the
run's accounting (util/manifest.py) would catch a lost row all the same.
"""

import functools
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from util import columns as col
from util.columns import ID_SCHEME
from util.errors import InputError
from util.manifest import read_manifest
from util.resources import TASK_CPUS


# Two SipHash keys (16 bytes each): one hash to search on, the other to confirm a match.
HASH_KEYS = ("batch-llm-ids-01", "batch-llm-ids-02")


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 hashes per id, vectorized (pandas' SipHash over the values)."""
    from pandas.util import hash_array

    values = ids.to_numpy(zero_copy_only=False) if hasattr(ids, "to_numpy") else np.asarray(ids, dtype=object)
    values = values.astype(object)
    return hash_array(values, hash_key=HASH_KEYS[0]), hash_array(values, hash_key=HASH_KEYS[1])


def _sorted_hashes(files, id_column: str) -> tuple[np.ndarray, np.ndarray]:
    first, second = [], []
    if files is not None:
        for batch in files.to_batches(columns=[id_column]):
            h1, h2 = id_hashes(batch[id_column])
            first.append(h1)
            second.append(h2)
    first = np.concatenate(first) if first else np.zeros(0, np.uint64)
    second = np.concatenate(second) if second else np.zeros(0, np.uint64)
    order = np.lexsort((second, first))
    return first[order], second[order]


@ray.remote(num_cpus=TASK_CPUS, num_returns=2)
def _build(files, id_column: str):
    first, second = _sorted_hashes(files, id_column)
    return len(first), (first, second)


def contains(index: tuple[np.ndarray, np.ndarray], ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean mask: which of `ids` are in the index (sorted first and second hashes)."""
    first, second = index
    q1, q2 = id_hashes(ids)
    if not len(first):
        return np.zeros(len(q1), bool)
    at = np.searchsorted(first, q1, side="left")
    found = np.zeros(len(q1), bool)
    # Ids whose first hash is shared by several done ids (rare) are checked against each of them.
    while True:
        valid = at < len(first)
        candidate = np.zeros(len(q1), bool)
        candidate[valid] = first[at[valid]] == q1[valid]
        if not candidate.any():
            return found
        found[candidate] |= second[at[candidate]] == q2[candidate]
        at = np.where(candidate & ~found, at + 1, len(first))


@dataclass
class DoneIndex:
    """The hashed ids of an output, in the object store."""
    rows: int
    ref: ray.ObjectRef

    @property
    def drop_done(self) -> functools.partial:
        """A row filter for the reader: drops the rows an earlier run wrote."""
        return functools.partial(drop_done_rows, index_ref=[self.ref])

    @property
    def mark_done(self) -> functools.partial:
        """For the input scan: adds the `done` column."""
        return functools.partial(mark_done, index_ref=[self.ref])

    @classmethod
    def build(cls, files, id_column: str = col.ID) -> "DoneIndex | None":
        """From the output's committed files (util.output.output_dataset: a pyarrow dataset, or None)."""
        if files is None:
            return None
        rows, ref = _build.remote(files, id_column)  # the driver fetches the count, not the ids
        rows = ray.get(rows)
        return cls(rows, ref) if rows else None


def done_mask(table: pa.Table, index_ref: list) -> np.ndarray:
    """Which rows of `table` have ids in the index (a one-item list holding its ref, so that Ray passes
    the ref, not a copy of the index, into each task)."""
    return contains(ray.get(index_ref[0]), table[col.ID])  # zero-copy from the object store


def drop_done_rows(table: pa.Table, index_ref: list) -> pa.Table:
    """`table` without the rows an earlier run wrote: a read task's row filter."""
    return table.filter(pa.array(~done_mask(table, index_ref)))


def mark_done(table: pa.Table, index_ref: list | None) -> pa.Table:
    """`table` with a `done` column (1 where an earlier run wrote the row), for the input scan's counts."""
    done = done_mask(table, index_ref) if index_ref else np.zeros(table.num_rows, bool)
    return table.append_column("done", pa.array(done.astype(np.int64)))


# --- the settings an output was made with ---

def fingerprint(cfg, sampling: dict, engine_kwargs: dict, task: str = "generate", images: bool = False,
                adapters: dict | None = None) -> dict:
    """The settings that decide a row's output; a run that resumes an output must have the same. The
    task, the image settings (a job with images) and the LoRA adapters ({name: path}) only when they
    apply, so that an output made before these existed still resumes."""
    settings = {"model": cfg.model, "revision": cfg.revision, "prompt_format": cfg.prompt_format,
                "system_prompt": cfg.system_prompt, "text_column": cfg.text_column, "id_column": cfg.id_column,
                "id_scheme": None if cfg.id_column else ID_SCHEME,
                "output_format": cfg.output_format, "sampling": sampling, "engine": engine_kwargs}
    if task != "generate":
        settings["task"] = task
    if images:  # which column holds them, and which are too large: they decide which rows fail
        settings["images"] = {"image_column": cfg.image_column, "max_image_bytes": cfg.max_image_bytes}
    if adapters:
        settings["adapters"] = adapters
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the file: tuples are lists


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def fingerprint_changes(before: dict, after: dict) -> list[str]:
    """What differs, one `name: old -> new` each, e.g. `sampling.max_tokens: 32 -> 64`."""
    old, new = _flatten(before), _flatten(after)
    show = lambda flat, key: json.dumps(flat[key]) if key in flat else "(unset)"
    return [f"{key}: {show(old, key)} -> {show(new, key)}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, ...) != new.get(key, ...)]


def check_fingerprint(output_path: str, settings: dict) -> None:
    """Raise an InputError if `output_path` holds output generated with other settings. An output
    without a manifest (written by hand, or by an older version) is resumed as it is."""
    earlier = read_manifest(output_path)
    changes = fingerprint_changes(earlier.get("fingerprint", {}), settings) if earlier else []
    if changes:
        raise InputError(f"{output_path} holds output generated with other settings ({'; '.join(changes)}); "
                         "pass --overwrite to delete the earlier output and start over, "
                         "or choose another --output-path")
