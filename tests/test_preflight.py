"""`main.py --preflight` without an engine: counts of rows that would fail, the input-token histogram,
the output-token bound, the GPU-hours and replicas arithmetic, the files it writes, and its exit codes.

    .venv/bin/python -m pytest tests/test_preflight.py -q

The main.py cases run in this process on the test session's Ray (`ray_local`) with the tiny local model:
only its tokenizer is loaded, through the pipeline's own formatter stage.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from util.errors import EMPTY_PROMPT, INVALID_SAMPLING, TOO_LONG
from util.features.preflight import (DEFAULT_TOK_PER_S, PREFLIGHT_FOLDER, estimate, median_of_counts, row_budgets,
                            row_error_kind, token_histogram)
from util.prompt_format import PromptFormatter
from util.results import REPORT_NAME
from util.model_dirs.tiny_model import tiny_model_dir

ROWS = [
    {"uid": "a", "text": "Hello there"},
    {"uid": "b", "text": "   "},  # empty
    {"uid": "c", "text": "word " * 100},  # over max_model_len 64
    {"uid": "d", "text": "Short one", "sampling_params": {"max_tokens": 5}},
    {"uid": "e", "text": "Another prompt"},
]


def test_row_error_kinds_of_the_formatters_and_the_predictors_messages():
    """The messages the real stages write, each of the kind preflight counts it as: the formatter's
    (the tiny model's tokenizer, max_model_len 16) for an empty and a too long prompt, then the
    predictor's check of each row's sampling_params."""
    formatter = PromptFormatter(tiny_model_dir(), "text", max_model_len=16)
    batch = formatter(pa.table({"id": ["a", "b", "c", "d"], "text": ["Hi", "   ", "word " * 40, "Hi"],
                                "sampling_params": [None, None, None, '{"max_tokens": 7']}))
    errors = row_budgets(batch, {"max_tokens": 20}, max_model_len=16)["error"].to_pylist()
    assert errors[0] is None
    assert [row_error_kind(message) for message in errors[1:]] == [EMPTY_PROMPT, TOO_LONG, INVALID_SAMPLING]
    assert row_error_kind("RuntimeError: the engine died") == "RuntimeError: the engine died"  # its own kind


def test_row_budgets_cap_each_rows_max_tokens_by_what_max_model_len_leaves():
    batch = pa.table({"id": ["a", "b", "c", "d", "e"], "num_input_tokens": pa.array([10, 60, 1, 100, 10], pa.int64()),
                      "error": [None, None, "empty prompt in column 'text'", "prompt has 100 tokens; ...", None],
                      "sampling_params": [None, None, None, None, '{"max_tokens": 7']})
    out = row_budgets(batch, {"max_tokens": 20, "temperature": 0.0}, max_model_len=64)
    assert out["max_output_tokens"].to_pylist() == [20, 4, 0, 0, 0]
    assert out["error"].to_pylist()[:4] == [None, None, "empty prompt in column 'text'", "prompt has 100 tokens; ..."]
    assert out["error"][4].as_py().startswith("invalid sampling_params: ")
    assert row_budgets(batch.slice(0, 1), {"max_tokens": 20}, None)["max_output_tokens"].to_pylist() == [20]
    # n samples: each row may generate its max_tokens n times
    sampled = batch.slice(0, 2).set_column(3, "sampling_params", pa.array(['{"n": 3, "temperature": 1}', None]))
    assert row_budgets(sampled, {"max_tokens": 20}, max_model_len=64)["max_output_tokens"].to_pylist() == [60, 4]


def test_the_budget_stage_follows_the_formatter_in_the_chain():
    from util.config import Config
    from util.pipeline import check_contracts, formatter_stage, pipeline_stages
    from util.plan import make_plan
    from util.features.preflight import budget_stage

    plan = make_plan(Config(concurrency=1, model="m"), cluster={"CPU": 2.0}, resolve_model_files=False)
    check_contracts(pipeline_stages(plan, until="format") + [budget_stage(plan)], ("id", "text"))
    with pytest.raises(ValueError) as info:
        check_contracts([budget_stage(plan), formatter_stage(plan)], ("id", "text"))
    assert str(info.value) == ("stage 'budget' needs column 'num_input_tokens', which no stage before it adds "
                               "(it gets: id, text)")


def test_token_histogram_ranges_double():
    assert token_histogram(np.array([0, 3, 15, 16, 40, 64, 100])) == [
        {"from": 0, "to": 15, "rows": 3}, {"from": 16, "to": 31, "rows": 1}, {"from": 32, "to": 63, "rows": 1},
        {"from": 64, "to": 127, "rows": 2}]
    assert token_histogram(np.array([128])) == [
        {"from": 0, "to": 15, "rows": 0}, {"from": 16, "to": 31, "rows": 0}, {"from": 32, "to": 63, "rows": 0},
        {"from": 64, "to": 127, "rows": 0}, {"from": 128, "to": 255, "rows": 1}]
    assert token_histogram(np.zeros(0, np.int64)) == [{"from": 0, "to": 15, "rows": 0}]
    # The same histograms from the rows per token count, as the preflight gathers them
    counts = np.bincount([0, 3, 15, 16, 40, 64, 100])
    assert token_histogram(counts, counted=True) == token_histogram(np.array([0, 3, 15, 16, 40, 64, 100]))
    assert token_histogram(np.bincount([128]), counted=True) == token_histogram(np.array([128]))
    assert token_histogram(np.zeros(0, np.int64), counted=True) == [{"from": 0, "to": 15, "rows": 0}]


def test_median_of_counts_is_the_exact_median():
    for values in ([10], [3, 1], [0, 10, 10, 10, 109], [5, 1, 9, 2], [7, 7, 7, 8], [0, 0, 1, 200, 200, 200]):
        assert median_of_counts(np.bincount(values)) == np.median(values), values


def test_gpu_hours_and_replicas_for_a_deadline():
    # 36M output tokens at 2,000 tok/s per replica: 5 replica-hours; TP=2 replicas hold 2 GPUs each.
    result = estimate(36_000_000, 2_000.0, gpus_per_replica=2, concurrency=4, deadline_hours=2)
    assert result["replica_hours"] == pytest.approx(5.0)
    assert result["gpu_hours"] == pytest.approx(10.0)
    assert result["hours_at_concurrency"] == pytest.approx(1.25)
    assert (result["replicas_for_deadline"], result["gpus_for_deadline"]) == (3, 6)  # 2.5 rounds up
    assert estimate(36_000_000, 2_000.0, 1, 4, deadline_hours=5)["replicas_for_deadline"] == 1  # exactly on time
    assert estimate(36_000_000, 2_000.0, 1, 4, deadline_hours=100)["replicas_for_deadline"] == 1
    assert estimate(36_000_000, 2_000.0, 1, 4, deadline_hours=None)["replicas_for_deadline"] is None


@pytest.fixture
def engine_free_main(main_in_process):
    """main.py --preflight in this process, on the test session's Ray, with the tiny model's tokenizer."""
    def run(*args: str) -> int:
        # One replica: the session's Ray has 2 CPUs, and a preflight sizes the pipeline as the run would.
        return main_in_process("--preflight", "--model", tiny_model_dir(), "--id-column", "uid", "--max-tokens",
                               "20", "--engine-arg", "max_model_len=64", "--concurrency", "1", *args)
    return run


def test_preflight_counts_failing_rows_by_reason_and_exits_1_over_the_error_fraction(engine_free_main, tmp_path, capsys):
    prompts, out = write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "out"
    assert engine_free_main("--input-path", str(prompts), "--output-path", str(out)) == 1

    report_dir = out / PREFLIGHT_FOLDER
    result = json.loads((report_dir / "preflight.json").read_text())
    assert (result["verdict"], result["exit_code"]) == ("too many failing rows", 1)
    assert result["reason"] == "40% of the output's rows would fail, more than --max-error-fraction 0.1 allows"
    assert (result["rows"], result["already_done"], result["to_run"]) == (5, 0, 5)
    assert result["failing"] == {"rows": 2, "by_reason": {"empty": 1, "over max length": 1},
                                 "examples": {"empty": ["b"], "over max length": ["c"]}, "fraction": 0.4}
    assert result["max_model_len"] == 64
    # The chat template makes 10 tokens of each short prompt; the empty row's prompt has none.
    assert result["input_tokens"] == {"total": 139, "min": 0, "median": 10.0, "max": 109, "histogram": [
        {"from": 0, "to": 15, "rows": 4}, {"from": 16, "to": 31, "rows": 0}, {"from": 32, "to": 63, "rows": 0},
        {"from": 64, "to": 127, "rows": 1}]}
    # a, d and e run: max_tokens 20, 5 (its own sampling_params) and 20, none capped at these lengths
    assert result["estimate"]["output_tokens_at_most"] == 45
    assert result["estimate"]["throughput_tok_per_s"] == DEFAULT_TOK_PER_S
    assert result["throughput_source"].startswith("default: BENCHMARKS.md")
    assert (report_dir / "input_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.rglob("*")) == sorted([PREFLIGHT_FOLDER, "preflight.json", "input_tokens.png"])

    printed = capsys.readouterr().out
    assert "  would fail     2 rows (1 empty, 1 over max length): 40.0% of the output's rows after the run; " \
           "--max-error-fraction 0.1" in printed
    assert "  verdict        40% of the output's rows would fail, more than --max-error-fraction 0.1 allows (exit 1)" in printed
    assert f"\n  input tokens        rows\n        0-15             4  {'#' * 40}\n" in printed
    assert f"\n       64-127            1  {'#' * 10}\n" in printed


def test_preflight_passes_estimates_and_leaves_no_output_folder(engine_free_main, tmp_path, capsys):
    prompts, out, reports = write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "out", tmp_path / "reports"
    # 45 output tokens at 0.005 tok/s: 2.5 replica-hours, so a 1-hour deadline needs 3 replicas.
    assert engine_free_main("--input-path", str(prompts), "--output-path", str(out), "--max-error-fraction", "0.5",
                            "--preflight-report-dir", str(reports), "--throughput-tok-per-s", "0.005",
                            "--deadline-hours", "1", "--tensor-parallel-size", "2") == 0
    result = json.loads((reports / "preflight.json").read_text())
    assert (result["verdict"], result["exit_code"], result["reason"]) == ("pass", 0, None)
    est = result["estimate"]
    assert est["replica_hours"] == pytest.approx(2.5) and est["gpu_hours"] == pytest.approx(5.0)
    assert (est["gpus_per_replica"], est["replicas_for_deadline"], est["gpus_for_deadline"]) == (2, 3, 6)
    assert result["throughput_source"] == "--throughput-tok-per-s"
    assert (reports / "input_tokens.png").exists()
    assert not out.exists()  # the writability probe leaves nothing, and the reports went elsewhere
    printed = capsys.readouterr().out
    assert "  deadline       1 h needs 3 replica(s), 6 GPU(s)" in printed
    assert "  verdict        pass (exit 0)" in printed


def test_preflight_skips_rows_already_written_and_uses_the_measured_throughput(engine_free_main, tmp_path):
    prompts, out = write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["a"], "error": pa.array([None], pa.string())}), out / "part-x-000000.parquet")
    (out / REPORT_NAME).write_text(json.dumps({"replicas": [{"output_tok_per_s": 100.0}, {"output_tok_per_s": 300.0}]}))
    assert engine_free_main("--input-path", str(prompts), "--output-path", str(out), "--max-error-fraction", "0.5") == 0
    result = json.loads((out / PREFLIGHT_FOLDER / "preflight.json").read_text())
    assert (result["rows"], result["already_done"], result["to_run"]) == (5, 1, 4)
    assert result["estimate"]["output_tokens_at_most"] == 25  # d and e
    assert result["failing"]["fraction"] == pytest.approx(2 / 5)  # the one earlier ok row counts
    assert result["estimate"]["throughput_tok_per_s"] == 200.0
    assert result["throughput_source"] == f"measured: the earlier run's replicas, {out}/{REPORT_NAME}"


def test_an_embedding_jobs_preflight_counts_input_tokens_and_ignores_sampling_params(engine_free_main, tmp_path, capsys):
    """--task embed generates nothing and its replicas read no sampling_params (a bad one fails no row):
    the work is the input tokens, and without --throughput-tok-per-s nothing is estimated."""
    rows = ROWS + [{"uid": "f", "text": "Bad sampling", "sampling_params": {"n": 2, "temperature": 0.0}}]
    prompts = write_jsonl(tmp_path / "rows.jsonl", rows)
    out, reports = tmp_path / "out", tmp_path / "reports"
    assert engine_free_main("--task", "embed", "--input-path", str(prompts), "--output-path", str(out),
                            "--max-error-fraction", "0.5", "--preflight-report-dir", str(reports)) == 0
    result = json.loads((reports / "preflight.json").read_text())
    assert result["task"] == "embed" and result["failing"]["by_reason"] == {"empty": 1, "over max length": 1}
    assert result["estimate"] is None
    assert result["throughput_source"] == ("not estimated: no embed, score or classify throughput is measured; pass "
                                           "--throughput-tok-per-s, the input tokens a second of one replica")
    printed = capsys.readouterr().out
    assert "  output tokens  none (--task embed: each row's input tokens are the work)" in printed
    assert f"  GPU-hours      {result['throughput_source']}" in printed

    # With --throughput-tok-per-s (input tok/s), the hours are the input tokens' (run_preflight's call).
    est = estimate(0, 0.01, 1, 1, None, input_tokens=result["input_tokens"]["total"])
    assert est["throughput_counts"] == "input tokens" and est["output_tokens_at_most"] == 0
    assert result["input_tokens"]["total"] > 0
    assert est["replica_hours"] == pytest.approx(result["input_tokens"]["total"] / 0.01 / 3600)


def test_preflight_refuses_a_duplicate_id_with_exit_2(engine_free_main, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "rows.jsonl", ROWS + [{"uid": "a", "text": "Hello again"}])
    reports = tmp_path / "reports"
    assert engine_free_main("--input-path", str(prompts), "--output-path", str(tmp_path / "out"),
                            "--preflight-report-dir", str(reports)) == 2
    reason = "duplicate id 'a' in column 'uid': rows.jsonl:1 and rows.jsonl:6"
    printed = capsys.readouterr()
    assert printed.err == f"error: {reason}\n"
    assert f"  verdict        refused (exit 2): {reason}" in printed.out.splitlines()
    result = json.loads((reports / "preflight.json").read_text())
    assert (result["verdict"], result["exit_code"], result["reason"]) == ("refused", 2, reason)
    assert not (reports / "input_tokens.png").exists()
    assert not (tmp_path / "out").exists()
