"""Bad input is refused before any engine starts, with a message that names the file and line, the column,
the path or the flag, and with nothing left behind. One test per refused case, then main.py end to end.

    .venv/bin/python -m pytest tests/test_validation.py -q

Ray runs locally (`ray_local`), S3 is moto's server (`s3_bucket`). Permission cases run in a child
process with permission bits in force: root ignores them, so as root the child drops the two
capabilities that let it (`setpriv`, from util-linux). The main.py cases run it as a subprocess with
the tiny local model and must stop before any engine starts.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from util import hf_token
from util.config import Config, parse_args
from util.hf_token import prompt_for_hugging_face_token
from util.output import conform
from util.reading import InputError, read_prompts, row_id
from util.resume import DoneIndex
from util.scan import InputScan, scan_input
from util.stages import check_cluster_fits, engine_kwargs
from util.validation import check_output_writable

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def scan_error(source, **read_args) -> str:
    """The message scan_input refuses `source` with; it must be an InputError itself, not Ray's wrapper.
    Read as check_before_run reads it: with each row's file and position when there is an id column."""
    id_column = read_args.get("id_column")
    with pytest.raises(InputError) as info:
        scan_input(read_prompts(source, with_where=bool(id_column), **read_args), id_column, None, source)
    assert type(info.value) is InputError
    return str(info.value)


def done_index(folder: Path, ids: list[str]) -> DoneIndex:
    """The DoneIndex of an output folder that holds exactly `ids`, as an earlier run would have left it."""
    folder.mkdir()
    pq.write_table(conform(pa.table({"id": pa.array(ids, pa.string())})), folder / "part-x-000000.parquet")
    return DoneIndex.build(str(folder), "parquet")


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


# --- the text column is missing ---

def test_missing_text_column_lists_the_columns(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "lang": "en"}])
    assert scan_error(path) == "q.jsonl: no column 'text'; columns are: question, lang"


# --- the input path is unreadable, or has no files ---

def test_input_folder_without_input_files(tmp_path):
    (tmp_path / "README.md").write_text("no prompts here\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_prompts(str(tmp_path))
    extensions = ".txt, .text, .jsonl, .json, .csv, .parquet, .pq"
    assert str(info.value) == f"{tmp_path}: no files ending in {extensions} in this folder"


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
from util.reading import InputError, read_prompts
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


# --- an empty file ---

def test_empty_file_is_named(ray_local, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "a prompt"}])
    (folder / "b.jsonl").write_text("", encoding="utf-8")
    assert scan_error(str(folder)) == f"{folder}/b.jsonl: empty file, no prompts in it"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")  # only blank lines: no prompts either
    assert scan_error(str(blank)) == f"{blank}: empty file, no prompts in it"


# --- malformed JSONL, non-UTF-8 text ---

def test_malformed_jsonl_names_file_and_line(ray_local, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    assert scan_error(str(path)) == f"{path}:3: malformed JSON (Expecting value at column 10)"


def test_non_utf8_text_names_file_and_line(ray_local, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\ncaf\u00e9\n".encode("latin-1"))
    assert scan_error(str(path)) == f"{path}:2: not valid UTF-8 (invalid continuation byte at byte 8)"


# --- duplicate ids when an id column is given ---

def test_duplicate_id_in_one_file_names_both_lines(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"uid": 7, "text": "a"}, {"uid": 8, "text": "b"},
                                              {"uid": 7, "text": "c"}])
    assert scan_error(path, id_column="uid") == "duplicate id '7' in column 'uid': d.jsonl:1 and d.jsonl:3"


def test_duplicate_id_across_files(ray_local, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"uid": "x", "text": "a"}, {"uid": "y", "text": "b"}])
    write_jsonl(folder / "b.jsonl", [{"uid": "z", "text": "c"}, {"uid": "x", "text": "d"}])
    assert scan_error(str(folder), id_column="uid") == "duplicate id 'x' in column 'uid': a.jsonl:1 and b.jsonl:2"
    # Without an id column the ids are derived from file and position, so the same rows are fine.
    assert scan_input(read_prompts(str(folder)), None, None) == InputScan(rows=4, already_done=0)


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
from util.reading import InputError
from util.validation import check_output_writable
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


def test_invalid_sampling_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--top-p", "0"])
    assert info.value.code == 2
    assert "error: --top-p must be in (0, 1], got 0.0" in capsys.readouterr().err


# --- unknown --engine-arg keys, a gated model with no token ---

def test_unknown_engine_arg_keys():
    with pytest.raises(ValueError) as info:
        engine_kwargs(Config(engine_arg={"max_num_seqz": 4, "max_num_seqs": 8}))
    assert str(info.value) == "unknown --engine-arg key(s): max_num_seqz; see vLLM's EngineArgs"


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


# --- scan_input counts ---

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
    assert DoneIndex.build(str(tmp_path / "no-output-yet"), "parquet") is None

    keyed = write_jsonl(tmp_path / "k.jsonl", [{"uid": f"u{n}", "text": t} for n, t in enumerate("abcde", 1)])
    done = done_index(tmp_path / "keyed-out", ["u1", "u5"])
    assert scan_input(read_prompts(keyed, id_column="uid", with_where=True), "uid", done, keyed) == InputScan(5, 2)
    assert scan_input(read_prompts(keyed, id_column="uid", limit=2, with_where=True), "uid", done,
                      keyed) == InputScan(2, 1)


# --- a CPU-only cluster too small for the replicas ---

def test_a_cpu_only_cluster_too_small_for_the_replicas_is_refused():
    with pytest.raises(InputError) as info:
        check_cluster_fits(Config(concurrency=4), use_gpu=False, cluster={"CPU": 2})
    assert str(info.value) == (
        "--concurrency 4 needs 2.5 CPUs on this CPU-only cluster: 0.5 for each of 4 replica(s) and 0.5 for "
        "reading, formatting and writing; the cluster has 2. Lower --concurrency, or add CPUs")
    check_cluster_fits(Config(concurrency=3), use_gpu=False, cluster={"CPU": 2})  # exactly fits: 1.5 + 0.5
    check_cluster_fits(Config(concurrency=2), use_gpu=False, cluster={"CPU": 2})
    # With GPUs an autoscaling cluster may still add nodes, and Ray Data waits for them.
    check_cluster_fits(Config(concurrency=8), use_gpu=True, cluster={"CPU": 2, "GPU": 1})


# --- main.py: exit code 2, the message on stderr, no output folder, no engine ---

def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def main_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: main.py's arguments and the error line it must print."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"uid": "x", "text": "a"}])
    write_jsonl(folder / "b.jsonl", [{"uid": "x", "text": "b"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    return {
        "sampling": (["--temperature", "-1"], "error: --temperature must be >= 0, got -1.0"),
        "duplicate_ids": (["--input-path", str(folder), "--id-column", "uid"],
                          "error: duplicate id 'x' in column 'uid': a.jsonl:1 and b.jsonl:1"),
        "empty_file": (["--input-path", str(empty)], f"error: {empty}: empty file, no prompts in it"),
        "output_not_writable": (["--output-path", str(tmp_path / "file" / "out")],
                                f"error: output path {tmp_path}/file/out is not writable: Not a directory"),
    }


@pytest.mark.parametrize("case", ["sampling", "duplicate_ids", "empty_file", "output_not_writable"])
def test_main_refuses_bad_input_with_exit_code_2(case, tmp_path):
    from util.tiny_model import tiny_model_dir

    args, error_line = main_cases(tmp_path)[case]
    output = tmp_path / "out"
    if "--output-path" not in args:
        args = [*args, "--output-path", str(output)]
    run = run_main("--model", tiny_model_dir(), "--concurrency", "1", *args)
    assert run.returncode == 2, run.stderr[-3000:]
    assert error_line in run.stderr.splitlines()[-1]
    assert not output.exists()
    assert "Initializing a V1 LLM engine" not in run.stdout + run.stderr  # refused before any engine started
