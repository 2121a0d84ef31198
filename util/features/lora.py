"""LoRA adapters (a feature, util/parts.py): one base model serves many fine-tunes in one job, each row
naming its own adapter.

    python main.py --input-path rows.jsonl --lora support=/adapters/support --lora legal=s3://bucket/legal
    # rows.jsonl:  {"text": "...", "lora": "support"}                a name registered with --lora
    #              {"text": "...", "lora": "s3://bucket/adapters/sql"} a path: local, s3:// or gs://
    #              {"text": "..."}                                   null or empty: the base model

    from util.features.lora import plan_lora
    adapters, engine = plan_lora(cfg.lora, cfg.max_loras, cfg.max_lora_rank)  # the plan: reads each adapter's config
    engine    # {"enable_lora": True, "max_loras": 2, "max_lora_rank": 16}: vLLM's LoRA engine arguments

Which adapter a row asks for (`row_adapters`): its `lora` column, a name registered with --lora or a path
(a value with a "/"). For an OpenAI batch file, the request body's `model`, as ray.data.llm reads a row's
`model`: a registered name is that adapter, the base model none, and any other model an error row. A job
without LoRA ignores body.model, as it always has. A row's adapter name is its output's `model`.

The plan (util/plan.py) reads every registered adapter's adapter_config.json once, before any engine
starts, and refuses the run (exit 2) naming the adapter whose folder is missing, is not an adapter, or has a
rank over --max-lora-rank. It sizes the engine: max_loras (adapters in one engine step) defaults to the
registered ones, at most MAX_LORAS_DEFAULT; max_lora_rank to the largest registered rank, rounded up to
a rank vLLM accepts.

In each replica (`ReplicaAdapters`) every adapter is made ready once, on its first row: an s3:// or gs://
folder is copied to a local folder of the replica's, its adapter_config.json read and its rank checked, and
then the engine loads it (`add_lora`), which raises on a bad adapter and leaves the engine running. Only a
loaded adapter goes with a request: in vLLM 0.32 a request whose adapter fails to load in the engine's step
kills the engine, and every row in flight with it. An adapter that cannot be made ready is an error row for
each row that names it (kinds "unknown adapter" and "adapter failed"), never the engine's.
"""

import asyncio
import dataclasses
import functools
import json
import os
import tempfile
import typing

import pyarrow.fs as pafs

from util import columns as col
from util.errors import ROW_ERRORS, InputError, RowError, row_error
from util.parts import Part, RowAsks, flag
from util.replica.internals import engine_dead_error, lora_ranks
from util.storage import is_remote, resolve

CONFIG_NAME = "adapter_config.json"  # peft's: every LoRA adapter folder has one
MAX_LORAS_DEFAULT = 8  # adapters in one engine step, unless --max-loras says: each slot costs GPU memory
# vLLM's CPU LoRA ops (0.32; torch_ops/lora_ops.py) gather each row's adapter slot by index, and a row
# without an adapter (index -1) gets the last slot's: in a step shared with adapter rows, its output is
# wrong (its fix, vllm-project/vllm#48421, is an open pull request). A slot that no adapter takes stays
# zero, so the registered adapters plus one keep base rows exact, while no more adapters than those are in
# use. GPUs are exact.
CPU_SPARE_SLOT = 1
LORA = "lora"  # an input column: the row's adapter, a --lora name or a path
ASKED_BY = RowAsks(columns=frozenset({LORA}))
UNKNOWN_ADAPTER, ADAPTER_FAILED = "unknown adapter", "adapter failed"
ROW_ERRORS.update({UNKNOWN_ADAPTER: "unknown adapter '{name}': {reason}",
                   ADAPTER_FAILED: "adapter '{name}' failed to load: {reason}"})
NOT_ENABLED = ("LoRA is not enabled for this job: pass --lora NAME=PATH, or --max-loras N for adapters given "
               "by path")


class AdapterError(ValueError):
    """Why a folder is not an adapter this job can use."""


def parse_lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        import argparse

        raise argparse.ArgumentTypeError(f"--lora takes NAME=PATH, got {text!r}")
    return name.strip(), path.strip()


@dataclasses.dataclass
class Flags:
    lora: dict = flag("A LoRA adapter NAME=PATH (repeatable): a folder with adapter_config.json, local, s3:// or "
                      "gs://. A row whose `lora` column holds NAME (or an adapter's path) runs with it.",
                      parse=parse_lora, metavar="NAME=PATH", unique="an adapter", default_factory=dict)
    max_loras: int | None = flag("Most adapters in one engine step (vLLM's max_loras); also enables LoRA for adapters "
                                 "given by path only. Default: the --lora adapters, at most 8 (on CPU one more: "
                                 "util/features/lora.py says why).", default=None)
    max_lora_rank: int | None = flag("Largest adapter rank the engine takes (vLLM's max_lora_rank). Default: the "
                                     "largest --lora adapter's, else vLLM's (16).", default=None)


def check(cfg) -> None:
    if cfg.lora or cfg.max_loras is not None or cfg.max_lora_rank is not None:
        check_lora_flags(cfg.lora, cfg.max_loras, cfg.max_lora_rank)  # no I/O: the plan reads the adapters


def check_lora_flags(lora: dict, max_loras: int | None, max_lora_rank: int | None) -> None:
    """--lora, --max-loras and --max-lora-rank as given (no I/O): ValueError naming the flag."""
    for name, path in lora.items():
        if not name or not path or "/" in name:
            raise InputError(f"--lora takes NAME=PATH with a NAME without '/' (a row's `lora` value with a '/' "
                             f"is a path), got {name}={path}")
    if max_loras is not None and not max_loras >= 1:
        raise InputError(f"--max-loras must be >= 1, got {max_loras}")
    ranks = lora_ranks()
    if max_lora_rank is not None and (not max_lora_rank >= 1 or ranks and max_lora_rank not in ranks):
        raise InputError(f"--max-lora-rank must be one of vLLM's ranks ({', '.join(map(str, ranks))}), "
                         f"got {max_lora_rank}")


def adapter_rank(folder: str, location: str | None = None) -> int:
    """The largest rank in the adapter_config.json of `folder` (local, s3:// or gs://); AdapterError naming
    `location` (where the adapter came from, `folder` by default) when it is not a LoRA adapter."""
    location = location or folder
    filesystem, path = resolve(folder)
    try:
        with filesystem.open_input_stream(f"{path}/{CONFIG_NAME}") as stream:
            config = json.loads(stream.read())
    except FileNotFoundError:
        raise AdapterError(f"no {CONFIG_NAME} in {location}") from None
    except json.JSONDecodeError as error:
        raise AdapterError(f"{location}/{CONFIG_NAME} is not valid JSON ({error})") from None
    except OSError as error:
        raise AdapterError(f"cannot read {location}/{CONFIG_NAME}: {error}") from None
    is_lora = isinstance(config, dict) and config.get("peft_type", "LORA") == "LORA"
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()] if is_lora else [None]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterError(f"{location}/{CONFIG_NAME} is not a LoRA adapter's (peft_type LORA, a rank r > 0)")
    return max(ranks)


def local_path(location: str) -> str:
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


def check_adapter(folder: str, location: str, max_lora_rank: int | None) -> int:
    """The adapter's rank; AdapterError when `folder` (where `location` is, or its copy) holds no LoRA
    adapter whose rank the engine takes (max_lora_rank; None: vLLM checks it as it loads the adapter)."""
    rank = adapter_rank(folder, location)
    if max_lora_rank is not None and rank > max_lora_rank:
        raise AdapterError(f"rank {rank} is over max_lora_rank {max_lora_rank} (--max-lora-rank)")
    return rank


@functools.lru_cache(maxsize=1024)
def adapter_problem(location: str, max_lora_rank: int | None) -> str | None:
    """Why the adapter at `location` cannot be used, as far as its config tells without an engine; once
    per location in a process (--preflight's workers check every row)."""
    try:
        check_adapter(location, location, max_lora_rank)
    except AdapterError as error:
        return str(error)
    return None


def plan_lora(lora: dict, max_loras: int | None, max_lora_rank: int | None, task: str = "generate",
              use_gpu: bool = True) -> tuple[dict, dict]:
    """(registered adapters {name: path}, vLLM's LoRA engine arguments), both empty for a job without LoRA.
    Reads each registered adapter's config: InputError naming it where it cannot be used. On CPU the
    default max_loras has a slot more than the adapters (CPU_SPARE_SLOT)."""
    if not lora and max_loras is None and max_lora_rank is None:
        return {}, {}
    if task != "generate":
        raise InputError(f"--lora, --max-loras and --max-lora-rank are for generation, not the {task} task")
    ranks = {}
    for name, path in lora.items():
        try:
            ranks[name] = check_adapter(path, path, max_lora_rank)
        except AdapterError as error:
            raise InputError(f"--lora {name}={path}: {error}") from None
    default = (min(len(lora), MAX_LORAS_DEFAULT) or MAX_LORAS_DEFAULT) + (0 if use_gpu else CPU_SPARE_SLOT)
    engine = {"enable_lora": True, "max_loras": max_loras or default}
    if max_lora_rank is None and ranks:  # the smallest rank vLLM accepts that holds every adapter
        largest = max(ranks.values())
        max_lora_rank = next((r for r in lora_ranks() if r >= largest), largest)
    if max_lora_rank is not None:  # else vLLM's default
        engine["max_lora_rank"] = max_lora_rank
    # A local folder as an absolute path: the replicas' working directory is not the driver's.
    return {name: path if is_remote(path) else local_path(path) for name, path in lora.items()}, engine


def lora_value(value, registered: dict, enabled: bool) -> tuple[str | None, str | None]:
    """A `lora` column value → (the adapter, or None for the base model; why the row cannot run, or None)."""
    name = None if value is None else str(value).strip()
    if not name:
        return None, None
    if not enabled:
        return name, row_error(UNKNOWN_ADAPTER, name=name, reason=NOT_ENABLED)
    if name not in registered and "/" not in name:
        return name, row_error(UNKNOWN_ADAPTER, name=name, reason=f"not registered with --lora "
                               f"({', '.join(registered) or 'none are'}), and not a path (no '/')")
    return name, None


def request_model_value(value, registered: dict, base_names: set) -> tuple[str | None, str | None]:
    """An OpenAI request's body.model → (the adapter, or None for the base model; why not, or None)."""
    if value is None or value in base_names:
        return None, None
    if value in registered:
        return value, None
    return value, row_error(UNKNOWN_ADAPTER, name=value, reason=f"body.model names neither the base model nor "
                            f"an adapter registered with --lora ({', '.join(registered) or 'none are'})")


class ReplicaAdapters:
    """The adapters of one replica's engine: each made ready once, on its first row, with a stable id
    (registered ones 1..n in --lora order, paths after them as they come), or its row error."""

    def __init__(self, registered: dict | None, max_lora_rank: int | None = None):
        self.registered, self.max_lora_rank = dict(registered or {}), max_lora_rank
        self.ids = {name: i for i, name in enumerate(self.registered, 1)}
        self.ready: dict[str, typing.Any] = {}  # name -> LoRARequest, or the row error of an adapter that failed
        self.locks: dict[str, asyncio.Lock] = {}
        self._copies = None  # a local folder for s3/gs adapters, made on first need, removed with the replica

    def local_folder(self, name: str, lora_id: int) -> str:
        """The adapter's folder on this machine, an s3:// or gs:// one copied here first; AdapterError
        when it is not an adapter, or its rank is over the engine's max_lora_rank."""
        location = self.registered.get(name, name)
        if not is_remote(location):
            folder = local_path(location)
        else:
            if self._copies is None:
                self._copies = tempfile.TemporaryDirectory(prefix="batch-llm-lora-")  # removed when collected
            folder = os.path.join(self._copies.name, str(lora_id))
            filesystem, path = resolve(location)
            os.makedirs(folder, exist_ok=True)  # copy_files makes the folders below it, not this one
            try:
                pafs.copy_files(path, folder, source_filesystem=filesystem,
                                destination_filesystem=pafs.LocalFileSystem())
            except FileNotFoundError:
                pass  # nothing there: adapter_rank says so, naming the location
            except OSError as error:
                raise AdapterError(f"cannot copy {location}: {error}") from None
        check_adapter(folder, location, self.max_lora_rank)
        return folder

    def request(self, name: str, lora_id: int):
        """vLLM's LoRARequest for the adapter, its folder checked (AdapterError when it is not usable)."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=self.local_folder(name, lora_id))

    async def load(self, name: str, add_lora) -> typing.Any:
        """The adapter's LoRARequest, loaded into the engine (`add_lora`: AsyncLLM.add_lora) on its first
        row; or the row error of an adapter that cannot be. A dead engine's error is raised: the job's."""
        if name not in self.ready:
            async with self.locks.setdefault(name, asyncio.Lock()):
                if name not in self.ready:
                    self.ready[name] = await self._make_ready(name, add_lora)
        return self.ready[name]

    async def _make_ready(self, name: str, add_lora) -> typing.Any:
        # The id here, in the event loop's thread: two adapters made ready at once must not share one.
        lora_id = self.ids.setdefault(name, len(self.ids) + 1)
        try:
            request = await asyncio.to_thread(self.request, name, lora_id)  # a copy from s3 or gs takes a while
            await add_lora(request)  # vLLM raises for an adapter it cannot load, and its engine runs on
        except AdapterError as error:
            return row_error(UNKNOWN_ADAPTER, name=name, reason=error)
        except engine_dead_error():
            raise
        except Exception as error:
            return row_error(ADAPTER_FAILED, name=name, reason=error)
        return request


# --- the plan's part -----------------------------------------------------------------------------------

class Lora(Part):
    """--lora, or rows that name an adapter (an error row when LoRA is off); the model column names the
    row's adapter."""

    def __init__(self, cfg, adapters: dict, engine: dict):
        self.registered, self.engine_kwargs = adapters, engine
        self.group_within = LORA  # grouped rows share a prefix within one adapter: its cache is its own
        self.fingerprint = {"adapters": adapters} if adapters else {}
        self.enabled, self.max_lora_rank = bool(engine.get("enable_lora")), engine.get("max_lora_rank")
        self.base_names = {cfg.model}
        self.replica = None  # in the replica: its ReplicaAdapters, made on the first row that names one

    def adapter(self, row: dict) -> tuple[str | None, str | None]:
        """(the adapter the row asks for, or None for the base model; why it cannot run, or None): its `lora`
        column or, with LoRA on, an OpenAI request's body.model."""
        if LORA in row:
            return lora_value(row[LORA], self.registered, self.enabled)
        if self.enabled and row.get(col.REQUEST_MODEL) is not None:
            return request_model_value(row[col.REQUEST_MODEL], self.registered, self.base_names)
        return None, None

    def check(self, request) -> None:
        name, error = self.adapter(request.row)
        request.model = request.state["adapter"] = name
        if error is None and name is not None:  # its config, read once per process (--preflight counts these)
            problem = adapter_problem(self.registered.get(name, name), self.max_lora_rank)
            error = problem and row_error(UNKNOWN_ADAPTER, name=name, reason=problem)
        if error:
            raise RowError(error)

    async def prepare(self, request) -> None:
        name = request.state.get("adapter")
        if name is None:
            return
        if self.replica is None:
            self.replica = ReplicaAdapters(self.registered, self.max_lora_rank)
        loaded = await self.replica.load(name, request.replica.engine.add_lora)
        if isinstance(loaded, str):
            raise RowError(loaded)
        request.generate_kwargs["lora_request"] = loaded


def part(plan) -> Lora | None:
    cfg = plan.cfg
    if plan.task != "generate":
        if cfg.lora or cfg.max_loras is not None or cfg.max_lora_rank is not None:
            raise InputError(f"--lora, --max-loras and --max-lora-rank are for generation, not the {plan.task} task")
        return None
    adapters, engine = plan_lora(cfg.lora, cfg.max_loras, cfg.max_lora_rank, plan.task, plan.choice.use_gpu)
    return Lora(cfg, adapters, engine) if engine or plan.row_asks.ask(ASKED_BY) else None
