"""The optional features, and the hooks through which a job uses them. The core never imports a feature:
it finds the modules in FEATURES (util/features/, which holds nothing else) at run time, and a deleted one
is simply not there.

A feature module may hold `Flags` (a dataclass of its flags, part of Config), `check(cfg)` (its flags'
checks; returns the Config fields they imply, which Config sets), `part(plan)` (a Part: what it adds to this
job, or None; it reads the plan and changes nothing: what it sets in the plan is its `plan`), INPUT_FORMATS,
OUTPUT_FORMATS, TASKS (the --input-format, --output-format and --task values it serves), and ASKED_BY (a RowAsks: the columns and
sampling_params keys by which a row asks for it; the plan sees them in the input's first rows, and the input's
pass refuses a later row that asks for a feature the job left out). A Part's hooks, each a no-op by default:
  - at plan time: `engine_kwargs`, `sampling` and `fingerprint` to merge, its output `columns`, and
    `stages(plan, stages)`: the chain with its stages added or swapped in;
  - in the replica, per row: `check(request)` (RowError: the row fails; --preflight calls it too),
    `prepare(request)` before the engine request, `output(request, output, result)` (its columns), `again`.
"""

import dataclasses
import importlib
import json
from dataclasses import field
from types import ModuleType

import pyarrow as pa
import pyarrow.compute as pc

from util import columns as col
from util.errors import InputError

# In their parts' order: structured output checks a whole text, reasoning splits it, tool calls read the rest,
# repair reads structured output's spec.
FEATURES = tuple(f"util.features.{name}" for name in (
    "openai_batch", "images", "lora", "structured_output", "reasoning", "tool_calls", "samples", "repair", "embeddings",
    "scoring", "parallel", "preflight", "autoscale"))


def flag(help: str, parse=None, metavar: str | None = None, is_flag: bool = True, unique: str | None = None, **kwargs):
    """A Config field and its --flag. `parse` reads the flag's text; a dict's flag repeats, each giving a key
    and a value, and `unique` (what a key names) refuses a key given twice."""
    return field(metadata=dict(help=help, parse=parse, metavar=metavar, flag=is_flag, unique=unique), **kwargs)


def only_for_generation(cfg, given: dict[str, bool]) -> None:
    """A feature's check: its flags set (`given`, flag -> set?) shape generated text, which another task has none of."""
    if cfg.task != "generate" and (flags := [name for name, on in given.items() if on]):
        raise InputError(f"--task {cfg.task} takes no generation flags; got {', '.join(flags)}")


@dataclasses.dataclass(frozen=True)
class RowAsks:
    """What rows ask of the job's features, one row at a time: input columns with a value (a row's `tools`,
    its `lora`), and the keys its sampling_params set (`n`, `response_format`); `every`: any row may ask for
    anything (an OpenAI batch file's requests). A feature module's ASKED_BY is one of these."""
    columns: frozenset = frozenset()
    sampling: frozenset = frozenset()
    every: bool = False

    def ask(self, asked_by: "RowAsks") -> bool:
        """Whether these rows ask for what `asked_by` names."""
        return self.every or bool(self.columns & asked_by.columns or self.sampling & asked_by.sampling)

    def __and__(self, other: "RowAsks") -> "RowAsks":
        return RowAsks(self.columns & other.columns, self.sampling & other.sampling)

    def __or__(self, other: "RowAsks") -> "RowAsks":
        return RowAsks(self.columns | other.columns, self.sampling | other.sampling, self.every or other.every)


def row_asks(table: pa.Table) -> RowAsks:
    """The columns that hold a value in some row of `table`, and the keys its rows' sampling_params set
    (an object, or its JSON text; where that is not an object, the row fails on its own)."""
    columns, keys = frozenset(name for name in table.column_names if table[name].null_count < table.num_rows), set()
    sampling = table[col.SAMPLING_PARAMS] if col.SAMPLING_PARAMS in columns else None
    if sampling is not None and pa.types.is_struct(sampling.type):  # objects (JSONL, Parquet): by field, not row
        return RowAsks(columns, frozenset(field.name for i, field in enumerate(sampling.type)
                                          if pc.struct_field(sampling, [i]).null_count < len(sampling)))
    for value in sampling.to_pylist() if sampling is not None else ():
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                continue
        if isinstance(value, dict):
            keys.update(key for key, item in value.items() if item is not None)
    return RowAsks(columns, frozenset(keys))


def features() -> list[ModuleType]:
    """The feature modules that are present."""
    found = []
    for name in FEATURES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            if not error.name or not (name == error.name or name.startswith(error.name + ".")):
                raise  # the feature is there (or util/features/ is), but something it imports is not
    return found


def registry(name: str) -> dict:
    """The features' entries of one registry (INPUT_FORMATS, OUTPUT_FORMATS or TASKS), merged."""
    return {key: value for module in features() for key, value in getattr(module, name, {}).items()}


class Part:
    """What a feature adds to one job. Class attributes are defaults; a part sets its own in __init__."""
    engine_kwargs: dict = {}  # vLLM engine arguments (the user's --engine-arg win over them)
    sampling: dict = {}  # the job's sampling parameters
    fingerprint: dict = {}  # settings that decide its rows' output: a resumed output must have the same
    columns: dict = {}  # output columns it adds: name -> Arrow type
    glance: tuple | None = None  # the columns a run shows of a few rows, for a task of its own
    engine_inputs: tuple = ()  # columns the replica reads and drops (util/predictor.py)
    input_columns: tuple = ()  # input columns every file must have (read as strings from CSV)
    group_within: str | None = None  # an input column whose values keep rows apart when rows are grouped (LoRA's)
    plan: dict = {}  # Plan fields it sets (make_plan applies them): the task, the predictor class, replica resources

    def stages(self, plan, stages: list) -> list:
        return stages

    def check(self, request) -> None:
        """Raise RowError when the row cannot run; may change request.sampling (no engine here)."""

    async def prepare(self, request) -> None:
        """Just before the engine request (request.replica: the predictor, its engine and tokenizer): may
        add to request.prompt or request.generate_kwargs."""

    def output(self, request, output, result: dict) -> None:
        """vLLM's finished RequestOutput as columns: set keys of `result` (the row's) or of each of
        `result["samples"]` (one per completion; the first sample's become the row's)."""

    def again(self, request, result: dict) -> bool:  # after the row's answer (`result`): True runs it once more
        return False
