"""Structured output (util/features/structured_output.py): the flags, a row's own spec, the check of each row's text,
and guided decoding on the real engine with a real model: jobs on the session's warm engine (SmolLM2, with
compact JSON: conftest.py), each guided to PERSON by --json-schema, read from a file.

    .venv/bin/python -m pytest tests/test_structured_output.py
"""

import json
import re

import jsonschema
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from util import storage
from util.config import Config, parse_args
from util.errors import RowError
from util.pipeline import pipeline_stages, predictor_stage
from util.plan import make_plan
from util.predictor import checked_request
from util.features.structured_output import output_error, read_json_schema, row_spec

# Small enough for a 135M model to finish well within max_tokens.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
COLOR = {"type": "object", "additionalProperties": False, "required": ["color"],
         "properties": {"color": {"enum": ["red", "green", "blue"]}}}
PROMPTS = ["Describe a person.", "Who are you?", "Tell me about Ada.", "Name someone.",
           "A friend of yours?", "Write JSON.", "Fill in the form.", "Hello"]


SMALL = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}


# --- the job's flags ---

def job_sampling(cfg: Config) -> dict:
    return make_plan(cfg, cluster={"CPU": 8.0}, resolve_model_files=False).sampling


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


# --- a --json-schema file is read once, by the plan ---

def test_the_plan_reads_a_json_schema_file_once(tmp_path, monkeypatch):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SMALL))
    opened, resolve = [], storage.resolve
    monkeypatch.setattr(storage, "resolve", lambda uri: opened.append(uri) or resolve(uri))  # the file opened
    cfg = Config(json_schema=str(schema), concurrency=1, model="m")
    assert opened == []  # the Config checks the flags, but reads no file
    plan = make_plan(cfg, cluster={"CPU": 8.0}, resolve_model_files=False)
    schema.unlink()  # what the stages and the manifest need is in the plan
    stages = pipeline_stages(plan)
    assert predictor_stage(plan).map_batches["fn_constructor_kwargs"]["sampling"] == plan.sampling
    assert opened == [str(schema)]
    assert [s.name for s in stages] == ["format", "cut_blocks", "predict"]
    assert plan.sampling["structured_outputs"] == {"json": SMALL}
    assert plan.fingerprint["sampling"]["structured_outputs"] == {"json": SMALL}


def test_a_missing_schema_file_refuses_the_run_with_exit_2(main_in_process, tmp_path, capsys):
    """The Config takes a schema file's name; the plan reads it, once, before anything else runs."""
    from util.model_dirs.tiny_model import tiny_model_dir

    assert main_in_process("--model", tiny_model_dir(), "--concurrency", "1", "--json-schema",
                           tmp_path / "no-schema.json", "--output-path", tmp_path / "out") == 2
    assert capsys.readouterr().err == (f"error: --json-schema: no such file {tmp_path}/no-schema.json (pass a schema "
                                       "inline or a .json file)\n")
    assert not (tmp_path / "out").exists()


def test_a_schema_file_that_is_not_json_is_refused_naming_it(tmp_path):
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as refused:
        read_json_schema(str(bad))
    assert str(refused.value) == (f"--json-schema: {bad} is not valid JSON: Expecting property name enclosed in "
                                  "double quotes: line 1 column 2 (char 1)")


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


@pytest.fixture(scope="module")
def schema_plan():
    """A job with a JSON schema: every row's spec, unless it has its own."""
    return make_plan(Config(concurrency=1, max_tokens=64, stop=["###"], json_schema='{"type": "object"}'),
                     cluster={"CPU": 2.0}, resolve_model_files=False)


def checked(plan, override) -> dict:
    return checked_request({"id": "r", "sampling_params": override}, plan.sampling, plan.parts).sampling


def test_a_rows_spec_replaces_the_jobs_in_its_sampling(schema_plan):
    job = {k: schema_plan.sampling[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed")}
    schema = {"structured_outputs": {"json": {"type": "object"}}}
    assert checked(schema_plan, {"max_tokens": 8}) == {**job, **schema, "max_tokens": 8}
    assert checked(schema_plan, '{"structured_outputs": {"choice": ["a", "b"]}}') == {
        **job, "structured_outputs": {"choice": ["a", "b"]}}
    assert checked(schema_plan, {"response_format": {"type": "json_object"}}) == {
        **job, "structured_outputs": {"json_object": True}}
    # No constraint for this row, and nothing left over that SamplingParams would not take.
    assert checked(schema_plan, {"response_format": {"type": "text"}}) == job
    assert checked(schema_plan, {"structured_outputs": None, "max_tokens": 3}) == {**job, **schema, "max_tokens": 3}


def test_a_row_with_a_bad_spec_fails_alone_saying_why(schema_plan):
    with pytest.raises(RowError) as refused:
        checked(schema_plan, '{"structured_outputs": {"regex": "a", "choice": ["a"]}}')
    assert str(refused.value) == ("invalid sampling_params: structured_outputs must have exactly one of json, regex, "
                                  "choice, grammar, json_object; got regex, choice")


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
def generate(run_job, tmp_path_factory):
    """Runs rows through one job guided to PERSON (a --json-schema file) with at most 48 tokens a row."""
    folder = tmp_path_factory.mktemp("structured")
    schema_file = folder / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    runs = []

    def run(sampling_params=None, texts=PROMPTS, *flags) -> list[dict]:
        name = f"run{len(runs)}"
        rows = [{"id": f"row-{i}", "text": text} for i, text in enumerate(texts)]
        for row, override in zip(rows, sampling_params or []):
            if override is not None:
                row["sampling_params"] = override
        write_jsonl(folder / f"{name}.jsonl", rows)
        job = run_job("--input-path", folder / f"{name}.jsonl", "--id-column", "id", "--output-path", folder / name,
                      "--json-schema", schema_file, "--max-tokens", 48, "--max-error-fraction", 1, *flags)
        runs.append(job)
        assert job.code == 0, job.err[-3000:]
        return sorted(pq.read_table(folder / name).to_pylist(), key=lambda row: int(row["id"].split("-")[1]))

    return run


def test_the_jobs_json_schema_guides_every_row(generate):
    rows = generate()
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(len(PROMPTS))]
    for row in rows:
        assert (row["error"], row["finish_reason"], row["structured_output_error"]) == (None, "stop", None), row
        jsonschema.validate(json.loads(row["generated_text"]), PERSON)


def test_a_choice_list_yields_only_those_choices(generate):
    choices = ["yes", "no", "maybe not"]
    spec = job_sampling(parse_args(["--choice", "yes", "--choice", "no", "--choice", "maybe not"]))["structured_outputs"]
    rows = generate([json.dumps({"structured_outputs": spec})] * len(PROMPTS))  # as --choice would guide every row
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
    rows = generate(overrides, PROMPTS[:len(overrides)])
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
