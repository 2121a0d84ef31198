"""Rows whose prompts share a long prefix run together, so vLLM's prefix cache computes that prefix once.

    order, share = choose_row_order("auto", sample_token_ids, 16)   # "grouped" where the sample shares, else "input"
    ds = group_rows(formatted, 16)                     # the rows sorted by their prompts' prefix keys

A prompt's key is the chain of hashes of its token blocks, cut as vLLM cuts its KV cache (`block_size`
tokens; the last, partial block is never cached): two prompts share their first k key words exactly when they
share their first k blocks. Ray Data's distributed sort by that key puts the rows of one document (or one
few-shot task) next to each other, so they arrive in one batch of one replica, where the first row's prefill
serves the rest. A group larger than a batch spans neighbouring batches; Ray Data hands batches to whichever
replica is free, so no replica idles while another has work left. The key only orders rows: a collision could
cost speed, never a wrong answer.

The sort waits for every row to be formatted before the first batch goes out, so it is there only where it pays:
--row-order: grouped, input, or auto, decided from the first SAMPLE_ROWS prompts (util/pipeline.py order_rows).
"""

import functools
import hashlib
import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from util import columns as col
from util.resources import TASK_CPUS

KEY = "__prefix_key"  # the sort key's column, dropped after the sort
MAX_KEY_BLOCKS = 512  # blocks a key covers: 8 k tokens at vLLM's default block size of 16
SAMPLE_ROWS = 4096  # prompts the "auto" order looks at
# "auto" groups when the sample's rows share this much of their prompt tokens beyond the prefix every row has
# (an instruction common to all stays in the cache in any order, so it is no reason to sort).
MIN_SHARED_SHARE = 0.2
DEFAULT_BLOCK_SIZE = 16  # vLLM's on GPU; the key's blocks need not match the engine's to group its rows
_MULTIPLIER = 0x9E3779B97F4A7C15  # odd: the chain's step is invertible modulo 2**64
_MASK = (1 << 64) - 1


def block_size(engine_kwargs: dict) -> int:
    return int(engine_kwargs.get("block_size") or DEFAULT_BLOCK_SIZE)


@functools.lru_cache(maxsize=4)
def _weights(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(1, 2**63, size=size, dtype=np.uint64) | np.uint64(1)


def prefix_key(token_ids, size: int, namespace: str | None = None) -> bytes:
    """The key of one prompt: one 8-byte word per whole block (each hashing every block up to it), big-endian
    so that comparing keys as bytes compares them word by word. `namespace` (a LoRA adapter's name) leads."""
    ids = np.asarray(token_ids if token_ids is not None else (), dtype=np.uint64)
    blocks = min(len(ids) // size, MAX_KEY_BLOCKS)
    with np.errstate(over="ignore"):  # the hash is arithmetic modulo 2**64
        block_hashes = (ids[:blocks * size].reshape(blocks, size) * _weights(size)).sum(axis=1, dtype=np.uint64)
    chain, words = 0, []
    for block_hash in block_hashes.tolist():
        chain = (chain * _MULTIPLIER + block_hash + 1) & _MASK
        words.append(chain)
    lead = [] if namespace is None else [hash_text(namespace)]
    return struct.pack(f">{len(lead) + len(words)}Q", *lead, *words)


def hash_text(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def shared_blocks(a: bytes, b: bytes) -> int:
    """How many leading 8-byte words two keys share: blocks, and a leading namespace word if the keys have one
    (shared_tokens takes it off with `lead_words`)."""
    n = 0
    for i in range(0, min(len(a), len(b)), 8):
        if a[i:i + 8] != b[i:i + 8]:
            break
        n += 1
    return n


def add_keys(batch: pa.Table, size: int, namespace_column: str | None = None) -> pa.Table:
    """The formatter's batch with each row's prefix key (Ray Data stage, fused with the formatter's tasks)."""
    namespaces = batch[namespace_column].to_pylist() if namespace_column in batch.column_names else [None] * batch.num_rows
    keys = [prefix_key(ids, size, None if space is None else str(space))
            for ids, space in zip(batch[col.PROMPT_TOKEN_IDS].to_pylist(), namespaces)]
    return batch.append_column(KEY, pa.array(keys, pa.binary()))


def shared_tokens(keys: list[bytes], size: int, lead_words: int = 0) -> int:
    """Prompt tokens that sorted `keys` share with the key before them: what a prefix cache need not compute."""
    return sum(max(0, shared_blocks(a, b) - lead_words) * size for a, b in zip(keys, keys[1:]))


def measure_and_drop_keys(batch: pa.Table, size: int, lead_words: int = 0) -> pa.Table:
    """After the sort: each block's shared prompt tokens go to the run's progress actor (the report's measure
    of how much the input shares), and the key goes. Counted within a block: a group cut by a block's edge
    counts one row short, a small undercount."""
    keys = batch[KEY].to_pylist()
    prompt_tokens = int(pc.sum(pc.list_value_length(batch[col.PROMPT_TOKEN_IDS])).as_py() or 0)
    from util.replica.supervisor import report_grouped

    report_grouped(prompt_tokens, shared_tokens(keys, size, lead_words))
    return batch.drop_columns([KEY])


def sample_share(token_ids: list, size: int) -> float:
    """The share of the sample's prompt tokens that grouping would let the cache reuse: the tokens each prompt
    shares with its neighbour in key order, beyond the prefix that every prompt of the sample has."""
    keys = sorted(prefix_key(ids, size) for ids in token_ids)
    total = sum(len(ids) for ids in token_ids if ids is not None)
    if len(keys) < 2 or not total:
        return 0.0
    common = shared_blocks(keys[0], keys[-1]) * size  # sorted: the first and last share what all of them share
    return max(0, shared_tokens(keys, size) - common * (len(keys) - 1)) / total


def choose_row_order(requested: str, token_ids: list, size: int) -> tuple[str, float]:
    """("grouped" or "input", the sample's shared share): "auto" groups when the sample shares enough."""
    share = sample_share(token_ids, size)
    if requested != "auto":
        return requested, share
    return ("grouped" if share >= MIN_SHARED_SHARE else "input"), share


def group_rows(ds, size: int, namespace_column: str | None = None):
    """`ds` (formatted rows) sorted by prefix key with Ray Data's distributed sort, measured, the key dropped."""
    lead_words = 1 if namespace_column else 0
    keyed = ds.map_batches(add_keys, fn_kwargs={"size": size, "namespace_column": namespace_column},
                           batch_format="pyarrow", num_cpus=TASK_CPUS)
    return keyed.sort(KEY).map_batches(measure_and_drop_keys, fn_kwargs={"size": size, "lead_words": lead_words},
                                       batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS)
