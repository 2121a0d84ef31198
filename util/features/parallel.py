"""Replicas across several GPUs (a feature, util/parts.py): tensor parallelism shards each layer across
the GPUs of one node, pipeline parallelism splits the layers into stages, across nodes if need be.

    python main.py --model meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size 4 --concurrency 2

A replica of TP x PP GPUs gets a placement group of one GPU bundle each, made when Ray Data starts it:
tensor-parallel shards on one node (STRICT_PACK: they talk every layer), pipeline stages across nodes if
need be (PACK); vLLM runs one Ray worker per bundle. `--engine-arg distributed_executor_backend=mp` instead
keeps the shards as local processes of an actor that holds all the GPUs of one node.
"""

import dataclasses
import functools

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from util.parts import Part, flag
from util.errors import InputError


@dataclasses.dataclass
class Flags:
    tensor_parallel_size: int = flag("GPUs a replica shards each layer across (one node).", default=1)
    pipeline_parallel_size: int = flag("Stages a replica splits the layers into, one GPU group each; with tensor "
                                       "parallelism a replica spans TP x PP GPUs, across nodes if need be.", default=1)


def check(cfg) -> None:
    if not (cfg.tensor_parallel_size >= 1 and cfg.pipeline_parallel_size >= 1):
        raise InputError(f"--tensor-parallel-size and --pipeline-parallel-size must be >= 1, got "
                         f"{cfg.tensor_parallel_size} and {cfg.pipeline_parallel_size}")


def placement_group(bundles: list[dict], strategy: str) -> dict:
    pg = ray.util.placement_group(bundles, strategy=strategy)
    # Capturing child tasks puts the workers vLLM starts into this replica's bundles.
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}


class Parallel(Part):
    def __init__(self, tensor: int, pipeline: int, use_gpu: bool = True):
        # vLLM runs one Ray worker per GPU, inside the replica's placement group (unless told otherwise). Its CPU
        # build has no Ray executor (the CPU platform names no Ray device): there the workers are processes of
        # the replica, each on its own cores (util/replica/host.py).
        self.engine_kwargs = {"tensor_parallel_size": tensor, "pipeline_parallel_size": pipeline,
                              "distributed_executor_backend": "ray" if use_gpu else "mp"}


def part(plan) -> Parallel | None:
    cfg = plan.cfg
    gpus = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if gpus == 1:
        return None
    parallel = Parallel(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, plan.choice.use_gpu)
    parallel.plan = {"gpus_per_replica": max(cfg.gpus_per_replica, gpus)}  # at least a whole GPU per shard
    if plan.choice.use_gpu and cfg.engine_arg.get("distributed_executor_backend", "ray") == "ray":
        accelerator = plan.choice.accelerator_type
        bundle = {"GPU": 1, "CPU": 1, **({f"accelerator_type:{accelerator}": 0.001} if accelerator else {})}
        strategy = "STRICT_PACK" if cfg.pipeline_parallel_size == 1 else "PACK"
        # The replica's actor holds no GPU: vLLM's workers take the bundles.
        parallel.plan["replica_resources"] = {"num_gpus": 0, "ray_remote_args_fn": functools.partial(
            placement_group, [bundle] * gpus, strategy)}
    return parallel
