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
from util.errors import error_text
from util.features.openai_batch import (BatchKind, ChatFormatter, OpenAIBatch, join_text_parts, output_record,
                               preview, request_row, request_table)
from util.output import output_dataset, write_results
from util.predictor import checked_request
from util.features.preflight import row_error_kind
from util.reading import read_prompts
from util.resume import DoneIndex
from util.scan import scan_input
from util.model_dirs.smol_model import smol_model_dir


def request(custom_id: str, content: str | list[dict], **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}})


def test_body_parameters_become_the_rows_sampling_params():
    row = request_row(request("q-1", "Hi", max_completion_tokens=7, temperature=0.5, stop="END", seed=3), "in.jsonl:1")
    assert row["custom_id"] == "q-1" and row["request_error"] is None and row["request_model"] == "gpt-4o-mini"
    assert json.loads(row["messages"]) == [{"role": "user", "content": "Hi"}]
    assert json.loads(row["sampling_params"]) == {"max_tokens": 7, "temperature": 0.5, "stop": ["END"], "seed": 3}


@pytest.mark.parametrize("body, sampling", [
    # max_completion_tokens wins over max_tokens, whichever comes first in the body, as in vLLM's server.
    ({"max_completion_tokens": 2, "max_tokens": 10}, {"max_tokens": 2}),
    ({"max_tokens": 10, "max_completion_tokens": 2}, {"max_tokens": 2}),
    ({"max_tokens": 10, "max_completion_tokens": None}, {"max_tokens": 10}),
    ({"stop": ["a", "b"], "presence_penalty": -1.5, "frequency_penalty": 2}, {"stop": ["a", "b"],
                                                                          "presence_penalty": -1.5, "frequency_penalty": 2}),
    ({"stop": [], "seed": -(2**63)}, {"stop": [], "seed": -(2**63)}),
    # logit_bias: each key through int() and each bias clamped to [-100, 100], as SamplingParams.from_optional
    # does; the keys stay JSON strings until the replica (OpenAIBatch.check).
    ({"logit_bias": {"7042": -100, " 12": 500, "+3": -1e9, "4": 0.5}},
     {"logit_bias": {"7042": -100.0, "12": 100.0, "3": -100.0, "4": 0.5}}),
])
def test_body_parameters_are_converted_as_vllms_server_converts_them(body, sampling):
    row = request_row(request("q-1", "Hi", **body), "in.jsonl:4")
    assert row["request_error"] is None and json.loads(row["sampling_params"]) == sampling


@pytest.mark.parametrize("line, custom_id, reason", [
    ('{"custom_id": "q-1", "body": ', "in.jsonl:4", "in.jsonl:4: malformed JSON (Expecting value at column 30)"),
    ('["q-1"]', "in.jsonl:4", "in.jsonl:4: a request must be a JSON object, got list"),
    (json.dumps({"url": "/v1/chat/completions", "body": {}}), "in.jsonl:4", "in.jsonl:4: no custom_id (a non-empty string)"),
    (json.dumps({"custom_id": "q-1", "url": "/v1/completions", "body": {}}), "q-1",
     "in.jsonl:4: only POST to /v1/chat/completions, /v1/embeddings, /v1/score, /v1/rerank is supported, got "
     "POST /v1/completions"),
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
    # Tools are util/features/tool_calls/'s (tests/test_tool_calls.py); the deprecated functions are not served.
    (request("q-1", "Hi", functions=[{"name": "f"}]), "q-1",
     'in.jsonl:4: functions=[{"name": "f"}] is not supported (no function calls; functions may be null or [])'),
    (request("q-1", "Hi", function_call={"name": "f"}), "q-1",
     'in.jsonl:4: function_call={"name": "f"} is not supported (no function calls; function_call may be null or '
     '"none" or "auto")'),
    (request("q-1", "Hi", modalities=["text", "audio"]), "q-1",
     'in.jsonl:4: modalities=["text", "audio"] is not supported (text output only; modalities may be null or ["text"])'),
    (request("q-1", "Hi", audio={"voice": "alloy", "format": "wav"}), "q-1",
     'in.jsonl:4: audio={"voice": "alloy", "format": "wav"} is not supported (text output only; audio may be null)'),
    (request("q-1", "Hi", temprature=0.5, logit_bias={}), "q-1", "in.jsonl:4: unknown body parameter(s): temprature"),
    # A value vLLM's request refuses (a wrong type, a key that is no token id), named with its line, instead of
    # failing in the engine.
    (request("q-1", "Hi", logit_bias={"Paris": -100, "7042": -100, "x1": 5}), "q-1",
     "in.jsonl:4: logit_bias contains key(s) that cannot be converted to integer token IDs: ['Paris', 'x1']"),
    (request("q-1", "Hi", logit_bias={"7042": "-100"}), "q-1", 'in.jsonl:4: logit_bias["7042"]="-100" must be a number'),
    (request("q-1", "Hi", logit_bias=[7042]), "q-1",
     "in.jsonl:4: logit_bias=[7042] must be an object of token ids (as strings) and biases"),
    (request("q-1", "Hi", stop=["END", 7]), "q-1", 'in.jsonl:4: stop=["END", 7] must be a string or a list of strings'),
    (request("q-1", "Hi", stop=list("abcde")), "q-1", "in.jsonl:4: stop has 5 strings; at most 4 (VLLM_MAX_STOP_STRINGS)"),
    (request("q-1", "Hi", seed="3"), "q-1", 'in.jsonl:4: seed="3" must be an integer'),
    (request("q-1", "Hi", seed=2**63), "q-1",
     f"in.jsonl:4: seed={2**63} must be an integer from {-(2**63)} to {2**63 - 1}"),
    (request("q-1", "Hi", presence_penalty="high"), "q-1", 'in.jsonl:4: presence_penalty="high" must be a number'),
    (request("q-1", "Hi", frequency_penalty=True), "q-1", "in.jsonl:4: frequency_penalty=true must be a number"),
    (request("q-1", "Hi", max_completion_tokens=2.5), "q-1", "in.jsonl:4: max_completion_tokens=2.5 must be an integer"),
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


def test_logit_bias_reaches_sampling_params_with_int_token_ids():
    """JSON keeps the row's sampling with string keys; the replica's check (OpenAIBatch.check, as the replica
    and --preflight run it) gives SamplingParams the ints it takes."""
    row = request_row(request("q-1", "Hi", logit_bias={"7042": -100, "12": 300}), "in.jsonl:4")
    checked = checked_request({**row, "id": "q-1"}, {"max_tokens": 8}, [OpenAIBatch(BatchKind("generate", None))])
    assert checked.sampling == {"max_tokens": 8, "logit_bias": {7042: -100.0, 12: 100.0}}


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


def test_a_request_with_an_image_for_a_text_only_model_is_refused_on_its_line():
    """Its record says why (util/features/images/ gives the formatter the reason: NoImages); the other requests
    are formatted as ever."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    lines = [request("text", "Hi"), request("image", [{"type": "text", "text": "What is this?"}, image]),
             request("image-only", [image])]
    table = request_table([request_row(line, f"in.jsonl:{n}") for n, line in enumerate(lines, 1)])
    formatter = ChatFormatter(model=smol_model_dir(), text_column="messages", no_images="m takes no images")
    errors = dict(zip(table["custom_id"].to_pylist(), formatter(table)["error"].to_pylist()))
    assert errors == {"text": None, "image": "an image_url part (messages[0].content[1]), but m takes no images",
                      "image-only": "an image_url part (messages[0].content[0]), but m takes no images"}
    assert row_error_kind(errors["image"]) == "image for a text-only model"  # --preflight counts them by kind


def test_an_error_message_never_is_an_exceptions_bare_name():
    """vLLM raises EngineGenerateError() from the real error: the message is the cause's."""
    try:
        try:
            raise TypeError("'<' not supported between instances of 'str' and 'int'")
        except TypeError as cause:
            raise RuntimeError() from cause
    except RuntimeError as wrapped:
        assert error_text(wrapped) == "TypeError: '<' not supported between instances of 'str' and 'int'"
    assert (error_text(ValueError("bad")), error_text(OSError())) == ("bad", "OSError, with no message")


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


# --- each converted body parameter, end to end on the smoke model: one file, one run ---

QUESTION = "What is the capital of France?"  # greedy: "The capital of France is Paris."
PARIS = 7042  # the token " Paris", which that answer holds
REPEAT = "List the days of the week, twice."  # greedy: "...Monday: Monday\nTuesday: Tuesday\n..."
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
GREEDY = {"temperature": 0, "max_tokens": 12}
SAMPLED = {"temperature": 1.0, "max_tokens": 8}
PARAMETER_LINES = {
    "plain": (QUESTION, {"logprobs": True, **GREEDY}),
    "logit-bias": (QUESTION, {"logit_bias": {str(PARIS): -100}, "logprobs": True, **GREEDY}),  # as the issue tried it
    "logit-bias-clamped": (QUESTION, {"logit_bias": {str(PARIS): 1000}, "logprobs": True, "temperature": 0,
                                      "max_tokens": 3}),
    "stop-string": (QUESTION, {"stop": " Paris", **GREEDY}),
    "stop-list": (QUESTION, {"stop": ["nowhere", " France"], **GREEDY}),
    "seed": ("Name a fruit.", {"seed": 1234, **SAMPLED}),
    "seed-again": ("Name a fruit.", {"seed": 1234, **SAMPLED}),
    "seed-other": ("Name a fruit.", {"seed": 4321, **SAMPLED}),
    "no-penalty": (REPEAT, {"temperature": 0, "max_tokens": 24}),
    "presence-penalty": (REPEAT, {"presence_penalty": 2.0, "temperature": 0, "max_tokens": 24}),
    "frequency-penalty": (REPEAT, {"frequency_penalty": 2.0, "temperature": 0, "max_tokens": 24}),
    "max-completion-tokens": (QUESTION, {"max_tokens": 10, "max_completion_tokens": 2}),
    "top-logprobs": (QUESTION, {"logprobs": True, "top_logprobs": 5, "temperature": 0, "max_tokens": 4}),
    # What the model or vLLM cannot serve: that line's error record, and the others run.
    "bad-logit-bias-key": (QUESTION, {"logit_bias": {"Paris": -100}}),
    "out-of-vocab": (QUESTION, {"logit_bias": {"99999999": 5}}),
    "penalty-out-of-range": (QUESTION, {"presence_penalty": 3}),
    "image": ([{"type": "text", "text": "What is in this image?"}, IMAGE], {}),
}


@pytest.fixture(scope="module")
def parameter_run(run_job, tmp_path_factory):
    """The records of one run of PARAMETER_LINES, by custom_id: (its stdout, records, error records)."""
    folder = tmp_path_factory.mktemp("parameters")
    source = folder / "parameters.jsonl"
    source.write_text("".join(request(custom_id, content, **body) + "\n"
                              for custom_id, (content, body) in PARAMETER_LINES.items()))
    out = folder / "out"
    job = run_job("--smoke", "--input-path", str(source), "--input-format", "openai", "--output-path", str(out),
                  "--max-error-fraction", "0.5")
    assert job.code == 0, job.err[-3000:]
    return job.out, _records(out), _records(out / "errors")


def _answer(records: dict, custom_id: str):
    """A record's body as the openai package reads it."""
    record = records[custom_id]
    assert record["error"] is None and record["response"]["status_code"] == 200, record
    return ChatCompletion.model_validate(record["response"]["body"])


def _tokens(completion) -> list[str]:
    return [token.token for token in completion.choices[0].logprobs.content]


def test_every_line_is_answered_or_refused_on_its_own(parameter_run):
    stdout, output, errors = parameter_run
    assert "summary: 17 rows: 13 ok, 4 errors, 0 already done" in stdout
    assert sorted(errors) == ["bad-logit-bias-key", "image", "out-of-vocab", "penalty-out-of-range"]
    for custom_id in output:
        _answer(output, custom_id)
    for record in errors.values():
        BatchError.model_validate(record["error"])
        ErrorObject.model_validate(record["response"]["body"]["error"])


def test_logit_bias_with_token_ids_as_strings(parameter_run):
    """-100 keeps a token out of the answer; 1000, clamped to 100, makes it every token."""
    _, output, _ = parameter_run
    plain, biased, forced = (_answer(output, c) for c in ("plain", "logit-bias", "logit-bias-clamped"))
    assert plain.choices[0].message.content == "The capital of France is Paris." and " Paris" in _tokens(plain)
    assert " Paris" not in _tokens(biased) and biased.choices[0].message.content != plain.choices[0].message.content
    assert _tokens(forced) == [" Paris"] * 3


def test_stop_as_a_string_or_a_list(parameter_run):
    _, output, _ = parameter_run
    for custom_id, text in (("stop-string", "The capital of France is"), ("stop-list", "The capital of")):
        choice = _answer(output, custom_id).choices[0]
        assert (choice.message.content, choice.finish_reason) == (text, "stop"), custom_id


def test_seed_makes_a_sampled_answer_repeat(parameter_run):
    _, output, _ = parameter_run
    seed, again, other = (_answer(output, c).choices[0].message.content for c in ("seed", "seed-again", "seed-other"))
    assert seed == again and seed != other


def test_presence_and_frequency_penalties_make_an_answer_repeat_itself_less(parameter_run):
    _, output, _ = parameter_run
    plain, presence, frequency = (_answer(output, c).choices[0].message.content
                                  for c in ("no-penalty", "presence-penalty", "frequency-penalty"))
    assert plain.count("day") > max(presence.count("day"), frequency.count("day")), (plain, presence, frequency)


def test_max_completion_tokens_wins_over_max_tokens(parameter_run):
    _, output, _ = parameter_run
    answer = _answer(output, "max-completion-tokens")
    assert (answer.usage.completion_tokens, answer.choices[0].finish_reason) == (2, "length")


def test_top_logprobs_gives_that_many_alternatives(parameter_run):
    _, output, _ = parameter_run
    content = _answer(output, "top-logprobs").choices[0].logprobs.content
    assert len(content) == 4 and all(len(token.top_logprobs) == 5 for token in content)
    assert all(token.top_logprobs[0].token == token.token for token in content)  # greedy: the likeliest


def test_what_the_model_or_vllm_cannot_serve_is_that_lines_error_record(parameter_run, test_model):
    _, _, errors = parameter_run
    message = {custom_id: record["error"]["message"] for custom_id, record in errors.items()}
    assert message["bad-logit-bias-key"] == (
        "parameters.jsonl:14: logit_bias contains key(s) that cannot be converted to integer token IDs: ['Paris']")
    assert message["image"] == (f"an image_url part (messages[0].content[1]), but {test_model} takes no images: it "
                                "has no image processor (a text-only model); use a vision-language model such as LLaVA")
    # vLLM's own reasons.
    assert "token_id(s) [99999999] in logit_bias contain out-of-vocab token ids" in message["out-of-vocab"]
    assert "presence_penalty must be in [-2, 2], got 3" in message["penalty-out-of-range"]


def test_without_the_tool_calls_feature_tools_are_refused(monkeypatch):
    """util/features/tool_calls/ serves `tools` (its BODY_COLUMNS); a template without it refuses them, by line."""
    monkeypatch.setattr("util.features.openai_batch.request_rows.body_columns", dict)
    row = request_row(request("q-1", "Hi", tools=[{"type": "function", "function": {"name": "f"}}]), "in.jsonl:4")
    assert row["request_error"] == ('in.jsonl:4: tools=[{"type": "function", "function": {"name": "f"}}] is not '
                                    "supported (no tool calls; tools may be null or [])")
    assert request_row(request("q-2", "Hi", tools=[], tool_choice="auto"), "in.jsonl:5")["request_error"] is None
