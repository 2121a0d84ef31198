"""Resume: an output path is its own checkpoint. A re-run skips the rows it holds, if it was made with the
same settings, and says exactly what changed otherwise (`sampling.max_tokens: 32 -> 64`). Its
`_manifest.json` says how the last run went and with what settings and software the output was made.

    check_fingerprint("outputs/run", plan.fingerprint, plan.provenance)  # InputError if made otherwise
    done = DoneIndex.build(*output_dataset("outputs/run"))  # None when it holds no rows yet
    ds = read_prompts("prompts.jsonl", row_filter=done.drop_done)  # each read task drops rows written
    manifest = Manifest(output_path, plan.fingerprint, plan.provenance); manifest.start(input=100, already_done=0)

The output's ids are hashed to 128 bits (two SipHash keys), sorted, and held once in Ray's object store by
a task: 16 bytes a row, never on the driver. Each filter task tests a block's ids against it with a binary
search. Two ids share a 128-bit hash with a chance of about n^2 / 2^129 (1e-25 for ten million rows).
"""

import datetime
import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from util import columns as col
from util.columns import ID_SCHEME
from util.errors import InputError
from util.resources import TASK_CPUS
from util.storage import commit_file, resolve

# Two SipHash keys (16 bytes each): one hash to search on, the other to confirm a match.
HASH_KEYS = ("batch-llm-ids-01", "batch-llm-ids-02")


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 hashes per id, vectorized (pandas' SipHash over the values)."""
    from pandas.util import hash_array

    values = ids.to_numpy(zero_copy_only=False) if hasattr(ids, "to_numpy") else np.asarray(ids, dtype=object)
    values = values.astype(object)
    return hash_array(values, hash_key=HASH_KEYS[0]), hash_array(values, hash_key=HASH_KEYS[1])


@ray.remote(num_cpus=TASK_CPUS, num_returns=2)
def _build(files, id_column: str):
    """The output's ids as (rows, (first hashes, second hashes), sorted): built in a task, not the driver."""
    hashes = [id_hashes(batch[id_column]) for batch in files.to_batches(columns=[id_column])]
    first = np.concatenate([h[0] for h in hashes]) if hashes else np.zeros(0, np.uint64)
    second = np.concatenate([h[1] for h in hashes]) if hashes else np.zeros(0, np.uint64)
    order = np.lexsort((second, first))
    return len(first), (first[order], second[order])


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
    def drop_done(self) -> functools.partial:  # a row filter for the reader: drops the rows an earlier run wrote
        return functools.partial(drop_done_rows, index_ref=[self.ref])

    @property
    def mark_done(self) -> functools.partial:  # for the input scan: adds the `done` column
        return functools.partial(mark_done, index_ref=[self.ref])

    @classmethod
    def build(cls, files, id_column: str = col.ID) -> "DoneIndex | None":
        """From the output's committed files (util.output.output_dataset: a pyarrow dataset, or None)."""
        if files is None:
            return None
        rows, ref = _build.remote(files, id_column)  # the driver fetches the count, not the ids
        rows = ray.get(rows)
        return cls(rows, ref) if rows else None


# `index_ref`: a one-item list holding the index's ref, so that Ray passes the ref, not a copy of the index,
# into each task, which maps the index from the object store without copying it.

def drop_done_rows(table: pa.Table, index_ref: list) -> pa.Table:
    """`table` without the rows an earlier run wrote: a read task's row filter."""
    return table.filter(pa.array(~contains(ray.get(index_ref[0]), table[col.ID])))


def mark_done(table: pa.Table, index_ref: list | None) -> pa.Table:
    """`table` with a `done` column (1 where an earlier run wrote the row), for the input scan's counts."""
    done = contains(ray.get(index_ref[0]), table[col.ID]) if index_ref else np.zeros(table.num_rows, bool)
    return table.append_column("done", pa.array(done.astype(np.int64)))


def fingerprint(cfg, sampling: dict, engine_kwargs: dict, features: dict | None = None) -> dict:
    """The settings that decide a row's output; a run that resumes an output must have the same.
    `features`: what the job's features add (the task, image settings, LoRA adapters: each Part's
    fingerprint), only when they apply, so that an output made before they existed still resumes."""
    settings = {"model": cfg.model, "revision": cfg.revision, "prompt_format": cfg.prompt_format,
                "system_prompt": cfg.system_prompt, "text_column": cfg.text_column, "id_column": cfg.id_column,
                "id_scheme": None if cfg.id_column else ID_SCHEME,
                "output_format": cfg.output_format, "sampling": sampling, "engine": engine_kwargs, **(features or {})}
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


# Provenance that changes a row's output (the model's weights, the prompt's template): a resume is refused.
# Other software may resume, with a warning line: each run's provenance is in the manifest's `runs`.
REFUSED_CHANGES, WARNED_CHANGES = ("model_commit", "chat_template_sha256"), ("vllm", "ray", "transformers", "torch")


def check_fingerprint(output_path: str, settings: dict, provenance: dict | None = None) -> list[str]:
    """InputError if `output_path` holds output made with other settings, another model commit or chat
    template; the warnings for other software versions. One without a manifest (written by hand, or by an
    older version) is resumed as it is."""
    earlier = read_manifest(output_path) or {}
    changes = fingerprint_changes(earlier.get("fingerprint", {}), settings) if earlier else []
    last = (earlier.get("runs") or [earlier.get("provenance") or {}])[-1]
    differs = lambda key: (provenance or {}).get(key) not in (None, last.get(key)) and last.get(key) is not None
    changes += [f"{key}: {json.dumps(last[key])} -> {json.dumps(provenance[key])}" for key in REFUSED_CHANGES if differs(key)]
    if changes:
        raise InputError(f"{output_path} holds output generated with other settings ({'; '.join(changes)}); "
                         "pass --overwrite to delete the earlier output and start over, "
                         "or choose another --output-path")
    return [f"warning: {output_path} holds output made with {key} {last[key]}, and this run has {provenance[key]}; "
            f"it resumes, and {MANIFEST_NAME} records both" for key in WARNED_CHANGES if differs(key)]


# --- the manifest ---

MANIFEST_NAME = "_manifest.json"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_manifest(output_path: str) -> dict | None:
    filesystem, path = resolve(output_path)
    try:
        with filesystem.open_input_stream(f"{path}/{MANIFEST_NAME}") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


class Manifest:
    """The output's manifest, rewritten whole, and atomically, at each change of this run's status. `runs`:
    every run that wrote to the output, its provenance (versions, model commit, chat template hash,
    accelerator) and how it went; an earlier manifest's runs come first."""

    def __init__(self, output_path: str, settings: dict, provenance: dict, overwrite: bool = False):
        """`overwrite`: the output is deleted before `start`, and the earlier manifest's runs with it."""
        self.output_path, earlier = output_path, ({} if overwrite else read_manifest(output_path) or {})
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        runs = earlier.get("runs") or ([earlier["provenance"]] if earlier.get("provenance") else [])
        self.run = {**provenance, "started": None, "finished": None, "status": None}
        self.record = {"status": None, "reason": None,
                       "counts": {"input": None, "ok": None, "error": None, "already_done": None},
                       "output": None, "started": None, "finished": None, "fingerprint": settings,
                       "fingerprint_hash": digest, "provenance": provenance, "runs": [*runs, self.run]}

    def save(self, **changes) -> None:
        self.record.update(changes)
        self.run.update({k: v for k, v in changes.items() if k in ("started", "finished", "status")})
        filesystem, path = resolve(self.output_path)
        commit_file(filesystem, f"{path}/{MANIFEST_NAME}", json.dumps(self.record, indent=2).encode() + b"\n")

    def start(self, input: int, already_done: int) -> None:
        self.record["counts"].update(input=input, already_done=already_done)
        self.save(status="running", started=now())

    def finish(self, ok: int, error: int, output: dict | None = None, failure: str | None = None) -> None:
        """Every row is written. `failure`: why the run failed all the same (too many failed rows)."""
        self.record["counts"].update(ok=ok, error=error)
        self.save(status="failed" if failure else "complete", reason=failure, output=output, finished=now())

    def fail(self, reason: str) -> None:
        """The run failed after `start` (before it, an input refused, the output is left as it was)."""
        if self.record["started"]:
            self.save(status="failed", reason=reason, finished=now())
