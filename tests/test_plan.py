"""What a run resolves from its config before it reads a row (util/plan.py, util/engine.py): the engine
arguments, where a replica runs, the GPUs it holds, and the refusal of a CPU-only cluster too small for the replicas. No Ray, no model files:
`make_plan` is given the cluster's resources, and resolve_model_files=False.

    .venv/bin/python -m pytest tests/test_plan.py -q
"""

import json

import pytest

from util.config import Config
from util.engine import CPU_ENGINE_KWARGS, CPU_ENV_VARS, REPLICA_ENV_VARS, engine_kwargs
from util.errors import InputError
from util.output import output_schema
from util.plan import check_cluster_fits, make_plan

CPU_CLUSTER = {"CPU": 8.0}


def plan_of(cluster: dict = CPU_CLUSTER, **config):
    return make_plan(Config(**config), cluster=cluster, resolve_model_files=False)


# --- the job's features: only those its flags or its rows ask for (tests/test_richer_outputs.py) ---

def test_a_plain_job_has_no_feature_and_writes_only_the_cores_columns(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"q{i}", "sampling_params": {"max_tokens": 4, "temperature": 0.5}}) + "\n"
                            for i in range(3)))
    plan = plan_of(input_path=str(rows))
    assert plan.parts == [] and plan.columns == {} and output_schema(plan.columns) == output_schema({})
    assert plan.row_asks.sampling == {"max_tokens", "temperature"}  # the core's own keys ask for no feature


# --- engine arguments and placement ---

def test_engine_kwargs_precedence():
    kwargs = engine_kwargs(Config(model="google/gemma-7b-it", engine_arg={"max_model_len": 1024}))
    assert kwargs["max_model_len"] == 1024  # the user's key beats the per-model table
    assert engine_kwargs(Config(model="google/gemma-7b-it"))["max_model_len"] == 2432
    # On CPU the CPU settings go over the table's, and the user's keys over both.
    cpu = engine_kwargs(Config(model="google/gemma-7b-it", engine_arg={"max_num_seqs": 4}), use_gpu=False)
    assert cpu == {**CPU_ENGINE_KWARGS, "max_num_seqs": 4, "seed": 0}
    # A feature's engine arguments go over the CPU settings, the user's over them.
    both = engine_kwargs(Config(engine_arg={"seed": 3}), use_gpu=False, features={"max_num_seqs": 8, "seed": 1})
    assert (both["max_num_seqs"], both["seed"]) == (8, 3)


def test_a_cpu_plan_runs_half_a_cpu_replica_with_the_cpu_engine_settings():
    plan = plan_of(concurrency=1)
    assert not plan.choice.use_gpu
    # Ray leaves the replica's engine processes to it (util/replica/host.py), which learns how many share the cores.
    assert plan.replica_resources == {"num_cpus": 0.5, "runtime_env": {"env_vars": {
        "RAY_kill_child_processes_on_worker_exit": "false", **CPU_ENV_VARS, "BATCH_LLM_REPLICAS": "1"}}}
    assert plan_of(concurrency=2).replica_resources["runtime_env"]["env_vars"]["BATCH_LLM_REPLICAS"] == "2"
    assert plan.engine_kwargs["max_num_seqs"] == CPU_ENGINE_KWARGS["max_num_seqs"]
    assert plan.gpus_held == 0 and plan.provenance["accelerator"] == "CPU"
    assert plan.fingerprint["engine"] == plan.engine_kwargs and plan.fingerprint["sampling"] == plan.sampling


def test_gpus_held_are_every_replicas_for_the_whole_run():
    plan = plan_of({"CPU": 16.0, "GPU": 8.0}, concurrency=3, accelerator_type="any")
    on_gpu = {"runtime_env": {"env_vars": REPLICA_ENV_VARS}}  # no CPU settings
    assert (plan.gpus_per_replica, plan.gpus_held, plan.replica_resources) == (1, 3, {"num_gpus": 1.0, **on_gpu})
    assert plan.provenance["accelerator"] == "GPU"
    shared = plan_of({"CPU": 16.0, "GPU": 1.0}, concurrency=2, gpus_per_replica=0.5, accelerator_type="any")
    assert (shared.gpus_per_replica, shared.gpus_held) == (0.5, 1.0)
    assert shared.replica_resources == {"num_gpus": 0.5, **on_gpu}


def test_an_h200_cluster_gets_2048_sequences_and_batches_in_flight_for_twice_that():
    h200 = {"CPU": 16.0, "GPU": 1.0, "accelerator_type:H200": 1.0}
    plan = plan_of(h200, concurrency=1, accelerator_type="any")
    assert plan.engine_kwargs["max_num_seqs"] == 2048
    assert (plan.cfg.batches_in_flight, plan.rows_in_flight) == (32, 4096)  # 2 x 2048 rows at batch 128
    # A scheduling default: it changes how fast rows come back, not what they say.
    assert "max_num_seqs" not in plan.fingerprint["engine"]
    assert plan.fingerprint == plan_of({"CPU": 16.0, "GPU": 1.0}, concurrency=1, accelerator_type="any").fingerprint
    # The user's engine argument and batches in flight win; without a known GPU type, vLLM's defaults.
    mine = plan_of(h200, concurrency=1, accelerator_type="any", engine_arg={"max_num_seqs": 256}, batch_size=8)
    assert (mine.engine_kwargs["max_num_seqs"], mine.cfg.batches_in_flight) == (256, 64)
    assert plan_of(h200, concurrency=1, accelerator_type="any", batches_in_flight=4).cfg.batches_in_flight == 4
    h100 = plan_of({"CPU": 16.0, "GPU": 1.0, "accelerator_type:H100": 1.0}, concurrency=1, accelerator_type="any")
    assert "max_num_seqs" not in h100.engine_kwargs and h100.cfg.batches_in_flight == 16
    assert plan_of(concurrency=1).cfg.batches_in_flight == 16  # CPU: 32 sequences; at least 16 batches


# --- a CPU-only cluster too small ---

def test_a_cpu_only_cluster_too_small_for_the_replicas_is_refused_when_the_run_is_planned():
    with pytest.raises(InputError) as info:
        plan_of({"CPU": 2.0}, concurrency=4)
    assert str(info.value) == (
        "--concurrency 4 needs 2.5 CPUs on this CPU-only cluster: 0.5 for each of 4 replica(s) and 0.5 for "
        "reading, formatting and writing; the cluster has 2. Lower --concurrency, or add CPUs")
    check_cluster_fits(3, use_gpu=False, cluster={"CPU": 2})  # exactly fits: 1.5 + 0.5
    check_cluster_fits(2, use_gpu=False, cluster={"CPU": 2})
    # With GPUs an autoscaling cluster may still add nodes, and Ray Data waits for them.
    check_cluster_fits(8, use_gpu=True, cluster={"CPU": 2, "GPU": 1})
