"""Shared fixtures and helpers of the test suite: one place for each, imported by the tests as
`from conftest import REPO, run_main, ...`.

- `s3_server` (session): moto's S3 server on 127.0.0.1, a free port; yields its endpoint URL. While it
  runs, os.environ points every S3 client at it (AWS_ENDPOINT_URL, fake keys, us-east-1), so boto3,
  pyarrow and util.storage.resolve() in this process never reach real AWS. The previous values come
  back at session end, so later subprocess-based tests (main.py) see the environment they started with.
- `ray_local` (session, needs `s3_server`): one local Ray with 2 CPUs. Ray's worker processes copy the
  environment when ray.init() starts them, which is why the S3 settings must be in place first.
  Tests that monkeypatch os.environ reach the driver only, not workers that are already running.
- `s3_bucket`: a fresh, uniquely named bucket on the moto server; yields its name.
- `test_model` (session): SmolLM2-135M-Instruct (util/model_dirs/smol_model.py) whose tokenizer spells two unused
  special tokens `<think>` and `</think>`, for the reasoning tests; the weights are the same file.
- `warm_engine` (session, needs `ray_local`): one engine for the whole session, on `test_model` in float32
  (so that it can match transformers exactly) with compact JSON for guided decoding (ENGINE_ARGS), kept warm
  in a ReplicaPool (util/features/replica_pool.py). Every test file that needs real answers runs its jobs on it.
- `main_here` (session, needs `ray_local`): main.main in this process, on the test session's Ray, with no
  Hugging Face token asked for: main_here(*args, replicas=None) gives the exit code and what it printed (Job).
- `main_in_process` (needs `ray_local`): the same, what it prints left to capsys; it returns the exit code.
- `run_job` (needs `warm_engine`): main_here on the warm engine: `--model` and ENGINE_ARGS first, then `args`.
- `hf_model` (session): transformers' own model and tokenizer of `test_model`, in float32, the reference.
- `few_parquet_footer_readers`: fewer of Ray's Parquet footer-reading actors, for files that read Parquet
  with Ray Data (`pytestmark = pytest.mark.usefixtures("few_parquet_footer_readers")`).

Tests that start an engine, or use one, are marked `engine`; those that run a whole harness in a subprocess,
`harness`: `make test-fast` runs the others.

Plain helpers: REPO, PROMPTS (assets/prompts_100.txt), `run_main(*args)` (main.py in a subprocess),
`line_ids` (the ids the reader gives a text file's lines), `ids_in` (the ids an output folder holds),
`h8` (the content part of an id), `write_jsonl`, `data_listing` (an output's data files with size and
mtime), `scan_error` (the message the input scan refuses an input with), `done_index` (the index of an
output holding given ids) and `closed_local_port_url`.

Nothing here may contact anything but 127.0.0.1.
"""

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
# The warm engine's arguments: float32, and compact JSON, since a 135M model, greedy, can fall into a
# loop of newlines wherever JSON allows whitespace (asked "Who are you?" under a schema it wrote 22 of them).
ENGINE_ARGS = ["--concurrency", "1", "--engine-arg", "dtype=float32", "--engine-arg",
               "structured_outputs_config={'backend': 'xgrammar', 'disable_any_whitespace': True}"]
PROMPTS = (REPO / "assets" / "prompts_100.txt").read_text().splitlines()

# The suite runs in two workers (make test). Every Ray a test or its subprocess starts is its own: a plain
# ray.init() would otherwise join another worker's running cluster (tests/test_faults.py starts one), and
# each CPU engine's KV cache takes 1 GiB of RAM, not 2, so that two workers' engines fit in 24 GiB.
os.environ["RAY_ADDRESS"] = "local"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
# vLLM's CPU engine pins its threads to core 0 by default, leaving the last core to everything else, so the
# two workers' engines would share one core and starve each other, and Ray's node start (a fixed 30 s) with
# them. Each worker's engines get a core of their own instead. A test that shards an engine sets its own.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw"):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(_worker[2:]) % (os.cpu_count() or 1)))

# Exactly these are set (or, where None, removed) while the S3 fixtures are up.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials or a region
    "AWS_ENDPOINT_URL_S3": None,  # it would win over AWS_ENDPOINT_URL in util.storage.resolve()
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,  # a profile missing from ~/.aws makes botocore fail before it reads the keys
}


def _restore(environ: dict) -> None:
    """Make os.environ equal `environ` again, so tests after these (main.py in subprocesses) see it."""
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def run_main(*args, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python main.py *args` in the repository; stdout and stderr captured as text unless `kwargs`
    redirect them (e.g. stdout=subprocess.PIPE, stderr=subprocess.STDOUT for one stream in order)."""
    options = {"cwd": REPO, "text": True, "timeout": timeout, **kwargs}
    if "stdout" not in options and "stderr" not in options:
        options["capture_output"] = True
    return subprocess.run([sys.executable, "main.py", *map(str, args)], **options)


class Run:
    """`python main.py *args` in a new session, so that every process it starts (Ray's workers and vLLM's
    engines take process groups of their own, but stay in the session) can be found, with its own RAY_TMPDIR
    (its Ray logs can be searched). stdout and stderr go to files: a pipe nobody reads would block it.
    `command`: another command than main.py's; `preexec_fn`: run in the child before it starts (signal
    settings a launcher would leave)."""

    def __init__(self, workdir: Path, args: list, env: dict | None = None, command: list | None = None,
                 preexec_fn=None):
        # Ray's socket paths must fit in 107 bytes, which a test's own folder (under a pytest-xdist worker's) may not.
        self.workdir, self.ray_dir = workdir, Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_TOKEN")}
        environ.update({"RAY_TMPDIR": str(self.ray_dir), "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local", **(env or {})})
        command = command or [sys.executable, "main.py"]
        with open(workdir / "stdout", "w") as stdout, open(workdir / "stderr", "w") as stderr:
            self.process = subprocess.Popen([*command, *map(str, args)], cwd=REPO, env=environ, stdout=stdout,
                                            stderr=stderr, start_new_session=True, preexec_fn=preexec_fn)
        self.sid = self.process.pid

    def wait(self, timeout: float = 600) -> int:
        return self.process.wait(timeout=timeout)

    def stdout(self) -> str:
        return (self.workdir / "stdout").read_text()

    def stderr(self) -> str:
        return (self.workdir / "stderr").read_text()

    def processes(self, title: str = "") -> list:
        """This run's live processes whose title starts with `title` (Ray and vLLM retitle theirs)."""
        import psutil

        found = []
        for process in psutil.process_iter():
            try:
                if (os.getsid(process.pid) == self.sid and process.status() != psutil.STATUS_ZOMBIE
                        and " ".join(process.cmdline()).startswith(title)):
                    found.append(process)
            except (psutil.Error, OSError):  # it exited while we looked
                pass
        return found

    def kill_leftovers(self) -> None:
        for process in self.processes():
            process.kill()


def h8(text: str) -> str:
    """The content part of an id, computed here independently of util.reading.row_id."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def write_jsonl(path, rows: list[dict]) -> str:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def data_listing(path) -> list[tuple[str, int, int]]:
    """An output folder's files, errors/ included, with size and mtime; not the manifest, which every
    run rewrites. Equal before and after a run: the run changed no data file."""
    from util.resume import MANIFEST_NAME

    path = Path(path)
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def scan_error(source, **read_args) -> str:
    """The message the input scan refuses `source` (a path or a list of items) with, read as
    util.scan.check_before_run reads it (each row's file and position when there is an id column). It
    must be an InputError itself, not Ray's wrapper of one."""
    from util.errors import InputError
    from util.reading import read_prompts
    from util.scan import scan_input

    id_column = read_args.get("id_column")
    source = source if isinstance(source, list) else str(source)
    with pytest.raises(InputError) as info:
        scan_input(read_prompts(source, with_where=bool(id_column), **read_args), id_column, None,
                   None if isinstance(source, list) else source, read_args.get("input_format", "auto"))
    assert type(info.value) is InputError
    return str(info.value)


def done_index(folder, ids: list[str]):
    """The util.resume.DoneIndex of a new output folder that holds exactly `ids`, as an earlier run would
    have left it (needs `ray_local`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from util.output import conform, output_dataset
    from util.resume import DoneIndex

    Path(folder).mkdir()
    pq.write_table(conform(pa.table({"id": pa.array(ids, pa.string())})), Path(folder) / "part-x-000000.parquet")
    return DoneIndex.build(*output_dataset(str(folder), "parquet"))


def closed_local_port_url() -> str:
    """A 127.0.0.1 URL on which nothing listens (the port was just freed), so connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def ids_in(path: str, fmt: str = "parquet") -> set:
    """The ids in the committed files of an output folder (errors/ included); empty when it has none."""
    from util.output import output_dataset

    files, id_column = output_dataset(str(path), fmt)
    return set() if files is None else set(files.to_table(columns=[id_column])[id_column].to_pylist())


def pytest_collection_modifyitems(items):
    for item in items:  # a test on the session's warm engine needs one, as much as one that starts its own
        if "warm_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
    # The files that start engines or harnesses first: `make test` hands whole files to its two workers in
    # this order (--dist loadfile --no-loadscope-reorder), so no long file starts while the other worker idles.
    slow = {item.path for item in items if item.get_closest_marker("engine") or item.get_closest_marker("harness")}
    items.sort(key=lambda item: item.path not in slow)  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = dict(os.environ)
    for name, value in settings.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield endpoint
    finally:
        _restore(saved)
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    import ray

    from util.replica.workers import worker_setup_hook

    if ray.is_initialized():  # started without our environment: its workers would miss the S3 settings
        ray.shutdown()
    # Workers unpickle util.* functions by reference, so they must import this repo whatever their cwd.
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    environ = dict(os.environ)  # ray.init() sets RAY_AUTH_MODE, PYTHONBREAKPOINT and others in os.environ
    # Its workers are set up as a run's are (util/replica/workers.py), but for the log levels: the suite reads many
    # inputs, and stops many reads early, in this one cluster.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 1024**2, runtime_env={"env_vars": {"PYTHONPATH": python_path},
                                                             "worker_process_setup_hook": worker_setup_hook(quiet=False)})
    context = ray.data.DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, False  # quiet test output
    try:
        yield ray
    finally:
        ray.shutdown()
        context.enable_progress_bars = progress_bars
        _restore(environ)


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def few_parquet_footer_readers(monkeypatch):
    """Ray 2.60's read_parquet starts 32 footer-reading actors per read (read in the driver when the
    read is planned); on 2 CPUs starting them takes 20-40 s a read. Two are plenty for a few files."""
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")


@pytest.fixture(scope="session")
def test_model(tmp_path_factory) -> str:
    """SmolLM2 whose tokenizer spells two unused special tokens (ids 11 and 12) `<think>` and `</think>`,
    as ordinary tokens, so that deepseek_r1's parser finds them and decoding keeps them. The weights are a
    link to the original's: the model is the same, and so are its answers to any other text."""
    import shutil

    from util.model_dirs.smol_model import smol_model_dir

    source, directory = Path(smol_model_dir()), tmp_path_factory.mktemp("think") / "smollm2-think"
    directory.mkdir()
    for path in source.iterdir():
        if path.name == "model.safetensors":
            os.symlink(path, directory / path.name)
        elif path.name != "tokenizer.json":
            shutil.copy(path, directory / path.name)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    renames = {"<jupyter_start>": "<think>", "<jupyter_text>": "</think>"}
    for added in tokenizer["added_tokens"]:
        if added["content"] in renames:
            added["content"], added["special"] = renames[added["content"]], False
    vocab = tokenizer["model"]["vocab"]
    for old, new in renames.items():
        vocab[new] = vocab.pop(old)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(directory)


@pytest.fixture(scope="session")
def hf_model(test_model):
    """transformers' own model and tokenizer of `test_model`, in float32: the reference the engine's
    answers and log-probabilities are compared with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: on a busy 2-core machine torch's two OpenMP threads wait on each other, and generating
    # 16 tokens took 34 s instead of 2 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(test_model, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(test_model)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def warm_engine(ray_local, test_model):
    from util.config import parse_args
    from util.plan import make_plan
    from util.features.replica_pool import ReplicaPool

    plan = make_plan(parse_args(["--model", test_model, *ENGINE_ARGS]))
    # Held for the whole session: its Ray reservation would leave the session's 2 CPUs short for the tests
    # that start replicas of their own (stand-ins) beside it. The engine's threads run all the same.
    plan.replica_resources["num_cpus"] = 0.01
    with ReplicaPool(plan) as pool:
        yield pool


class Job(NamedTuple):
    code: int  # main.py's exit code
    out: str  # what it printed on stdout
    err: str  # ... and on stderr


def main_on_session_ray(*args, replicas=None) -> int:
    """main.py's main in this process, on the test session's Ray, without asking for a Hugging Face token."""
    import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("util.replica.workers.prompt_for_hugging_face_token", lambda model, interactive: None)
        patch.setattr(main.ray, "init", lambda **kwargs: None)  # the test session's Ray is already up
        return main.main([str(a) for a in args], replicas=replicas)


@pytest.fixture(scope="session")
def main_here(ray_local):
    """main_on_session_ray, what it prints captured: main_here(*args, replicas=None) gives a Job."""
    import contextlib
    import io

    def run(*args, replicas=None) -> Job:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main_on_session_ray(*args, replicas=replicas)
        return Job(code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture
def main_in_process(ray_local):
    """main_on_session_ray, its output left to pytest's capsys: main_in_process(*args) gives the exit code."""
    return main_on_session_ray


@pytest.fixture(scope="session")
def run_job(main_here, warm_engine, test_model):
    return lambda *args: main_here("--model", test_model, *ENGINE_ARGS, *args, replicas=warm_engine)


def line_ids(source: str, lines: list[str]) -> list[str]:
    """The ids util.reading gives the lines of a text file written as "\\n".join(lines): the file's
    name, each line's byte offset, and a hash of its text."""
    from util.reading import row_id

    ids, offset = [], 0
    for line in lines:
        ids.append(row_id(source, offset, line))
        offset += len(line.encode("utf-8")) + 1
    return ids
