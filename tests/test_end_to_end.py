"""`python main.py --smoke` end to end: real Ray Data, real vLLM (CPU), a small local model, Parquet out.

Two runs with the same settings must produce the same text at temperature 0.
"""

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from util.manifest import read_manifest
from util.output import MANIFEST_NAME, OUTPUT_SCHEMA
from conftest import line_ids

REPO = Path(__file__).resolve().parents[1]
PROMPTS = (REPO / "assets" / "prompts_100.txt").read_text().splitlines()


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outputs = []
    for name in ("first", "second"):
        path = tmp_path_factory.mktemp(name) / "out"
        run = run_main("--smoke", "--output-path", str(path))
        assert run.returncode == 0, run.stderr[-3000:]
        # The whole folder, errors/ included; readers skip the manifest (its name starts with "_").
        outputs.append((run, pq.read_table(path).sort_by("id"), path))
    return outputs


def test_one_row_per_input_row_with_stable_ids(two_runs):
    _, table, _ = two_runs[0]
    expected = sorted(line_ids("prompts_100.txt", PROMPTS[:20]))
    assert table.num_rows == 20
    assert table["id"].to_pylist() == expected


def test_output_contract_columns_and_tokens(two_runs):
    _, table, _ = two_runs[0]
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


def test_summary_line(two_runs):
    run, table, _ = two_runs[0]
    total = sum(table["num_generated_tokens"].to_pylist())
    assert "summary: 20 rows: 20 ok, 0 errors, 0 already done; " in run.stdout
    assert f"{total} output tokens" in run.stdout


def test_smoke_run_leaves_a_complete_manifest_that_accounts_for_every_row(two_runs):
    _, table, path = two_runs[0]
    manifest = read_manifest(str(path))
    counts = manifest["counts"]
    assert (manifest["status"], manifest["reason"]) == ("complete", None)
    assert counts["input"] == counts["ok"] + counts["error"] + counts["already_done"] == table.num_rows == 20
    assert counts == {"input": 20, "ok": 20, "error": 0, "already_done": 0}
    assert manifest["output"] == {"ok": 20, "error": 0}
    assert manifest["fingerprint"]["sampling"]["max_tokens"] == 32  # --smoke's
    assert manifest["provenance"]["accelerator"] == "CPU"
    assert manifest["started"] <= manifest["finished"]


def test_smoke_run_writes_a_run_report_with_per_replica_numbers(two_runs):
    import json

    from util.report import PLOT_NAME, REPORT_NAME

    run, table, path = two_runs[0]
    report = json.loads((path / REPORT_NAME).read_text())
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


def test_deterministic_at_temperature_zero(two_runs):
    (_, first, _), (_, second, _) = two_runs
    assert first["id"].to_pylist() == second["id"].to_pylist()
    assert first["generated_text"].to_pylist() == second["generated_text"].to_pylist()


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    """README.ipynb executed top to bottom by papermill, with the tiny model on CPU."""
    import papermill

    work = tmp_path_factory.mktemp("notebook")
    papermill.execute_notebook(str(REPO / "README.ipynb"), str(work / "executed.ipynb"), cwd=str(REPO),
                               parameters={"SMOKE": True, "OUTPUT_PATH": str(work / "out")},
                               progress_bar=False, log_output=False)
    return work


def test_notebook_runs_and_shows_per_row_sampling(notebook_run):
    import nbformat

    notebook = nbformat.read(notebook_run / "executed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    # The per-row sampling cell prints "<max_tokens> <num_generated_tokens> ...": each row kept its own limit.
    for limit in (4, 8, 12, 16, 20):
        assert f"\n{limit} {limit} " in "\n" + printed
    assert "{'rows': 20, 'ok': 20, 'errors': 0" in printed


def test_notebook_and_main_give_the_same_schema_and_rows(notebook_run, two_runs):
    _, from_main, _ = two_runs[0]
    from_notebook = pq.read_table(notebook_run / "out").sort_by("id")
    assert from_notebook.schema == from_main.schema
    assert from_notebook.num_rows == from_main.num_rows
    assert from_notebook["id"].to_pylist() == from_main["id"].to_pylist()


@pytest.mark.parametrize("args, message", [
    (["--input-path", "does/not/exist.txt"], "error: does/not/exist.txt: no such file or folder"),
    (["--input-path", "{tmp}/rows.jsonl", "--text-column", "question"],
     "error: rows.jsonl: no column 'question'; columns are: prompt, topic"),
    (["--engine-arg", "max_num_seqz=4"], "error: unknown --engine-arg key(s): max_num_seqz"),
])
def test_bad_input_exits_2_with_a_clear_message(args, message, tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"prompt": "Hi", "topic": "greeting"}\n')
    run = run_main("--smoke", "--output-path", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in args])
    assert run.returncode == 2, run.stderr[-2000:]
    assert message in run.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def _listing(path: Path) -> list[tuple[str, int, int]]:
    """The data files, errors/ included; the manifest is rewritten by every run."""
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def test_rerunning_a_finished_job_processes_nothing_and_changes_nothing(two_runs):
    _, _, path = two_runs[0]
    before = _listing(path)
    run = run_main("--smoke", "--output-path", str(path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "summary: 20 rows: 0 ok, 0 errors, 20 already done; " in run.stdout
    assert before and _listing(path) == before
    manifest = read_manifest(str(path))
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"input": 20, "ok": 0, "error": 0, "already_done": 20}


def test_resume_writes_only_the_missing_rows(two_runs, tmp_path):
    _, complete, _ = two_runs[0]
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(complete.slice(0, 12), out / "earlier.parquet")  # as if a run had died after 12 rows
    run = run_main("--smoke", "--output-path", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "summary: 20 rows: 8 ok, 0 errors, 12 already done; " in run.stdout
    resumed = pq.read_table(out).sort_by("id")
    assert resumed["id"].to_pylist() == complete["id"].to_pylist()  # no duplicates, no losses
    assert resumed["generated_text"].to_pylist() == complete["generated_text"].to_pylist()
