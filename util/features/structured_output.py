"""Structured output (a feature, util/parts.py): vLLM's guided decoding for a whole job or for one row,
and a check of each row's text.

    python main.py --input-path prompts.jsonl --json-schema schema.json     # or --regex '...', --choice yes --choice no
    from util.features.structured_output import check_job_flags, job_spec, row_spec, vllm_params, output_error
    check_job_flags(json_schema="schema.json", regex=None, choice=[])    # the flags' checks that read no file
    spec = job_spec(json_schema="schema.json", regex=None, choice=[])     # {"json": {...schema...}}
    spec = row_spec({"response_format": {"type": "json_object"}}, job=spec)  # {"json_object": True}
    SamplingParams(max_tokens=256, structured_outputs=vllm_params(spec))
    output_error({"json": schema}, '{"name": "Ad', "length")   # 'not valid JSON: ... (finish_reason length)'

A spec is the keyword arguments of vLLM's `StructuredOutputsParams`, as ray.data.llm takes them in
`sampling_params["structured_outputs"]`: exactly one of json (a JSON schema), regex, choice (a list of
strings), grammar or json_object (true). The backend (xgrammar, guidance, ...) and whether JSON may hold
free whitespace are the engine's, set by vLLM's `structured_outputs_config` engine argument; vLLM's
per-request whitespace options have no effect, so a spec does not take them.

A row asks for its own in its `sampling_params`, either as vLLM's `"structured_outputs": {...}` or as
the OpenAI request body's `"response_format"`: `{"type": "json_schema", "json_schema": {"schema": {...}}}`,
`{"type": "json_object"}`, or `{"type": "text"}` (no constraint, whatever the job's). A row that says
neither gets the job's (--json-schema, --regex or --choice).

Guided decoding makes every token fit the spec, but a row can still come out unfinished: cut off by
max_tokens, or by a stop string. `output_error` says so for json and json_object (the text must parse,
and for json validate against the schema), regex (the whole text must match, by Python's `re`) and
choice (the text must be one of them). A grammar's text is not checked.

Arrow fills in the keys a row lacks but another row of its file has, with nulls, when it reads JSON
objects into a struct column; so a row's null-valued keys are dropped, in a JSON schema too. Give a
row's schema as a JSON string (`"json": "{\\"type\\": ...}"`) to keep a keyword whose value is null.
"""

import dataclasses
import functools
import json
import re

import pyarrow as pa

from util.parts import Part, RowAsks, flag, only_for_generation
from util.errors import InputError

KINDS = ("json", "regex", "choice", "grammar", "json_object")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _check_json_schema(schema) -> dict:
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise InputError(f"not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise InputError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as error:
        raise InputError(f"not a valid JSON schema: {error.message}") from None
    return schema


def _check_regex(pattern) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise InputError(f"a regular expression must be a non-empty string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise InputError(f"not a valid regular expression: {error}") from None
    return pattern


def _check_choice(choices) -> list[str]:
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
        raise InputError(f"must be a non-empty list of strings, got {choices!r}")
    return list(choices)


def _check_grammar(grammar) -> str:
    if not isinstance(grammar, str) or not grammar.strip():
        raise InputError(f"a grammar must be a non-empty string, got {grammar!r}")
    return grammar


def _check_json_object(value) -> bool:
    if value is not True:
        raise InputError(f"must be true, got {value!r}")
    return True


CHECKS = {"json": _check_json_schema, "regex": _check_regex, "choice": _check_choice,
          "grammar": _check_grammar, "json_object": _check_json_object}


def check_spec(spec, where: str = "structured_outputs") -> dict:
    """`spec` checked and normalized (a schema given as a string is parsed); ValueError naming `where`."""
    if not isinstance(spec, dict):
        raise InputError(f"{where} must be an object, got {type(spec).__name__}")
    spec = {k: v for k, v in spec.items() if v is not None}
    unknown = sorted(set(spec) - set(KINDS))
    if unknown:
        raise InputError(f"{where} has unknown key(s) {', '.join(unknown)}; it takes exactly one of "
                         f"{', '.join(KINDS)}")
    if len(spec) != 1:
        raise InputError(f"{where} must have exactly one of {', '.join(KINDS)}; got {', '.join(spec) or 'none'}")
    (kind, value), = spec.items()
    try:
        return {kind: CHECKS[kind](_without_nulls(value) if kind == "json" else value)}
    except ValueError as error:
        raise InputError(f"{where}.{kind}: {error}") from None


def _parse_inline(json_schema):
    """--json-schema given inline (a string starting with `{`), parsed; a schema already read, as it is."""
    if not isinstance(json_schema, str):
        return json_schema
    try:
        return json.loads(json_schema)
    except json.JSONDecodeError as error:
        raise InputError(f"--json-schema: not valid JSON: {error}") from None


def job_spec(json_schema: str | dict | None, regex: str | None, choice: list[str] | None) -> dict | None:
    """The job's spec from its flags (at most one of them), or None; ValueError naming the flag.
    `json_schema`: inline JSON text, or the schema a file held (util/plan.py reads the file, once)."""
    given = {flag: value for flag, value in (("--json-schema", json_schema), ("--regex", regex),
                                             ("--choice", choice or None)) if value is not None}
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} cannot be used together: pass at most one of "
                         "--json-schema, --regex, --choice")
    if not given:
        return None
    (flag, value), = given.items()
    kind = {"--json-schema": "json", "--regex": "regex", "--choice": "choice"}[flag]
    if flag == "--json-schema":
        value = _parse_inline(value)
    try:
        return {kind: CHECKS[kind](value)}
    except ValueError as error:
        raise InputError(f"{flag}: {error}") from None


def check_job_flags(json_schema: str | None, regex: str | None, choice: list[str] | None) -> None:
    """job_spec's checks that need no file, for the Config: at most one flag, and an inline schema, a
    regex or choices that are valid. A schema file is read once, by job_spec, when the run is planned."""
    inline = json_schema is None or json_schema.lstrip().startswith("{")
    job_spec(json_schema if inline else "{}", regex, choice)


def from_response_format(response_format) -> dict | None:
    """OpenAI's `response_format` as a spec; None for {"type": "text"}."""
    if not isinstance(response_format, dict):
        raise InputError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise InputError(f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}; got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    schema = (response_format.get("json_schema") or {}).get("schema")
    if schema is None:
        raise InputError("response_format.json_schema.schema is missing")
    try:
        return {"json": _check_json_schema(_without_nulls(schema))}
    except ValueError as error:
        raise InputError(f"response_format.json_schema.schema: {error}") from None


def row_spec(override: dict, job: dict | None = None) -> dict | None:
    """The spec one row runs with: its own `structured_outputs` or `response_format` (of its
    sampling_params, nulls already dropped), else the job's. ValueError when the row's is invalid."""
    if "structured_outputs" in override and "response_format" in override:
        raise InputError("give structured_outputs or response_format, not both")
    if "response_format" in override:
        return from_response_format(override["response_format"])
    if "structured_outputs" in override:
        return check_spec(override["structured_outputs"])
    return job


def vllm_params(spec: dict | None):
    """vLLM's StructuredOutputsParams for a spec (None for none)."""
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**spec) if spec else None


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str):
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    return validator_for(schema)(schema)


def _problem(spec: dict, text: str) -> str | None:
    if "json" in spec or "json_object" in spec:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            return f"not valid JSON: {error}"
        if "json" in spec:
            from jsonschema.exceptions import best_match

            schema = spec["json"] if isinstance(spec["json"], dict) else json.loads(spec["json"])
            mismatch = best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(value))
            if mismatch is not None:
                return f"does not match the JSON schema at {mismatch.json_path}: {mismatch.message}"
    elif "regex" in spec:
        if not re.fullmatch(spec["regex"], text):
            return f"does not match the regex {spec['regex']!r}"
    elif "choice" in spec:
        if text not in spec["choice"]:
            return f"not one of the {len(spec['choice'])} choices"
    return None  # a grammar: no parser here to check it with


def output_error(spec: dict | None, text: str | None, finish_reason: str | None) -> str | None:
    """Why a row's text does not conform to its spec, or None when it does (or there was no spec).
    A row that stopped for any reason but its own end says so: `... (finish_reason length)`."""
    if not spec or text is None:
        return None
    problem = _problem(spec, text)
    if problem and finish_reason not in (None, "stop"):
        problem += f" (finish_reason {finish_reason})"
    return problem


# --- the feature: flags, checks, the plan's part --------------------------------------------------------

STRUCTURED_OUTPUT_ERROR = "structured_output_error"  # null unless a row asked for structured output and its text does not conform


@dataclasses.dataclass
class Flags:
    json_schema: str | None = flag("Guide every row's text to this JSON schema: inline JSON, or a .json file (local, "
                                   "s3:// or gs://). Rows whose text does not parse and validate (cut off by "
                                   "--max-tokens, say) get `structured_output_error`.", default=None)
    regex: str | None = flag("Guide every row's text to match this regular expression, whole.", default=None)
    choice: list[str] = flag("Guide every row's text to exactly one of these strings (repeat the flag for each).",
                             default_factory=list)


def check(cfg) -> None:
    check_job_flags(cfg.json_schema, cfg.regex, cfg.choice)  # a bad regex or mix: ValueError now
    only_for_generation(cfg, {"--json-schema": cfg.json_schema is not None, "--regex": cfg.regex is not None,
                              "--choice": bool(cfg.choice)})


def read_json_schema(json_schema: str | None):
    """--json-schema as given: inline JSON (left for job_spec to parse), or a file (local, s3:// or gs://),
    read and parsed here, once per run."""
    from util.storage import resolve

    if json_schema is None or json_schema.lstrip().startswith("{"):
        return json_schema
    filesystem, path = resolve(json_schema)
    try:
        with filesystem.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"--json-schema: no such file {json_schema} (pass a schema inline or a .json file)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"--json-schema: {json_schema} is not valid JSON: {error}") from None


ASKED_BY = RowAsks(sampling=frozenset({"structured_outputs", "response_format"}))  # a row's own spec


class StructuredOutput(Part):
    """The job's spec (its flags), or a row's own (its sampling_params)."""
    columns = {STRUCTURED_OUTPUT_ERROR: pa.string()}

    def __init__(self, job: dict | None):
        self.job = job
        self.sampling = {"structured_outputs": job} if job else {}

    def check(self, request) -> None:
        from util.predictor import row_sampling

        own = row_sampling({}, request.row.get("sampling_params"))  # the row's own keys, apart from the job's
        spec = row_spec(own, self.job)
        request.sampling = {k: v for k, v in request.sampling.items() if k not in ("structured_outputs", "response_format")}
        if spec:
            request.sampling["structured_outputs"] = request.state["structured_outputs"] = spec

    async def prepare(self, request) -> None:  # from the spec each time: a row may run again (a new engine, --repair)
        if "structured_outputs" in request.state:
            request.sampling["structured_outputs"] = vllm_params(request.state["structured_outputs"])

    def output(self, request, output, result: dict) -> None:
        spec = request.state.get("structured_outputs")
        for sample in result["samples"]:  # the whole text, thinking included: what guided decoding constrained
            sample[STRUCTURED_OUTPUT_ERROR] = output_error(spec, sample["text"], sample["finish_reason"])


def part(plan) -> StructuredOutput | None:
    if plan.task != "generate":
        return None
    cfg = plan.cfg
    job = job_spec(read_json_schema(cfg.json_schema), cfg.regex, cfg.choice)
    return StructuredOutput(job) if job or plan.row_asks.ask(ASKED_BY) else None
