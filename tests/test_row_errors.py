"""Rows that cannot be generated become error rows, in the output and in errors/; the job goes on.

One real run (CPU engine, the --smoke model) over 8 rows, 6 of them bad in every per-row way there is, then a
re-run of the finished job, which must do nothing and change nothing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {"id": "good-1", "text": "Tell me a story."},
    {"id": "empty", "text": ""},
    {"id": "blank", "text": "   \t "},
    {"id": "null", "text": None},
    {"id": "too-long", "text": "hello " * 3000},  # the CPU engine's max_model_len is 2048
    {"id": "bad-temperature", "text": "Hi.", "sampling_params": {"temperature": -1}},
    {"id": "bad-top-p", "text": "Hi.", "sampling_params": {"top_p": 2}},
    {"id": "good-2", "text": "Name a color.", "sampling_params": {"max_tokens": 4}},
]


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", "--smoke", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def rows_of(path: Path) -> dict[str, dict]:
    table = pads.dataset(path, format="parquet").to_table()
    return {row["id"]: row for row in table.to_pylist()}


def listing(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bad_rows_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("row-errors")
    source = folder / "prompts.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = folder / "out"
    first = run_main("--input-path", str(source), "--id-column", "id", "--output-path", str(out))
    return first, out, source


def test_every_bad_row_becomes_an_error_row_with_a_reason(bad_rows_run):
    first, out, _ = bad_rows_run
    rows = rows_of(out)
    assert sorted(rows) == sorted(r["id"] for r in ROWS)  # every row once, none lost
    errors = {i: r["error"] for i, r in rows.items() if r["error"] is not None}
    assert sorted(errors) == ["bad-temperature", "bad-top-p", "blank", "empty", "null", "too-long"]
    for empty in ("empty", "blank", "null"):
        assert errors[empty] == "empty prompt in column 'text'"
    assert errors["too-long"].startswith("prompt has ") and errors["too-long"].endswith(
        "tokens; the model accepts at most 2047 (max_model_len 2048)")
    assert "temperature" in errors["bad-temperature"] and "-1" in errors["bad-temperature"]
    assert "top_p" in errors["bad-top-p"] and "2" in errors["bad-top-p"]
    assert rows["good-1"]["generated_text"] and rows["good-2"]["num_generated_tokens"] <= 4


def test_error_rows_are_also_alone_in_errors(bad_rows_run):
    _, out, _ = bad_rows_run
    errors = rows_of(out / "errors")
    assert sorted(errors) == ["bad-temperature", "bad-top-p", "blank", "empty", "null", "too-long"]
    top_level = pads.dataset([str(p) for p in out.glob("*.parquet")], format="parquet").to_table()
    assert sorted(top_level["id"].to_pylist()) == ["good-1", "good-2"]


def test_too_many_errors_exit_1_with_everything_written_and_counted(bad_rows_run):
    first, out, _ = bad_rows_run
    assert first.returncode == 1, first.stderr[-3000:]
    assert "error: 6 of 8 output rows failed (75%), more than --max-error-fraction 0.1 allows" in first.stderr
    assert "summary: 8 rows: 2 ok, 6 errors, 0 already done" in first.stdout
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"] == {"input": 8, "ok": 2, "error": 6, "already_done": 0}
    assert manifest["status"] == "failed" and "--max-error-fraction" in manifest["reason"]


def test_rerun_of_a_finished_job_does_nothing(bad_rows_run):
    _, out, source = bad_rows_run
    before = [entry for entry in listing(out) if entry[0] != "_manifest.json"]
    again = run_main("--input-path", str(source), "--id-column", "id", "--output-path", str(out),
                     "--max-error-fraction", "0.9")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "summary: 8 rows: 0 ok, 0 errors, 8 already done" in again.stdout
    assert [entry for entry in listing(out) if entry[0] != "_manifest.json"] == before
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"input": 8, "ok": 0, "error": 0, "already_done": 8}
