"""The pipeline, chained in one place: read -> drop rows already done -> format -> predict.

    from util.pipeline import build_pipeline
    ds = build_pipeline(cfg, choice, done)                      # lazy; util.output.write_results runs it
    ds = build_pipeline(cfg, choice, done, until="format")      # stop after the formatter (--preflight)
    ds = build_pipeline(cfg, choice, source=rows)               # in-memory rows instead of cfg.input_path
    ds = build_pipeline(cfg, choice, predictor=StandIn)         # another class in a stage (bench/scale.py)

main.py, --preflight (util/preflight.py), the benchmark (bench/run.py) and the notebook all build it here.

Blocks: the reader yields blocks of bounded size, the formatter (Ray tasks, as many as there are free
CPUs) works in the predictor's batches, and a streaming repartition, which Ray fuses into the
formatting task so that it takes no CPU of its own, cuts them to `batch_size` rows. Every replica then takes work a batch at a time, so one input file spreads
over all of them, and a replica holds at most `batch_size x batches_in_flight` rows.
"""

import ray

from util.accelerator import AcceleratorChoice
from util.config import Config
from util.predictor import LLMPredictor
from util.prompt_format import format_prompts
from util.reading import SAMPLE_PROMPTS, read_prompts
from util.resume import DoneIndex, drop_done_rows
from util.stages import TASK_CPUS, check_cluster_fits, formatter_stage, predictor_stage


def build_pipeline(cfg: Config, choice: AcceleratorChoice, done: DoneIndex | None = None,
                   source: str | list | None = None, until: str = "predict", predictor=LLMPredictor,
                   formatter=format_prompts, cluster: dict | None = None) -> ray.data.Dataset:
    """The lazy dataset of output rows (or, with until="format", of formatted rows)."""
    check_cluster_fits(cfg, choice.use_gpu, ray.cluster_resources() if cluster is None else cluster)
    # Rows already written are dropped as they are read; with --limit, after it, so that a rerun takes
    # the same first rows. The filter works in the formatter's batches, so Ray fuses the three.
    ds = read_prompts(source if source is not None else cfg.input_path or SAMPLE_PROMPTS,
                      cfg.input_format, cfg.text_column, cfg.id_column, cfg.limit,
                      done=None if cfg.limit else done)
    if cfg.limit and done is not None:
        ds = ds.map_batches(drop_done_rows, fn_kwargs={"index_ref": [done.ref]}, batch_size=cfg.batch_size,
                            batch_format="pyarrow", num_cpus=TASK_CPUS)
    ds = ds.map_batches(**formatter_stage(cfg, choice.use_gpu, formatter))
    if until == "format":
        return ds
    ds = cut_blocks(ds, cfg.batch_size)
    return ds.map_batches(**predictor_stage(cfg, choice, predictor=predictor))


def cut_blocks(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """`ds` in blocks of about `rows` rows: Ray Data's streaming repartition. Its tasks ask for a whole
    CPU, which `repartition` takes no argument to change; a repartition task waiting for a whole CPU
    beside the replicas and paused read tasks would wait forever on a small machine. With the data
    tasks' share it also fuses into the formatting task before it."""
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = TASK_CPUS  # Ray 2.60: the op just added
    return ds
