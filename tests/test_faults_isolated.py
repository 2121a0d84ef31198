"""Faults injected into runs of main.py, a second file so that the suite's two workers share them (the
helpers: tests/test_faults.py):

- one row kills every engine it meets and another hangs one, made so by a vLLM plugin (tests/fault_plugin/)
  found only on that run's PYTHONPATH: the hung engine is replaced, the killer is the only error row;
- the node that holds the replica is removed from a cluster of two mid-run: the run finishes on the other.

    .venv/bin/python -m pytest tests/test_faults_isolated.py -q --durations=0
"""

import contextlib
import os
import re
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from conftest import PROMPTS, write_jsonl
from test_faults import (ACTOR_TITLE, FAULT_PLUGIN, KILL_SEED, STALL_SEED, input_folder, output_ids,  # noqa: F401
                         ray_dirs_removed, read_manifest, report_of, start, wait_for, wait_for_commit)

# Every test here starts vLLM engines, and a cluster of two nodes: alone (make test runs `solo` tests after the
# others), since Ray's node start has a fixed 30 s that a loaded 2-core machine misses.
pytestmark = [pytest.mark.engine, pytest.mark.solo]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A run in which one row hangs the engine the first time it runs, and another kills every engine that
    runs it. Two rows in flight at a time, so that few rows share each death."""
    workdir = tmp_path_factory.mktemp("poison")
    rows, stall_at, kill_at = 12, 1, 7
    items = [{"text": f"{PROMPTS[i]} ({i})"} for i in range(rows)]
    items[stall_at]["sampling_params"], items[kill_at]["sampling_params"] = {"seed": STALL_SEED}, {"seed": KILL_SEED}
    (workdir / "input").mkdir()
    path = write_jsonl(workdir / "input" / "marked.jsonl", items)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT_PLUGIN), os.environ.get("PYTHONPATH")])),
           "FAULT_DIR": str(workdir), "FAULT_KILL_SEED": str(KILL_SEED), "FAULT_STALL_SEED": str(STALL_SEED)}
    run = start(tmp_path_factory, "r", Path(path), workdir / "out", env,
                ["--batch-size", "2", "--batches-in-flight", "1", "--max-tokens", "16", "--concurrency", "1",
                 "--stall-timeout-s", "20"])
    try:
        run.wait()
    finally:
        run.kill_leftovers()
    return run, rows, items[kill_at]["text"]


@pytest.fixture(scope="module")
def node_lost(tmp_path_factory, input_folder):
    """A run on a cluster of two worker nodes (its head takes no work), whose replica's node is removed
    after the first file."""
    from ray.cluster_utils import Cluster

    folder, _ = input_folder
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    run = start(tmp_path_factory, "r", folder, tmp_path_factory.mktemp("node") / "out", {"RAY_ADDRESS": cluster.address})
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in workers}
    doomed = []
    try:
        wait_for_commit(run)
        # The replica: a worker process that its node's raylet started (this cluster's, not another test's).
        [actor] = wait_for(lambda: [child for pid in raylets for child in psutil.Process(pid).children()
                                    if titled(child, ACTOR_TITLE)], 60, "the replica's process")
        doomed = [actor, *actor.children(recursive=True)]  # its engine goes with the node
        cluster.remove_node(raylets[actor.ppid()], allow_graceful=False)
        run.wait()
    finally:
        run.kill_leftovers()
        cluster.shutdown()
        for process in doomed:  # what outlived the removed node, if anything did
            with contextlib.suppress(psutil.Error):
                process.kill()
    return run


def titled(process: psutil.Process, title: str) -> bool:
    with contextlib.suppress(psutil.Error, OSError):
        return process.status() != psutil.STATUS_ZOMBIE and " ".join(process.cmdline()).startswith(title)
    return False



# --- a row that kills every engine, a row that hangs one -----------------------------------------

def test_a_row_that_kills_every_engine_is_the_only_error_row_and_a_hung_engine_is_replaced(poisoned):
    run, rows, marked = poisoned
    assert run.process.returncode == 0, run.stderr()[-3000:]
    ids = output_ids(run.out)
    assert len(ids) == len(set(ids)) == rows
    [error] = pq.read_table(run.out / "errors", columns=["text", "error"]).to_pylist()
    assert error["text"] == marked
    assert re.fullmatch(r"the engine died \d+ times while running this row, the last time with no other row "
                        r"beside it", error["error"]), error["error"]
    survived = report_of(run.out)["survived"]
    assert survived["rows_isolated"] == 1 and survived["engine_restarts"] >= 4, survived  # a stall, three deaths
    assert "finished no row for 20 s (a hung engine)" in run.stderr() + run.stdout()


# --- a node lost --------------------------------------------------------------------------------

def test_a_lost_node_is_survived_on_the_other(node_lost, input_folder):
    _, input_ids = input_folder
    run = node_lost
    assert run.process.returncode == 0, run.stderr()[-3000:]
    ids = output_ids(run.out)
    assert len(ids) == len(set(ids)) == len(input_ids) and set(ids) == input_ids
    assert read_manifest(str(run.out))["counts"]["error"] == 0
    assert report_of(run.out)["survived"]["nodes_lost"] == 1
