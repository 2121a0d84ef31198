"""Rows that cannot be generated become error rows with a reason; the job goes on.

One real job (on the session's warm engine: conftest.py) over 8 rows, 6 of them bad in every per-row way there is:
refused by the formatter (empty, too long) or by the engine (invalid sampling values). Where error rows
are written (errors/), the error budget's exit code 1, and a re-run of a finished job are tested without
an engine in test_output.py, and with one in test_end_to_end.py.
"""

import json

import pyarrow.dataset as pads
import pytest


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


@pytest.fixture(scope="module")
def bad_rows_run(run_job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("row-errors")
    source = folder / "prompts.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = folder / "out"
    # Every failed row is allowed: the run itself must go through.
    job = run_job("--smoke", "--input-path", source, "--id-column", "id", "--output-path", out,
                  "--max-error-fraction", "1")
    return job, out


def test_every_bad_row_becomes_an_error_row_with_a_reason(bad_rows_run):
    job, out = bad_rows_run
    assert job.code == 0, job.err[-3000:]
    assert "summary: 8 rows: 2 ok, 6 errors, 0 already done" in job.out
    rows = {row["id"]: row for row in pads.dataset(out, format="parquet").to_table().to_pylist()}
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
    # A failed row passes the engine untouched: no text, no tokens.
    assert all((rows[i]["generated_text"], rows[i]["num_generated_tokens"]) == (None, 0) for i in errors)
