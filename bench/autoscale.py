"""An autoscaling pool on a growing cluster (--concurrency MIN-MAX), on CPU with the stand-in stages.

    python -m bench.autoscale --out /tmp/autoscale              # 1-2 replicas; a second node joins mid-run
    python -m bench.autoscale --out /tmp/autoscale --rows 2000  # a longer run

A local Ray cluster of fake nodes (ray.cluster_utils.Cluster) stands for an autoscaling one: each
replica needs one unit of a custom resource, a "GPU slot", and the head has MIN of them. The run starts
on those; once its first batch is in, a node with one more slot joins, as a cloud autoscaler's would,
and Ray Data's pool starts a replica there. The predictor and formatter are bench/scale.py's stand-ins
(no model), slowed to PACE_S a batch so that the run outlasts a node's start. Everything else is the
project's own: the plan, the pipeline, the writer and the run report.

Prints the run report, then one JSON line: when the node was added (seconds from the run's start, as
the report's join times), the report, and whether the output holds every input id exactly once.
"""

import argparse
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

from bench.scale import StandInPredictor, make_input, output_check, stand_in_formatter

SLOT = "replica_slot"  # the custom resource each replica needs: a GPU, as far as the scheduler goes
PACE_S = 0.2  # a stand-in batch's time: a few seconds of work, so the new node joins mid-run


class SlowStandIn(StandInPredictor):
    def __call__(self, batch):
        time.sleep(PACE_S)
        return super().__call__(batch)


def add_node_after_first_batch(cluster, progress, running: threading.Thread) -> dict:
    """The cluster grows once the run is under way: after the first replica's first batch. (From the
    main thread: starting a node sets signal handlers.)"""
    import ray

    from util.replica.supervisor import PROGRESS_ACTOR

    actor = ray.get_actor(PROGRESS_ACTOR)
    while ray.get(actor.totals.remote())["rows"] == 0 and running.is_alive():
        time.sleep(0.2)
    added = {"rows_before": ray.get(actor.totals.remote())["rows"], "at_s": round(time.time() - progress.started, 1)}
    cluster.add_node(num_cpus=4, resources={SLOT: 1})
    return added


def run(out: Path, rows: int, least: int, most: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from util.config import Config
    from util.output import write_results
    from util.pipeline import build_pipeline, pipeline_stages
    from util.plan import make_plan
    from util.report import ProgressReporter
    from util.results import format_report

    # The fake nodes' workers import util/ and bench/ from this checkout, whatever their cwd.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH")) if p)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {SLOT: least},
                                                            "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        input_path = make_input(out / "input", rows, files=1)
        cfg = Config(model="stand-in", input_path=str(input_path), input_format="jsonl", concurrency=least,
                     max_concurrency=most, batch_size=10, batches_in_flight=2, output_path=str(out / "output"))
        plan = make_plan(cfg, resolve_model_files=False)
        plan = dataclasses.replace(plan, replica_resources={**plan.replica_resources, "resources": {SLOT: 1}})
        stages = pipeline_stages(plan, formatter=stand_in_formatter, predictor=SlowStandIn)
        result = {}
        with ProgressReporter(rows, interval_s=5, gpus=plan.gpus_held) as progress:
            running = threading.Thread(target=lambda: result.update(
                written=write_results(build_pipeline(plan, stages=stages), cfg.output_path)), daemon=True)
            running.start()
            added = add_node_after_first_batch(cluster, progress, running)
            running.join()
        written = result["written"]  # KeyError: the run failed (its traceback is above)
        report = progress.report(written)
        print(format_report(report), flush=True)
        return {"node_added_s": added["at_s"], "rows_before_node": added["rows_before"],
                "report": report, **output_check(cfg.output_path, rows)}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="input and output go here (emptied first)")
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--concurrency", default="1-2", help="MIN-MAX replicas; the head holds MIN")
    args = parser.parse_args()
    from util.config import parse_concurrency

    least, most = parse_concurrency(args.concurrency)
    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    print(json.dumps(run(out, args.rows, least, most)), flush=True)
