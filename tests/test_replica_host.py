"""util/replica/host.py without an engine: how a node's cores are shared among CPU replicas, how a replica
claims its slot (and one whose process died leaves it to the next), when vLLM's own binding stays, and the
watcher that ends a replica's children when the replica dies.

    .venv/bin/python -m pytest tests/test_replica_host.py
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from util.replica import host as replica_host
from util.replica.host import bind_cpu_replica, claim_slot, core_share, parse_cpu_list


@pytest.mark.parametrize("cores, replicas, shares", [
    (2, 1, [[0]]),  # one replica: its share less the core kept for the engine's other threads, as vLLM's own
    (2, 2, [[0], [1]]),
    (2, 3, [[0], [1], [0]]),  # more replicas than cores: one core each, shared round them
    (4, 1, [[0, 1, 2]]),
    (4, 2, [[0], [2]]),
    (4, 3, [[0], [2], [3]]),
    (16, 1, [list(range(15))]),
    (16, 2, [list(range(7)), list(range(8, 15))]),
    (16, 3, [[0, 1, 2, 3, 4], [6, 7, 8, 9], [11, 12, 13, 14]]),
])
def test_each_replica_gets_its_own_cores(cores, replicas, shares):
    got = [core_share(list(range(cores)), replicas, slot) for slot in range(replicas)]
    assert got == shares
    if replicas <= cores:  # no core is in two shares
        assert len({core for share in got for core in share}) == sum(map(len, got))


def test_parse_cpu_list():
    assert parse_cpu_list("0-2,5\n") == [0, 1, 2, 5]
    assert parse_cpu_list("7") == [7]


def test_slots_are_claimed_lowest_first_and_a_full_node_gives_none(tmp_path):
    first, second = claim_slot(2, str(tmp_path)), claim_slot(2, str(tmp_path))
    assert (first[0], second[0]) == (0, 1)
    assert claim_slot(2, str(tmp_path)) is None
    second[1].close()  # its holder is gone: the slot is free again
    again = claim_slot(2, str(tmp_path))
    assert again[0] == 1


def test_a_slot_held_by_a_dead_process_is_claimed_again(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from util.replica.host import claim_slot; "
                               f"held = claim_slot(2, {str(tmp_path)!r}); print(held[0], flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": "."})
    try:
        assert holder.stdout.readline().strip() == "0"
        assert claim_slot(2, str(tmp_path))[0] == 1  # slot 0 is the other process's
    finally:
        holder.kill()
        holder.wait()
    assert claim_slot(2, str(tmp_path))[0] == 0  # the OS released its lock with it


@pytest.fixture
def fresh_binding(monkeypatch, tmp_path):
    monkeypatch.setattr(replica_host, "_held_slot", None)
    monkeypatch.setattr(replica_host, "SLOTS_DIR", str(tmp_path))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(replica_host.os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(replica_host, "physical_cores", lambda cpus: cpus)


def test_a_replica_of_two_binds_its_engine_to_its_slot(fresh_binding, monkeypatch):
    monkeypatch.setenv("BATCH_LLM_REPLICAS", "2")
    other = claim_slot(2, replica_host.SLOTS_DIR)  # another replica holds slot 0 (while this stays open)
    assert other[0] == 0 and bind_cpu_replica({}) == "2" == os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    assert bind_cpu_replica({}) == "2"  # a new engine of the same replica: the same cores


@pytest.mark.parametrize("replicas, engine, binding", [
    ("1", {"pipeline_parallel_size": 2}, "0|2"),  # one replica: a share of its node's cores per worker, less one
    ("2", {"tensor_parallel_size": 2}, "0|1"),  # slot 0 of 2 (cores 0-1), a core per worker
    ("1", {"tensor_parallel_size": 2, "pipeline_parallel_size": 4}, "0|1|2|3|0|1|2|3"),  # more workers than cores
])
def test_an_engine_of_several_workers_gets_cores_of_their_own_for_each(fresh_binding, monkeypatch, replicas, engine,
                                                                       binding):
    # vLLM's own binding wants a NUMA node per worker: "Not enough allowed NUMA nodes to bind threads of 2 local
    # CPUWorkers" on a machine of one.
    monkeypatch.setenv("BATCH_LLM_REPLICAS", replicas)
    assert bind_cpu_replica(engine) == binding == os.environ["VLLM_CPU_OMP_THREADS_BIND"]


@pytest.mark.parametrize("replicas, user_binding, engine", [
    ("1", None, {}),  # one replica: vLLM's own binding
    (None, None, {}),  # a GPU replica: no count in its environment
    ("2", "0-1", {}),  # the user's own binding wins
    ("1", "0|1", {"tensor_parallel_size": 2}),  # the user's own, for several workers too
])
def test_vllm_keeps_its_own_binding(fresh_binding, monkeypatch, replicas, user_binding, engine):
    for name, value in (("BATCH_LLM_REPLICAS", replicas), ("VLLM_CPU_OMP_THREADS_BIND", user_binding)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert bind_cpu_replica(engine) is None
    assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == user_binding


def test_a_full_node_keeps_vllms_binding(fresh_binding, monkeypatch):
    monkeypatch.setenv("BATCH_LLM_REPLICAS", "2")
    held = [claim_slot(2, replica_host.SLOTS_DIR) for _ in range(2)]
    assert all(held) and bind_cpu_replica({}) is None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the watcher reads /proc")
def test_the_watcher_ends_the_children_of_a_process_killed_outright():
    # A stand-in replica: it starts the watcher (as a replica whose Ray leaves its children to it), then a
    # child that ignores nothing, then one that ignores SIGTERM, prints their pids, and waits to be killed.
    # The watcher scans without pause, so the kill mostly lands mid-scan: a watcher that trusted such a
    # scan saw no children left and ended none (a killed job once left its engine running that way).
    replica = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from util.replica import host as replica_host\n"
        "replica_host.WATCH_S = 0.0\n"
        "replica_host.end_children_with_this_process()\n"
        "a = subprocess.Popen(['sleep', '300'])\n"
        "b = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
        "print(a.pid, b.pid, flush=True)\n"
        "time.sleep(300)\n")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": ".", "RAY_kill_child_processes_on_worker_exit": "false"})
    children = [int(pid) for pid in replica.stdout.readline().split()]
    time.sleep(1.0)  # the watcher has seen them
    assert all(alive(pid) for pid in children)
    replica.send_signal(signal.SIGKILL)  # no exit hook runs
    replica.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in children)


def test_no_watcher_where_ray_still_kills_the_children(monkeypatch):
    monkeypatch.setattr(replica_host, "_watcher", None)
    monkeypatch.delenv("RAY_kill_child_processes_on_worker_exit", raising=False)
    replica_host.end_children_with_this_process()
    assert replica_host._watcher is None
