"""What a run resolves from its config before it reads a row (util/plan.py, util/engine.py): the engine
arguments, where a replica runs, the GPUs it holds, the job's sampling with a --json-schema file read
once, and the refusal of a CPU-only cluster too small for the replicas. No Ray, no model files:
`make_plan` is given the cluster's resources, and resolve_model_files=False.

    .venv/bin/python -m pytest tests/test_plan.py -q
"""

import json

import pytest

from util import plan as planning
from util.accelerator import AcceleratorChoice
from util.config import Config
from util.engine import CPU_ENGINE_KWARGS, CPU_ENV_VARS, engine_kwargs, replica_placement
from util.errors import InputError
from util.pipeline import pipeline_stages, predictor_stage_kwargs
from util.plan import check_cluster_fits, job_sampling, make_plan

CPU_CLUSTER = {"CPU": 8.0}
PERSON = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}


def plan_of(cluster: dict = CPU_CLUSTER, **config):
    return make_plan(Config(**config), cluster=cluster, resolve_model_files=False)


# --- engine arguments and placement ---

def test_engine_kwargs_precedence():
    kwargs = engine_kwargs(Config(model="google/gemma-7b-it", tensor_parallel_size=2,
                                  engine_arg={"max_model_len": 1024}))
    assert kwargs["max_model_len"] == 1024  # the user's key beats the per-model table
    assert (kwargs["tensor_parallel_size"], kwargs["distributed_executor_backend"]) == (2, "ray")
    assert engine_kwargs(Config(model="google/gemma-7b-it"))["max_model_len"] == 2432
    # On CPU the CPU settings go over the table's, and the user's keys over both.
    cpu = engine_kwargs(Config(model="google/gemma-7b-it", engine_arg={"max_num_seqs": 4}), use_gpu=False)
    assert cpu == {**CPU_ENGINE_KWARGS, "max_num_seqs": 4, "seed": 0}


def test_a_multi_gpu_replica_gets_a_placement_group_of_one_gpu_bundle_each():
    gpu = AcceleratorChoice(use_gpu=True, accelerator_type="H100", num_gpus_in_cluster=8)

    def placement(cfg: Config) -> dict:
        return replica_placement(cfg, gpu, engine_kwargs(cfg))

    assert placement(Config()) == {"num_gpus": 1.0, "accelerator_type": "H100"}
    sharded = placement(Config(tensor_parallel_size=2, pipeline_parallel_size=2))
    assert sharded["num_gpus"] == 0  # vLLM's workers hold the GPUs, not the replica's actor
    bundles, strategy = sharded["ray_remote_args_fn"].args
    assert bundles == [{"GPU": 1, "CPU": 1, "accelerator_type:H100": 0.001}] * 4 and strategy == "PACK"
    assert placement(Config(tensor_parallel_size=2))["ray_remote_args_fn"].args[1] == "STRICT_PACK"
    # Local processes instead (the engine arguments say so): the actor reserves the GPUs itself.
    local = Config(tensor_parallel_size=2, engine_arg={"distributed_executor_backend": "mp"})
    assert placement(local) == {"num_gpus": 2, "accelerator_type": "H100"}


def test_a_cpu_plan_runs_half_a_cpu_replica_with_the_cpu_engine_settings():
    plan = plan_of(concurrency=1, tensor_parallel_size=2)
    assert not plan.choice.use_gpu
    assert plan.replica_resources == {"num_cpus": 0.5, "runtime_env": {"env_vars": CPU_ENV_VARS}}
    assert plan.engine_kwargs["max_num_seqs"] == CPU_ENGINE_KWARGS["max_num_seqs"]
    assert plan.gpus_held == 0 and plan.provenance["accelerator"] == "CPU"
    assert plan.fingerprint["engine"] == plan.engine_kwargs and plan.fingerprint["sampling"] == plan.sampling


def test_gpus_held_are_every_replicas_for_the_whole_run():
    plan = plan_of({"CPU": 16.0, "GPU": 8.0}, concurrency=3, tensor_parallel_size=2, accelerator_type="any")
    assert (plan.gpus_per_replica, plan.gpus_held) == (2, 6)
    assert plan.provenance["accelerator"] == "GPU"
    shared = plan_of({"CPU": 16.0, "GPU": 1.0}, concurrency=2, gpus_per_replica=0.5, accelerator_type="any")
    assert (shared.gpus_per_replica, shared.gpus_held, shared.replica_resources) == (0.5, 1.0, {"num_gpus": 0.5})


def test_an_autoscaling_pool_holds_at_most_its_max_and_resumes_a_fixed_pools_output():
    grows = plan_of({"CPU": 16.0, "GPU": 8.0}, concurrency=1, max_concurrency=4, accelerator_type="any")
    assert grows.gpus_held == 4  # a bound on GPU-hours: the pool may stay smaller
    fixed = plan_of({"CPU": 16.0, "GPU": 8.0}, concurrency=4, accelerator_type="any")
    assert grows.fingerprint == fixed.fingerprint  # replicas do not change a row's output


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
    plan_of({"CPU": 2.0}, concurrency=1, max_concurrency=8)  # a range must fit its MIN; it grows as CPUs free
    # With GPUs an autoscaling cluster may still add nodes, and Ray Data waits for them.
    check_cluster_fits(8, use_gpu=True, cluster={"CPU": 2, "GPU": 1})


# --- the job's sampling: a --json-schema file is read once, by the plan ---

def test_the_plan_reads_a_json_schema_file_once(tmp_path, monkeypatch):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    opened, resolve = [], planning.resolve
    monkeypatch.setattr(planning, "resolve", lambda uri: opened.append(uri) or resolve(uri))  # the file opened
    cfg = Config(json_schema=str(schema), concurrency=1)
    assert opened == []  # the Config checks the flags, but reads no file
    plan = make_plan(cfg, cluster=CPU_CLUSTER, resolve_model_files=False)
    schema.unlink()  # what the stages and the manifest need is in the plan
    stages = pipeline_stages(plan)
    assert predictor_stage_kwargs(plan)["fn_constructor_kwargs"]["sampling"] == plan.sampling
    assert opened == [str(schema)]
    assert [s.name for s in stages] == ["format", "cut_blocks", "predict"]
    assert plan.sampling["structured_outputs"] == {"json": PERSON}
    assert plan.fingerprint["sampling"]["structured_outputs"] == {"json": PERSON}


def test_a_schema_file_that_is_not_json_is_refused_naming_it(tmp_path):
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as refused:
        job_sampling(Config(json_schema=str(bad)))
    assert str(refused.value) == (f"--json-schema: {bad} is not valid JSON: Expecting property name enclosed in "
                                  "double quotes: line 1 column 2 (char 1)")
