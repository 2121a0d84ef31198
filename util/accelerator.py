"""Which GPU (or the CPU) the inference replicas ask Ray for.

    import ray
    from util.accelerator import choose_accelerator
    ray.init()
    choice = choose_accelerator("auto")                 # or "A10G", "L4", "H100", "any"
    ds.map_batches(..., **choice.ray_remote_args(gpus_per_replica=1))

"auto" means an A10G-class (24 GB) GPU: "A10G" on AWS, "L4" on GCP. What the cluster advertises wins;
a short probe of the cloud's metadata server is the fallback, and None means "any GPU will do".
"""

import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message

from util.resources import CPU_REPLICA_CPUS

# Module constants so tests can point the probes at a local server instead of a real cloud.
GCP_METADATA_URL = "http://metadata.google.internal"
AWS_METADATA_URL = "http://169.254.169.254/latest/meta-data/"

A10G_EQUIVALENTS = ("A10G", "L4")  # preference order when a cluster advertises both
_ACCELERATOR_PREFIX = "accelerator_type:"

# Metadata servers are link-local: going through an HTTP(S)_PROXY from the environment would be wrong.
_no_proxy_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def advertised_accelerator_types(cluster_resources: dict) -> list[str]:
    """The accelerator types Ray nodes advertise, e.g. ["A10G"] from {"accelerator_type:A10G": 1.0}."""
    return sorted(k[len(_ACCELERATOR_PREFIX):] for k in cluster_resources if k.startswith(_ACCELERATOR_PREFIX))


def _current_cluster_resources() -> dict:
    import ray  # imported late: this module must stay usable (and testable) without a running cluster

    return ray.cluster_resources() if ray.is_initialized() else {}


def _probe(request: urllib.request.Request, timeout_s: float) -> tuple[int, Message] | None:
    """(status, headers) of whatever answered in time, or None when nothing did: then it is not this cloud."""
    try:
        with _no_proxy_opener.open(request, timeout=timeout_s) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:  # an HTTP answer all the same, e.g. 401 (caught before Exception)
        error.close()
        return error.code, error.headers
    except Exception:  # refused, unresolvable, timed out, garbled: whatever it is, it is not this cloud
        return None


def _on_gcp(timeout_s: float) -> bool:
    answer = _probe(urllib.request.Request(GCP_METADATA_URL, headers={"Metadata-Flavor": "Google"}), timeout_s)
    # Only Google's metadata server sets this header; `.get` because other servers leave it out.
    return answer is not None and answer[0] == 200 and answer[1].get("Metadata-Flavor") == "Google"


def _on_aws(timeout_s: float) -> bool:
    # One tokenless GET: 200 from IMDSv1, 401 from instances that require IMDSv2 tokens. (The IMDSv2 token
    # PUT is skipped on purpose: with the default hop limit its answer never reaches a container.)
    answer = _probe(urllib.request.Request(AWS_METADATA_URL), timeout_s)
    return answer is not None and answer[0] in (200, 401)


def get_a10g_or_equivalent_accelerator_type(
    cluster_resources: dict | None = None, timeout_s: float = 1.0
) -> str | None:
    """"A10G" or "L4" (the 24 GB class on AWS / GCP), or None when neither the cluster nor the cloud tells."""
    if cluster_resources is None:
        cluster_resources = _current_cluster_resources()
    advertised = advertised_accelerator_types(cluster_resources)
    for accelerator_type in A10G_EQUIVALENTS:
        if accelerator_type in advertised:
            return accelerator_type
    if advertised:  # GPUs of another class (H100, ...) are up: ask for none, the replicas fit there.
        return None
    # Nodes with GPUs may not be up yet (autoscaling): ask the cloud which GPU name it would use.
    if _on_gcp(timeout_s):
        return "L4"
    if _on_aws(timeout_s):
        return "A10G"
    return None


@dataclass(frozen=True)
class AcceleratorChoice:
    use_gpu: bool
    accelerator_type: str | None  # None: no constraint, any GPU node will do
    num_gpus_in_cluster: float

    def ray_remote_args(self, gpus_per_replica: float) -> dict:
        """Resource kwargs for Ray Data `map_batches` (one replica = one vLLM engine)."""
        if not self.use_gpu:
            # A fraction of a CPU: on a small machine a whole one per replica would leave no CPU
            # for the read and write tasks, and the pipeline would stall. vLLM uses its own threads.
            return {"num_cpus": CPU_REPLICA_CPUS}
        constraint = {"accelerator_type": self.accelerator_type} if self.accelerator_type else {}
        return {"num_gpus": gpus_per_replica, **constraint}


def choose_accelerator(
    requested_type: str | None = None, cluster_resources: dict | None = None, timeout_s: float = 1.0
) -> AcceleratorChoice:
    """GPU or CPU, and which accelerator_type to require. Raises ValueError for a type the cluster lacks.

    `requested_type`: None or "auto" (A10G-class), "any" (no constraint) or a Ray type name ("H100", ...).
    Without `cluster_resources`, asks the running Ray cluster (the caller must have called ray.init()).
    """
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources()
    num_gpus = float(cluster_resources.get("GPU", 0))
    if num_gpus <= 0:
        return AcceleratorChoice(use_gpu=False, accelerator_type=None, num_gpus_in_cluster=0.0)

    if requested_type in (None, "auto"):
        accelerator_type = get_a10g_or_equivalent_accelerator_type(cluster_resources, timeout_s)
    elif requested_type == "any":
        accelerator_type = None
    else:
        advertised = advertised_accelerator_types(cluster_resources)
        if advertised and requested_type not in advertised:
            # Ray would otherwise queue the replicas forever waiting for a node type that never comes.
            raise ValueError(
                f"Accelerator type {requested_type!r} was requested, but this cluster advertises only "
                f"{', '.join(advertised)}. Pick one of those, 'auto' or 'any'."
            )
        accelerator_type = requested_type
    return AcceleratorChoice(use_gpu=True, accelerator_type=accelerator_type, num_gpus_in_cluster=num_gpus)
