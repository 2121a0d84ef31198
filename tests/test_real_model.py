"""`python main.py --smoke` with real weights (SmolLM2-135M-Instruct, util/smol_model.py), run once for
the whole file: its greedy output equals transformers' generate token for token (float32 on CPU), its
prompts are the tokenizer's chat template, a short answer stops by itself, and the run ends cleanly.

    .venv/bin/python -m pytest tests/test_real_model.py
"""

import subprocess

import pyarrow.parquet as pq
import pytest

import conftest
from conftest import run_main

PROMPTS = conftest.PROMPTS[:8]
CAPITAL = "What is the capital of France?"
MAX_TOKENS = 32  # --smoke's


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One main.py run, in float32 so that it can match transformers exactly; stderr into stdout, in
    the order they were printed, for the check of what follows the report."""
    folder = tmp_path_factory.mktemp("real")
    (folder / "prompts.txt").write_text("\n".join([*PROMPTS, CAPITAL]) + "\n")
    run = run_main("--smoke", "--input-path", folder / "prompts.txt", "--engine-arg", "dtype=float32",
                   "--output-path", folder / "out", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert run.returncode == 0, run.stdout[-5000:]
    rows = {row["text"]: row for row in pq.read_table(folder / "out").to_pylist()}
    return run.stdout, rows


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from util.smol_model import smol_model_dir

    # One thread: on a busy 2-core machine torch's two OpenMP threads wait on each other, and generating
    # 16 tokens took 34 s instead of 2 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = smol_model_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(directory)
    torch.set_num_threads(threads)


def first_difference(expected_ids: list[int], text: str, tokenizer) -> int:
    """The first position where transformers' tokens stop spelling the pipeline's text."""
    for position in range(len(expected_ids)):
        if not text.startswith(tokenizer.decode(expected_ids[:position + 1], skip_special_tokens=True)):
            return position
    return len(expected_ids)


def test_greedy_output_equals_transformers_token_for_token(smoke_run, hf_model):
    import torch

    _, rows = smoke_run
    model, tokenizer = hf_model
    mismatches = []
    for text in PROMPTS:
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


def test_prompts_are_the_chat_template_and_short_answers_stop(smoke_run, hf_model):
    _, rows = smoke_run
    _, tokenizer = hf_model
    for text, row in rows.items():
        expected = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        assert row["prompt"] == expected
        assert row["error"] is None
        # Cut off at max_tokens, or stopped by the model's own end-of-turn token before it.
        expected_reason = "length" if row["num_generated_tokens"] == MAX_TOKENS else "stop"
        assert row["finish_reason"] == expected_reason, row
    answer = rows[CAPITAL]
    assert (answer["generated_text"], answer["finish_reason"]) == ("The capital of France is Paris.", "stop")


def test_nothing_follows_the_report_but_the_end(smoke_run):
    output, _ = smoke_run
    assert "summary: 9 rows: 9 ok, 0 errors, 0 already done; " in output
    after_report = output[output.index("run report\n"):]
    assert "ERROR" not in after_report and "Traceback" not in after_report, after_report
    # Ray Data's progress goes to its log file, and vLLM's INFO lines are not shown (--verbose shows them).
    assert "logging_progress.py" not in output and " INFO " not in output, output
