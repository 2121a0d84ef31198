"""The pipeline, chained in one place: read -> drop rows already done -> format -> predict.

    from util.pipeline import build_pipeline
    ds = build_pipeline(cfg, choice, done)                      # lazy; util.output.write_results runs it
    ds = build_pipeline(cfg, choice, done, until="format")      # stop after the formatter (--preflight)
    ds = build_pipeline(cfg, choice, source=rows)               # in-memory rows instead of cfg.input_path

main.py, --preflight (util/preflight.py), the benchmark (bench/run.py) and the notebook all build it here.

Blocks: the reader yields blocks of bounded size, the formatter works in the predictor's batches, and
a streaming repartition (fused into the formatter's actors, so it takes no CPU of its own) cuts them
to `batch_size` rows. Every replica then takes work a batch at a time, so one input file spreads
over all of them, and a replica holds at most `batch_size x batches_in_flight` rows.
"""

import ray

from util.accelerator import AcceleratorChoice
from util.config import Config
from util.predictor import LLMPredictor
from util.reading import SAMPLE_PROMPTS, read_prompts
from util.resume import DoneIndex, drop_done
from util.stages import formatter_stage, predictor_stage, size_formatters


def build_pipeline(cfg: Config, choice: AcceleratorChoice, done: DoneIndex | None = None,
                   source: str | list | None = None, until: str = "predict", predictor=LLMPredictor,
                   cluster: dict | None = None) -> ray.data.Dataset:
    """The lazy dataset of output rows (or, with until="format", of formatted rows)."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    max_formatters = size_formatters(cfg, choice.use_gpu, cluster)  # InputError if the cluster is too small
    ds = read_prompts(source if source is not None else cfg.input_path or SAMPLE_PROMPTS,
                      cfg.input_format, cfg.text_column, cfg.id_column, cfg.limit)
    ds = drop_done(ds, done)
    ds = ds.map_batches(**formatter_stage(cfg, choice.use_gpu, max_formatters))
    if until == "format":
        return ds
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    return ds.map_batches(**predictor_stage(cfg, choice, predictor=predictor))
