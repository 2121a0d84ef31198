"""Resume: which input rows an earlier run already wrote, found without holding ids on the driver.

    from util.resume import DoneIndex
    done = DoneIndex.build("outputs/run", "parquet")    # None when the output holds no rows yet
    ds = read_prompts("prompts.jsonl", done=done)       # each read task drops the rows already written

The output's ids are hashed to 128 bits (two 64-bit SipHash keys), sorted, and held once in Ray's object
store, 16 bytes a row, by a task that reads the output's id column a file at a time. Each filter task maps
that array from shared memory and tests a block's ids with a binary search: vectorized, and nothing the
size of the output travels in a closure or through the driver. Two different ids share a 128-bit hash
with a chance of about n² / 2^129 (1e-25 for ten million rows), so the filter is exact in practice; the
run's accounting (util/manifest.py) would catch a lost row all the same.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray


# Two SipHash keys (16 bytes each): one hash to search on, the other to confirm a match.
HASH_KEYS = ("batch-llm-ids-01", "batch-llm-ids-02")


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 hashes per id, vectorized (pandas' SipHash over the values)."""
    from pandas.util import hash_array

    values = ids.to_numpy(zero_copy_only=False) if hasattr(ids, "to_numpy") else np.asarray(ids, dtype=object)
    values = values.astype(object)
    return hash_array(values, hash_key=HASH_KEYS[0]), hash_array(values, hash_key=HASH_KEYS[1])


def _sorted_hashes(output_path: str, output_format: str) -> tuple[np.ndarray, np.ndarray]:
    from util.output import output_dataset

    files, id_column = output_dataset(output_path, output_format)
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


@ray.remote(num_cpus=0.5, num_returns=2)
def _build(output_path: str, output_format: str):
    first, second = _sorted_hashes(output_path, output_format)
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

    @classmethod
    def build(cls, output_path: str, output_format: str) -> "DoneIndex | None":
        rows, ref = _build.remote(output_path, output_format)  # the driver fetches the count, not the ids
        rows = ray.get(rows)
        return cls(rows, ref) if rows else None


def drop_done_rows(table: pa.Table, index_ref: list | None) -> pa.Table:
    """`table` without the rows whose ids are in the index (a one-item list holding its ref)."""
    if index_ref is None:
        return table
    index = ray.get(index_ref[0])  # zero-copy from the object store
    return table.filter(pa.array(~contains(index, table["id"])))


def mark_done(batch: pa.Table, index_ref: list | None) -> pa.Table:
    """Adds a `done` column (1 where the row's id is in the output) for the input scan."""
    done = contains(ray.get(index_ref[0]), batch["id"]) if index_ref else np.zeros(batch.num_rows, bool)
    return batch.append_column("done", pa.array(done.astype(np.int64)))
