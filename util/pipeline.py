"""The pipeline, chained in one place: read -> drop rows already done -> format -> cut blocks -> predict.

    from util.pipeline import build_pipeline, pipeline_stages
    ds = build_pipeline(plan, done)                             # lazy; util.output.write_results runs it
    ds = build_pipeline(plan, done, stages=pipeline_stages(plan, done, until="format"))   # --preflight
    ds = build_pipeline(plan, source=rows)                      # in-memory rows instead of the input path
    ds = build_pipeline(plan, stages=pipeline_stages(plan, predictor=StandIn))   # another predictor class
    ds = build_pipeline(plan, stages=pipeline_stages(plan, pool=pool))  # engines kept warm (replica_pool)

The last stage follows the plan's task: `predict` (LLMPredictor) for generate, `embed`
(EmbeddingPredictor) for embed.

main.py, --preflight (util/preflight.py), the benchmarks and the notebook all build it here.

Each stage declares the columns it needs and the columns it adds (and drops). `check_contracts` walks
the chain when the pipeline is built, before anything runs: a stage put before the one that adds its
column fails then, with a message naming the stage and the column, not halfway through a run.

Blocks: the reader yields blocks of bounded size, the formatter (Ray tasks, as many as there are free
CPUs) works in the predictor's batches, and a streaming repartition, which Ray fuses into the formatting
task so that it takes no CPU of its own, cuts them to `batch_size` rows. Every replica then takes work a
batch at a time, so one input file spreads over all of them, and a replica holds at most
`batch_size x batches_in_flight` rows.
"""

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import ray

from util import columns as col
from util.predictor import EmbeddingPredictor, LLMPredictor
from util.prompt_format import format_prompts
from util.reading import SAMPLE_PROMPTS, read_prompts
from util.resources import TASK_CPUS

if TYPE_CHECKING:
    from util.plan import Plan
    from util.resume import DoneIndex

PREDICTOR_ADDS = (col.GENERATED_TEXT, col.FINISH_REASON, col.NUM_GENERATED_TOKENS, col.MODEL,
                  col.STRUCTURED_OUTPUT_ERROR, col.COMPLETIONS, col.LOGPROBS, col.PROMPT_LOGPROBS,
                  col.REASONING_CONTENT)
EMBEDDING_ADDS = (col.EMBEDDING, col.MODEL)  # --task embed's predictor (EmbeddingPredictor)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: its contract (columns it needs, adds and drops) and how it runs."""
    name: str
    needs: tuple[str, ...]
    adds: tuple[str, ...]
    apply: Callable[[ray.data.Dataset], ray.data.Dataset] = field(repr=False)
    drops: tuple[str, ...] = ()


def map_stage(name: str, needs: tuple, adds: tuple, drops: tuple = (), **map_batches) -> Stage:
    """A stage that runs as `ds.map_batches(**map_batches)`."""
    return Stage(name, needs, adds, lambda ds: ds.map_batches(**map_batches), drops)


def check_contracts(stages: list[Stage], columns: tuple[str, ...]) -> None:
    """ValueError naming the first stage whose needed column no stage before it adds. `columns`: what
    the reader gives (the id and the prompt column; the input's other columns are not known yet)."""
    have = list(columns)
    for stage in stages:
        for needed in stage.needs:
            if needed not in have:
                raise ValueError(f"stage '{stage.name}' needs column '{needed}', which no stage before it "
                                 f"adds (it gets: {', '.join(have)})")
        have = [c for c in have if c not in stage.drops] + [c for c in stage.adds if c not in have]


def drop_done_stage(plan: "Plan", done: "DoneIndex") -> Stage:
    """Rows already written, dropped after --limit so that a rerun takes the same first rows. (Without
    --limit the read tasks drop them as they read.) In the formatter's batches, so Ray fuses the two."""
    return map_stage("drop_done", needs=(col.ID,), adds=(), fn=done.drop_done, batch_size=plan.cfg.batch_size,
                     batch_format="pyarrow", num_cpus=TASK_CPUS)


def image_options(plan: "Plan") -> dict:
    """The formatter's image settings, for a job whose rows carry images: it fetches and checks them on
    CPU (util/images.py), at most as many per row as the engine takes (--engine-arg may change that)."""
    if not plan.images:
        return {}
    cfg = plan.cfg
    most = (plan.engine_kwargs.get("limit_mm_per_prompt") or {}).get("image", cfg.max_images_per_row)
    return {"images": True, "image_column": cfg.image_column, "max_images_per_row": most,
            "max_image_bytes": cfg.max_image_bytes}


def formatter_stage(plan: "Plan", formatter=format_prompts) -> Stage:
    """The prompt formatter: tasks of the predictor's batch size, each worker loading the tokenizer once,
    as many at a time as there are free CPUs (util/prompt_format.py). With images it fetches and checks
    them too, and adds their encoded bytes (prompt_images) for the replica."""
    cfg = plan.cfg
    return map_stage(
        "format", needs=(cfg.text_column,) + ((cfg.image_column,) if cfg.image_column else ()),
        adds=(col.PROMPT, col.PROMPT_TOKEN_IDS, col.NUM_INPUT_TOKENS, col.ERROR)
        + ((col.PROMPT_IMAGES,) if plan.images else ()),
        fn=formatter,
        fn_kwargs={"model": cfg.model, "text_column": cfg.text_column, "system_prompt": cfg.system_prompt,
                   "prompt_format": plan.prompt_format, "revision": cfg.revision,
                   "max_model_len": plan.max_model_len, **image_options(plan)},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=TASK_CPUS)  # as the read's: Ray fuses read, format and the block cut into one task


def cut_blocks_stage(rows: int) -> Stage:
    """Blocks of about `rows` rows: Ray Data's streaming repartition. Its tasks ask for a whole CPU, which
    `repartition` takes no argument to change; a repartition task waiting for a whole CPU beside the
    replicas and paused read tasks would wait forever on a small machine. With the data tasks' share it
    also fuses into the formatting task before it."""
    def cut(ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = ds.repartition(target_num_rows_per_block=rows)
        ds._logical_plan.dag.ray_remote_args["num_cpus"] = TASK_CPUS  # Ray 2.60: the op just added
        return ds

    return Stage("cut_blocks", needs=(), adds=(), apply=cut)


def tasks_in_flight(cfg) -> int:
    """Batches Ray Data sends each replica: `batches_in_flight`, which it runs together; an autoscaling
    pool's replicas get more, queued behind those. Ray Data starts another replica only while the pool's
    batches exceed its running slots by the DataContext's
    autoscaling_config.actor_pool_util_upscaling_threshold (1.75x by default): with no batch queued, it
    would never grow past MIN."""
    if cfg.max_concurrency is None:
        return cfg.batches_in_flight
    threshold = ray.data.DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
    return max(cfg.batches_in_flight, math.ceil(threshold * cfg.batches_in_flight))


def predictor_adapters(plan: "Plan") -> dict:
    """The predictor's `adapters` argument: the --lora adapters, only when there are some, so that a
    predictor class that takes none (a stand-in, an embedding engine) is built as before."""
    return {"adapters": plan.adapters} if plan.adapters else {}


def predictor_stage_kwargs(plan: "Plan", predictor=LLMPredictor, pool=None) -> dict:
    """`ds.map_batches` arguments for the vLLM stage: `concurrency` replicas, each on its own GPUs; with
    --concurrency MIN-MAX, Ray Data's autoscaling pool. Its work starts with the first replica ready
    (DataContext.wait_for_min_actors_s is -1 by default: no waiting for MIN), and it starts another
    replica, up to MAX, while every replica is busy; one that waits for a GPU joins when a node brings it.
    Given a `pool` (util/replica_pool.py): forwarders to its replicas, which are running already and stay."""
    if pool is not None:
        return pool.map_batches_kwargs()
    cfg = plan.cfg
    return {
        "fn": predictor,
        "fn_constructor_kwargs": {"model": cfg.model, "engine_kwargs": plan.engine_kwargs,
                                  "sampling": plan.sampling, **predictor_adapters(plan)},
        # Several batches in flight per replica keep the engine's queue full between batches: Ray
        # sends each actor up to tasks_in_flight(cfg) tasks, and the async actor runs
        # `batches_in_flight` of them together.
        "compute": ray.data.ActorPoolStrategy(min_size=cfg.concurrency, max_size=cfg.most_replicas,
                                              max_tasks_in_flight_per_actor=tasks_in_flight(cfg),
                                              max_concurrent_calls_per_actor=cfg.batches_in_flight),
        "batch_size": cfg.batch_size,
        "batch_format": "pyarrow",
        **plan.replica_resources,
    }


def predictor_stage(plan: "Plan", predictor=LLMPredictor, pool=None) -> Stage:
    """The vLLM stage: Ray Data's own pool of replicas for this run, or, given a `pool`
    (util/replica_pool.py), forwarders to replicas that are already running and stay."""
    images = (col.PROMPT_IMAGES,) if plan.images else ()  # a vision job's images, decoded in the replica
    return map_stage("predict", needs=(col.ID, col.PROMPT_TOKEN_IDS, col.ERROR) + images, adds=PREDICTOR_ADDS,
                     drops=(col.PROMPT_TOKEN_IDS,) + images, **predictor_stage_kwargs(plan, predictor, pool))


def embedding_stage(plan: "Plan", predictor=EmbeddingPredictor, pool=None) -> Stage:
    """--task embed's vLLM stage: the same replicas, placement and batches, as pooling engines; or, given
    a `pool` of them, forwarders to it."""
    return map_stage("embed", needs=(col.ID, col.PROMPT_TOKEN_IDS, col.ERROR), adds=EMBEDDING_ADDS,
                     drops=(col.PROMPT_TOKEN_IDS,), **predictor_stage_kwargs(plan, predictor, pool))


def task_predictor(plan: "Plan") -> type:
    """The replicas' predictor for the plan's task."""
    return EmbeddingPredictor if plan.task == "embed" else LLMPredictor


def pipeline_stages(plan: "Plan", done: "DoneIndex | None" = None, until: str = "predict",
                    formatter=format_prompts, predictor=None, pool=None) -> list[Stage]:
    """The stages after the read, in order; until="format" stops after the formatter (--preflight).
    `predictor`: the replicas' class, else the task's (task_predictor); the task decides the last stage's
    contract (predict or embed)."""
    stages = [drop_done_stage(plan, done)] if plan.cfg.limit and done is not None else []
    stages.append(formatter_stage(plan, formatter))
    if until == "format":
        return stages
    predictor = predictor or task_predictor(plan)
    last = (embedding_stage(plan, predictor, pool) if plan.task == "embed"
            else predictor_stage(plan, predictor, pool))
    return stages + [cut_blocks_stage(plan.cfg.batch_size), last]


def build_pipeline(plan: "Plan", done: "DoneIndex | None" = None, source: str | list | None = None,
                   stages: list[Stage] | None = None) -> ray.data.Dataset:
    """The lazy dataset of output rows (or what `stages` make of the input), its contracts checked."""
    cfg = plan.cfg
    stages = pipeline_stages(plan, done) if stages is None else stages
    check_contracts(stages, columns=(col.ID, cfg.text_column) + ((cfg.image_column,) if cfg.image_column else ()))
    # Without --limit, rows already written are dropped as they are read, in the read tasks.
    row_filter = done.drop_done if done is not None and not cfg.limit else None
    ds = read_prompts(source if source is not None else cfg.input_path or SAMPLE_PROMPTS, cfg.input_format,
                      cfg.text_column, cfg.id_column, cfg.limit, row_filter=row_filter, image_column=cfg.image_column)
    for stage in stages:
        ds = stage.apply(ds)
    return ds
