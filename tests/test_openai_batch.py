"""OpenAI Batch API files in and out: requests parsed per line, records joined back on custom_id.
Every output line is checked against the openai package's own types.

    .venv/bin/python -m pytest tests/test_openai_batch.py
"""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from openai.types import BatchError
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from conftest import scan_error
from util.openai_batch import join_text_parts, output_record, preview, request_row
from util.output import output_dataset, write_results
from util.reading import read_prompts
from util.resume import DoneIndex
from util.scan import scan_input


def request(custom_id: str, content: str | list[dict], **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}})


def test_body_parameters_become_the_rows_sampling_params():
    row = request_row(request("q-1", "Hi", max_completion_tokens=7, temperature=0.5, stop="END", seed=3), "in.jsonl:1")
    assert row["custom_id"] == "q-1" and row["request_error"] is None and row["request_model"] == "gpt-4o-mini"
    assert json.loads(row["messages"]) == [{"role": "user", "content": "Hi"}]
    assert json.loads(row["sampling_params"]) == {"max_tokens": 7, "temperature": 0.5, "stop": ["END"], "seed": 3}


@pytest.mark.parametrize("line, custom_id, reason", [
    ('{"custom_id": "q-1", "body": ', "in.jsonl:4", "in.jsonl:4: malformed JSON (Expecting value at column 30)"),
    ('["q-1"]', "in.jsonl:4", "in.jsonl:4: a request must be a JSON object, got list"),
    (json.dumps({"url": "/v1/chat/completions", "body": {}}), "in.jsonl:4", "in.jsonl:4: no custom_id (a non-empty string)"),
    (json.dumps({"custom_id": "q-1", "url": "/v1/completions", "body": {}}), "q-1",
     "in.jsonl:4: only POST /v1/chat/completions or POST /v1/embeddings is supported, got POST /v1/completions"),
    (json.dumps({"custom_id": "q-1", "url": "/v1/chat/completions", "body": {"messages": []}}), "q-1",
     "in.jsonl:4: body.messages must be a non-empty list of messages"),
    (request("q-1", "Hi", n=0), "q-1", "in.jsonl:4: n=0 must be a positive integer"),
    (request("q-1", "Hi", n=True), "q-1", "in.jsonl:4: n=true must be a positive integer"),
    (request("q-1", "Hi", stream=True), "q-1",
     "in.jsonl:4: stream=true is not supported (a batch is answered whole; stream may be null or false)"),
    (request("q-1", "Hi", top_logprobs=2), "q-1", "in.jsonl:4: top_logprobs=2 needs logprobs=true"),
    (request("q-1", "Hi", logprobs=True, top_logprobs=21), "q-1",
     "in.jsonl:4: top_logprobs=21 must be an integer from 0 to 20"),
    (request("q-1", "Hi", logprobs=1), "q-1", "in.jsonl:4: logprobs=1 must be true or false"),
    (request("q-1", "Hi", tools=[{"type": "function", "function": {"name": "f"}}]), "q-1",
     'in.jsonl:4: tools=[{"type": "function", "function": {"name": "f"}}] is not supported '
     "(no tool calls; tools may be null or [])"),
    (request("q-1", "Hi", tool_choice="required"), "q-1",
     'in.jsonl:4: tool_choice="required" is not supported (no tool calls; tool_choice may be null or "none" or "auto")'),
    (request("q-1", "Hi", modalities=["text", "audio"]), "q-1",
     'in.jsonl:4: modalities=["text", "audio"] is not supported (text output only; modalities may be null or ["text"])'),
    (request("q-1", "Hi", audio={"voice": "alloy", "format": "wav"}), "q-1",
     'in.jsonl:4: audio={"voice": "alloy", "format": "wav"} is not supported (text output only; audio may be null)'),
    (request("q-1", "Hi", temprature=0.5, logit_bias={}), "q-1", "in.jsonl:4: unknown body parameter(s): temprature"),
])
def test_a_bad_request_line_becomes_an_error_row(line, custom_id, reason):
    row = request_row(line, "in.jsonl:4")
    assert (row["custom_id"], row["request_error"], row["messages"]) == (custom_id, reason, None)


@pytest.mark.parametrize("body", [
    {"n": None, "logprobs": None, "tools": None, "stream": None, "top_logprobs": None, "audio": None},
    {"n": 1, "stream": False, "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
     "parallel_tool_calls": True, "functions": [], "function_call": "auto", "modalities": ["text"]},
    {"user": "u-1", "metadata": {"team": "a"}, "store": False, "service_tier": "auto", "safety_identifier": "s",
     "prompt_cache_key": "k", "stream_options": None, "prediction": None, "web_search_options": None},
])
def test_what_asks_for_no_unsupported_feature_is_accepted(body):
    row = request_row(request("q-1", "Hi", max_tokens=None, **body), "in.jsonl:4")
    assert (row["request_error"], json.loads(row["messages"]), row["sampling_params"]) == (
        None, [{"role": "user", "content": "Hi"}], None)


@pytest.mark.parametrize("body, sampling", [
    ({"n": 3, "temperature": 0.7}, {"n": 3, "temperature": 0.7}),
    ({"logprobs": True}, {"logprobs": 0}),  # the chosen token's logprob, no alternatives
    ({"logprobs": True, "top_logprobs": 5}, {"logprobs": 5}),
    ({"logprobs": False, "top_logprobs": 0}, None),
])
def test_n_and_logprobs_become_the_rows_sampling(body, sampling):
    row = request_row(request("q-1", "Hi", **body), "in.jsonl:4")
    assert row["request_error"] is None
    assert (json.loads(row["sampling_params"]) if row["sampling_params"] else None) == sampling


def test_logit_bias_becomes_a_sampling_parameter():
    row = request_row(request("q-1", "Hi", logit_bias={"42": -100}), "in.jsonl:4")
    assert json.loads(row["sampling_params"]) == {"logit_bias": {"42": -100}}


def test_text_parts_are_joined_with_newlines_as_vllms_server_joins_them():
    message = {"role": "user", "name": "ada", "content": [{"type": "text", "text": "What is the capital"},
                                                          {"type": "text", "text": "of France?"}]}
    assert join_text_parts(message) == {"role": "user", "name": "ada", "content": "What is the capital\nof France?"}
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}
    assert join_text_parts(refusal) == {"role": "assistant", "content": "I can't."}
    assert join_text_parts({"role": "user", "content": "Hi"}) == {"role": "user", "content": "Hi"}
    image = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
    with pytest.raises(ValueError) as refused:
        join_text_parts(image, 2)
    assert str(refused.value) == "messages[2].content[1] is a 'image_url' part; only text parts are supported"


def test_output_and_error_records():
    ok = {"id": "q-1", "error": None, "generated_text": "Hello.", "finish_reason": "stop", "model": "m",
          "num_input_tokens": 12, "num_generated_tokens": 3}
    record = output_record(ok, created=1700000000)
    assert record["custom_id"] == "q-1" and record["error"] is None and record["id"].startswith("batch_req_")
    assert record["response"]["status_code"] == 200
    body = record["response"]["body"]
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello."},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert output_record(ok, created=1)["id"] == record["id"]  # the same in every run
    failed = output_record({**ok, "id": "q-2", "error": "empty prompt in column 'messages'"})
    assert failed["response"]["status_code"] == 400
    assert failed["error"] == {"code": "invalid_request", "message": "empty prompt in column 'messages'"}
    assert preview(record) == {"id": "q-1", "generated_text": "Hello.", "finish_reason": "stop",
                               "num_generated_tokens": 3, "error": None}
    cut = output_record({**ok, "generated_text": '{"a": ', "finish_reason": "length",
                         "structured_output_error": "not valid JSON: Expecting value (finish_reason length)"})
    assert cut["response"]["body"]["choices"][0]["structured_output_error"].startswith("not valid JSON")


def test_reading_a_batch_file_keys_rows_on_custom_id(ray_local, tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join([request("a", "Hi"), "{oops", request("b", "Yo", max_tokens=5)]) + "\n")
    rows = {row["id"]: row for row in read_prompts(str(path), "openai").take_all()}
    assert sorted(rows) == ["a", "b", "batch.jsonl:2"]
    assert rows["batch.jsonl:2"]["request_error"].startswith("batch.jsonl:2: malformed JSON")
    assert json.loads(rows["b"]["sampling_params"]) == {"max_tokens": 5}


def test_duplicate_custom_ids_are_refused(ray_local, tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text(request("a", "Hi") + "\n" + request("b", "Hey") + "\n" + request("a", "Yo") + "\n")
    # The input scan refuses it, as main.py and --preflight run it; lines are named by number.
    assert scan_error(path, input_format="openai", id_column="custom_id") == (
        "duplicate id 'a' in column 'custom_id': batch.jsonl:1 and batch.jsonl:3")


def test_a_batch_resumes_on_custom_id(ray_local, tmp_path):
    """The custom_ids of an earlier run's output records, in the output and in its error file, count as
    done, and a re-run reads only the other requests."""
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(request(c, "Hi") for c in ("a", "b", "c", "d")) + "\n")
    rows = [{"id": "a", "prompt": "p", "generated_text": "Hello.", "finish_reason": "stop", "num_input_tokens": 3,
             "num_generated_tokens": 2, "error": None, "model": "m"},
            {"id": "c", "prompt": "", "generated_text": None, "finish_reason": None, "num_input_tokens": 0,
             "num_generated_tokens": 0, "error": "empty prompt in column 'messages'", "model": "m"}]
    out = tmp_path / "out"
    write_results(ray_local.data.from_arrow(pa.Table.from_pylist(rows)), str(out), "openai")
    # One record in the output file, one in the error file.
    assert (len(list(out.glob("*.jsonl"))), len(list((out / "errors").glob("*.jsonl")))) == (1, 1)
    done = DoneIndex.build(*output_dataset(str(out), "openai"))
    assert done.rows == 2
    scan = scan_input(read_prompts(str(path), "openai", with_where=True), "custom_id", done, str(path), "openai")
    assert (scan.rows, scan.already_done) == (4, 2)
    assert sorted(r["id"] for r in read_prompts(str(path), "openai", row_filter=done.drop_done).take_all()) == ["b", "d"]


@pytest.fixture(scope="module")
def batch_run(run_job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    source = folder / "batch_input.jsonl"
    parts = [{"type": "text", "text": "What is the capital of France?"},
             {"type": "text", "text": "Answer in one sentence."}]
    lines = [request("q-1", "Tell me a story.", max_tokens=6),
             request("q-2", "Name a color.", max_completion_tokens=3, temperature=0),
             "this line is not JSON",
             request("q-3", "   "),
             request("q-4", "Count to three."),
             request("q-5", parts, max_tokens=None, n=None, logprobs=False, tools=None, stream=False),
             request("q-6", "Hi", n=2),
             request("q-7", "Name a fruit.", n=2, temperature=0.8, seed=1, logprobs=True, top_logprobs=2,
                     max_tokens=5)]
    source.write_text("\n".join(lines) + "\n")
    out = folder / "out"
    args = ["--smoke", "--input-path", str(source), "--input-format", "openai", "--output-path", str(out),
            "--max-error-fraction", "0.5"]
    return run_job(*args), out


def _records(folder: Path) -> dict[str, dict]:
    records = [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()]
    return {record["custom_id"]: record for record in records}


def test_a_batch_file_round_trips_and_joins_back_on_custom_id(batch_run):
    first, out = batch_run
    assert first.code == 0, first.err[-3000:]
    assert "summary: 8 rows: 5 ok, 3 errors, 0 already done" in first.out
    output, errors = _records(out), _records(out / "errors")
    assert sorted(output) == ["q-1", "q-2", "q-4", "q-5", "q-7"] and sorted(errors) == ["batch_input.jsonl:3", "q-3", "q-6"]
    for record in output.values():  # each line as the openai package reads an answer
        ChatCompletion.model_validate(record["response"]["body"])
    for record in errors.values():  # ... and an error
        BatchError.model_validate(record["error"])
        ErrorObject.model_validate(record["response"]["body"]["error"])
    # The text parts, joined, ask a question the model answers in a sentence, and stops.
    answer = output["q-5"]["response"]["body"]["choices"][0]
    assert (answer["message"]["content"], answer["finish_reason"]) == ("The capital of France is Paris.", "stop")
    assert errors["q-6"]["error"]["message"] == (
        "invalid sampling_params: n=2 needs temperature > 0: greedy sampling gives one answer")
    # n=2 with logprobs: two choices, each with a logprob and the top 2 per token; usage counts both.
    body = output["q-7"]["response"]["body"]
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        tokens = choice["logprobs"]["content"]
        assert 0 < len(tokens) <= 5 and all(len(token["top_logprobs"]) == 2 for token in tokens)
        # The tokens spell the answer; one that stopped by itself ends with the end-of-turn token too.
        spelled = "".join(token["token"] for token in tokens)
        assert spelled in (choice["message"]["content"], choice["message"]["content"] + "<|im_end|>")
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in body["choices"])
    for custom_id, limit in (("q-1", 6), ("q-2", 3), ("q-4", 32)):  # the body's max_tokens, else the job's
        body = output[custom_id]["response"]["body"]
        assert output[custom_id]["response"]["status_code"] == 200 and output[custom_id]["error"] is None
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert 0 < body["usage"]["completion_tokens"] <= limit
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert errors["batch_input.jsonl:3"]["error"]["message"].startswith("batch_input.jsonl:3: malformed JSON")
    assert errors["q-3"]["error"]["message"] == "empty prompt in column 'messages'"
    assert errors["q-3"]["response"]["status_code"] == 400
