"""Richer outputs: n samples per row, log-probabilities of the answer and of the prompt, a reasoning
model's thinking kept apart, per-row timings, and structured output checked per sample (util/features/samples.py,
util/features/reasoning.py, util/features/structured_output.py). One job on the session's warm engine (SmolLM2 in float32,
its tokenizer with the think tags `<think>` and `</think>`: conftest.py) serves the whole file, and a regex
forces the reasoning shape through guided decoding.

    .venv/bin/python -m pytest tests/test_richer_outputs.py
"""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openai.types.chat import ChatCompletion

from conftest import write_jsonl
from util.columns import TIMINGS
from util.config import Config, parse_args
from util.features.openai_batch import output_record
from util.output import OUTPUT_SCHEMA, output_schema
from util.parts import RowAsks
from util.plan import make_plan
from util.model_dirs.tiny_model import tiny_model_dir
from util.predictor import CORE_COLUMNS, RowError, checked_request, finish_batch, timings

MAX_TOKENS, TOP_K, PROMPT_K = 16, 3, 2
THINK = "<think>[a-z ]{20,40}</think>[a-z ]{1,20}"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
JSON_N2 = {"n": 2, "temperature": 1.0, "seed": 7,
           "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
ROWS = [
    {"id": "capital", "text": "What is the capital of France?"},  # the job's sampling: greedy, logprobs
    {"id": "sky", "text": "Why is the sky blue?"},
    {"id": "think", "text": "Think, then answer: what is two plus two?",
     "sampling_params": {"reasoning_parser": "deepseek_r1", "structured_outputs": {"regex": THINK}, "max_tokens": 40}},
    {"id": "think-cut", "text": "Think, then answer: what is two plus two?",
     "sampling_params": {"reasoning_parser": "deepseek_r1", "structured_outputs": {"regex": THINK}, "max_tokens": 9}},
    {"id": "json", "text": "Give a person's name and age as JSON.", "sampling_params": {**JSON_N2, "max_tokens": 40}},
    {"id": "json-cut", "text": "Give a person's name and age as JSON.", "sampling_params": {**JSON_N2, "max_tokens": 3}},
]
END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def rows(run_job, tmp_path_factory):
    """The run's output rows by id. Rows carry their sampling_params as JSON text."""
    folder = tmp_path_factory.mktemp("richer")
    lines = [json.dumps({**row, "sampling_params": json.dumps(row["sampling_params"])} if "sampling_params" in row
                        else row) for row in ROWS]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    job = run_job("--smoke", "--input-path", folder / "in.jsonl", "--id-column", "id", "--max-tokens", MAX_TOKENS,
                  "--logprobs", TOP_K, "--prompt-logprobs", PROMPT_K, "--output-path", folder / "out")
    assert job.code == 0, job.err[-5000:]
    assert f"summary: {len(ROWS)} rows: {len(ROWS)} ok, 0 errors" in job.out, job.out[-3000:]
    table = pq.read_table(folder / "out")
    assert table.schema.names[:len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    return {row["id"]: row for row in table.to_pylist()}


def spelled(tokens: list[dict]) -> str:
    return "".join(token["token"] for token in tokens)


def test_greedy_logprobs_and_prompt_logprobs_match_transformers(rows, hf_model):
    import torch

    model, tokenizer = hf_model
    for row_id in ("capital", "sky"):
        row = rows[row_id]
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        generated = [token["token_id"] for token in row["logprobs"]]
        assert len(generated) == row["num_generated_tokens"] and row["completions"] is None
        assert row["generated_text"] == tokenizer.decode(generated, skip_special_tokens=True)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        # Each generated token: the argmax (greedy), its logprob, and the top K in rank order.
        for position, token in enumerate(row["logprobs"]):
            at = expected[len(prompt_ids) + position - 1]
            top = torch.topk(at, TOP_K)
            assert token["token_id"] == top.indices[0].item(), (row_id, position)
            assert abs(token["logprob"] - at[token["token_id"]].item()) < 1e-3, (row_id, position)
            assert [t["token_id"] for t in token["top_logprobs"]] == top.indices.tolist(), (row_id, position)
            for t, value in zip(token["top_logprobs"], top.values.tolist()):
                assert abs(t["logprob"] - value) < 1e-3 and t["token"] == tokenizer.decode([t["token_id"]])
        # Each prompt token as the model scores it after the ones before it; nothing precedes the first.
        assert [t["token_id"] for t in row["prompt_logprobs"]] == prompt_ids
        assert (row["prompt_logprobs"][0]["logprob"], row["prompt_logprobs"][0]["top_logprobs"]) == (None, [])
        for position, token in enumerate(row["prompt_logprobs"][1:], start=1):
            at = expected[position - 1]
            assert abs(token["logprob"] - at[token["token_id"]].item()) < 1e-3, (row_id, position)
            assert [t["token_id"] for t in token["top_logprobs"]] == torch.topk(at, PROMPT_K).indices.tolist()


def test_reasoning_is_kept_apart_from_the_answer(rows):
    think = rows["think"]
    assert re.fullmatch("[a-z ]{20,40}", think["reasoning_content"]), think["reasoning_content"]
    assert re.fullmatch("[a-z ]{1,20}", think["generated_text"]), think["generated_text"]
    assert (think["finish_reason"], think["structured_output_error"]) == ("stop", None)
    # The whole text, as the tokens spell it, is the two parts in their tags.
    whole = f"<think>{think['reasoning_content']}</think>{think['generated_text']}"
    assert spelled(think["logprobs"]) in (whole, whole + END_OF_TURN)
    # Cut by max_tokens inside the thinking: all of it is thinking, no answer, and the check says why.
    cut = rows["think-cut"]
    assert (cut["finish_reason"], cut["num_generated_tokens"], cut["generated_text"]) == ("length", 9, "")
    assert spelled(cut["logprobs"]) == "<think>" + cut["reasoning_content"] and cut["reasoning_content"]
    assert cut["structured_output_error"] == f"does not match the regex {THINK!r} (finish_reason length)"
    # Rows that named no reasoning parser keep their text whole.
    assert rows["capital"]["reasoning_content"] is None


def test_n_samples_in_one_row_each_checked_against_the_schema(rows):
    from jsonschema import validate

    row = rows["json"]
    samples = row["completions"]
    assert len(samples) == 2
    assert (row["generated_text"], row["finish_reason"]) == (samples[0]["text"], samples[0]["finish_reason"])
    assert row["num_generated_tokens"] == sum(s["num_generated_tokens"] for s in samples)
    assert row["logprobs"] == samples[0]["logprobs"]
    for sample in samples:
        validate(json.loads(sample["text"]), PERSON)
        assert (sample["finish_reason"], sample["structured_output_error"]) == ("stop", None)
        assert len(sample["logprobs"]) == sample["num_generated_tokens"]
    # Cut at 3 tokens, each sample is flagged on its own.
    cut = rows["json-cut"]
    assert [s["num_generated_tokens"] for s in cut["completions"]] == [3, 3]
    for sample in cut["completions"]:
        assert sample["structured_output_error"].startswith("not valid JSON: ")
        assert sample["structured_output_error"].endswith(" (finish_reason length)")
    assert cut["structured_output_error"] == cut["completions"][0]["structured_output_error"]


def test_every_row_has_its_timings(rows):
    for row in rows.values():
        assert row["time_in_queue_s"] >= 0 and row["generation_time_s"] >= 0, row["id"]
        assert 0 < row["time_to_first_token_s"] < 600, row["id"]
    # Cut at 9 tokens, the thinking row generated for a shorter time than the same prompt's 40.
    assert rows["think-cut"]["generation_time_s"] < rows["think"]["generation_time_s"]


def test_every_row_is_an_openai_chat_completion(rows):
    for row in rows.values():
        body = output_record(row, created=1)["response"]["body"]
        completion = ChatCompletion.model_validate(body)
        samples = row["completions"] or [{"text": row["generated_text"], "logprobs": row["logprobs"],
                                          "reasoning_content": row["reasoning_content"]}]
        assert len(completion.choices) == len(samples) and body["usage"]["completion_tokens"] == row["num_generated_tokens"]
        for choice, sample in zip(completion.choices, samples):
            assert choice.message.content == sample["text"]
            assert [(t.token, t.logprob) for t in choice.logprobs.content] == [
                (t["token"], t["logprob"]) for t in sample["logprobs"]]
            assert all(len(t.top_logprobs) == TOP_K for t in choice.logprobs.content)
            assert getattr(choice.message, "reasoning_content", None) == sample["reasoning_content"]
        assert len(body["prompt_logprobs"]) == row["num_input_tokens"]


# Without an engine: flags, row overrides, and columns that are null, not missing.

@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "--n must be >= 1, got 0"),
    ({"n": 2}, "--n 2 needs --temperature > 0: greedy sampling gives one answer"),
    ({"logprobs": -1}, "--logprobs must be >= 0, got -1"),
    ({"prompt_logprobs": 21}, "--prompt-logprobs must be <= 20 (the engine's max_logprobs; raise it with "
                              "--engine-arg max_logprobs=N), got 21"),
])
def test_bad_flag_values_are_refused(kwargs, message):
    with pytest.raises(ValueError) as refused:
        Config(**kwargs)
    assert str(refused.value) == message


def sampling_of(**config) -> dict:
    return make_plan(Config(concurrency=1, **config), cluster={"CPU": 2.0}, resolve_model_files=False).sampling


def test_the_flags_enter_the_jobs_sampling_only_when_given():
    assert not {"n", "logprobs", "prompt_logprobs", "reasoning_parser"} & set(sampling_of())
    sampling = sampling_of(n=3, temperature=0.7, logprobs=0, prompt_logprobs=1, reasoning_parser="deepseek_r1",
                           engine_arg={"max_logprobs": 50})
    assert {k: sampling[k] for k in ("n", "logprobs", "prompt_logprobs", "reasoning_parser")} == {
        "n": 3, "logprobs": 0, "prompt_logprobs": 1, "reasoning_parser": "deepseek_r1"}
    assert Config(logprobs=50, engine_arg={"max_logprobs": 50}).logprobs == 50


def test_an_unknown_reasoning_parser_exits_2_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--reasoning-parser", "deepseek"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r".+: error: --reasoning-parser: unknown reasoning parser 'deepseek'; vLLM \S+ has "
                        r"(\w+, )*deepseek_r1(, \w+)*", error), error


def test_row_overrides_of_n_and_reasoning_parser_are_checked():
    asking = [{"text": "x", "sampling_params": {"n": 2, "reasoning_parser": "r1"}}]  # rows that ask: the parts are on
    plan = make_plan(Config(concurrency=1, temperature=0.0, max_tokens=8), cluster={"CPU": 2.0}, resolve_model_files=False,
                     source=asking)

    def request(override: dict):
        return checked_request({"id": "r", "sampling_params": override}, plan.sampling, plan.parts)

    accepted = request({"n": 2, "temperature": 0.5})
    assert (accepted.sampling["n"], accepted.sampling["temperature"], accepted.sampling["max_tokens"]) == (2, 0.5, 8)
    with pytest.raises(RowError) as greedy:
        request({"n": 2})
    assert str(greedy.value) == "invalid sampling_params: n=2 needs temperature > 0: greedy sampling gives one answer"
    with pytest.raises(RowError) as unknown:
        request({"reasoning_parser": "r1"})
    assert str(unknown.value).startswith("invalid sampling_params: reasoning_parser: unknown reasoning parser 'r1'; vLLM ")


def test_without_metrics_the_timings_are_null_columns_not_missing():
    asking = [{"text": "x", "sampling_params": {"n": 2, "logprobs": 1, "reasoning_parser": "r1"}}]
    plan = make_plan(Config(concurrency=1), cluster={"CPU": 2.0}, resolve_model_files=False, source=asking)
    assert timings(None) == dict.fromkeys(TIMINGS)
    batch = pa.table({"id": ["a"], "prompt_token_ids": [[1]], "error": [None]})
    table = finish_batch(batch, [{"generated_text": "x", **timings(None)}], {**CORE_COLUMNS, **plan.columns})
    schema = output_schema(plan.columns)
    for name in (*TIMINGS, "completions", "logprobs", "prompt_logprobs", "reasoning_content"):
        assert table[name].type == schema.field(name).type and table[name].to_pylist() == [None], name


# --- a feature joins a job by its flag, or by rows that ask for it (util/parts.py ASKED_BY) ---

CPU_CLUSTER = {"CPU": 8.0}


def test_a_later_row_that_asks_for_a_feature_the_job_left_out_refuses_the_run(main_here, tmp_path):
    asks = tmp_path / "asks"  # tools in the second file only: the plan, made from the first, has no tool calls
    asks.mkdir()
    write_jsonl(asks / "a.jsonl", [{"text": "Hi"}])
    write_jsonl(asks / "b.jsonl", [{"text": "Weather?", "tools": [{"type": "function", "function": {"name": "f"}}]}])
    job = main_here("--model", tiny_model_dir(), "--concurrency", "1", "--input-path", str(asks),
                    "--output-path", str(tmp_path / "out"))
    assert job.code == 2, job.err[-3000:]
    assert job.err.splitlines()[-1] == (f"error: {asks}/b.jsonl:1: the row sets tools, which none of the rows the job "
                                        "was planned from sets (the first file's first 1024); put a row that sets it "
                                        "among those")
    assert not (tmp_path / "out").exists()


def test_what_a_plain_jobs_later_rows_may_not_ask_for(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "q", "sampling_params": {"max_tokens": 4}}) + "\n")
    plan = make_plan(Config(input_path=str(rows)), cluster=CPU_CLUSTER, resolve_model_files=False)
    # A later row may not ask for what the first rows did not: util/scan.py refuses it (test_reading.py).
    assert {"tools", "lora"} <= plan.unplanned.columns and {"n", "response_format"} <= plan.unplanned.sampling


@pytest.mark.parametrize("row, parts", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ["ToolCalls"]),
    ({"lora": "adapter"}, ["Lora"]),
    ({"sampling_params": {"n": 2, "temperature": 1.0}}, ["Samples"]),
    ({"sampling_params": '{"logprobs": 1}'}, ["Samples"]),  # a CSV's JSON text
    ({"sampling_params": {"response_format": {"type": "json_object"}}}, ["StructuredOutput"]),
    ({"sampling_params": {"reasoning_parser": "deepseek_r1"}}, ["Reasoning"]),
    ({"sampling_params": {"n": None, "max_tokens": 3}}, []),  # a key other rows set, null in this one
])
def test_a_feature_is_in_the_job_when_a_row_asks_for_it(row, parts):
    plan = make_plan(Config(), cluster=CPU_CLUSTER, resolve_model_files=False, source=[{"text": "q"}, {"text": "q", **row}])
    assert [type(part).__name__ for part in plan.parts] == parts
    columns = {"ToolCalls": "tool_calls", "Samples": "completions", "StructuredOutput": "structured_output_error",
               "Reasoning": "reasoning_content"}
    assert [name for name in columns.values() if name in plan.columns] == [columns[p] for p in parts if p in columns]


def test_flags_turn_features_on_and_other_tasks_take_no_row_asks():
    flags = Config(n=2, temperature=1.0, reasoning_parser="deepseek_r1", tool_call_parser="hermes", regex="a+")
    flagged = make_plan(flags, cluster=CPU_CLUSTER, resolve_model_files=False)
    assert [type(p).__name__ for p in flagged.parts] == ["StructuredOutput", "Reasoning", "ToolCalls", "Samples"]
    embed = make_plan(Config(task="embed"), cluster=CPU_CLUSTER, resolve_model_files=False,
                      source=[{"text": "q", "tools": ["t"]}])
    assert embed.unplanned is None and "ToolCalls" not in [type(p).__name__ for p in embed.parts]
    assert RowAsks(every=True).ask(RowAsks(columns=frozenset({"tools"})))  # an OpenAI file's requests: anything
