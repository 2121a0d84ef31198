"""vLLM's engine arguments for a replica, and where Ray puts the replica: which GPU, how many.

    choice = choose_accelerator("auto")      # after ray.init(): "auto" is an A10G-class (24 GB) GPU, A10G on
    kwargs = engine_kwargs(cfg, use_gpu=choice.use_gpu)   # AWS, L4 on GCP (util/cloud.py asks the cloud when
    ds.map_batches(..., **choice.ray_remote_args(gpus_per_replica=1))   # the cluster advertises none)

Engine arguments, lowest precedence first: vLLM's defaults, the per-model table (util/models.py), CPU
settings when no GPU is present, the job's features' (a replica's parallelism: util/features/parallel.py), the
user's --engine-arg.
"""

import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import ray

from util.models import engine_defaults
from util.resources import CPU_REPLICA_CPUS
from util.errors import InputError

if TYPE_CHECKING:
    from util.config import Config

# Engine defaults per GPU type, where measured (BENCHMARKS.md): on a 141 GB H200, 2,048 sequences at once
# gave 7% more output tokens/s than vLLM's 1,024 for a 7B model. Other GPUs keep vLLM's defaults.
GPU_ENGINE_DEFAULTS = {"H200": {"max_num_seqs": 2048}}
VLLM_MAX_NUM_SEQS = 1024  # vLLM's offline default on a large GPU, when the engine arguments name none
REPLICA_ENV_VARS = {"RAY_kill_child_processes_on_worker_exit": "false"}  # it ends them: util/replica/host.py
CPU_ENV_VARS = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),  # GiB of RAM, not a GPU's
                "VLLM_USE_V2_MODEL_RUNNER": "0"}  # V2 needs Triton's CPU backend: vLLM falls back to V1, and warns
CPU_ENGINE_KWARGS = {"max_model_len": 2048, "max_num_seqs": 32, "enforce_eager": True,
                     "gpu_memory_utilization": 0.3}  # on CPU: the share of RAM vLLM may take


def advertised_accelerator_types(cluster_resources: dict) -> list[str]:
    """The accelerator types Ray nodes advertise, e.g. ["A10G"] from {"accelerator_type:A10G": 1.0}."""
    return sorted(k.split(":", 1)[1] for k in cluster_resources if k.startswith("accelerator_type:"))


@dataclass(frozen=True)
class AcceleratorChoice:
    use_gpu: bool
    accelerator_type: str | None  # None: no constraint, any GPU node will do
    num_gpus_in_cluster: float

    def ray_remote_args(self, gpus_per_replica: float) -> dict:
        """Resource kwargs for Ray Data `map_batches` (one replica = one vLLM engine)."""
        if not self.use_gpu:  # a share of a CPU: vLLM runs its own threads, and the data tasks need the rest
            return {"num_cpus": CPU_REPLICA_CPUS}
        return {"num_gpus": gpus_per_replica, **({"accelerator_type": self.accelerator_type} if self.accelerator_type else {})}


def choose_accelerator(requested_type: str | None = None, cluster_resources: dict | None = None,
                       timeout_s: float = 1.0) -> AcceleratorChoice:
    """GPU or CPU, and which accelerator_type to require: "auto" (A10G-class), "any", or a Ray type name.
    ValueError for a type the cluster does not advertise (Ray would queue the replicas forever)."""
    cluster_resources = ray.cluster_resources() if cluster_resources is None else cluster_resources
    num_gpus = float(cluster_resources.get("GPU", 0))
    if num_gpus <= 0:
        return AcceleratorChoice(use_gpu=False, accelerator_type=None, num_gpus_in_cluster=0.0)
    if requested_type in (None, "auto"):
        from util.cloud import get_a10g_or_equivalent_accelerator_type

        accelerator_type = get_a10g_or_equivalent_accelerator_type(cluster_resources, timeout_s)
    elif requested_type == "any":
        accelerator_type = None
    else:
        advertised = advertised_accelerator_types(cluster_resources)
        if advertised and requested_type not in advertised:
            raise InputError(f"Accelerator type {requested_type!r} was requested, but this cluster advertises only "
                             f"{', '.join(advertised)}. Pick one of those, 'auto' or 'any'.")
        accelerator_type = requested_type
    return AcceleratorChoice(use_gpu=True, accelerator_type=accelerator_type, num_gpus_in_cluster=num_gpus)


def engine_kwargs(cfg: "Config", use_gpu: bool = True, features: dict | None = None) -> dict:
    """vLLM engine arguments for one replica. `features`: those the job's features need (their Parts')."""
    if cfg.engine_arg:  # vLLM is imported only to check these: the driver has no other use for it (8 s on 2 CPUs)
        from vllm import AsyncEngineArgs

        unknown = sorted(set(cfg.engine_arg) - {f.name for f in fields(AsyncEngineArgs)})
        if unknown:
            raise InputError(f"unknown --engine-arg key(s): {', '.join(unknown)}; see vLLM's EngineArgs")
    kwargs = engine_defaults(cfg.model)
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if not use_gpu:
        kwargs.update(CPU_ENGINE_KWARGS)
    return {**kwargs, "seed": cfg.seed, **(features or {}), **cfg.engine_arg}


def with_gpu_defaults(engine: dict, gpu_type: str | None) -> dict:
    """`engine` over the defaults of the replicas' GPU type (a Ray accelerator type such as "H200")."""
    return {**GPU_ENGINE_DEFAULTS.get(gpu_type, {}), **engine}


def batches_in_flight(cfg: "Config", engine: dict) -> int:
    """--batches-in-flight, else enough batches for twice the engine's max_num_seqs (at least 16): the
    engine's queue stays full while finished batches leave and new ones arrive."""
    if cfg.batches_in_flight is not None:
        return cfg.batches_in_flight
    return max(16, math.ceil(2 * engine.get("max_num_seqs", VLLM_MAX_NUM_SEQS) / cfg.batch_size))
