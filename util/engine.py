"""vLLM's engine arguments for a replica, and where Ray puts the replica.

    from util.engine import engine_kwargs, replica_placement
    kwargs = engine_kwargs(cfg, use_gpu=True)                 # {"max_model_len": 16832, "seed": 0, ...}
    ds.map_batches(..., **replica_placement(cfg, choice, kwargs))    # num_gpus=1, or a placement group

Engine arguments, lowest precedence first: vLLM's defaults, the per-model table (util/models.py),
the replica's parallelism, CPU settings when no GPU is present, LoRA's (util/lora.py, resolved by the
plan), then the user's --engine-arg keys.
"""

import dataclasses
import functools
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from util.models import engine_defaults

if TYPE_CHECKING:
    from util.accelerator import AcceleratorChoice
    from util.config import Config

# On CPU the KV cache lives in RAM: keep it small enough for a laptop or a CI runner.
CPU_ENV_VARS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
CPU_ENGINE_KWARGS = {"max_model_len": 2048, "max_num_seqs": 32, "enforce_eager": True,
                     "gpu_memory_utilization": 0.3}  # on CPU: the share of RAM vLLM may take


def valid_engine_keys() -> set[str]:
    from vllm import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def engine_kwargs(cfg: "Config", use_gpu: bool = True, lora: dict | None = None) -> dict:
    """vLLM engine arguments for one replica; util/plan.py resolves them once per run. `lora`: the
    LoRA arguments util.lora.plan_lora derived (enable_lora, max_loras, max_lora_rank), if any."""
    unknown = sorted(set(cfg.engine_arg) - valid_engine_keys())
    if unknown:
        raise ValueError(f"unknown --engine-arg key(s): {', '.join(unknown)}; see vLLM's EngineArgs")
    kwargs = engine_defaults(cfg.model)
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if replica_gpus(cfg) > 1:
        # vLLM runs one Ray worker per GPU, inside the replica's placement group (see replica_placement).
        kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size,
                      pipeline_parallel_size=cfg.pipeline_parallel_size, distributed_executor_backend="ray")
    if not use_gpu:
        kwargs.update(CPU_ENGINE_KWARGS)
    kwargs["seed"] = cfg.seed
    return {**kwargs, **(lora or {}), **cfg.engine_arg}


def replica_gpus(cfg: "Config") -> int:
    """GPUs a replica's shards span: tensor x pipeline parallel."""
    return cfg.tensor_parallel_size * cfg.pipeline_parallel_size


def gpus_per_replica(cfg: "Config") -> float:
    """GPUs one replica holds, as replica_placement reserves them: --gpus-per-replica (a share of one GPU
    is allowed) for a one-GPU replica; at least a whole GPU per shard for tensor x pipeline parallel."""
    shards = replica_gpus(cfg)
    return cfg.gpus_per_replica if shards == 1 else max(cfg.gpus_per_replica, shards)


def _placement_group(bundles: list[dict], strategy: str) -> dict:
    pg = ray.util.placement_group(bundles, strategy=strategy)
    # Capturing child tasks puts the workers vLLM starts into this replica's bundles.
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}


def replica_placement(cfg: "Config", choice: "AcceleratorChoice", engine: dict) -> dict:
    """Where Ray puts one replica. A replica of one GPU (or a share of one) reserves it as an actor.
    A replica of several (tensor x pipeline parallel) gets a placement group of one GPU bundle each,
    created when Ray Data starts the replica: tensor-parallel shards on one node (STRICT_PACK, they
    talk every layer), pipeline stages across nodes if need be (PACK). The actor itself holds no GPU;
    vLLM's Ray workers take the bundles. `--engine-arg distributed_executor_backend=mp` instead keeps
    the shards as local processes of an actor that holds all the GPUs of one node."""
    gpus = replica_gpus(cfg)
    backend = engine.get("distributed_executor_backend")
    if not choice.use_gpu or gpus == 1 or backend != "ray":
        return choice.ray_remote_args(gpus_per_replica(cfg))
    bundle = {"GPU": 1, "CPU": 1}
    if choice.accelerator_type:
        bundle[f"accelerator_type:{choice.accelerator_type}"] = 0.001
    strategy = "STRICT_PACK" if cfg.pipeline_parallel_size == 1 else "PACK"
    return {"num_gpus": 0, "ray_remote_args_fn": functools.partial(_placement_group, [bundle] * gpus, strategy)}
