"""Faults injected into real runs of main.py (Ray Data, CPU vLLM, the tiny local model):

- the whole job is SIGKILLed mid-run: it leaves only whole files and no process, and a re-run writes
  exactly the missing rows;
- a replica's vLLM engine process is SIGKILLed three times, at random moments, then the replica's actor:
  the replica gets a new engine each time (util/replica/supervisor.py), Ray restarts the actor, and every row is
  written once;
- (tests/test_faults_isolated.py, with these helpers: a row that kills every engine, a hung engine, a node
  lost mid-run;)
- the Hugging Face token reaches the engine but no log, output or file.

    .venv/bin/python -m pytest tests/test_faults.py -q --durations=0

Each run gets its own RAY_TMPDIR, so its Ray session logs can be searched, and its own session
(start_new_session), so every process it starts, Ray's workers and vLLM's included, can be found.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import PROMPTS, REPO, Run, line_ids
from util.resume import MANIFEST_NAME, read_manifest
from util.model_dirs.tiny_model import tiny_model_dir

# Every test here starts vLLM engines in main.py runs of their own, each starting its Ray: alone (make test runs
# `solo` tests after the others), since Ray's node start has a fixed 30 s that a loaded 2-core machine misses.
pytestmark = [pytest.mark.engine, pytest.mark.solo]

SENTINEL = f"hf_SENTINEL{uuid.uuid4().hex}"  # stands in for a real token; must appear nowhere
ACTOR_TITLE = "ray::MapWorker(MapBatches(LLMPredictor))"  # Ray titles an actor's process after its class
ENGINE_TITLE = "VLLM::EngineCore"

# The formatter hands the replica blocks of at least 256 rows, and each block is written as one file.
# Four input files of 260 rows give four blocks; one batch in flight makes the replica finish them one
# after another, so files are committed several seconds apart and a fault can land between them.
FILES, ROWS_PER_FILE = 4, 260
RUN_ARGS = ["--batch-size", "32", "--batches-in-flight", "1", "--max-tokens", "64", "--concurrency", "1"]
FAULT_PLUGIN = REPO / "tests" / "fault_plugin"  # a vLLM plugin that kills or hangs the engine on a marked row
KILL_SEED, STALL_SEED = 4242, 4343  # the marks: a row's sampling seed


# --- helpers -------------------------------------------------------------------------------------

def write_input(folder: Path) -> set[str]:
    """The input files; returns the ids main.py must give their rows."""
    folder.mkdir()
    ids = set()
    for k in range(FILES):
        lines = [PROMPTS[(k * ROWS_PER_FILE + i) % len(PROMPTS)] for i in range(ROWS_PER_FILE)]
        (folder / f"prompts_{k}.txt").write_text("\n".join(lines) + "\n")
        ids |= set(line_ids(f"prompts_{k}.txt", lines))
    return ids


def start(tmp_path_factory, name: str, input_path: Path, out: Path, env: dict[str, str], args=RUN_ARGS) -> Run:
    run = Run(tmp_path_factory.mktemp(name), ["--model", tiny_model_dir(), "--input-path", str(input_path),
                                              "--output-path", str(out), *args], env)
    RAY_DIRS.append(run.ray_dir)
    run.out = out
    return run


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def committed_files(out: Path) -> list[Path]:
    """The data files a reader sees: Arrow's dataset discovery, like Spark's, skips names starting
    with '.' or '_' (temporary files, the manifest)."""
    try:  # the output path's write check makes the folder and removes it again before the run writes
        return sorted(p for p in out.rglob("*") if p.is_file()
                      and not any(part.startswith((".", "_")) for part in p.relative_to(out).parts))
    except FileNotFoundError:
        return []


def wait_for_commit(run: Run, timeout: float = 480) -> None:
    def committed():
        assert run.process.poll() is None, f"main.py ended before it wrote a file:\n{run.stderr()[-3000:]}"
        return committed_files(run.out)
    wait_for(committed, timeout, f"a committed file in {run.out}")


def output_ids(out: Path) -> list[str]:
    """Every row id in the output, errors/ included; the recursive read a user would do."""
    return pads.dataset(out, format="parquet").to_table(columns=["id"])["id"].to_pylist()


def files_containing(text: str, *roots: Path) -> list[str]:
    """Every file under `roots`, but in .venv and .git, whose bytes contain `text`."""
    needle, found = text.encode(), []
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = [d for d in subfolders if d not in (".venv", ".git")]
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if os.path.isfile(path) and not os.path.islink(path) and needle in Path(path).read_bytes():
                        found.append(path)
                except OSError:  # a file another test removed meanwhile
                    pass
    return found


# --- runs, shared by the tests -------------------------------------------------------------------

RAY_DIRS: list[Path] = []  # the runs' Ray folders, outside pytest's: removed when the module is done


@pytest.fixture(scope="module", autouse=True)
def ray_dirs_removed():
    yield
    for folder in RAY_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input") / "prompts"
    return folder, write_input(folder)


def whole_file_rows(path: Path) -> tuple[int, list[str]] | str:
    """(rows in the footer, ids read) of a complete Parquet file, else why it is not one."""
    try:
        return pq.ParquetFile(path).metadata.num_rows, pq.read_table(path)["id"].to_pylist()
    except Exception as error:
        return f"{type(error).__name__}: {error}"


@pytest.fixture(scope="module")
def crash_and_resume(tmp_path_factory, input_folder):
    """A run whose whole process group is SIGKILLed after its first file, then the same command again."""
    folder, _ = input_folder
    out = tmp_path_factory.mktemp("crash") / "out"
    crashed = start(tmp_path_factory, "r", folder, out, {"HF_TOKEN": SENTINEL})
    try:
        wait_for_commit(crashed)
        os.killpg(crashed.sid, signal.SIGKILL)  # the driver, and the local Ray cluster it started
        crashed.wait()
        # Ray's workers and vLLM's engine have process groups of their own: they must exit by themselves.
        try:
            wait_for(lambda: not crashed.processes(), 60, "the killed run's processes to exit")
        except AssertionError:
            pass
        survivors = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in crashed.processes()]
        committed = {p.relative_to(out).as_posix(): whole_file_rows(p) for p in committed_files(out)}
        others = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                        if p.is_file() and p not in committed_files(out))
        manifest_after_crash = read_manifest(str(out))
    finally:
        crashed.kill_leftovers()
    resumed = start(tmp_path_factory, "r", folder, out, {"HF_TOKEN": SENTINEL})
    try:
        resumed.wait()
    finally:
        resumed.kill_leftovers()
    return {"crashed": crashed, "survivors": survivors, "committed": committed, "others": others,
            "manifest_after_crash": manifest_after_crash, "resumed": resumed, "out": out}


@pytest.fixture(scope="module")
def replica_faults(tmp_path_factory, input_folder):
    """One run whose replica's vLLM engine process is SIGKILLed three times (once its first file is written,
    then each time at a random moment after the new engine's process appeared: starting, or generating),
    and then whose replica's actor is SIGKILLed. The token comes from a stored `hf auth login` here, not
    from $HF_TOKEN, so only Ray's setup hook can hand it to the workers."""
    folder, _ = input_folder
    hf_home = tmp_path_factory.mktemp("hf_home")
    (hf_home / "token").write_text(SENTINEL)
    run = start(tmp_path_factory, "r", folder, tmp_path_factory.mktemp("replica") / "out", {"HF_HOME": str(hf_home)})
    killed, chance = [], random.Random(os.environ.get("FAULT_SEED", "0"))
    new_engine = lambda: [p for p in run.processes(ENGINE_TITLE) if p.pid not in killed] or run.process.poll() is not None
    try:
        wait_for_commit(run)  # the first engine is up: a replica whose first start fails is Ray Data's to retry
        for moment in range(4):  # three engines, then the replica's actor
            found = wait_for(new_engine, 480, "a new engine")
            time.sleep(chance.uniform(1, 8) if moment else 0)
            if found is True or run.process.poll() is not None:
                break
            if moment < 3:
                found[0].kill()
                killed.append(found[0].pid)
                continue
            [actor] = run.processes(ACTOR_TITLE)
            [engine] = [p for p in actor.children() if " ".join(p.cmdline()).startswith(ENGINE_TITLE)]
            actor.kill()
            killed.append(engine.pid)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, 60,
                         "the killed replica's engine to exit")
            engine_left = engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE
            restarted = wait_for(new_engine, 480, "the restarted replica's engine")
            # The environment it started with: the token must reach the process that downloads the model.
            engine_environ = Path(f"/proc/{restarted[0].pid}/environ").read_bytes() if restarted is not True else b""
        run.wait()
    finally:
        run.kill_leftovers()
    assert len(killed) == 4, f"the run ended after {len(killed)} of its 4 faults:\n{run.stderr()[-3000:]}"
    return {"run": run, "engine_left": engine_left, "engine_environ": engine_environ}


def report_of(out: Path) -> dict:
    return json.loads((out / "_report.json").read_text())


# --- 1. the whole job killed, then run again -----------------------------------------------------

def test_killed_job_leaves_only_whole_files(crash_and_resume, input_folder):
    _, input_ids = input_folder
    committed = crash_and_resume["committed"]
    assert committed, "no file was committed before the kill"
    not_whole = {name: rows for name, rows in committed.items() if isinstance(rows, str)}
    assert not_whole == {}
    for footer_rows, ids in committed.values():
        assert footer_rows == len(ids) > 0
        assert set(ids) <= input_ids
    ids = [i for _, file_ids in committed.values() for i in file_ids]
    assert len(ids) == len(set(ids))
    # Besides whole data files, only the manifest and hidden temporary files (readers skip both) are there.
    assert [name for name in crash_and_resume["others"]
            if name != MANIFEST_NAME and not Path(name).name.startswith(".")] == []
    assert crash_and_resume["manifest_after_crash"] is not None
    assert crash_and_resume["manifest_after_crash"]["status"] == "running"


def test_killed_job_leaves_no_process_behind(crash_and_resume):
    assert crash_and_resume["survivors"] == []


def test_rerun_writes_exactly_the_missing_rows(crash_and_resume, input_folder):
    _, input_ids = input_folder
    resumed, out = crash_and_resume["resumed"], crash_and_resume["out"]
    assert resumed.process.returncode == 0, resumed.stderr()[-3000:]
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) == len(input_ids)
    assert set(ids) == input_ids
    done_before = sum(footer_rows for footer_rows, _ in crash_and_resume["committed"].values())
    manifest = read_manifest(str(out))
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"input": len(input_ids), "ok": len(input_ids) - done_before, "error": 0,
                                  "already_done": done_before}
    # The next write removed the temporary files the killed one left.
    assert [p.name for p in out.rglob(".*")] == []


# --- 2. a replica's engine killed three times, then its actor ------------------------------------

def test_killed_engines_and_replica_are_replaced_and_every_row_written_once(replica_faults, input_folder):
    _, input_ids = input_folder
    run = replica_faults["run"]
    assert run.process.returncode == 0, run.stderr()[-3000:]
    assert not replica_faults["engine_left"]  # a dead replica's engine must not hold on to its GPU
    ids = output_ids(run.out)
    assert len(ids) == len(set(ids)) == len(input_ids)
    assert set(ids) == input_ids
    manifest = read_manifest(str(run.out))
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"input": len(input_ids), "ok": len(input_ids), "error": 0, "already_done": 0}
    survived = report_of(run.out)["survived"]
    # A kill may land while the engine before it starts: then that start fails, and counts as a death too.
    assert (survived["engine_restarts"], survived["replica_restarts"], survived["rows_isolated"]) == (3, 1, 0), survived
    assert survived["rows_rerun"] >= 32  # at least the batch in flight at the first kill
    assert "  survived       3 engine restarts, " in run.stdout()


# --- 3. the token -------------------------------------------------------------------------------

def test_token_reaches_the_engine_but_no_log_output_or_file(crash_and_resume, replica_faults):
    # Given only as a stored login, the token still reached the restarted replica's engine.
    assert f"HF_TOKEN={SENTINEL}".encode() in replica_faults["engine_environ"].split(b"\0")
    runs = [crash_and_resume["crashed"], crash_and_resume["resumed"], replica_faults["run"]]
    # The repository (job.yaml included); each run's folder, with its stdout, stderr and Ray session logs;
    # each run's output, data files and manifest.
    places = [REPO, *(run.workdir for run in runs), *(run.ray_dir for run in runs), *(run.out for run in runs)]
    assert files_containing(SENTINEL, *places) == []
