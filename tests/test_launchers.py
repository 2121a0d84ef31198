"""A refused input ends the job however it was started: exit 2, its message, no output, and no process of
the run left 30 s later. The verdict travels by the progress actor (util/scan.py ScanBeside), never as a
signal, so it holds where SIGINT is ignored (a background job of a non-interactive shell, a supervisor that
ignores it for its children), off the main thread, and under `ray job submit`.

    .venv/bin/python -m pytest tests/test_launchers.py -q
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, Run, write_jsonl
from util.model_dirs.tiny_model import tiny_model_dir

# Each test runs main.py, with its own Ray and engine, in a subprocess: alone, as Ray's fixed 30 s wait for that
# cluster's start failed it beside the other worker's engines.
pytestmark = [pytest.mark.harness, pytest.mark.solo]

REFUSAL = "error: duplicate id 'x' in column 'uid': a.jsonl:1 and b.jsonl:1"
LEFT_WITHIN_S = 30
# main.main in a thread that is not the main thread, as a driver that runs jobs from a thread pool would.
IN_A_THREAD = ("import sys, threading, main; code = []; "
               "thread = threading.Thread(target=lambda: code.append(main.main(sys.argv[1:]))); "
               "thread.start(); thread.join(); sys.exit(code[0])")


@pytest.fixture(scope="module")
def duplicate_ids(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("input") / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"uid": "x", "text": "a"}])
    write_jsonl(folder / "b.jsonl", [{"uid": "x", "text": "b"}])
    return folder


def job_args(folder: Path, out: Path) -> list:
    return ["--model", tiny_model_dir(), "--concurrency", "1", "--input-path", folder, "--id-column", "uid",
            "--output-path", out]


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def processes_left(run: Run, within_s: float = LEFT_WITHIN_S, besides: tuple = ()) -> list[str]:
    """The run's processes, but those titled `besides`, still alive `within_s` after it exited."""
    deadline = time.monotonic() + within_s
    while True:
        left = [" ".join(p.cmdline())[:120] for p in run.processes()]
        left = [command for command in left if not command.startswith(besides)] if besides else left
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def driver_lines(log: str) -> list[str]:
    """The lines main.py itself wrote: Ray streams its workers' lines into the same stream, each line behind
    its process's name, `(MapWorker(...) pid=...)`, in color or not, and they may come after main.py's last."""
    return [line for line in log.splitlines() if not line.startswith(("(", "\x1b[36m("))]


def check_refused(run: Run, out: Path, agents_within_s: float = LEFT_WITHIN_S) -> None:
    try:
        code = run.wait(timeout=420)
        assert code == 2, run.stderr()[-3000:]
        assert driver_lines(run.stderr())[-1] == REFUSAL
        assert not out.exists()
        assert processes_left(run, besides=RAY_AGENTS) == []
        assert processes_left(run, agents_within_s) == []
    finally:
        run.kill_leftovers()
        shutil.rmtree(run.ray_dir, ignore_errors=True)


def test_with_sigint_ignored_as_a_background_job_starts_it(duplicate_ids, tmp_path):
    """`python main.py ... &` in a script: the shell starts it with SIGINT ignored, which Python keeps."""
    out = tmp_path / "out"
    run = Run(tmp_path, job_args(duplicate_ids, out), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    check_refused(run, out)


def test_from_a_thread_that_is_not_the_main_thread(duplicate_ids, tmp_path):
    """Ray's own two agents outlive a local cluster started from a thread by about 50 s (they poll for their
    raylet; seen with a bare `ray.init()` in a thread too): every process of the job is gone within 30 s."""
    out = tmp_path / "out"
    run = Run(tmp_path, job_args(duplicate_ids, out), command=[sys.executable, "-c", IN_A_THREAD])
    check_refused(run, out, agents_within_s=90)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A local test cluster without Ray's token authentication, which `ray start` turns on by default.
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}
# Ray's dashboard and job server, installed apart (requirements-job-server.txt), for this cluster alone.
JOB_SERVER = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(sys.prefix) / "job-server"),
                                                          os.environ.get("PYTHONPATH")]))}


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **NO_AUTH, **JOB_SERVER})


def test_under_ray_job_submit_the_job_fails_with_the_message(duplicate_ids, tmp_path):
    """The way an Anyscale job runs it: a job's entrypoint on a running cluster, its status FAILED."""
    out, dashboard = tmp_path / "out", f"http://127.0.0.1:{free_port()}"
    # The cluster: `ray start --head` in a session of its own, so that everything it starts can be found.
    head = Run(tmp_path, ["start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
                          "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard.rsplit(":", 1)[1],
                          "--port", str(free_port())],
               command=[str(Path(sys.executable).parent / "ray")], env={"RAY_ADDRESS": "", **NO_AUTH, **JOB_SERVER})
    try:
        deadline = time.monotonic() + 300  # the dashboard and job server start slowly on a loaded machine
        while ray_cli("job", "list", "--address", dashboard).returncode != 0:
            assert head.process.poll() is None and time.monotonic() < deadline, head.stderr()[-2000:] + dashboard_log(head)
            time.sleep(1)
        # The entrypoint runs in a shell on the head, in its folder: the repository's.
        submitted = ray_cli("job", "submit", "--address", dashboard, "--submission-id", "refused", "--",
                            sys.executable, "main.py", *map(str, job_args(duplicate_ids, out)), timeout=420)
        assert submitted.returncode != 0
        assert job_status(dashboard, "refused") == "FAILED"
        logs = ray_cli("job", "logs", "--address", dashboard, "refused").stdout
        assert logs.splitlines()[-1] == REFUSAL, logs[-3000:]
        assert not out.exists()
        # The cluster stays up, but the job's replicas and engines are gone: only the cluster's own processes.
        deadline = time.monotonic() + LEFT_WITHIN_S
        while job_processes(head) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert job_processes(head) == []
    finally:  # not `ray stop`: it would stop every Ray on this machine, another test's too
        head.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        head.kill_leftovers()
        shutil.rmtree(head.ray_dir, ignore_errors=True)


def dashboard_log(head: Run) -> str:
    return "".join(f"\n{log}:\n{log.read_text(errors='replace')[-2000:]}"
                   for log in sorted(head.ray_dir.glob("**/logs/dashboard*.log")))


def job_status(dashboard: str, submission_id: str) -> str:
    code = ("import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    deadline, status = time.monotonic() + 120, None
    while time.monotonic() < deadline:  # a busy job server may not answer the first time
        status = subprocess.run([sys.executable, "-c", code, dashboard, submission_id], capture_output=True, text=True,
                                timeout=60, env={**os.environ, **NO_AUTH, **JOB_SERVER})
        if status.stdout.strip():
            return status.stdout.strip()
        time.sleep(2)
    return status.stderr[-2000:]


def job_processes(head: Run) -> list[str]:
    """The cluster's processes that the job started: its driver, replicas (MapWorker actors), vLLM's engines."""
    commands = []
    for process in head.processes():
        try:
            commands.append(process.cmdline())
        except psutil.Error:  # it exited while we looked
            pass
    return [" ".join(c)[:120] for c in commands if c and (c[0].startswith(("ray::MapWorker", "VLLM::"))
                                                        or c[1:2] == ["main.py"])]

