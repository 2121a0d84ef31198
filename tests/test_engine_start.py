"""A one-GPU replica's engine process is forked, not spawned (util/replica/internals.py engine_process_forked): in a
Ray actor vLLM's own check (_maybe_force_spawn) picks spawn, and inside the context it does not, unless the
user asked for spawn or the replica spans several GPUs.

    .venv/bin/python -m pytest tests/test_engine_start.py -q
"""

import os

import pytest
import ray


@ray.remote(num_cpus=0)
class Replica:
    def start_method(self, engine: dict, forked: bool, asked: str | None = None) -> str | None:
        from vllm.utils import system_utils

        from util.replica.internals import engine_process_forked

        os.environ.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
        if asked:
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = asked
        if forked:
            with engine_process_forked(engine):
                system_utils._maybe_force_spawn()
        else:
            system_utils._maybe_force_spawn()
        # vLLM then starts its engine process with this method (None: its default, fork).
        return os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")


@pytest.fixture(scope="module")
def replica(ray_local):
    actor = Replica.remote()
    yield actor
    ray.kill(actor)


def test_a_one_gpu_replica_forks_its_engine_process(replica):
    assert ray.get(replica.start_method.remote({}, forked=False)) == "spawn"  # vLLM's choice in a Ray actor
    assert ray.get(replica.start_method.remote({}, forked=True)) is None
    assert ray.get(replica.start_method.remote({"tensor_parallel_size": 1}, forked=True)) is None


def test_spawn_stays_for_several_gpus_the_ray_executor_or_when_asked(replica):
    assert ray.get(replica.start_method.remote({"tensor_parallel_size": 2}, forked=True)) == "spawn"
    assert ray.get(replica.start_method.remote({"distributed_executor_backend": "ray"}, forked=True)) == "spawn"
    assert ray.get(replica.start_method.remote({}, forked=True, asked="spawn")) == "spawn"


def test_the_check_is_vllms_own_again_after_the_start():
    from vllm.utils import system_utils

    from util.replica.internals import engine_process_forked

    check = system_utils.is_in_ray_actor
    with engine_process_forked({}):
        assert system_utils.is_in_ray_actor() is False
    assert system_utils.is_in_ray_actor is check
