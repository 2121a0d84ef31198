"""Autoscaling replicas (a feature, util/parts.py): `--concurrency MIN-MAX` runs Ray Data's autoscaling
actor pool, which starts the run as soon as one replica is ready and grows to MAX as the cluster adds GPUs.

    python main.py --input-path s3://my-bucket/prompts.jsonl --concurrency 1-8

Ray Data starts the work with the first replica ready (DataContext.wait_for_min_actors_s is -1 by default:
no waiting for MIN), and another replica, up to MAX, while every replica is busy; one that waits for a GPU
joins when a node brings it. A CPU-only cluster must fit MIN (util/plan.py); GPU-hours in the run report
count MAX, a bound. `python -m bench.autoscale` shows it on a local cluster whose second node joins mid-run.
"""

import dataclasses
import math

import ray

from util.errors import InputError
from util.parts import Part, flag
from util.pipeline import actor_pool


@dataclasses.dataclass
class Flags:
    max_concurrency: int | None = flag("The most replicas; set by --concurrency MIN-MAX (None: a fixed pool of "
                                       "`concurrency`).", is_flag=False, default=None)


def concurrency_text(least: int, most: int | None) -> str:
    """--concurrency as written: "4", or "1-8" for an autoscaling pool."""
    return f"{least}" if most is None else f"{least}-{most}"


def check(cfg) -> dict:
    if cfg.max_concurrency is None:
        return {}
    if not cfg.concurrency >= 1:
        raise InputError(f"--concurrency needs at least 1 replica, got {concurrency_text(cfg.concurrency, cfg.max_concurrency)}")
    if not cfg.max_concurrency >= cfg.concurrency:
        raise InputError(f"--concurrency MIN-MAX needs MIN <= MAX, got {concurrency_text(cfg.concurrency, cfg.max_concurrency)}")
    return {"max_concurrency": None} if cfg.max_concurrency == cfg.concurrency else {}  # 4-4: a fixed pool of 4


def tasks_in_flight(batches_in_flight: int) -> int:
    """Batches Ray Data sends each replica of an autoscaling pool: more than it runs together, queued behind
    them. Ray Data starts another replica only while the pool's batches exceed its running slots by the
    DataContext's autoscaling_config.actor_pool_util_upscaling_threshold (1.75x by default): with no batch
    queued, it would never grow past MIN."""
    threshold = ray.data.DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
    return max(batches_in_flight, math.ceil(threshold * batches_in_flight))


class Autoscale(Part):
    def __init__(self, least: int, most: int):
        self.least, self.most = least, most
        self.plan = {"most_replicas": most}

    def stages(self, plan, stages: list) -> list:
        """The model's stage as an autoscaling actor pool of MIN to MAX replicas."""
        cfg = plan.cfg
        compute = actor_pool(self.least, cfg.batches_in_flight, self.most, tasks_in_flight(cfg.batches_in_flight))
        return [stage.with_options(compute=compute) if "compute" in stage.map_batches else stage for stage in stages]


def part(plan) -> Autoscale | None:
    cfg = plan.cfg
    if cfg.max_concurrency is None:
        return None
    return Autoscale(cfg.concurrency, cfg.max_concurrency)
