"""Structured output: the flags, a row's own spec, the check of each row's text, and guided decoding
on the real engine with a real model (SmolLM2-135M-Instruct, util/smol_model.py). The engine starts
once, in this process, for the whole file.

    .venv/bin/python -m pytest tests/test_structured_output.py
"""

import asyncio
import json
import os
import re

import jsonschema
import pyarrow as pa
import pytest

from util.config import Config, parse_args
from util.plan import job_sampling
from util.structured_output import output_error, row_spec

# Small enough for a 135M model to finish well within max_tokens.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
COLOR = {"type": "object", "additionalProperties": False, "required": ["color"],
         "properties": {"color": {"enum": ["red", "green", "blue"]}}}
PROMPTS = ["Describe a person.", "Who are you?", "Tell me about Ada.", "Name someone.",
           "A friend of yours?", "Write JSON.", "Fill in the form.", "Hello"]


# --- the job's flags ---

def test_each_flag_becomes_the_jobs_spec_and_part_of_its_sampling(tmp_path):
    def spec(cfg: Config) -> dict:
        return job_sampling(cfg)["structured_outputs"]

    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    assert spec(Config(json_schema=str(schema_file))) == {"json": PERSON}
    assert spec(Config(json_schema=json.dumps(COLOR))) == {"json": COLOR}
    assert spec(Config(json_schema='{"const": null}')) == {"json": {"const": None}}
    assert spec(Config(regex=r"\d+")) == {"regex": r"\d+"}
    assert spec(parse_args(["--choice", "yes", "--choice", "no"])) == {"choice": ["yes", "no"]}
    assert "structured_outputs" not in job_sampling(Config())  # earlier outputs' fingerprints still match


def test_the_spec_is_in_the_runs_fingerprint():
    from util.plan import make_plan
    from util.resume import fingerprint_changes

    def settings(regex: str) -> dict:
        return make_plan(Config(regex=regex, concurrency=1), cluster={"CPU": 2.0}, resolve_model_files=False).fingerprint

    assert fingerprint_changes(settings("a+"), settings("b+")) == ['sampling.structured_outputs.regex: "a+" -> "b+"']


@pytest.mark.parametrize("kwargs, message", [  # a schema file is read when the run is planned: test_plan.py
    ({"json_schema": '{"type": '}, "--json-schema: not valid JSON: Expecting value: line 1 column 10 (char 9)"),
    ({"json_schema": '{"type": "objekt"}'},
     "--json-schema: not a valid JSON schema: 'objekt' is not valid under any of the given schemas"),
    ({"regex": "[a-"}, "--regex: not a valid regular expression: unterminated character set at position 0"),
    ({"regex": "a+", "choice": ["a"]},
     "--regex and --choice cannot be used together: pass at most one of --json-schema, --regex, --choice"),
])
def test_bad_flags_are_refused_at_start_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError) as refused:
        Config(**kwargs)
    assert str(refused.value) == message


# --- a row's own spec ---

def test_a_rows_spec_from_structured_outputs_or_openai_response_format():
    job = {"regex": "a+"}
    assert row_spec({}, job) == job
    assert row_spec({"max_tokens": 4}, None) is None
    assert row_spec({"structured_outputs": {"choice": ["x", "y"]}}, job) == {"choice": ["x", "y"]}
    assert row_spec({"structured_outputs": {"json": json.dumps(COLOR)}}, job) == {"json": COLOR}
    # Arrow fills keys that only other rows have with nulls, inside a schema too: they are dropped.
    assert row_spec({"structured_outputs": {"regex": None, "json": {**COLOR, "minItems": None}}}) == {"json": COLOR}
    assert row_spec({"structured_outputs": {"json": '{"const": null}'}}) == {"json": {"const": None}}  # as given
    assert row_spec({"response_format": {"type": "json_schema",
                                         "json_schema": {"name": "color", "strict": True, "schema": COLOR}}},
                    job) == {"json": COLOR}
    assert row_spec({"response_format": {"type": "json_object"}}, job) == {"json_object": True}
    assert row_spec({"response_format": {"type": "text", "json_schema": None}}, job) is None


@pytest.mark.parametrize("override, message", [
    ({"structured_outputs": {"regex": "("}},
     "structured_outputs.regex: not a valid regular expression: missing ), unterminated subpattern at position 0"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}},
     "structured_outputs must have exactly one of json, regex, choice, grammar, json_object; got regex, choice"),
    ({"structured_outputs": {}},
     "structured_outputs must have exactly one of json, regex, choice, grammar, json_object; got none"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice: must be a non-empty list of strings, got []"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object: must be true, got False"),
    ({"structured_outputs": {"json": {"type": 7}}},
     "structured_outputs.json: not a valid JSON schema: 7 is not valid under any of the given schemas"),
    ({"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
     "structured_outputs has unknown key(s) disable_any_whitespace; it takes exactly one of "
     "json, regex, choice, grammar, json_object"),
    ({"structured_outputs": "a+"}, "structured_outputs must be an object, got str"),
    ({"response_format": {"type": "xml"}},
     "response_format.type must be one of text, json_object, json_schema; got 'xml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema is missing"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "give structured_outputs or response_format, not both"),
])
def test_an_invalid_row_spec_says_what_is_wrong(override, message):
    with pytest.raises(ValueError) as refused:
        row_spec(override)
    assert str(refused.value) == message


# --- the check of a row's text ---

def test_output_error_flags_text_that_does_not_conform():
    assert output_error({"json": PERSON}, '{"name": "Ada", "ok": true, "n": 3}', "stop") is None
    assert output_error({"json": PERSON}, '{"name": "Ad', "length") == (
        "not valid JSON: Unterminated string starting at: line 1 column 10 (char 9) (finish_reason length)")
    assert output_error({"json": PERSON}, '{"name": "Ada", "ok": true, "n": "3"}', "stop") == (
        "does not match the JSON schema at $.n: '3' is not of type 'integer'")
    assert output_error({"json": PERSON}, '{"name": "Ada", "ok": true}', "stop") == (
        "does not match the JSON schema at $: 'n' is a required property")
    assert output_error({"json_object": True}, '[1, {"a": null}]', "stop") is None
    assert output_error({"json_object": True}, "", "length") == (
        "not valid JSON: Expecting value: line 1 column 1 (char 0) (finish_reason length)")
    assert output_error({"regex": r"[a-z]{3}-\d{2}"}, "abc-12", "stop") is None
    assert output_error({"regex": r"[a-z]{3}-\d{2}"}, "abc-1", "length") == (
        r"does not match the regex '[a-z]{3}-\\d{2}' (finish_reason length)")
    assert output_error({"choice": ["yes", "no"]}, "no", "stop") is None
    assert output_error({"choice": ["yes", "no"]}, "ye", "length") == "not one of the 2 choices (finish_reason length)"
    assert output_error({"grammar": "root ::= 'a'"}, "b", "stop") is None  # no parser here to check with
    assert output_error(None, "anything", "stop") is None
    assert output_error({"json": PERSON}, None, None) is None  # a failed row has no text to check


# --- guided decoding on the real engine ---

@pytest.fixture(scope="module")
def generate(tmp_path_factory):
    """Runs rows through one LLMPredictor: the job guides every row to PERSON, read from a file."""
    from vllm.config import StructuredOutputsConfig

    from util.predictor import LLMPredictor
    from util.prompt_format import PromptFormatter
    from util.smol_model import smol_model_dir
    from util.engine import CPU_ENV_VARS, engine_kwargs

    model = smol_model_dir()
    schema_file = tmp_path_factory.mktemp("schema") / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    cfg = Config(model=model, json_schema=str(schema_file), max_tokens=48, concurrency=1)
    # A 135M model, greedy, can fall into a loop of newlines wherever JSON allows whitespace: asked
    # "Who are you?" under PERSON it wrote 22 of them and was cut off at 48 tokens (finish_reason length,
    # "not valid JSON: Expecting value: line 23 column 1"). Compact JSON keeps every row within max_tokens.
    kwargs = {**engine_kwargs(cfg, use_gpu=False),
              "structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)}
    saved = {name: os.environ.get(name) for name in CPU_ENV_VARS}
    os.environ.update(CPU_ENV_VARS)
    loop = asyncio.new_event_loop()
    predictor = LLMPredictor(model, kwargs, job_sampling(cfg))
    formatter = PromptFormatter(model, "text")

    def run(sampling_params=None, texts=PROMPTS) -> list[dict]:
        columns = {"id": [f"row-{i}" for i in range(len(texts))], "text": texts}
        if sampling_params is not None:
            columns["sampling_params"] = sampling_params
        return loop.run_until_complete(predictor(formatter(pa.table(columns)))).to_pylist()

    try:
        yield run
    finally:
        predictor.shutdown()  # now, not at interpreter exit, where vLLM's __del__ would find its modules gone
        # The engine's output tasks live on this loop: end them before closing it.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_the_jobs_json_schema_guides_every_row(generate):
    rows = generate()
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(len(PROMPTS))]
    for row in rows:
        assert (row["error"], row["finish_reason"], row["structured_output_error"]) == (None, "stop", None), row
        jsonschema.validate(json.loads(row["generated_text"]), PERSON)


def test_a_choice_list_yields_only_those_choices(generate):
    choices = ["yes", "no", "maybe not"]
    spec = job_sampling(parse_args(["--choice", "yes", "--choice", "no", "--choice", "maybe not"]))["structured_outputs"]
    rows = generate([json.dumps({"structured_outputs": spec})] * len(PROMPTS))  # as --choice guides every row
    assert len(rows) == len(PROMPTS)
    assert all(r["error"] is None and r["structured_output_error"] is None for r in rows)
    assert {r["generated_text"] for r in rows} <= set(choices)


def test_per_row_overrides_as_a_struct_column_like_jsonl_input(generate):
    # One struct column, as Arrow reads these JSON objects: each row's missing keys come back null.
    overrides = [
        None,  # the job's schema
        {"structured_outputs": {"regex": r"[a-z]{3}-\d{2}"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR}}},
        {"response_format": {"type": "json_object"}, "max_tokens": 2},
        {"response_format": {"type": "text"}, "max_tokens": 8},  # no constraint, though the job has one
    ]
    rows = generate(pa.array(overrides), PROMPTS[:len(overrides)])
    assert [r["error"] for r in rows] == [None] * len(overrides)
    job, regex, color, json_object, text = rows
    jsonschema.validate(json.loads(job["generated_text"]), PERSON)
    assert re.fullmatch(r"[a-z]{3}-\d{2}", regex["generated_text"])
    assert json.loads(color["generated_text"])["color"] in ("red", "green", "blue")
    assert [r["structured_output_error"] for r in (job, regex, color, text)] == [None] * 4
    assert (json_object["finish_reason"], json_object["num_generated_tokens"]) == ("length", 2)
    assert json_object["structured_output_error"].startswith("not valid JSON: ")
    assert (text["finish_reason"], text["num_generated_tokens"]) == ("length", 8)


def test_a_row_cut_off_by_max_tokens_is_flagged(generate):
    rows = generate([json.dumps({"max_tokens": 4}), None], PROMPTS[:2])
    cut, whole = rows
    assert (cut["error"], cut["finish_reason"], cut["num_generated_tokens"]) == (None, "length", 4)
    assert cut["structured_output_error"].startswith("not valid JSON: ")
    assert cut["structured_output_error"].endswith(" (finish_reason length)")
    assert whole["structured_output_error"] is None


def test_an_invalid_row_spec_fails_that_row_only(generate):
    rows = generate([json.dumps({"structured_outputs": {"regex": "("}}),
                     json.dumps({"response_format": {"type": "json_schema", "json_schema": {}}}),
                     json.dumps({"structured_outputs": {"regex": "(?=a)a"}}),  # Python's re takes it, vLLM not
                     json.dumps({"structured_outputs": {"choice": ["ok"]}})], PROMPTS[:4])
    errors = [r["error"] for r in rows]
    assert errors[:2] == [
        "invalid sampling_params: structured_outputs.regex: not a valid regular expression: "
        "missing ), unterminated subpattern at position 0",
        "invalid sampling_params: response_format.json_schema.schema is missing"]
    # vLLM refuses it when the request is made, in words that depend on the structured-output backend.
    assert errors[2].startswith("VLLMValidationError: ") and "regex" in errors[2].lower()
    assert errors[3] is None
    assert [r["generated_text"] for r in rows] == [None, None, None, "ok"]
    assert [r["structured_output_error"] for r in rows] == [None] * 4
