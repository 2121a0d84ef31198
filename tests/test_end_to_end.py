"""`python main.py --smoke` end to end: real Ray Data, real vLLM (CPU), a small local model, Parquet out.

One run, then, on its output: a resume from a part of it, which must write only the missing rows and, at
temperature 0, the same text; and a re-run of the finished job, which must do nothing. Bad input, refused
before any engine starts, is in test_validation.py; README.ipynb's run in test_notebook.py.
"""

import json

import pyarrow.parquet as pq
import pytest

from conftest import PROMPTS, data_listing, line_ids, run_main
from util.manifest import read_manifest
from util.output import OUTPUT_SCHEMA
from util.report import PLOT_NAME, REPORT_NAME


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The run, its output table, its path, and its manifest and report as it left them (a later test
    runs main.py again into the same path)."""
    path = tmp_path_factory.mktemp("smoke") / "out"
    run = run_main("--smoke", "--output-path", path)
    assert run.returncode == 0, run.stderr[-3000:]
    # The whole folder, errors/ included; readers skip the manifest (its name starts with "_").
    table = pq.read_table(path).sort_by("id")
    return {"run": run, "table": table, "path": path, "manifest": read_manifest(str(path)),
            "report": json.loads((path / REPORT_NAME).read_text())}


def test_one_row_per_input_row_with_stable_ids(smoke_run):
    table = smoke_run["table"]
    expected = sorted(line_ids("prompts_100.txt", PROMPTS[:20]))
    assert table.num_rows == 20
    assert table["id"].to_pylist() == expected


def test_output_contract_columns_and_tokens(smoke_run):
    table = smoke_run["table"]
    assert table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert "text" in table.schema.names  # the input column passes through
    rows = table.to_pylist()
    assert all(r["error"] is None for r in rows)
    # SmolLM2's chat template, with its default system message (tests/test_real_model.py checks it whole).
    assert all(r["prompt"].startswith("<|im_start|>system\n") and r["prompt"].endswith(
        f"<|im_start|>user\n{r['text']}<|im_end|>\n<|im_start|>assistant\n") for r in rows)
    assert all(r["num_input_tokens"] > 5 for r in rows)
    assert all(1 <= r["num_generated_tokens"] <= 32 for r in rows)  # --smoke caps max_tokens at 32
    assert {r["finish_reason"] for r in rows} <= {"length", "stop"}
    assert all(r["generated_text"] for r in rows)


def test_summary_line(smoke_run):
    run, table = smoke_run["run"], smoke_run["table"]
    total = sum(table["num_generated_tokens"].to_pylist())
    assert "summary: 20 rows: 20 ok, 0 errors, 0 already done; " in run.stdout
    assert f"{total} output tokens" in run.stdout


def test_smoke_run_leaves_a_complete_manifest_that_accounts_for_every_row(smoke_run):
    table, manifest = smoke_run["table"], smoke_run["manifest"]
    counts = manifest["counts"]
    assert (manifest["status"], manifest["reason"]) == ("complete", None)
    assert counts["input"] == counts["ok"] + counts["error"] + counts["already_done"] == table.num_rows == 20
    assert counts == {"input": 20, "ok": 20, "error": 0, "already_done": 0}
    assert manifest["output"] == {"ok": 20, "error": 0}
    assert manifest["fingerprint"]["sampling"]["max_tokens"] == 32  # --smoke's
    assert manifest["provenance"]["accelerator"] == "CPU"
    assert manifest["started"] <= manifest["finished"]


def test_smoke_run_writes_a_run_report_with_per_replica_numbers(smoke_run):
    run, table, path, report = smoke_run["run"], smoke_run["table"], smoke_run["path"], smoke_run["report"]
    total = sum(table["num_generated_tokens"].to_pylist())
    assert report["rows"] == {"ok": 20, "error": 0}
    assert (report["input_tokens"], report["output_tokens"]) == (sum(table["num_input_tokens"].to_pylist()), total)
    assert (report["gpus"], report["gpu_hours"]) == (0, 0)  # on CPU no GPU is held
    [replica] = report["replicas"]  # --smoke runs one replica, which reported every batch
    assert (replica["rows"], replica["output_tokens"]) == (20, total) and replica["output_tok_per_s"] > 0
    assert 0 < replica["ready_s"] <= replica["last_batch_s"] <= report["wall_s"]
    assert sum(report["throughput"]["total"]) * report["throughput"]["bin_s"] == pytest.approx(total)
    assert (path / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run report\n  rows           20 ok, 0 error\n" in run.stdout


def test_resume_writes_only_the_missing_rows_with_the_same_text(smoke_run, tmp_path):
    """As if a run had died after 12 rows: the resumed run generates the other 8, and at temperature 0
    they are the text the first run generated."""
    complete = smoke_run["table"]
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(complete.slice(0, 12), out / "earlier.parquet")
    run = run_main("--smoke", "--output-path", out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "summary: 20 rows: 8 ok, 0 errors, 12 already done; " in run.stdout
    resumed = pq.read_table(out).sort_by("id")
    assert resumed["id"].to_pylist() == complete["id"].to_pylist()  # no duplicates, no losses
    assert resumed["generated_text"].to_pylist() == complete["generated_text"].to_pylist()


def test_rerunning_a_finished_job_processes_nothing_and_changes_nothing(smoke_run):
    path = smoke_run["path"]
    before = data_listing(path)
    run = run_main("--smoke", "--output-path", path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "summary: 20 rows: 0 ok, 0 errors, 20 already done; " in run.stdout
    assert before and data_listing(path) == before
    manifest = read_manifest(str(path))
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"input": 20, "ok": 0, "error": 0, "already_done": 20}
    assert manifest["output"] == {"ok": 20, "error": 0}
