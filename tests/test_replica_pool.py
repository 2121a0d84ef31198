"""Engines kept warm (util/features/replica_pool.py): a second pipeline run on the same pool starts no replica and
no engine, every row is answered once per run, and shutdown ends the replicas. The scale harness's
stand-ins (bench/scale.py) stand for the formatter and the engine, so this runs in seconds.

    .venv/bin/python -m pytest tests/test_replica_pool.py
"""

import pytest
import ray

from bench.scale import StandInPredictor, stand_in_formatter
from util import columns as col
from util.config import Config
from util.pipeline import build_pipeline
from util.plan import make_plan
from util.features.replica_pool import ReplicaPool


def plan_of(task: str):
    cfg = Config(model="stand-in", input_path=None, concurrency=2, batch_size=2, batches_in_flight=2, task=task)
    plan = make_plan(cfg, resolve_model_files=False)
    # Stand-ins need no CPU of their own; the session's 2 must keep a whole one free beside them (and beside the
    # session's warm engine): ray.data.from_arrow, which reads a list of prompts, runs a task of 1 CPU.
    plan.replica_resources["num_cpus"] = 0.1
    return plan


@pytest.fixture
def plan(ray_local):
    return plan_of("generate")


def test_a_pool_refuses_a_range_of_replicas(ray_local):
    plan = make_plan(Config(model="stand-in", concurrency=1, max_concurrency=2), cluster={"CPU": 2.0},
                     resolve_model_files=False)
    with pytest.raises(ValueError, match=r"a ReplicaPool starts a fixed number of replicas, not --concurrency 1-2"):
        ReplicaPool(plan, predictor=StandInPredictor)


def run_once(plan, pool) -> list[dict]:
    stages = pool.stages(plan, formatter=stand_in_formatter)
    assert stages[-1].name == "predict"
    return build_pipeline(plan, stages=stages).select_columns([col.ID, "replica"]).take_all()


def test_a_second_run_on_a_warm_pool_starts_no_engine(plan):
    with ReplicaPool(plan, predictor=StandInPredictor) as pool:
        started = {replica._actor_id.hex()[:8] for replica in pool.replicas}  # each holds its engine
        first, second = run_once(plan, pool), run_once(plan, pool)
        replicas = list(pool.replicas)
    assert len(started) == plan.cfg.concurrency
    assert sorted(r[col.ID] for r in first) == sorted(r[col.ID] for r in second)
    assert len(first) == 5  # the five sample prompts, each answered once per run
    # Both runs were answered by the replicas started before the first, and by no other: no engine start.
    assert {r["replica"] for r in first + second} <= started
    for replica in replicas:  # shut down: the replicas are gone, and so are their reservations
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(replica.__ray_ready__.remote(), timeout=30)


def test_a_pool_for_an_embedding_job_answers_its_embed_stage(ray_local):
    embed = plan_of("embed")
    with ReplicaPool(embed, predictor=StandInPredictor) as pool:
        assert [stage.name for stage in pool.stages(embed, formatter=stand_in_formatter)][-1] == "embed"


def test_a_pool_of_real_engines_answers_two_runs_with_one_engine_start(warm_engine, test_model):
    """The session's warm pool: the real LLMPredictor on the smoke model (tests/conftest.py)."""
    from conftest import ENGINE_ARGS, PROMPTS
    from util.config import parse_args

    plan = make_plan(parse_args(["--model", test_model, *ENGINE_ARGS, "--max-tokens", "8"]))
    engines = lambda: ray.get([replica.__ray_call__.remote(lambda predictor: (id(predictor.engine),
                                                                              predictor.supervisor.generation))
                               for replica in warm_engine.replicas])
    before = engines()
    runs = [build_pipeline(plan, source=PROMPTS[:4], stages=warm_engine.stages(plan))
            .select_columns([col.ID, col.GENERATED_TEXT, col.ERROR]).take_all() for _ in range(2)]
    assert engines() == before and [generation for _, generation in before] == [0]  # the same engine, never replaced
    first, second = (sorted((r[col.ID], r[col.GENERATED_TEXT], r[col.ERROR]) for r in run) for run in runs)
    assert first == second and len(first) == 4  # greedy: the same answers, every row once
    assert all(text and error is None for _, text, error in first)
