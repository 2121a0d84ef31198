"""Every private item of Ray and vLLM the project relies on (util/replica/internals.py) is still where it was, on
the installed versions: a version bump that moves one fails here, by name, instead of turning a wait into
a skip or a forked engine start into a spawned one.

    .venv/bin/python -m pytest tests/test_internals.py -q
"""

import os

import pytest
import ray

from util.replica import internals
from util.replica.internals import CHECKS, Moved


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_each_internal_is_where_it_was(name):
    assert CHECKS[name]() is not None  # each check raises Moved, naming the item, when it is gone


def test_a_moved_internal_fails_loudly_by_name():
    with pytest.raises(Moved, match=r"^vllm.utils.system_utils:no_such_check is gone \(AttributeError"):
        internals._find("vllm.utils.system_utils:no_such_check")
    with pytest.raises(Moved, match=r"^ray.no_such_module: is gone \(ModuleNotFoundError"):
        internals._find("ray.no_such_module:")


def test_an_engine_of_ray_workers_passes_on_the_setup_hook_as_its_env_var_alone():
    from types import SimpleNamespace

    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR as HOOK
    from ray._private.runtime_env.setup_hook import upload_worker_process_setup_hook_if_needed
    from ray.runtime_env import RuntimeEnv

    # What a replica's runtime env holds once Ray has exported the job's setup hook: the env var, and the name.
    exported = {"worker_process_setup_hook": "set_up_worker", "env_vars": {HOOK: "ray_runtime_env_func::a2V5", "A": "1"}}
    with pytest.raises(RuntimeError, match="^Conflicting worker_process_setup_hook"):  # what vLLM's ray.init met
        upload_worker_process_setup_hook_if_needed(RuntimeEnv(**exported), worker=None)
    config = SimpleNamespace(parallel_config=SimpleNamespace(ray_runtime_env=RuntimeEnv(**exported)))
    internals.without_setup_hook_field(config)
    passed_on = config.parallel_config.ray_runtime_env
    assert isinstance(passed_on, RuntimeEnv) and dict(passed_on) == {"env_vars": exported["env_vars"]}
    assert upload_worker_process_setup_hook_if_needed(passed_on, worker=None) == passed_on  # accepted as it is
    plain = SimpleNamespace(parallel_config=SimpleNamespace(ray_runtime_env=None))  # no Ray workers, no job hook
    internals.without_setup_hook_field(plain)
    assert plain.parallel_config.ray_runtime_env is None


def test_the_repartition_cpus_land_on_the_operator_ray_data_runs(ray_local):
    ds = internals.set_last_operator_cpus(ray.data.range(8).repartition(target_num_rows_per_block=4), 0.25)
    assert ds._logical_plan.dag.ray_remote_args["num_cpus"] == 0.25
    assert ds.count() == 8


@ray.remote(num_cpus=0)
class MapWorkerStandIn:
    def pid(self) -> int:
        return os.getpid()


def test_the_exit_wait_finds_this_jobs_actors_in_the_actor_table(ray_local):
    """The fields wait_for_actors_to_exit reads: an actor of this job, on this node, by class name, with
    its process id; once the actor is killed, the wait returns as soon as its process is gone."""
    actor = MapWorkerStandIn.remote()
    pid = ray.get(actor.pid.remote())
    context = ray.get_runtime_context()
    found = [a for a in internals._find("ray._private.state:actors")().values()
             if a["JobID"] == context.get_job_id() and a["ActorClassName"].startswith("MapWorkerStandIn")
             and a["Address"]["NodeID"] == context.get_node_id()]
    assert [a["Pid"] for a in found] == [pid]
    ray.kill(actor)
    internals.wait_for_actors_to_exit("MapWorkerStandIn", timeout_s=30)
    assert not internals._running(pid)
