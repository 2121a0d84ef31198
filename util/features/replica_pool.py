"""Engines kept warm (a feature, util/parts.py): replicas that outlive one pipeline run, so that a driver
which runs the pipeline again (a notebook, a script looping over inputs, a test session) starts no engine
the second time.

    from util.pipeline import build_pipeline
    from util.features.replica_pool import ReplicaPool
    with ReplicaPool(plan) as pool:                     # starts `concurrency` engines, once
        for path in ["a.jsonl", "b.jsonl"]:
            ds = build_pipeline(plan, source=path, stages=pool.stages(plan))
            write_results(ds, f"out/{os.path.basename(path)}")    # the same engines, every time
    main.run(cfg, replicas=pool)                         # a whole job on them (same model and engine arguments)
    # leaving the block (or pool.shutdown()) stops the engines and gives their GPUs back

Ray Data's actor pool (the model's stage, util/pipeline.py) creates its replicas when a dataset starts and
ends them when it is done, so each run pays the engine start again. Here the replicas are plain Ray actors
that the pool owns: each holds one predictor (the plan's) with its engine, and takes up to
`batches_in_flight` batches at once. The pipeline's model stage is then a pool of light forwarders, a
hundredth of a CPU each and no GPU, that hand each batch, with its job's sampling and features' parts, to
the replica with the fewest batches of theirs in flight. So one pool serves any job of the same model and
engine arguments. The replicas live as long as the pool, at most as long as the driver: they are not
detached, so a driver that exits takes them, and their GPUs, with it.
"""

import logging
import time

import pyarrow as pa
import ray

from util.pipeline import actor_pool, pipeline_stages, predictor_stage

FORWARDER_CPUS = 0.01  # a forwarder only awaits its replica's answer
SHUTDOWN_TIMEOUT_S = 60  # for the engines to stop, then again for the killed replicas to end

logger = logging.getLogger(__name__)


def replica_class(predictor: type) -> type:
    """`predictor` as a plain Ray actor: `predict` answers a batch with a job's sampling and parts,
    `release` stops its engine before the actor is killed."""

    class WarmReplica(predictor):
        def release(self) -> None:
            if hasattr(self, "shutdown"):
                self.shutdown()

    WarmReplica.__name__ = WarmReplica.__qualname__ = f"Warm{predictor.__name__}"
    return WarmReplica


class ReplicaClient:
    """The model's stage when replicas are kept warm: one per replica in Ray Data's actor pool."""

    def __init__(self, replicas: list, sampling: dict, parts: list):
        self.replicas, self.sampling, self.parts = replicas, sampling, parts
        self.in_flight = [0] * len(replicas)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        index = self.in_flight.index(min(self.in_flight))
        self.in_flight[index] += 1
        try:
            return await self.replicas[index].predict.remote(batch, self.sampling, self.parts)
        finally:
            self.in_flight[index] -= 1


class ReplicaPool:
    """`plan.cfg.concurrency` replicas of `predictor` (by default the plan's), started now, placed as the
    plan says."""

    def __init__(self, plan, predictor: type | None = None):
        cfg = plan.cfg
        if plan.most_replicas != cfg.concurrency:  # its replicas start here, all of them, and stay
            raise ValueError(f"a ReplicaPool starts a fixed number of replicas, not --concurrency "
                             f"{cfg.concurrency}-{plan.most_replicas}: pass one number, or leave the pool out to let "
                             f"Ray Data's own pool autoscale")
        stage = predictor_stage(plan, predictor).map_batches
        self.model, self.engine_kwargs = cfg.model, plan.engine_kwargs
        self.batch_size, self.batches_in_flight = cfg.batch_size, cfg.batches_in_flight
        options = {k: v for k, v in stage.items() if k in ("num_gpus", "num_cpus", "accelerator_type", "runtime_env")}
        make_placement = stage.get("ray_remote_args_fn")  # a placement group per replica (TP x PP)
        actor = ray.remote(replica_class(stage["fn"]))
        self.replicas = []
        for _ in range(cfg.concurrency):
            placement = make_placement() if make_placement else {}
            self.replicas.append(actor.options(max_concurrency=cfg.batches_in_flight, **options, **placement).remote(
                **stage["fn_constructor_kwargs"]))
        ray.get([replica.__ray_ready__.remote() for replica in self.replicas])  # every engine has started

    def stages(self, plan, done=None, **options) -> list:
        """The plan's stages (pipeline_stages, with `options`), the model's stage forwarding to these replicas.
        ValueError for a plan of another model or other engine arguments than the pool's engines run."""
        if (plan.cfg.model, plan.engine_kwargs) != (self.model, self.engine_kwargs):
            raise ValueError(f"this pool's engines run {self.model} with {self.engine_kwargs}; the plan asks for "
                             f"{plan.cfg.model} with {plan.engine_kwargs}")
        forward = {"fn": ReplicaClient, "fn_constructor_kwargs": {"replicas": self.replicas, "sampling": plan.sampling,
                                                                  "parts": plan.parts},
                   "compute": actor_pool(len(self.replicas), self.batches_in_flight),
                   "batch_size": plan.cfg.batch_size, "batch_format": "pyarrow", "num_cpus": FORWARDER_CPUS}
        model_stage = predictor_stage(plan).name
        return [stage.with_options(**forward) if stage.name == model_stage else stage
                for stage in pipeline_stages(plan, done, **options)]

    def shutdown(self) -> None:
        """Stop every engine and end the replicas: their GPUs are free when this returns."""
        replicas, self.replicas = self.replicas, []
        try:
            ray.get([replica.release.remote() for replica in replicas], timeout=SHUTDOWN_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # a replica already gone has no engine to stop
        for replica in replicas:
            ray.kill(replica)
        # ray.kill only asks: a replica may still answer (and hold its GPU) for a moment after it returns.
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for replica in replicas:
            while not actor_has_ended(replica, timeout_s=deadline - time.monotonic()):
                if time.monotonic() >= deadline:
                    logger.warning("a replica has not ended %d s after it was killed; its resources may still "
                                   "be held", SHUTDOWN_TIMEOUT_S)
                    break
                time.sleep(0.1)

    def __enter__(self) -> "ReplicaPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def actor_has_ended(actor, timeout_s: float) -> bool:
    """Whether `actor` is dead: a call to it fails with RayActorError instead of being answered."""
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=max(timeout_s, 0.1))
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        pass  # dying, or hung: not ended yet
    return False
