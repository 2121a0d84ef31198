"""The pipeline's two model stages, and how Ray Data runs them: prompt formatting on CPU, then vLLM.

    from util.stages import formatter_stage, predictor_stage
    ds = ds.map_batches(**formatter_stage(cfg, use_gpu))    # adds prompt, prompt_token_ids, ...
    ds = ds.map_batches(**predictor_stage(cfg, choice))     # adds generated_text, finish_reason, ...

On a CPU-only cluster the replicas and one data task at a time must fit (`check_cluster_fits`), or Ray
would wait forever for a CPU that never frees.

Engine arguments, lowest precedence first: vLLM's defaults, the per-model table (util/models.py),
the replica's parallelism, CPU settings when no GPU is present, then the user's --engine-arg keys.
"""

import dataclasses
import functools

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from util.accelerator import AcceleratorChoice
from util.config import Config
from util.models import engine_defaults
from util.predictor import LLMPredictor
from util.prompt_format import format_prompts

# On CPU the KV cache lives in RAM: keep it small enough for a laptop or a CI runner.
CPU_ENV_VARS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
CPU_ENGINE_KWARGS = {"max_model_len": 2048, "max_num_seqs": 32, "enforce_eager": True,
                     "gpu_memory_utilization": 0.3}  # on CPU: the share of RAM vLLM may take
# CPUs the pipeline's tasks and CPU replicas take. vLLM on CPU runs its own threads whatever Ray counts.
TASK_CPUS = 0.5  # read, format and write tasks (util/reading.py READ_CPUS, util/output.py WRITE_CPUS)
CPU_REPLICA_CPUS = 0.5  # util/accelerator.py


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
    if replica_gpus(cfg) > 1:
        # vLLM runs one Ray worker per GPU, inside the replica's placement group (see replica_placement).
        kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size,
                      pipeline_parallel_size=cfg.pipeline_parallel_size, distributed_executor_backend="ray")
    if not use_gpu:
        kwargs.update(CPU_ENGINE_KWARGS)
    kwargs["seed"] = cfg.seed
    return {**kwargs, **cfg.engine_arg}


def replica_gpus(cfg: Config) -> int:
    return cfg.tensor_parallel_size * cfg.pipeline_parallel_size


def _placement_group(bundles: list[dict], strategy: str) -> dict:
    pg = ray.util.placement_group(bundles, strategy=strategy)
    # Capturing child tasks puts the workers vLLM starts into this replica's bundles.
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}


def replica_placement(cfg: Config, choice: AcceleratorChoice) -> dict:
    """Where Ray puts one replica. A replica of one GPU (or a share of one) reserves it as an actor.
    A replica of several (tensor x pipeline parallel) gets a placement group of one GPU bundle each,
    created when Ray Data starts the replica: tensor-parallel shards on one node (STRICT_PACK, they
    talk every layer), pipeline stages across nodes if need be (PACK). The actor itself holds no GPU;
    vLLM's Ray workers take the bundles. `--engine-arg distributed_executor_backend=mp` instead keeps
    the shards as local processes of an actor that holds all the GPUs of one node."""
    gpus = replica_gpus(cfg)
    backend = engine_kwargs(cfg, choice.use_gpu).get("distributed_executor_backend")
    if not choice.use_gpu or gpus == 1 or backend != "ray":
        return choice.ray_remote_args(max(cfg.gpus_per_replica, gpus))
    bundle = {"GPU": 1, "CPU": 1}
    if choice.accelerator_type:
        bundle[f"accelerator_type:{choice.accelerator_type}"] = 0.001
    strategy = "STRICT_PACK" if cfg.pipeline_parallel_size == 1 else "PACK"
    return {"num_gpus": 0, "ray_remote_args_fn": functools.partial(_placement_group, [bundle] * gpus, strategy)}


def check_cluster_fits(cfg: Config, use_gpu: bool, cluster: dict) -> None:
    """Raises InputError when a CPU-only cluster cannot hold the replicas and one formatting or reading
    task at a time beside them: Ray would otherwise wait forever for a CPU that never frees. A GPU
    cluster may be autoscaling, so there Ray Data waits for the nodes to come."""
    from util.reading import InputError

    cpus = float(cluster.get("CPU", 0))
    need = cfg.concurrency * CPU_REPLICA_CPUS + TASK_CPUS
    if not use_gpu and need > cpus:
        raise InputError(
            f"--concurrency {cfg.concurrency} needs {need:g} CPUs on this CPU-only cluster: {CPU_REPLICA_CPUS:g} "
            f"for each of {cfg.concurrency} replica(s) and {TASK_CPUS:g} for reading, formatting and writing; "
            f"the cluster has {cpus:g}. Lower --concurrency, or add CPUs")


def formatter_stage(cfg: Config, use_gpu: bool = True, formatter=format_prompts) -> dict:
    """`ds.map_batches` arguments for the prompt formatter: tasks of the predictor's batch size, each
    worker loading the tokenizer once, as many at a time as there are free CPUs."""
    return {
        "fn": formatter,
        "fn_kwargs": {"model": cfg.model, "text_column": cfg.text_column,
                      "system_prompt": cfg.system_prompt, "prompt_format": cfg.prompt_format,
                      "revision": cfg.revision,
                      "max_model_len": engine_kwargs(cfg, use_gpu).get("max_model_len")},
        "batch_size": cfg.batch_size,
        "batch_format": "pyarrow",
        "num_cpus": TASK_CPUS,  # as the read's: Ray fuses read, format and repartition into one task
    }


def predictor_stage(cfg: Config, choice: AcceleratorChoice, predictor=LLMPredictor) -> dict:
    """`ds.map_batches` arguments for the vLLM stage: `concurrency` replicas, each on its own GPUs."""
    kwargs = engine_kwargs(cfg, choice.use_gpu)
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
        **replica_placement(cfg, choice),
        **({} if choice.use_gpu else {"runtime_env": {"env_vars": CPU_ENV_VARS}}),
    }
