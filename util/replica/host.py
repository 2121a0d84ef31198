"""What a replica's process sets up before its engine starts: its engine's processes end with it, and on
CPU, its own share of the node's cores.

    prepare_replica_host(engine_kwargs)   # in the replica, before its first engine starts

- **Its engine's processes.** Ray kills a worker's child processes as the worker starts to exit, before
  the worker's exit hooks run, so a replica's engine would die under it and vLLM log a crash after a good
  run. The replicas' runtime env turns that off (util/engine.py replica_env_vars): the replica's exit hook
  stops its engine (util/replica/supervisor.py), and a watcher process, started here, ends whatever children the
  replica leaves when it dies any other way (ray.kill, SIGKILL, a crash), which Ray's own only partly did.
- **Its cores.** vLLM binds a CPU engine's threads to cores it picks for the node (all but one, with
  VLLM_CPU_OMP_THREADS_BIND=auto), whatever other engines run there: two replicas on one node then work on
  the same cores. With more than one replica in the job, each claims a slot of the node's cores (an
  exclusive lock on a file per slot, which the OS releases when the process dies, so a replica started
  again claims it again) and binds its engine's threads there, keeping one core of its share for the
  engine's other threads, as vLLM does, when its share has more than one. A user's own
  VLLM_CPU_OMP_THREADS_BIND wins; one replica keeps vLLM's binding.
"""

import fcntl
import os
import subprocess
import sys
import tempfile

REPLICAS_VAR = "BATCH_LLM_REPLICAS"  # the job's most replicas, in a CPU replica's environment
SLOTS_DIR = os.path.join(tempfile.gettempdir(), "batch-llm-cpu-slots")  # per node: /tmp is the node's own
WATCH_S = 0.5

# The watcher: every WATCH_S it notes its parent's children, keeping a scan only if the parent outlived it
# (one that dies mid-scan leaves the rest of its children orphaned, unseen). Once its parent is gone, it asks
# those still running to stop (SIGTERM: vLLM's engine stops itself), then kills what is left after 5 s. A
# child is known by its pid and start time, so a pid the system gave to a new process is left alone.
_WATCHER = r"""
import os, signal, sys, time
parent, me = int(sys.argv[1]), os.getpid()
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[1], fields[19]  # ppid, start time
    except (OSError, IndexError):
        return None, None
def children():
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            ppid, start = started(name)
            if ppid == str(parent):
                found.add((int(name), start))
    return found
known = set()
while True:
    found = children()
    if os.getppid() != parent:  # it died during the scan, which then saw its children already orphaned
        break
    known = found
    time.sleep(float(sys.argv[2]))
for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    for pid, start in known:
        if started(pid)[1] == start:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(started(pid)[1] == start for pid, start in known):
        time.sleep(0.1)
"""
_watcher: subprocess.Popen | None = None


def end_children_with_this_process() -> None:
    """Start the watcher (above), once per process, where Ray no longer kills this worker's children."""
    global _watcher
    if _watcher is None and sys.platform == "linux" and \
            os.environ.get("RAY_kill_child_processes_on_worker_exit", "").lower() in ("false", "0"):
        _watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), str(WATCH_S)],
                                    stdin=subprocess.DEVNULL, close_fds=True)


def physical_cores(cpus: list[int]) -> list[int]:
    """One logical CPU (the lowest) per physical core among `cpus`, as vLLM's own binding picks on x86."""
    kept = []
    for cpu in sorted(cpus):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings = parse_cpu_list(f.read())
        except OSError:
            siblings = [cpu]
        if cpu == min(set(siblings) & set(cpus) or {cpu}):
            kept.append(cpu)
    return kept


def parse_cpu_list(text: str) -> list[int]:
    """ "0-2,5" -> [0, 1, 2, 5]"""
    cpus = []
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def core_share(cores: list[int], slots: int, slot: int) -> list[int]:
    """The cores slot `slot` of `slots` binds its engine's threads to: an even, contiguous share of `cores`,
    less the last core of a share of several (the engine's other threads run there). More slots than cores:
    each slot gets one core, shared round the slots."""
    share = even_share(cores, slots, slot)
    return share[:-1] if len(share) > 1 else share


def even_share(cores: list[int], slots: int, slot: int) -> list[int]:
    if slots > len(cores):
        return [cores[slot % len(cores)]]
    size, extra = divmod(len(cores), slots)
    start = slot * size + min(slot, extra)
    return cores[start:start + size + (slot < extra)]


def claim_slot(slots: int, directory: str | None = None) -> tuple[int, object] | None:
    """The lowest free slot of `slots` on this node and the open file whose lock holds it (keep it open for
    as long as the slot is held; the OS releases it when the process dies); None when every slot is held."""
    directory = directory or SLOTS_DIR
    os.makedirs(directory, exist_ok=True)
    for slot in range(slots):
        held = open(os.path.join(directory, f"{slots}-slots-{slot}.lock"), "a")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.close()
            continue
        return slot, held
    return None


_held_slot = None  # this process's claimed slot: its lock lives as long as the process


def bind_cpu_replica(engine_kwargs: dict) -> str | None:
    """On a CPU replica of a job of several, or of an engine of several workers (tensor or pipeline parallel):
    claim a slot and set VLLM_CPU_OMP_THREADS_BIND to its cores, split by `|` among the workers (vLLM's own
    binding wants a NUMA node per worker), in this process's environment, which the engine's processes inherit
    (a new engine too). The cores bound, or None where vLLM's own binding stays (a GPU, one replica of one
    worker, the user's own binding, no slot free)."""
    global _held_slot
    if _held_slot is None:
        replicas = int(os.environ.get(REPLICAS_VAR) or 1)
        workers = engine_kwargs.get("tensor_parallel_size", 1) * engine_kwargs.get("pipeline_parallel_size", 1)
        if (replicas <= 1 and workers == 1) or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            return None
        _held_slot = claim_slot(replicas)
        if _held_slot is None:
            return None
        cores = even_share(physical_cores(sorted(os.sched_getaffinity(0))), replicas, _held_slot[0])
        shares = [core_share(cores, workers, worker) for worker in range(workers)]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, share)) for share in shares)
    return os.environ["VLLM_CPU_OMP_THREADS_BIND"]


def prepare_replica_host(engine_kwargs: dict) -> None:
    """In a replica, before its first engine starts: the watcher, on CPU its cores (above), and no progress bar
    of the weights' loading where vLLM logs warnings only (util/replica/workers.py QUIET_ENV_VARS: not --verbose)."""
    end_children_with_this_process()
    bind_cpu_replica(engine_kwargs)
    if os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() not in ("DEBUG", "INFO"):
        engine_kwargs.setdefault("use_tqdm_on_load", False)
