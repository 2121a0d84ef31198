"""bench/agreement.py's parts, with no engine: --config parsing, the comparison of answers with the
baseline's, the summary of a run where a configuration failed, and its table.

    .venv/bin/python -m pytest tests/test_agreement.py
"""

import argparse

import pytest

from bench.agreement import agreement, first_difference, parse_config, summarize, table


def answer(*ids: int) -> dict:
    return {"text": "".join(chr(ord("a") + i) for i in ids), "token_ids": list(ids)}


def run(answers: list[dict], tok_per_s: float = 100.0) -> dict:
    return {"engine_start_s": 1.0, "generate_s": 2.0, "output_tokens": sum(len(a["token_ids"]) for a in answers),
            "output_tok_per_s": tok_per_s, "answers": answers}


BASELINE = [answer(1, 2, 3, 4), answer(5, 6, 7), answer(8, 9), answer(1, 1)]


def test_config_values_parse_as_literals_else_strings():
    assert parse_config("fp8_both=quantization=fp8;kv_cache_dtype=fp8") == (
        "fp8_both", {"quantization": "fp8", "kv_cache_dtype": "fp8"})
    assert parse_config("big = max_num_seqs=512; enforce_eager=True;compilation_config={'level': 0}") == (
        "big", {"max_num_seqs": 512, "enforce_eager": True, "compilation_config": {"level": 0}})
    assert parse_config("again=") == ("again", {})


@pytest.mark.parametrize("text", ["fp8", "=dtype=float32", "x=dtype"])
def test_a_bad_config_is_refused_with_its_text(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--config") as refused:
        parse_config(text)
    assert repr(text) in str(refused.value)


def test_first_difference_counts_an_early_end():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([], [4]) == 0


def test_identical_answers_agree_fully():
    assert agreement(BASELINE, [dict(a) for a in BASELINE]) == {
        "compared": 4, "identical_text": 4, "identical_token_ids": 4, "identical_text_share": 1.0,
        "identical_token_ids_share": 1.0, "first_difference_median": None}


def test_answers_that_part_at_token_k():
    # Two answers part (at 2 and at 0), one ends early (at 1), one matches.
    other = [answer(1, 2, 9, 4), answer(5, 6, 7), answer(8), answer(2, 1)]
    assert agreement(BASELINE, other) == {
        "compared": 4, "identical_text": 1, "identical_token_ids": 1, "identical_text_share": 0.25,
        "identical_token_ids_share": 0.25, "first_difference_median": 1}


def test_the_same_text_from_other_tokens_counts_by_text_only():
    other = [*BASELINE[:3], {"text": BASELINE[3]["text"], "token_ids": [7]}]
    result = agreement(BASELINE, other)
    assert (result["identical_text"], result["identical_token_ids"], result["first_difference_median"]) == (4, 3, 0)


def test_answers_for_other_prompts_are_refused():
    with pytest.raises(ValueError, match="3 answers against the baseline's 4"):
        agreement(BASELINE, BASELINE[:3])


def test_a_failed_configuration_is_reported_in_run_order_and_the_others_compared():
    failure = {"exit_code": 1, "log": "logs/fp8_weights.log", "log_tail": ["Traceback", "last line"],
               "error_lines": ["(Worker pid=7) ERROR 12-05 01:41:20 [executor.py:953] ValueError: no fp8 on CPU",
                               "    raise RuntimeError(",
                               "RuntimeError: Engine core initialization failed. See root cause above."]}
    parted = [answer(1, 2, 3, 5), *BASELINE[1:]]
    summary = summarize({"bf16": run(BASELINE, 120.0), "fp8_weights": {"failed": failure},
                         "fp8_kv": run(parted, 150.0)}, baseline="bf16")
    assert summary["baseline"] == "bf16" and not summary["baseline_failed"]
    assert list(summary["configs"]) == ["bf16", "fp8_weights", "fp8_kv"]
    assert "identical_text" not in summary["configs"]["bf16"]
    assert summary["configs"]["fp8_weights"] == {"failed": failure}
    kv = summary["configs"]["fp8_kv"]
    assert (kv["identical_token_ids_share"], kv["first_difference_median"], kv["output_tok_per_s"]) == (0.75, 3, 150.0)
    lines = table(summary).splitlines()
    assert lines[1].split() == ["bf16", "baseline", "baseline", "120.0"]
    assert lines[2] == "fp8_weights      FAILED (exit 1): ValueError: no fp8 on CPU"
    assert lines[3].split() == ["fp8_kv", "75.0%", "75.0%", "3", "150.0"]


def test_without_the_baseline_nothing_is_compared():
    summary = summarize({"bf16": {"failed": {"exit_code": 1, "log": "l", "log_tail": ["killed"],
                                             "error_lines": []}},
                         "float32": run(BASELINE)}, baseline="bf16")
    assert summary["baseline_failed"] and "compared" not in summary["configs"]["float32"]
    assert table(summary).splitlines()[1:] == [
        "bf16             FAILED (exit 1): killed",
        "float32                   -          -                  -      100.0"]
