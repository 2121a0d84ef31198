"""`python main.py --smoke` end to end: real Ray Data, real vLLM (CPU), a small real model, Parquet out; then,
on the session's warm engine (float32, so that it can match transformers token for token): a run's
greedy output equals transformers' generate, a resume from a part of its output writes only the missing
rows and the same text, and a re-run of the finished job does nothing. Bad input, refused before any
engine starts, is in test_validation.py; README.ipynb's run in test_notebook.py.

    .venv/bin/python -m pytest tests/test_end_to_end.py
"""

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from conftest import PROMPTS, data_listing, line_ids, run_main
from util.resume import read_manifest
from util.output import OUTPUT_SCHEMA
from util.results import PLOT_NAME, REPORT_NAME

pytestmark = pytest.mark.engine
CAPITAL = "What is the capital of France?"
MAX_TOKENS = 32  # --smoke's


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The command itself, as a user runs it: its output (stdout and stderr in the order they were printed),
    its table, its path, and its manifest and report."""
    path = tmp_path_factory.mktemp("smoke") / "out"
    run = run_main("--smoke", "--output-path", path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert run.returncode == 0, run.stdout[-5000:]
    # The whole folder, errors/ included; readers skip the manifest (its name starts with "_").
    return {"output": run.stdout, "table": pq.read_table(path).sort_by("id"), "path": path,
            "manifest": read_manifest(str(path)), "report": json.loads((path / REPORT_NAME).read_text())}


def test_one_row_per_input_row_with_stable_ids(smoke_run):
    table = smoke_run["table"]
    assert table.num_rows == 20
    assert table["id"].to_pylist() == sorted(line_ids("prompts_100.txt", PROMPTS[:20]))


def test_output_contract_columns_and_tokens(smoke_run):
    table = smoke_run["table"]
    assert table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert "text" in table.schema.names  # the input column passes through
    rows = table.to_pylist()
    assert all(r["error"] is None for r in rows)
    # SmolLM2's chat template, with its default system message.
    assert all(r["prompt"].startswith("<|im_start|>system\n") and r["prompt"].endswith(
        f"<|im_start|>user\n{r['text']}<|im_end|>\n<|im_start|>assistant\n") for r in rows)
    assert all(r["num_input_tokens"] > 5 for r in rows)
    assert all(1 <= r["num_generated_tokens"] <= MAX_TOKENS for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"length", "stop"}
    assert all(r["generated_text"] for r in rows)


def test_summary_line_and_nothing_after_the_report_but_the_end(smoke_run):
    output, table = smoke_run["output"], smoke_run["table"]
    total = sum(table["num_generated_tokens"].to_pylist())
    assert "summary: 20 rows: 20 ok, 0 errors, 0 already done; " in output
    assert f"{total} output tokens" in output
    after_report = output[output.index("run report\n"):]
    assert "ERROR" not in after_report and "Traceback" not in after_report, after_report
    # Ray Data's progress goes to its log file, and vLLM's INFO lines are not shown (--verbose shows them).
    assert "logging_progress.py" not in output and " INFO " not in output, output


# Warnings the run quiets at their source (util/replica/workers.py, util/engine.py CPU_ENV_VARS, util/replica/host.py),
# and what an engine stopped under its replica used to print after a good run.
QUIETED = ("Model Runner V2 requires Triton", "torch.distributed.reduce_op", "Passing raw prompts to InputProcessor",
           "Loading safetensors checkpoint shards", "Token authentication is enabled", "resource_tracker",
           "engine core exited unexpectedly", "output_handler failed", "force killing")
# Ray core logs this at ERROR, once per driver, for every Ray Data actor pool: Ray Data passes each actor its
# DataContext and transformer by reference, and sets max_restarts -1 (ray-project/ray#53727).
RAY_DATA_ACTOR_LINE = "has constructor arguments in the object store and max_restarts > 0"


def test_a_good_run_prints_no_error_no_traceback_and_no_quieted_warning(smoke_run):
    lines = smoke_run["output"].splitlines()  # the driver's, and every line Ray forwards from the replica
    bad = [line for line in lines if ("ERROR" in line or "Traceback" in line or " E " in line)
           and RAY_DATA_ACTOR_LINE not in line]
    assert bad == [], "\n".join(bad)
    quieted = [line for line in lines if any(text in line for text in QUIETED)]
    assert quieted == [], "\n".join(quieted)


def test_smoke_run_leaves_a_complete_manifest_that_accounts_for_every_row(smoke_run):
    table, manifest = smoke_run["table"], smoke_run["manifest"]
    assert (manifest["status"], manifest["reason"]) == ("complete", None)
    assert manifest["counts"] == {"input": 20, "ok": 20, "error": 0, "already_done": 0} and table.num_rows == 20
    assert manifest["output"] == {"ok": 20, "error": 0}
    assert manifest["fingerprint"]["sampling"]["max_tokens"] == MAX_TOKENS  # --smoke's
    assert manifest["provenance"]["accelerator"] == "CPU"
    assert manifest["started"] <= manifest["finished"]


def test_smoke_run_writes_a_run_report_with_per_replica_numbers(smoke_run):
    output, table, path, report = smoke_run["output"], smoke_run["table"], smoke_run["path"], smoke_run["report"]
    total = sum(table["num_generated_tokens"].to_pylist())
    assert report["rows"] == {"ok": 20, "error": 0}
    assert (report["input_tokens"], report["output_tokens"]) == (sum(table["num_input_tokens"].to_pylist()), total)
    assert (report["gpus"], report["gpu_hours"]) == (0, 0)  # on CPU no GPU is held
    [replica] = report["replicas"]  # --smoke runs one replica, which reported every batch
    assert (replica["rows"], replica["output_tokens"]) == (20, total) and replica["output_tok_per_s"] > 0
    assert 0 < replica["ready_s"] <= replica["last_batch_s"] <= report["wall_s"]
    assert sum(report["throughput"]["total"]) * report["throughput"]["bin_s"] == pytest.approx(total)
    assert (path / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run report\n  rows           20 ok, 0 error\n" in output


# --- on the warm engine: parity with transformers, resume, re-run ------------------------------------

@pytest.fixture(scope="module")
def warm_run(run_job, tmp_path_factory):
    """Nine prompts, the capital question last, on the session's warm engine: its output folder and rows."""
    folder = tmp_path_factory.mktemp("real")
    (folder / "prompts.txt").write_text("\n".join([*PROMPTS[:8], CAPITAL]) + "\n")
    job = run_job("--smoke", "--input-path", folder / "prompts.txt", "--output-path", folder / "out")
    assert job.code == 0, job.err[-3000:]
    assert "summary: 9 rows: 9 ok, 0 errors, 0 already done; " in job.out
    return folder, pq.read_table(folder / "out").sort_by("id")


def first_difference(expected_ids: list[int], text: str, tokenizer) -> int:
    """The first position where transformers' tokens stop spelling the pipeline's text."""
    for position in range(len(expected_ids)):
        if not text.startswith(tokenizer.decode(expected_ids[:position + 1], skip_special_tokens=True)):
            return position
    return len(expected_ids)


def test_greedy_output_equals_transformers_token_for_token(warm_run, hf_model):
    import torch

    model, tokenizer = hf_model
    rows = {row["text"]: row for row in warm_run[1].to_pylist()}
    mismatches = []
    for text in PROMPTS[:8]:
        row = rows[text]
        # Tokenized as the pipeline's formatter does: the chat template already holds the special tokens.
        input_ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert input_ids.shape[1] == row["num_input_tokens"]
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        expected = out.sequences[0, input_ids.shape[1]:].tolist()
        expected_text = tokenizer.decode(expected, skip_special_tokens=True)
        if (expected_text, len(expected)) != (row["generated_text"], row["num_generated_tokens"]):
            position = first_difference(expected, row["generated_text"], tokenizer)
            top = torch.topk(out.logits[min(position, len(out.logits) - 1)][0], 2)
            top_two = ", ".join(f"{tokenizer.decode([i])!r} {value:.4f}"
                                for value, i in zip(top.values.tolist(), top.indices.tolist()))
            mismatches.append(
                f"{text!r}: first difference at generated token {position}; transformers' top 2 there: {top_two}"
                f"\n  transformers: {expected_text!r}\n  pipeline:     {row['generated_text']!r}")
    assert not mismatches, "\n".join(mismatches)


def test_prompts_are_the_chat_template_and_short_answers_stop(warm_run, hf_model):
    _, tokenizer = hf_model
    rows = {row["text"]: row for row in warm_run[1].to_pylist()}
    for text, row in rows.items():
        expected = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        assert row["prompt"] == expected
        assert row["error"] is None
        # Cut off at max_tokens, or stopped by the model's own end-of-turn token before it.
        assert row["finish_reason"] == ("length" if row["num_generated_tokens"] == MAX_TOKENS else "stop"), row
    answer = rows[CAPITAL]
    assert (answer["generated_text"], answer["finish_reason"]) == ("The capital of France is Paris.", "stop")


def test_resume_writes_only_the_missing_rows_with_the_same_text(run_job, warm_run, tmp_path):
    """As if a run had died after 5 of its 9 rows: the resumed run generates the other 4, and at temperature
    0 they are the text the first run generated."""
    folder, complete = warm_run
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(complete.slice(0, 5), out / "earlier.parquet")
    job = run_job("--smoke", "--input-path", folder / "prompts.txt", "--output-path", out)
    assert job.code == 0, job.err[-2000:]
    assert "summary: 9 rows: 4 ok, 0 errors, 5 already done; " in job.out
    resumed = pq.read_table(out).sort_by("id")
    assert resumed["id"].to_pylist() == complete["id"].to_pylist()  # no duplicates, no losses
    assert resumed["generated_text"].to_pylist() == complete["generated_text"].to_pylist()


def test_rerunning_a_finished_job_processes_nothing_and_changes_nothing(run_job, warm_run):
    folder, _ = warm_run
    before = data_listing(folder / "out")
    job = run_job("--smoke", "--input-path", folder / "prompts.txt", "--output-path", folder / "out")
    assert job.code == 0, job.err[-2000:]
    assert "summary: 9 rows: 0 ok, 0 errors, 9 already done; " in job.out
    assert before and data_listing(folder / "out") == before
    manifest = read_manifest(str(folder / "out"))
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"input": 9, "ok": 0, "error": 0, "already_done": 9}
    assert manifest["output"] == {"ok": 9, "error": 0}
