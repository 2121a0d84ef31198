"""Tool calls (util/features/tool_calls/): a row's tools through the chat template, a named or "required" tool_choice
held to vLLM's own schema by guided decoding, "auto" read by vLLM's tool-call parsers, and the calls in the
`tool_calls` column and in OpenAI batch records (checked with the openai package's ChatCompletion). The
checks of every edge need no engine; two jobs (an OpenAI batch file, a table) run on the session's warm engine.

    .venv/bin/python -m pytest tests/test_tool_calls.py
"""

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openai.types import BatchError
from openai.types.chat import ChatCompletion

from util.features import samples, tool_calls
from util.errors import RowError
from util.replica.internals import tool_call_schema
from util.features.openai_batch import ChatFormatter, output_record, request_row, request_table
from util.predictor import Request
from util.prompt_format import PromptFormatter
from util.model_dirs.smol_model import smol_model_dir
from util.features.structured_output import StructuredOutput
from util.features.tool_calls import (ToolCalls, ToolFormatter, ToolRequest, call_id, forced_calls, forced_schema,
                             template_messages, tool_request)

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": CITY}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters
NAMED = {"type": "function", "function": {"name": "get_weather"}}


# --- a row's tools, checked ---

@pytest.mark.parametrize("tools, choice, parallel, message", [
    ("not json", None, None, "tools is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ({"type": "function"}, None, None, "tools must be a list of function tools, got dict"),
    (["get_weather"], None, None, "tools[0] must be an object, got str"),
    ([{"type": "code_interpreter"}], None, None, 'tools[0].type must be "function", got "code_interpreter"'),
    ([{"type": "function"}], None, None, "tools[0].function must be an object with a name, got null"),
    ([WEATHER, {"type": "function", "function": {"name": " "}}], None, None,
     "tools[1].function has no name (a non-empty string)"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, None,
     "tools[0].function.description must be a string"),
    ([{"type": "function", "function": {"name": "f", "parameters": "city"}}], None, None,
     "tools[0].function.parameters must be a JSON schema object, got str"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "dict"}}}], None, None,
     "tools[0].function.parameters is not a valid JSON schema: 'dict' is not valid under any of the given schemas"),
    ([WEATHER, WEATHER], None, None, "tools name 'get_weather' more than once"),
    ([WEATHER], "sometimes", None,
     'tool_choice="sometimes" must be "none", "auto", "required" or {"type": "function", "function": {"name": "..."}}'),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, None,
     "tool_choice names the function 'get_time', which is not in tools (get_weather)"),
    ([WEATHER], {"type": "function", "name": "get_weather"}, None,
     'tool_choice={"type": "function", "name": "get_weather"} must be "none", "auto", "required" or '
     '{"type": "function", "function": {"name": "..."}}'),
    (None, "required", None, 'tool_choice "required" needs tools'),
    ([], {"type": "function", "function": {"name": "f"}}, None,
     "tool_choice names the function 'f', which is not in tools (none given)"),
    ([WEATHER], None, "no", 'parallel_tool_calls must be true or false, got "no"'),
])
def test_a_bad_tools_spec_is_refused_naming_what_is_wrong(tools, choice, parallel, message):
    with pytest.raises(ValueError) as refused:
        tool_request(tools, choice, parallel)
    assert str(refused.value) == message
    with pytest.raises(RowError, match="^invalid tools: "):  # the row's error
        tool_calls.row_tool_request({"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel})


@pytest.mark.parametrize("tools, choice", [(None, None), ([], None), ("[]", "none"), (None, "auto"), ("", "")])
def test_no_tools_is_no_tool_request(tools, choice):
    assert tool_request(tools, choice) is None


@pytest.mark.parametrize("tools, choice, parallel, expected", [
    ([WEATHER], None, None, ToolRequest((WEATHER,), "auto")),  # tools given: "auto", as vLLM's server defaults
    (json.dumps([WEATHER]), "auto", "false", ToolRequest((WEATHER,), "auto", parallel=False)),  # columns as JSON text
    ([WEATHER], '"required"', None, ToolRequest((WEATHER,), "required")),
    ([WEATHER, TIME], json.dumps(NAMED), True, ToolRequest((WEATHER, TIME), "function", "get_weather")),
    ([WEATHER], "none", None, ToolRequest((WEATHER,), "none")),  # shown to the template, never called
    # Arrow fills keys a JSON file's row lacks with nulls: they were never given.
    ([{"type": "function", "function": {"name": "now", "description": None, "parameters": None}}], None, None,
     ToolRequest(({"type": "function", "function": {"name": "now"}},), "auto")),
])
def test_tool_choice_forms(tools, choice, parallel, expected):
    assert tool_request(tools, choice, parallel) == expected


def test_the_forced_schema_is_vllms_own():
    named = forced_schema(tool_request([WEATHER, TIME], NAMED))
    assert named == CITY
    required = forced_schema(tool_request([WEATHER, NOW], "required"))
    assert required["type"] == "array" and required["minItems"] == 1 and "maxItems" not in required
    assert [s["properties"]["name"]["enum"] for s in required["items"]["anyOf"]] == [["get_weather"], ["now"]]
    assert required["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert forced_schema(tool_request([WEATHER], "required", False))["maxItems"] == 1
    # A named function without parameters: any object (vLLM 0.32's answer; 0.26 gives None, read the same).
    assert forced_schema(tool_request([NOW], {"type": "function", "function": {"name": "now"}})) == {
        "type": "object", "properties": {}}
    assert tool_call_schema()("auto", None) is None


def test_forced_text_becomes_calls_as_vllms_server_reads_it():
    named, required = tool_request([WEATHER], NAMED), tool_request([WEATHER, TIME], "required")
    assert forced_calls(named, '{"city":"Paris"}') == [("get_weather", '{"city":"Paris"}')]
    assert forced_calls(named, "") is None
    assert forced_calls(required, '[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"get_time",'
                                  '"parameters":{"city":"Köln"}}]') == [
        ("get_weather", '{"city": "Paris"}'), ("get_time", '{"city": "Köln"}')]
    assert forced_calls(required, '[{"name":"get_weather","param') is None  # cut off by max_tokens
    assert forced_calls(required, "[]") is None


def test_messages_reach_the_template_as_vllm_gives_them():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "now", "arguments": ""}},
                    {"id": "c3", "type": "function", "function": {"name": "now", "arguments": "{not json"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "22 C, sunny"},
                {"role": "assistant", "content": "It is sunny.", "tool_calls": []}]
    shown = template_messages(messages)
    assert [call["function"]["arguments"] for call in shown[1]["tool_calls"]] == [{"city": "Paris"}, {}, {}]
    assert shown[1]["content"] == "" and "tool_calls" not in shown[3] and shown[2] == messages[2]
    assert messages[1]["content"] is None  # the row's own messages are left as they were
    with pytest.raises(ValueError, match="tool_calls must each be"):
        template_messages([{"role": "assistant", "content": "", "tool_calls": ["get_weather"]}])


# --- the formatter: tools through the chat template ---

TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{% for tool in tools %} {{ tool.function.name }}{% endfor %}{{ '\\n' }}"
                  "{% endif %}{% for message in messages %}{{ message.role }}: {{ message.content }}"
                  "{% for call in message.tool_calls or [] %} CALL {{ call.function.name }}"
                  "({{ call.function.arguments.city }}){% endfor %}{{ '\\n' }}{% endfor %}assistant:")


def formatter(base=PromptFormatter, text_column="text", template=TOOLS_TEMPLATE, **options) -> ToolFormatter:
    made = ToolFormatter(base, model=smol_model_dir(), text_column=text_column, **options)
    if template:
        made.inner.templates.chat_template = template
    return made


def test_the_formatter_gives_a_rows_tools_to_the_chat_template():
    table = pa.table({"text": ["Weather in Paris?", "Hi", "Hi", "Hi"],
                      "tools": [json.dumps([WEATHER, TIME]), None, '[{"type": "function"}]', json.dumps([WEATHER])],
                      "tool_choice": [None, None, None, "sometimes"]})
    out = formatter()(table).to_pylist()
    assert out[0]["prompt"] == "TOOLS: get_weather get_time\nuser: Weather in Paris?\nassistant:"
    assert out[1]["prompt"] == "user: Hi\nassistant:"
    assert [row["error"] for row in out] == [
        None, None, "invalid tools: tools[0].function must be an object with a name, got null",
        'invalid tools: tool_choice="sometimes" must be "none", "auto", "required" or '
        '{"type": "function", "function": {"name": "..."}}']
    assert out[0]["num_input_tokens"] == len(out[0]["prompt_token_ids"]) > len(out[1]["prompt_token_ids"])


def test_an_openai_requests_earlier_tool_calls_and_results_are_formatted():
    conversation = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "22 C"}]}]
    lines = [json.dumps({"custom_id": "a", "url": "/v1/chat/completions",
                         "body": {"messages": conversation, "tools": [WEATHER], "tool_choice": "none"}}),
             json.dumps({"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": conversation}})]
    out = formatter(ChatFormatter, "messages")(request_table([request_row(line, f"in.jsonl:{n}")
                                                              for n, line in enumerate(lines, 1)])).to_pylist()
    assert [row["error"] for row in out] == [None, None]
    assert out[0]["prompt"] == ("TOOLS: get_weather\nuser: Weather in Paris?\nassistant:  CALL get_weather(Paris)\n"
                                "tool: 22 C\nassistant:")
    assert out[1]["prompt"] == out[0]["prompt"].removeprefix("TOOLS: get_weather\n")
    # SmolLM2's own template takes no tools: the prompt is the conversation alone, the arguments not shown.
    smol = formatter(ChatFormatter, "messages", template=None)(request_table([request_row(lines[0], "in.jsonl:1")]))
    prompt = smol["prompt"][0].as_py()
    assert prompt.endswith("<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n22 C<|im_end|>\n<|im_start|>assistant\n")
    assert "get_weather" not in prompt


def test_a_template_that_refuses_a_rows_tools_fails_that_row():
    made = formatter(template="{{ raise_exception('no tools here') if tools else 'user: ' + messages[0].content }}")
    out = made(pa.table({"text": ["Hi", "Hi"], "tools": [json.dumps([WEATHER]), None]}))
    assert out["error"].to_pylist() == ["cannot format the prompt with its tools: no tools here", None]
    assert out["prompt"].to_pylist() == ["", "user: Hi"]


def test_tools_without_the_chat_template_fail_their_row():
    out = formatter(prompt_format="plain")(pa.table({"text": ["Hi", "Hi"], "tools": [json.dumps([WEATHER]), None]}))
    assert out["error"].to_pylist() == [
        "tools cannot be given to the model: they need the model's chat template (the prompt format is plain)", None]


# --- the part: what a row asks the engine for, and its answer as calls ---

def request(row: dict, parser=None, sampling=None, parts=()) -> Request:
    made = Request({"id": "r-1", **row}, dict(sampling or {}), {"prompt_token_ids": [1]},
                   replica=types.SimpleNamespace(tokenizer=_tokenizer()))
    for part in (*parts, ToolCalls(parser)):
        part.check(made)
    return made


def _tokenizer():
    from transformers import AutoTokenizer

    global _TOKENIZER
    if "_TOKENIZER" not in globals():
        _TOKENIZER = AutoTokenizer.from_pretrained(smol_model_dir())
    return _TOKENIZER


def test_auto_without_a_parser_is_refused_naming_the_flag():
    with pytest.raises(RowError) as refused:
        request({"tools": [WEATHER]})
    assert str(refused.value) == (
        'tool_choice "auto" needs --tool-call-parser NAME to read the calls out of the text (a name of `vllm serve '
        '--tool-call-parser`, e.g. hermes); or ask for "required" or a function')
    assert request({"tools": [WEATHER], "tool_choice": "none"}).sampling == {}  # nothing to read
    assert request({"tools": [WEATHER]}, parser="hermes").sampling == {}  # the parser reads the free text


def test_a_named_or_required_choice_is_guided_over_the_rows_own_structured_output():
    rows_own = StructuredOutput({"regex": "[a-z]+"})  # the job's --regex, and the row's response_format below
    named = request({"tools": [WEATHER], "tool_choice": NAMED,
                     "sampling_params": {"response_format": {"type": "json_object"}}}, parts=[rows_own])
    assert named.sampling["structured_outputs"] == named.state["structured_outputs"] == {"json": CITY}
    required = request({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}, parts=[rows_own])
    assert required.sampling["structured_outputs"]["json"]["maxItems"] == 1


def answer(row: dict, texts: list[str], parser=None, finish_reason="stop") -> list[dict]:
    made = request(row, parser)
    result = {"samples": [{"text": text, "finish_reason": finish_reason, "num_generated_tokens": 5} for text in texts]}
    ToolCalls(parser).output(made, None, result)
    return result["samples"]


def test_a_named_functions_text_is_its_arguments_and_finish_reason_is_tool_calls():
    sample, = answer({"tools": [WEATHER], "tool_choice": NAMED}, ['{"city":"Paris"}'])
    assert sample == {"text": "", "finish_reason": "tool_calls", "num_generated_tokens": 5, "tool_calls": [
        {"id": call_id("r-1", 0, 0), "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert call_id("r-1", 0, 0) == call_id("r-1", 0, 0) != call_id("r-1", 1, 0)  # the same in every run


def test_required_gives_each_sample_its_calls_and_finish_reason_tool_calls():
    texts = ['[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"get_time","parameters":{"city":"Rome"}}]',
             '[{"name":"get_time","parameters":{"city":"Oslo"}}]']
    first, second = answer({"tools": [WEATHER, TIME], "tool_choice": "required"}, texts)
    assert [c["function"]["name"] for c in first["tool_calls"]] == ["get_weather", "get_time"]
    assert second["tool_calls"][0]["id"] == call_id("r-1", 1, 0)
    assert (first["finish_reason"], first["text"], second["tool_calls"][0]["function"]["arguments"]) == (
        "tool_calls", "", '{"city": "Oslo"}')
    one, = answer({"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False}, texts[:1])
    assert len(one["tool_calls"]) == 1  # as vLLM's server keeps the first
    cut, = answer({"tools": [WEATHER], "tool_choice": "required"}, ['[{"name":"get_we'], finish_reason="length")
    assert (cut["tool_calls"], cut["text"], cut["finish_reason"]) == (None, '[{"name":"get_we', "length")


def test_auto_reads_the_calls_with_vllms_parser():
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    called, plain = answer({"tools": [WEATHER]}, ["Let me look. " + hermes, "It is sunny."], parser="hermes")
    assert (called["text"], called["finish_reason"], called["tool_calls"][0]["function"]) == (
        "Let me look. ", "tool_calls", {"name": "get_weather", "arguments": '{"city": "Paris"}'})
    assert called["tool_calls"][0]["id"].startswith("chatcmpl-tool-")  # the parser's own
    assert plain == {"text": "It is sunny.", "finish_reason": "stop", "num_generated_tokens": 5, "tool_calls": None}


def test_a_parser_that_cannot_read_the_tokenizer_fails_the_row_saying_why():
    with pytest.raises(RowError, match=r"^tool-call parser llama3_json cannot read this model's tokenizer \(Runtime"):
        answer({"tools": [WEATHER]}, ["hi"], parser="llama3_json")


def test_unknown_parser_names_are_refused_before_any_engine():
    with pytest.raises(ValueError, match=r"^--tool-call-parser: unknown tool-call parser 'hermez'; vLLM .* has .*hermes"):
        tool_calls.check(types.SimpleNamespace(tool_call_parser="hermez", task="generate"))
    with pytest.raises(ValueError, match="^--task embed takes no generation flags; got --tool-call-parser"):
        tool_calls.check(types.SimpleNamespace(tool_call_parser="hermes", task="embed"))


def test_the_completions_struct_holds_tool_calls_of_the_same_type():
    assert samples.TOOL_CALLS == tool_calls.TOOL_CALLS_TYPE
    assert samples.COMPLETION.field("tool_calls").type == tool_calls.TOOL_CALLS_TYPE


# --- OpenAI batch lines in and records out ---

def line(custom_id: str, content="Weather in Paris?", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": content}], **body}})


def test_a_requests_tools_go_to_the_rows_columns():
    row = request_row(line("q", tools=[WEATHER], tool_choice=NAMED, parallel_tool_calls=False), "in.jsonl:1")
    assert row["request_error"] is None and row["sampling_params"] is None
    assert (json.loads(row["tools"]), json.loads(row["tool_choice"]), row["parallel_tool_calls"]) == (
        [WEATHER], NAMED, "false")
    assert tool_calls.row_tool_request(row) == ToolRequest((WEATHER,), "function", "get_weather", parallel=False)
    bare = request_row(line("p"), "in.jsonl:2")
    assert (bare["tools"], bare["tool_choice"], bare["parallel_tool_calls"]) == (None, None, None)
    assert request_table([row, bare]).column_names[-3:] == ["tools", "tool_choice", "parallel_tool_calls"]


def test_an_output_record_carries_the_calls_as_the_openai_package_reads_them():
    calls = [{"id": "chatcmpl-tool-1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    row = {"id": "q", "generated_text": "", "finish_reason": "tool_calls", "num_input_tokens": 9,
           "num_generated_tokens": 7, "error": None, "model": "m", "tool_calls": calls}
    body = ChatCompletion.model_validate(output_record(row, created=1)["response"]["body"])
    assert body.choices[0].finish_reason == "tool_calls"
    assert body.choices[0].message.tool_calls[0].function.model_dump() == calls[0]["function"]
    no_calls = ChatCompletion.model_validate(output_record({**row, "tool_calls": None, "finish_reason": "stop"},
                                                           created=1)["response"]["body"])
    assert no_calls.choices[0].message.tool_calls is None


# --- end to end on the smoke model, on the session's warm engine ---

HERMES = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'
GREEDY = {"temperature": 0, "max_tokens": 40}
BATCH = {
    "named": line("named", tools=[WEATHER, TIME], tool_choice=NAMED, **GREEDY),
    "required": line("required", "What is the weather and the time in Paris?", tools=[WEATHER, TIME],
                     tool_choice="required", **{**GREEDY, "max_tokens": 80}),
    "required-one": line("required-one", tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                         **{**GREEDY, "max_tokens": 80}),
    "auto": line("auto", "Say hello.", tools=[WEATHER], **GREEDY),
    "tool-result": json.dumps({"custom_id": "tool-result", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                         "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "22 C and sunny"}],
        "tools": [WEATHER], "tool_choice": "none", **GREEDY}}),
    "bad-tools": line("bad-tools", tools=[{"type": "function", "function": {"description": "no name"}}]),
    "unknown-function": line("unknown-function", tools=[WEATHER], tool_choice={"type": "function", "function": {
        "name": "get_time"}}),
}


def _records(folder) -> dict[str, dict]:
    return {r["custom_id"]: r for path in sorted(folder.glob("*.jsonl")) for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def batch_run(run_job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools-batch")
    (folder / "in.jsonl").write_text("\n".join(BATCH.values()) + "\n")
    job = run_job("--smoke", "--input-path", folder / "in.jsonl", "--input-format", "openai", "--output-path",
                  folder / "out", "--tool-call-parser", "hermes", "--max-error-fraction", "0.5")
    assert job.code == 0, job.err[-3000:]
    records = _records(folder / "out")
    print(json.dumps(records.get("required")))  # with -s: a record, as util/features/tool_calls.md shows one
    return job.out, records, _records(folder / "out" / "errors")


@pytest.mark.engine
def test_a_batch_files_tool_calls_are_answered_as_openais_server_answers(batch_run):
    out, records, errors = batch_run
    assert "summary: 7 rows: 5 ok, 2 errors, 0 already done" in out
    answers = {custom_id: ChatCompletion.model_validate(r["response"]["body"]).choices[0] for custom_id, r in records.items()}
    named = answers["named"]
    assert (named.finish_reason, named.message.content, len(named.message.tool_calls)) == ("tool_calls", "", 1)
    assert named.message.tool_calls[0].function.name == "get_weather"
    assert set(json.loads(named.message.tool_calls[0].function.arguments)) == {"city"}  # the schema held it
    for custom_id, most in (("required", None), ("required-one", 1)):
        choice = answers[custom_id]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "", custom_id
        assert 1 <= len(choice.message.tool_calls) <= (most or 9)
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.function.name in ("get_weather", "get_time")
            assert set(json.loads(call.function.arguments)) == {"city"}
    # "auto": the model answers in words (SmolLM2's template shows it no tools), which the parser leaves as they are.
    assert answers["auto"].message.tool_calls is None and answers["auto"].message.content
    assert answers["tool-result"].message.tool_calls is None and answers["tool-result"].finish_reason in ("stop", "length")
    for record in errors.values():
        BatchError.model_validate(record["error"])
    assert {k: r["error"]["message"] for k, r in errors.items()} == {
        "bad-tools": "invalid tools: tools[0].function has no name (a non-empty string)",
        "unknown-function": "invalid tools: tool_choice names the function 'get_time', which is not in tools (get_weather)"}


TABLE = [
    {"id": "parsed", "text": "Weather in Paris?", "tools": [WEATHER], "tool_choice": None,
     "sampling_params": json.dumps({"structured_outputs": {"regex": HERMES}, "max_tokens": 120})},
    {"id": "named", "text": "Weather in Paris?", "tools": [WEATHER], "tool_choice": json.dumps(NAMED),
     "sampling_params": None},
    {"id": "plain", "text": "What is the capital of France?", "tools": None, "tool_choice": None, "sampling_params": None},
    {"id": "bad", "text": "Hi", "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "text"}}}}}], "tool_choice": "required",
     "sampling_params": None},
]


@pytest.fixture(scope="module")
def table_run(run_job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools-table")
    (folder / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in TABLE))
    args = ("--smoke", "--input-path", folder / "in.jsonl", "--id-column", "id", "--output-path", folder / "out",
            "--max-error-fraction", "0.5", "--temperature", "0")
    job = run_job(*args, "--tool-call-parser", "hermes")
    assert job.code == 0, job.err[-3000:]
    rows = {row["id"]: row for row in pq.read_table(folder / "out").to_pylist()}
    print({k: rows["parsed"][k] for k in ("id", "generated_text", "finish_reason", "tool_calls", "num_generated_tokens",
                                          "error")})  # with -s: the row util/features/tool_calls.md shows
    return job, rows, args


@pytest.mark.engine
def test_a_tables_tools_column_gives_a_tool_calls_column(table_run):
    job, rows, _ = table_run
    assert "summary: 4 rows: 3 ok, 1 errors, 0 already done" in job.out
    parsed, named, plain, bad = (rows[k] for k in ("parsed", "named", "plain", "bad"))
    assert (parsed["generated_text"], parsed["finish_reason"]) == ("", "tool_calls")
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"]] == [
        ("function", "get_weather", {"city": "Paris"})]
    assert named["finish_reason"] == "tool_calls" and named["tool_calls"][0]["id"] == call_id("named", 0, 0)
    assert set(json.loads(named["tool_calls"][0]["function"]["arguments"])) == {"city"}
    assert (plain["generated_text"], plain["tool_calls"]) == ("The capital of France is Paris.", None)
    assert bad["error"].startswith("invalid tools: tools[0].function.parameters is not a valid JSON schema: 'text' is not")


@pytest.mark.engine
def test_a_tools_job_resumes_and_its_parser_is_in_the_fingerprint(table_run, run_job):
    _, _, args = table_run
    again = run_job(*args, "--tool-call-parser", "hermes")
    assert again.code == 0 and "summary: 4 rows: 0 ok, 0 errors, 4 already done" in again.out
    other = run_job(*args, "--tool-call-parser", "pythonic")
    assert other.code == 2 and 'tool_call_parser: "hermes" -> "pythonic"' in other.err, other.err[-2000:]
