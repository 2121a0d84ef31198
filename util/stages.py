"""The pipeline's two model stages, and how Ray Data runs them: prompt formatting on CPU, then vLLM.

    from util.stages import formatter_stage, predictor_stage
    ds = ds.map_batches(**formatter_stage(cfg))             # adds prompt, prompt_token_ids, ...
    ds = ds.map_batches(**predictor_stage(cfg, choice))     # adds generated_text, finish_reason, ...

Engine arguments, lowest precedence first: vLLM's defaults, the per-model table (util/models.py),
the replica's parallelism, CPU settings when no GPU is present, then the user's --engine-arg keys.
"""

import dataclasses

import ray

from util.accelerator import AcceleratorChoice
from util.config import Config
from util.models import engine_defaults
from util.predictor import LLMPredictor
from util.prompt_format import PromptFormatter

# On CPU the KV cache lives in RAM: keep it small enough for a laptop or a CI runner.
CPU_ENV_VARS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
CPU_ENGINE_KWARGS = {"max_model_len": 2048, "max_num_seqs": 32, "enforce_eager": True,
                     "gpu_memory_utilization": 0.3}  # on CPU: the share of RAM vLLM may take


def valid_engine_keys() -> set[str]:
    from vllm import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def engine_kwargs(cfg: Config, use_gpu: bool = True) -> dict:
    unknown = sorted(set(cfg.engine_arg) - valid_engine_keys())
    if unknown:
        raise ValueError(f"unknown --engine-arg key(s): {', '.join(unknown)}; see vLLM's EngineArgs")
    kwargs = engine_defaults(cfg.model)
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.tensor_parallel_size > 1:
        # The replica's actor already holds all of its GPUs, so vLLM's shards run as local processes
        # beside it rather than as Ray tasks that would wait for GPUs the actor is holding.
        kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size, distributed_executor_backend="mp")
    if not use_gpu:
        kwargs.update(CPU_ENGINE_KWARGS)
    kwargs["seed"] = cfg.seed
    return {**kwargs, **cfg.engine_arg}


def formatter_stage(cfg: Config, use_gpu: bool = True) -> dict:
    """`ds.map_batches` arguments for the prompt formatter: a small CPU actor that loads the tokenizer once."""
    return {
        "fn": PromptFormatter,
        "fn_constructor_kwargs": {"model": cfg.model, "text_column": cfg.text_column,
                                  "system_prompt": cfg.system_prompt, "prompt_format": cfg.prompt_format,
                                  "revision": cfg.revision,
                                  "max_model_len": engine_kwargs(cfg, use_gpu).get("max_model_len")},
        "compute": ray.data.ActorPoolStrategy(size=1),
        "batch_size": 256,
        "batch_format": "pyarrow",
        "num_cpus": 1 if use_gpu else 0.5,  # leave CPU for reading and writing on small machines
    }


def predictor_stage(cfg: Config, choice: AcceleratorChoice, predictor=LLMPredictor) -> dict:
    """`ds.map_batches` arguments for the vLLM stage: `concurrency` replicas, each on its own GPUs."""
    kwargs = engine_kwargs(cfg, choice.use_gpu)
    gpus = max(cfg.gpus_per_replica, cfg.tensor_parallel_size)
    return {
        "fn": predictor,
        "fn_constructor_kwargs": {"model": cfg.model, "engine_kwargs": kwargs, "sampling": cfg.sampling(),
                                  "model_name": cfg.model},
        # Several batches in flight per replica keep the engine's queue full between batches: Ray
        # sends up to `batches_in_flight` tasks to each actor, and the async actor runs them together.
        "compute": ray.data.ActorPoolStrategy(size=cfg.concurrency,
                                              max_tasks_in_flight_per_actor=cfg.batches_in_flight),
        "max_concurrency": cfg.batches_in_flight,
        "batch_size": cfg.batch_size,
        "batch_format": "pyarrow",
        **choice.ray_remote_args(gpus),
        **({} if choice.use_gpu else {"runtime_env": {"env_vars": CPU_ENV_VARS}}),
    }
