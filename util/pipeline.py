"""The pipeline's stages, chained in one place: read -> (drop rows already done) -> format -> (group rows
that share a prompt prefix) -> cut blocks -> the model's stage (predict, or a task's own), with what the job's features add.

    order_rows(plan, done)                                 # grouped, or as read (util/grouping.py)
    ds = read_input(plan, done)                            # main.py's steps: read, then each stage
    for stage in pipeline_stages(plan, done): ds = stage.apply(ds)
    ds = build_pipeline(plan, source=rows)                 # the same in one call, on in-memory rows

Each stage declares the columns it needs, adds and drops, checked before anything runs. A streaming
repartition cuts blocks to `batch_size` rows, so that every replica takes work a batch at a time.
"""

import functools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import ray

from util import columns as col
from util.grouping import SAMPLE_ROWS, block_size, choose_row_order, group_rows
from util.predictor import CORE_COLUMNS
from util.errors import InputError, original
from util.prompt_format import cached_formatter, format_prompts, tokenizer_args
from util.reading import SAMPLE_PROMPTS, read_prompts
from util.resources import TASK_CPUS

if TYPE_CHECKING:
    from util.plan import Plan
    from util.resume import DoneIndex


@dataclass(frozen=True)
class Stage:
    """One step: its contract, and how it runs: `ds.map_batches(**map_batches)`, or `custom(ds)`."""
    name: str
    needs: tuple[str, ...]
    adds: tuple[str, ...]
    drops: tuple[str, ...] = ()
    map_batches: dict = field(default_factory=dict, repr=False)
    custom: Callable[[ray.data.Dataset], ray.data.Dataset] | None = field(default=None, repr=False)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return self.custom(ds) if self.custom else ds.map_batches(**self.map_batches)

    def with_options(self, **map_batches) -> "Stage":  # a feature's edit of a stage
        return replace(self, map_batches={**self.map_batches, **map_batches})


def check_contracts(stages: list[Stage], columns: tuple[str, ...]) -> None:
    """ValueError naming the first stage whose needed column no stage before it adds; `columns`: the reader's."""
    have = list(columns)
    for stage in stages:
        for needed in stage.needs:
            if needed not in have:
                raise ValueError(f"stage '{stage.name}' needs column '{needed}', which no stage before it "
                                 f"adds (it gets: {', '.join(have)})")
        have = [c for c in have if c not in stage.drops] + [c for c in stage.adds if c not in have]


def drop_done_stage(plan: "Plan", done: "DoneIndex") -> Stage:
    """With --limit, rows already written are dropped after the limit, so that a rerun takes the same first
    rows (without it, the read tasks drop them); in the formatter's batches, so that Ray fuses the two."""
    return Stage("drop_done", needs=(col.ID,), adds=(), map_batches=dict(
        fn=done.drop_done, batch_size=plan.cfg.batch_size, batch_format="pyarrow", num_cpus=TASK_CPUS))


def formatter_stage(plan: "Plan", formatter=format_prompts) -> Stage:
    """The prompt formatter: tasks of the predictor's batch size, as many as there are free CPUs."""
    cfg = plan.cfg
    return Stage("format", needs=(cfg.text_column,),
                 adds=(col.PROMPT, col.PROMPT_TOKEN_IDS, col.NUM_INPUT_TOKENS, col.ERROR), map_batches=dict(
                     fn=formatter, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=TASK_CPUS,
                     fn_kwargs={"model": cfg.model, "text_column": cfg.text_column, "system_prompt": cfg.system_prompt,
                                "prompt_format": plan.prompt_format, "revision": cfg.revision,
                                "max_model_len": plan.max_model_len,
                                # hashable, as every option: each worker caches its formatter by them
                                "tokenizer": tuple(tokenizer_args(cfg.model, plan.engine_kwargs).items())}))


def cut_blocks_stage(rows: int) -> Stage:
    """Blocks of about `rows` rows, in tasks at the data tasks' CPU share (a whole CPU could wait forever
    beside the replicas on a small machine), fused with the formatter's."""
    def cut(ds: ray.data.Dataset) -> ray.data.Dataset:
        from util.replica.internals import set_last_operator_cpus

        return set_last_operator_cpus(ds.repartition(target_num_rows_per_block=rows), TASK_CPUS)

    return Stage("cut_blocks", needs=(), adds=(), custom=cut)


def predictor_stage(plan: "Plan", predictor=None) -> Stage:
    """`concurrency` replicas of `predictor` (by default the plan's), each running `batches_in_flight`
    batches at once, with the job's features' parts."""
    cfg, predictor = plan.cfg, predictor or plan.predictor
    inputs = tuple(name for part in plan.parts for name in part.engine_inputs)
    columns = {**getattr(predictor, "COLUMNS", CORE_COLUMNS), **plan.columns}
    return Stage("predict" if plan.task == "generate" else plan.task,
                 needs=(col.ID, col.PROMPT_TOKEN_IDS, col.ERROR) + inputs, adds=tuple(columns),
                 drops=(col.PROMPT_TOKEN_IDS,) + inputs, map_batches=dict(
                     fn=predictor,
                     fn_constructor_kwargs={"model": cfg.model, "engine_kwargs": plan.engine_kwargs,
                                            "sampling": plan.sampling, "parts": plan.parts,
                                            "max_engine_restarts": cfg.max_engine_restarts,
                                            "stall_timeout_s": cfg.stall_timeout_s},
                     compute=actor_pool(cfg.concurrency, cfg.batches_in_flight),
                     batch_size=cfg.batch_size, batch_format="pyarrow", **plan.replica_resources))


def actor_pool(least: int, batches_in_flight: int, most: int | None = None,
               tasks_per_replica: int | None = None) -> ray.data.ActorPoolStrategy:
    """Ray Data's pool of `least` replicas (up to `most`: it autoscales), each running `batches_in_flight`
    batches at once and sent `tasks_per_replica` (by default as many; more are queued behind them)."""
    return ray.data.ActorPoolStrategy(min_size=least, max_size=most or least,
                                      max_tasks_in_flight_per_actor=tasks_per_replica or batches_in_flight,
                                      max_concurrent_calls_per_actor=batches_in_flight)


def pipeline_stages(plan: "Plan", done: "DoneIndex | None" = None, until: str | None = None,
                    formatter=format_prompts, predictor=None) -> list[Stage]:
    """The stages after the read, the features' among them; `until`: the last one. `formatter`, `predictor`:
    other classes for those stages (stand-ins, a benchmark's)."""
    stages = [drop_done_stage(plan, done)] if plan.cfg.limit and done is not None else []
    stages += [formatter_stage(plan, formatter)]
    if plan.row_order == "grouped":  # rows that share a prompt prefix next to each other (util/grouping.py)
        stages.append(Stage("group", needs=(col.PROMPT_TOKEN_IDS,), adds=(), custom=functools.partial(
            group_rows, size=block_size(plan.engine_kwargs), namespace_column=plan.group_within)))
    stages += [cut_blocks_stage(plan.cfg.batch_size), predictor_stage(plan, predictor)]
    for part in plan.parts:
        stages = part.stages(plan, stages)
    if until is not None:
        stages = stages[:[stage.name for stage in stages].index(until) + 1]
    check_contracts(stages, read_columns(plan))
    return stages


def order_rows(plan: "Plan", done: "DoneIndex | None" = None, source: str | list | None = None) -> None:
    """Sets plan.row_order, "grouped" or "input", and the share of the sample's prompt tokens that grouping
    reuses. For --row-order auto the first SAMPLE_ROWS rows left to run are formatted here, in the driver, as
    the job's format stage formats them but with the plan's tokenizer (loaded already, and without torch), and
    grouped order is chosen where they share enough (util/grouping.py)."""
    from util.plan import plan_tokenizer

    cfg = plan.cfg
    plan.row_order = "grouped" if cfg.row_order == "grouped" else "input"  # until the sample says otherwise
    # Other tasks' engines keep no prefix cache; a row's images are not in its key, and the sample would fetch them;
    # a plan made without the model's files (stand-in stages) has no tokenizer to format a sample with.
    if cfg.row_order == "input" or plan.task != "generate" or any(part.engine_inputs for part in plan.parts) or \
            not plan.model_files:
        return
    *before, format_stage = pipeline_stages(plan, done, until="format")
    sample = read_input(plan, done, source)
    for stage in before:  # with --limit, the rows already done are dropped after it
        sample = stage.apply(sample)
    try:
        rows = next(iter(sample.limit(SAMPLE_ROWS).iter_batches(batch_size=SAMPLE_ROWS, batch_format="pyarrow")), None)
    except Exception as error:
        if isinstance(original(error), (InputError, OSError)):
            return  # the input's pass refuses it, naming the file and line (util/scan.py)
        raise
    if rows is None:
        return  # no row left to run
    # The job's formatter (a feature's, where one swaps it in), not cached: this tokenizer is the driver's.
    formatter = cached_formatter.__wrapped__(**{**format_stage.map_batches["fn_kwargs"],
                                                "loaded_tokenizer": plan_tokenizer(tokenizer_args(cfg.model, plan.engine_kwargs))})
    token_ids = formatter(rows)[col.PROMPT_TOKEN_IDS].to_pylist()
    plan.row_order, plan.sample_shared_share = choose_row_order(cfg.row_order, token_ids, block_size(plan.engine_kwargs))


def read_columns(plan: "Plan") -> tuple:
    """What every stage can count on from the reader: the id, the prompt's column, and a feature's own."""
    return (col.ID, plan.cfg.text_column, *plan.input_columns)


def read_input(plan: "Plan", done: "DoneIndex | None" = None, source: str | list | None = None) -> ray.data.Dataset:
    """The job's input (or `source`: a path or a list of items), lazy, without the rows an earlier run wrote."""
    cfg = plan.cfg
    return read_prompts(source if source is not None else cfg.input_path or SAMPLE_PROMPTS, cfg.input_format,
                        cfg.text_column, cfg.id_column, cfg.limit, required=plan.input_columns,
                        row_filter=done.drop_done if done is not None and not cfg.limit else None)


def build_pipeline(plan: "Plan", done: "DoneIndex | None" = None, source: str | list | None = None,
                   stages: list[Stage] | None = None) -> ray.data.Dataset:
    """The lazy dataset of output rows (or what `stages` make of the input), its contracts checked."""
    stages = pipeline_stages(plan, done) if stages is None else stages
    check_contracts(stages, read_columns(plan))
    ds = read_input(plan, done, source)
    for stage in stages:
        ds = stage.apply(ds)
    return ds
