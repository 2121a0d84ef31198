"""An autoscaling pool (--concurrency 1-2) on a cluster that grows mid-run: the run starts on the one
replica the first node has room for, a replica joins on the node added once the first batch is in,
every row is written exactly once, and the report lists each replica's join time, in join order.
bench/autoscale.py runs it in its own process, on a local Ray cluster of fake nodes
(ray.cluster_utils.Cluster), with the stand-in stages: about a minute on 2 CPUs.

    .venv/bin/python -m pytest tests/test_autoscale.py -q
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from util.config import Config, parse_args
from util.errors import InputError
from util.pipeline import pipeline_stages
from util.plan import make_plan


@pytest.mark.parametrize("value, least, most", [
    ("3", 3, None),  # a fixed pool, as before
    ("1-8", 1, 8),  # an autoscaling pool: starts with 1, grows to 8
    ("4-4", 4, None),  # no room to grow: a fixed pool
])
def test_concurrency_is_a_number_or_a_range(value, least, most):
    cfg = parse_args(["--concurrency", value])
    assert (cfg.concurrency, cfg.max_concurrency) == (least, most)


def test_a_range_whose_min_is_over_its_max_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--concurrency", "3-2"])
    assert exit_info.value.code == 2
    assert "error: --concurrency MIN-MAX needs MIN <= MAX, got 3-2" in capsys.readouterr().err


def plan_of(cluster: dict, **config):
    return make_plan(Config(**config), cluster=cluster, resolve_model_files=False)


def test_an_autoscaling_pool_holds_at_most_its_max_and_resumes_a_fixed_pools_output():
    grows = plan_of({"CPU": 16.0, "GPU": 8.0}, concurrency=1, max_concurrency=4, accelerator_type="any")
    assert (grows.most_replicas, grows.gpus_held) == (4, 4)  # a bound on GPU-hours: the pool may stay smaller
    fixed = plan_of({"CPU": 16.0, "GPU": 8.0}, concurrency=4, accelerator_type="any")
    assert grows.fingerprint == fixed.fingerprint  # replicas do not change a row's output


def test_a_range_must_fit_its_min_on_a_cpu_only_cluster():
    plan = plan_of({"CPU": 2.0}, concurrency=1, max_concurrency=8)  # its MIN fits: it grows as CPUs free
    assert (plan.cfg.concurrency, plan.most_replicas) == (1, 8)
    with pytest.raises(InputError, match=r"^--concurrency 4 needs 2.5 CPUs on this CPU-only cluster"):
        plan_of({"CPU": 2.0}, concurrency=4, max_concurrency=8)  # its MIN does not


@pytest.mark.parametrize("max_concurrency, least, most, tasks_per_replica", [
    (None, 3, 3, 4),  # --concurrency 3, a fixed pool: each replica gets the batches it runs together
    (5, 3, 5, 7),  # --concurrency 3-5: 1.75x as many, so that a busy pool shows Ray Data the demand to grow
])
def test_the_predict_stage_is_a_fixed_or_an_autoscaling_pool(max_concurrency, least, most, tasks_per_replica):
    plan = plan_of({"CPU": 2.0}, concurrency=3, max_concurrency=max_concurrency, batches_in_flight=4, model="m")
    compute = pipeline_stages(plan)[-1].map_batches["compute"]
    assert (compute.min_size, compute.max_size) == (least, most)
    assert (compute.max_tasks_in_flight_per_actor, compute.max_concurrent_calls_per_actor) == (tasks_per_replica, 4)


@pytest.mark.engine
def test_a_replica_joins_when_a_node_joins_and_every_row_is_written_once(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.autoscale", "--out", str(tmp_path / "run"), "--rows", "1200",
                          "--concurrency", "1-2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["output_rows"], result["distinct_ids"], result["exactly_once"]) == (1200, 1200, True)
    first, later = result["report"]["replicas"]  # in join order
    # The run started on MIN replicas before the node existed: the first had a batch done by then.
    assert result["rows_before_node"] > 0 and first["ready_s"] < result["node_added_s"]
    # The second replica joined once the node was there, and took a share of the rows.
    assert later["ready_s"] > result["node_added_s"] and later["rows"] > 0
    assert first["rows"] + later["rows"] == 1200
    # The printed report lists both, with their join times, the later one last.
    table = run.stdout[run.stdout.index("joined at"):].splitlines()[1:3]
    assert [line.split()[0] for line in table] == [first["replica"], later["replica"]]
    assert [line.split()[-1] for line in table] == [f"{first['ready_s']:.1f}s", f"{later['ready_s']:.1f}s"]
