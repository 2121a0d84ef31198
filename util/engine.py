"""vLLM's engine arguments for a replica, and where Ray puts the replica.

    from util.engine import engine_kwargs, replica_placement
    kwargs = engine_kwargs(cfg, use_gpu=True)                 # {"max_model_len": 16832, "seed": 0, ...}
    ds.map_batches(..., **replica_placement(cfg, choice, kwargs))    # num_gpus=1, or a placement group
    with engine_process_forked(kwargs):                       # in the replica, around the engine's start
        engine = AsyncLLM.from_engine_args(...)

Engine arguments, lowest precedence first: vLLM's defaults, the per-model table (util/models.py),
the replica's parallelism, CPU settings when no GPU is present, LoRA's (util/lora.py, resolved by the
plan), then the user's --engine-arg keys.
"""

import contextlib
import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from util.models import engine_defaults

if TYPE_CHECKING:
    from util.accelerator import AcceleratorChoice
    from util.config import Config

# Engine defaults per GPU type, where measured (BENCHMARKS.md): on a 141 GB H200, 2,048 sequences at
# once gave 7% more output tokens/s than vLLM's 1,024 for a 7B model. Other GPUs keep vLLM's defaults.
GPU_ENGINE_DEFAULTS = {"H200": {"max_num_seqs": 2048}}
VLLM_MAX_NUM_SEQS = 1024  # vLLM's offline default on a large GPU, when the engine arguments name none

# On CPU the KV cache lives in RAM: keep it small enough for a laptop or a CI runner.
CPU_ENV_VARS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
CPU_ENGINE_KWARGS = {"max_model_len": 2048, "max_num_seqs": 32, "enforce_eager": True,
                     "gpu_memory_utilization": 0.3}  # on CPU: the share of RAM vLLM may take


def valid_engine_keys() -> set[str]:
    from vllm import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def engine_kwargs(cfg: "Config", use_gpu: bool = True, images: bool = False, lora: dict | None = None) -> dict:
    """vLLM engine arguments for one replica; util/plan.py resolves them once per run. A job whose rows
    carry images (`images`) tells vLLM how many one prompt may hold, which it sizes its profiling by.
    `lora`: the LoRA arguments util.lora.plan_lora derived (enable_lora, max_loras, max_lora_rank), if any."""
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
    if images:
        kwargs["limit_mm_per_prompt"] = {"image": cfg.max_images_per_row}
    kwargs["seed"] = cfg.seed
    return {**kwargs, **(lora or {}), **cfg.engine_arg}


def with_gpu_defaults(engine: dict, gpu_type: str | None) -> dict:
    """`engine` over the defaults of the replicas' GPU type (a Ray accelerator type such as "H200")."""
    return {**GPU_ENGINE_DEFAULTS.get(gpu_type, {}), **engine}


def batches_in_flight(cfg: "Config", engine: dict) -> int:
    """--batches-in-flight, else enough batches for twice the engine's max_num_seqs (at least 16): the
    engine's queue stays full while finished batches leave and new ones arrive."""
    if cfg.batches_in_flight is not None:
        return cfg.batches_in_flight
    return max(16, math.ceil(2 * engine.get("max_num_seqs", VLLM_MAX_NUM_SEQS) / cfg.batch_size))


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


@contextlib.contextmanager
def engine_process_forked(engine: dict):
    """Around the start of a one-GPU replica's engine: vLLM forks its engine process, as it does from a
    plain script, instead of spawning it. From a Ray actor vLLM always spawns
    (vllm/utils/system_utils.py, _maybe_force_spawn), and the new interpreter imports torch and vLLM
    again: 21-23 s of every replica's start on an H200, against 1-2 s for the fork (BENCHMARKS.md).
    vLLM spawns there so that an engine's Ray workers (several GPUs, the Ray executor) find the cluster;
    a one-GPU engine runs in one process and never talks to Ray, so it is told, for the start alone, that
    this is no Ray actor. Its other reasons to spawn still hold (CUDA already initialized in this process,
    VLLM_WORKER_MULTIPROC_METHOD=spawn set by the user), and on CPU vLLM always spawns."""
    from vllm.utils import system_utils

    shards = engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1)
    if shards > 1 or engine.get("distributed_executor_backend") is not None:
        yield
        return
    in_ray_actor = system_utils.is_in_ray_actor
    system_utils.is_in_ray_actor = lambda: False
    try:
        yield
    finally:
        system_utils.is_in_ray_actor = in_ray_actor
