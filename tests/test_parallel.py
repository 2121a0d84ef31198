"""Replicas across several GPUs (util/features/parallel.py): the engine arguments, the placement group of one GPU
bundle per shard, and the GPUs a run holds. No Ray, no model files: `make_plan` is given the cluster.

    .venv/bin/python -m pytest tests/test_parallel.py -q
"""

import pytest

from util.config import Config, parse_args
from util.engine import REPLICA_ENV_VARS
from util.plan import make_plan

GPUS = {"CPU": 32.0, "GPU": 8.0, "accelerator_type:H100": 8.0}


def plan_of(cluster: dict = GPUS, **config):
    return make_plan(Config(**config), cluster=cluster, resolve_model_files=False)


def test_a_one_gpu_replica_has_no_part_and_reserves_its_gpu_as_an_actor():
    plan = plan_of(accelerator_type="H100")
    assert not [p for p in plan.parts if type(p).__name__ == "Parallel"]
    assert plan.replica_resources == {"num_gpus": 1.0, "accelerator_type": "H100",
                                      "runtime_env": {"env_vars": REPLICA_ENV_VARS}}
    assert "tensor_parallel_size" not in plan.engine_kwargs


def test_a_multi_gpu_replica_gets_a_placement_group_of_one_gpu_bundle_each():
    sharded = plan_of(accelerator_type="H100", tensor_parallel_size=2, pipeline_parallel_size=2, concurrency=2)
    assert sharded.replica_resources["num_gpus"] == 0  # vLLM's workers hold the GPUs, not the replica's actor
    bundles, strategy = sharded.replica_resources["ray_remote_args_fn"].args
    assert bundles == [{"GPU": 1, "CPU": 1, "accelerator_type:H100": 0.001}] * 4 and strategy == "PACK"
    assert (sharded.gpus_per_replica, sharded.gpus_held) == (4, 8)
    engine = sharded.engine_kwargs
    assert (engine["tensor_parallel_size"], engine["pipeline_parallel_size"],
            engine["distributed_executor_backend"]) == (2, 2, "ray")
    assert sharded.fingerprint["engine"]["tensor_parallel_size"] == 2  # a resumed output must match
    tensor_only = plan_of(accelerator_type="H100", tensor_parallel_size=2)
    assert tensor_only.replica_resources["ray_remote_args_fn"].args[1] == "STRICT_PACK"


def test_local_shard_processes_make_the_actor_reserve_the_gpus_itself():
    local = plan_of(accelerator_type="H100", tensor_parallel_size=2,
                    engine_arg={"distributed_executor_backend": "mp"})
    assert local.replica_resources == {"num_gpus": 2, "accelerator_type": "H100",
                                       "runtime_env": {"env_vars": REPLICA_ENV_VARS}}
    assert local.engine_kwargs["distributed_executor_backend"] == "mp"  # the user's --engine-arg wins


def test_on_cpu_the_shards_are_engine_arguments_only():
    plan = plan_of({"CPU": 8.0}, concurrency=1, tensor_parallel_size=2)
    assert plan.replica_resources["num_cpus"] == 0.5 and plan.gpus_held == 0
    assert plan.engine_kwargs["tensor_parallel_size"] == 2
    # vLLM's CPU build has no Ray executor ("current platform cpu does not support ray"): the workers are the
    # replica's own processes, each on its own cores (tests/test_replica_host.py).
    assert plan.engine_kwargs["distributed_executor_backend"] == "mp"


def test_sizes_below_one_are_refused_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tensor-parallel-size", "0"])
    assert exit_info.value.code == 2
    assert "--tensor-parallel-size and --pipeline-parallel-size must be >= 1, got 0 and 1" in capsys.readouterr().err
