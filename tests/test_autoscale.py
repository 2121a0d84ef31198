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

from conftest import REPO


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
