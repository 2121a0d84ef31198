"""The checks before a run: bad input is refused before any row is generated, with a message that names the
path, the column or the flag, and with nothing left behind; and the input scan's counts. The reader's
own refusals (a file's malformed line, a missing column, duplicate ids) are in test_reading.py.

    .venv/bin/python -m pytest tests/test_validation.py -q

Ray runs locally (`ray_local`), S3 is moto's server (`s3_bucket`). Permission cases run in a child
process with permission bits in force: root ignores them, so as root the child drops the two
capabilities that let it (`setpriv`, from util-linux). main.py's refusals run it in this process
(`main_here`), with the tiny local model: a flag, path or output refused reaches no pipeline; an input the
scan refuses fails the held replicas' first batch, which ends them (ScanBeside, whose own tests close the
file; tests/test_launchers.py runs the same refusal under other launchers).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import ray

import main
from conftest import REPO, done_index, write_jsonl
from util.replica import workers as hf_token
from util.config import Config, parse_args
from util.errors import InputError
from util.replica.workers import prompt_for_hugging_face_token
from util.output import output_dataset
from util.cloud import check_output_writable
from util.reading import read_prompts, row_id
from util.report import ProgressReporter
from util.resources import TASK_CPUS
from util.resume import DoneIndex
from util.scan import InputScan, ScanBeside, scan_input
from util.model_dirs.tiny_model import tiny_model_dir


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_with_permissions(code: str) -> list[str]:
    """Run Python `code` (which prints a JSON list) in a child process where permission bits count."""
    drop_root_powers = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("as root, permission bits count only with setpriv (util-linux) to drop capabilities")
        caps = "-dac_override,-dac_read_search"
        drop_root_powers = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # Ray's workers unpickle util.* functions
    child = subprocess.run([*drop_root_powers, sys.executable, "-c", code], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.fixture
def locked(tmp_path):
    """Paths this process's user cannot read or write; unlocked again at the end so tmp_path can go."""
    paths = []

    def lock(path: Path, mode: int) -> Path:
        path.chmod(mode)
        paths.append(path)
        return path

    yield lock
    for path in paths:
        path.chmod(0o755)


# --- the input path is unreadable ---

def test_unreadable_input_file_and_folder(tmp_path, locked):
    (tmp_path / "secret.txt").write_text("a prompt\n", encoding="utf-8")
    (tmp_path / "closed").mkdir()
    (tmp_path / "closed" / "a.txt").write_text("a prompt\n", encoding="utf-8")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("readable\n", encoding="utf-8")
    (tmp_path / "mixed" / "b.txt").write_text("not readable\n", encoding="utf-8")
    locked(tmp_path / "secret.txt", 0o000)
    locked(tmp_path / "closed", 0o000)
    locked(tmp_path / "mixed" / "b.txt", 0o000)
    messages = run_with_permissions(f"""
import json, ray
from util.errors import InputError
from util.reading import read_prompts
from util.scan import scan_input
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
messages = []
for path in ("{tmp_path}/secret.txt", "{tmp_path}/closed"):
    try:
        read_prompts(path)
    except InputError as error:
        messages.append(str(error))
try:
    scan_input(read_prompts("{tmp_path}/mixed"), None, None)  # listed on the driver, read by a worker
except InputError as error:
    messages.append(str(error))
print(json.dumps(messages))
""")
    assert messages == [
        f"{tmp_path}/secret.txt: not readable (Permission denied)",
        f"{tmp_path}/closed: not readable (Permission denied)",
        f"an input file is not readable: Failed to open local file '{tmp_path}/mixed/b.txt'. "
        "Detail: [errno 13] Permission denied",
    ]


# --- an output path that is not writable ---

def test_output_path_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    for output in (tmp_path / "file" / "out", tmp_path / "file"):
        with pytest.raises(InputError) as info:
            check_output_writable(str(output))
        reason = "Not a directory" if output.name == "out" else "it is a file, not a folder"
        assert str(info.value) == f"output path {output} is not writable: {reason}"
    assert tree(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_output_path_in_a_read_only_folder_leaves_nothing(tmp_path, locked):
    locked(tmp_path, 0o555)
    messages = run_with_permissions(f"""
import json
from util.errors import InputError
from util.cloud import check_output_writable
messages = []
for path in ("{tmp_path}", "{tmp_path}/out/deeper"):
    try:
        check_output_writable(path)
    except InputError as error:
        messages.append(str(error))
print(json.dumps(messages))
""")
    assert messages == [f"output path {tmp_path} is not writable: Permission denied",
                        f"output path {tmp_path}/out/deeper is not writable: Permission denied"]
    assert tree(tmp_path) == []


def test_writable_local_output_path_leaves_nothing(tmp_path):
    check_output_writable(str(tmp_path / "runs" / "run" / "model"))  # three new folders: all go again
    assert tree(tmp_path) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"earlier output")
    check_output_writable(str(tmp_path / "out"))  # an existing output folder is fine, and is kept as it is
    assert tree(tmp_path) == ["out", "out/part-0.parquet"]


def test_s3_output_path(s3_bucket, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    check_output_writable(f"s3://{s3_bucket}/runs/run/model")
    assert s3.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []  # no probe, no folder markers
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    with pytest.raises(InputError) as info:
        check_output_writable("s3://no-such-bucket-here/out")
    assert str(info.value) == ("output path s3://no-such-bucket-here/out is not writable: "
                               "The specified bucket does not exist")


# --- invalid sampling values ---

@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, "--temperature must be >= 0, got -1.0"),
    ("temperature", float("nan"), "--temperature must be >= 0, got nan"),
    ("max_tokens", 0, "--max-tokens must be > 0, got 0"),
    ("max_tokens", -5, "--max-tokens must be > 0, got -5"),
    ("top_p", 0.0, "--top-p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "--top-p must be in (0, 1], got 1.5"),
])
def test_invalid_sampling_values(field, value, message):
    with pytest.raises(ValueError) as info:
        Config(**{field: value})
    assert str(info.value) == message


def test_valid_sampling_edges_and_a_negative_seed_pass():
    cfg = parse_args(["--temperature", "0", "--top-p", "1", "--max-tokens", "1", "--seed", "-1"])
    assert (cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed) == (0.0, 1.0, 1, -1)


# --- a gated model with no token ---

def test_gated_model_without_a_token_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_token, "get_token", lambda: None)  # no stored login either
    monkeypatch.setattr(hf_token, "model_access", lambda model_id, token, timeout_s: "gated")  # the hub's answer
    with pytest.raises(PermissionError) as info:
        prompt_for_hugging_face_token("org/gated", interactive=False)
    message = str(info.value)
    assert message.startswith("'org/gated' is a gated model on Hugging Face")
    assert "No Hugging Face token was found." in message
    assert "`export HF_TOKEN=hf_...`" in message and "`hf auth login`" in message


# --- the input scan's counts, and the resume filter ---

def test_scan_input_counts_rows_and_rows_already_done(ray_local, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\nd\ne\n", encoding="utf-8")
    ids = [row_id("p.txt", offset, text) for offset, text in zip(range(0, 10, 2), "abcde")]  # byte offsets
    assert [r["id"] for r in read_prompts(str(path)).take_all()] == ids
    # rows 2 and 4, and an id this input does not have, in an earlier run's output
    done = done_index(tmp_path / "out", [ids[1], ids[3], "other.txt:0:00000000"])
    assert done.rows == 3
    assert scan_input(read_prompts(str(path)), None, done) == InputScan(rows=5, already_done=2)
    assert scan_input(read_prompts(str(path), limit=3), None, done) == InputScan(rows=3, already_done=1)
    assert scan_input(read_prompts(str(path), limit=10), None, done) == InputScan(rows=5, already_done=2)
    assert scan_input(read_prompts(str(path)), None, None) == InputScan(rows=5, already_done=0)
    # A run reads them again through the index's filter, in its read tasks: only the rows not yet written.
    assert [r["id"] for r in read_prompts(str(path), row_filter=done.drop_done).take_all()] == ids[0::2]
    assert DoneIndex.build(*output_dataset(str(tmp_path / "no-output-yet"), "parquet")) is None

    keyed = write_jsonl(tmp_path / "k.jsonl", [{"uid": f"u{n}", "text": t} for n, t in enumerate("abcde", 1)])
    done = done_index(tmp_path / "keyed-out", ["u1", "u5"])
    assert scan_input(read_prompts(keyed, id_column="uid", with_where=True), "uid", done, keyed) == InputScan(5, 2)
    assert scan_input(read_prompts(keyed, id_column="uid", limit=2, with_where=True), "uid", done,
                      keyed) == InputScan(2, 1)


# --- main.py: exit code 2, the message on stderr, no output folder, no pipeline ---

def refused_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: main.py's arguments and the error it must print. Refused, in main.py's order, when the
    run is planned (flags: util/plan.py), then by the checks before it (util/scan.py check_before_run)."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hi", "topic": "greeting"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    return {
        "engine_arg": (["--engine-arg", "max_num_seqz=4", "--engine-arg", "max_num_seqs=8"],
                       "unknown --engine-arg key(s): max_num_seqz; see vLLM's EngineArgs"),
        "missing_path": (["--input-path", str(tmp_path / "nothing.txt")], f"{tmp_path}/nothing.txt: no such file or folder"),
        "empty_file": (["--input-path", str(empty)], f"{empty}: empty file, no prompts in it"),
        "output_not_writable": (["--output-path", str(tmp_path / "file" / "out")],
                                f"output path {tmp_path}/file/out is not writable: Not a directory"),
        "missing_column": (["--input-path", rows, "--text-column", "question"],
                           "rows.jsonl: no column 'question'; columns are: prompt, topic"),
    }


# No pipeline is built at all: refused by the plan (its flags, the input's first file) or the output's check.
REFUSED_BEFORE_THE_SCAN = ("engine_arg", "missing_path", "empty_file", "output_not_writable", "missing_column")


def replicas() -> dict[str, str]:
    """This process's Ray's replicas, ever started (Ray Data's actors of our predictor): actor id -> state."""
    from util.replica.internals import _find

    return {actor_id: a["State"] for actor_id, a in _find("ray._private.state:actors")().items()
            if "LLMPredictor" in a["ActorClassName"]}


def replicas_alive(wait_s: float = 30, besides: tuple = ()) -> list[str]:
    """The replicas, but `besides`, that are not dead `wait_s` after the run returned (Ray's state says so a
    moment after they end)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [actor_id for actor_id, state in replicas().items() if state != "DEAD" and actor_id not in besides]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.parametrize("case", ["engine_arg", "missing_path", "empty_file", "output_not_writable", "missing_column"])
def test_main_refuses_bad_input_with_exit_code_2(case, main_here, tmp_path, monkeypatch):
    """Refused where the run is planned and its output checked, before any pipeline; or by the input's
    pass, which runs beside the replicas' start: then they are ended, and nothing is written."""
    if case in REFUSED_BEFORE_THE_SCAN:
        monkeypatch.setattr(main, "read_input", lambda *a, **k: pytest.fail("a refused run built its pipeline"))
    args, message = refused_cases(tmp_path)[case]
    output = tmp_path / "out"
    if "--output-path" not in args:
        args = [*args, "--output-path", str(output)]
    before = replicas()  # a warm pool's, which another test file of this worker may hold
    job = main_here("--model", tiny_model_dir(), "--concurrency", "1", *args)
    assert job.code == 2, job.err[-3000:]
    assert job.err.splitlines()[-1] == f"error: {message}"
    assert not output.exists()
    assert replicas_alive(besides=tuple(before)) == []


def test_main_refuses_duplicate_ids_with_exit_code_2_and_ends_the_replicas(main_here, tmp_path):
    """Duplicate ids are found by the distributed scan, on Ray's workers, while the replicas start; the
    refusal reaches the driver as exit code 2 and `error: ...` on stderr, and the replicas are ended."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"uid": "x", "text": "a"}])
    write_jsonl(folder / "b.jsonl", [{"uid": "x", "text": "b"}])
    output = tmp_path / "out"
    before = replicas()
    job = main_here("--model", tiny_model_dir(), "--concurrency", "1", "--input-path", folder, "--id-column", "uid",
                    "--output-path", output)
    assert job.code == 2, job.err[-3000:]
    assert job.err.splitlines()[-1] == "error: duplicate id 'x' in column 'uid': a.jsonl:1 and b.jsonl:1"
    assert not output.exists()
    assert set(replicas()) - set(before), "no replica started beside the scan"
    assert replicas_alive(besides=tuple(before)) == []


# --- ScanBeside: the input's pass in a thread beside the run ---

@pytest.fixture
def duplicate_ids_plan(ray_local, tmp_path):
    from util.plan import make_plan

    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"uid": "x", "text": "a"}, {"uid": "y", "text": "b"}])
    write_jsonl(folder / "b.jsonl", [{"uid": "x", "text": "c"}])
    cfg = Config(model=tiny_model_dir(), input_path=str(folder), id_column="uid", concurrency=1,
                 output_path=str(tmp_path / "out"))
    return make_plan(cfg, resolve_model_files=False)


def held_run(on_pass, plan) -> tuple[list, ScanBeside]:
    """Three rows through a held stand-in replica beside the plan's scan; `on_pass(scan, progress)` is the
    run's verdict (main.py's releases the replicas and returns True). The rows that came out, and the scan."""

    class HeldReplica:  # defined here, so that Ray pickles it by value: its workers cannot import this file
        """A stand-in replica: like LLMPredictor, it answers a batch only once the run lets rows run."""

        def __init__(self):
            from util.replica.supervisor import ProgressClient

            self.progress = ProgressClient.connect()

        async def __call__(self, batch):
            await self.progress.released()
            return batch

    rows = []
    with ProgressReporter(None, interval_s=60, write=lambda line: None, held=True) as progress, \
            ScanBeside(plan, None, lambda scan: on_pass(scan, progress), progress.stop) as checking:
        rows = ray.data.range(3).map_batches(HeldReplica, compute=ray.data.ActorPoolStrategy(size=1),
                                             num_cpus=TASK_CPUS, batch_size=3).take_all()
    return rows, checking


def test_a_refusal_fails_the_held_replicas_first_batch_and_is_raised(duplicate_ids_plan):
    passed = []
    with pytest.raises(InputError, match="^duplicate id 'x' in column 'uid': a.jsonl:1 and b.jsonl:1$"):
        held_run(lambda scan, progress: passed.append(scan), duplicate_ids_plan)
    assert passed == []


def test_a_pass_with_nothing_to_run_stops_the_run_without_an_error(duplicate_ids_plan):
    plan = dataclasses.replace(duplicate_ids_plan, cfg=dataclasses.replace(duplicate_ids_plan.cfg, id_column=None))
    rows, checking = held_run(lambda scan, progress: False, plan)
    assert rows == [] and checking.stopped and checking.scan == InputScan(3, 0)


def test_a_passed_scan_lets_the_held_replica_answer(duplicate_ids_plan):
    plan = dataclasses.replace(duplicate_ids_plan, cfg=dataclasses.replace(duplicate_ids_plan.cfg, id_column=None))
    rows, checking = held_run(lambda scan, progress: progress.release(scan.rows) or True, plan)
    assert sorted(row["id"] for row in rows) == [0, 1, 2]
    assert not checking.stopped and checking.scan == InputScan(3, 0)


def test_off_the_main_thread_a_refusal_stops_the_run_the_same_way(duplicate_ids_plan):
    """A driver may call main.run from another thread, where no signal could reach it."""
    outcome = {}

    def run():
        try:
            outcome["rows"] = held_run(lambda scan, progress: progress.release(scan.rows) or True, duplicate_ids_plan)
        except InputError as error:
            outcome["refused"] = str(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=300)
    assert outcome == {"refused": "duplicate id 'x' in column 'uid': a.jsonl:1 and b.jsonl:1"}

