"""The OpenAI Batch API's file formats: run a batch input file on your own GPUs, get its output file back.

    python main.py --input-path batch_input.jsonl --input-format openai --output-path out/
    # out/part-*.jsonl: one output record per request that succeeded
    # out/errors/part-*.jsonl: one record per request that failed; join both back on custom_id

An input line is a request, as the Batch API takes it:

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [{"role": "user", "content": "..."}], "max_tokens": 64}}

Every request the `openai` package's chat-completions types accept is served, within what this runner
does. Its `messages` go through the model's chat template (content given as a list of text parts is
joined with "\n", as vLLM's OpenAI server joins it; a vision-language model gets `image_url` parts, whose
url is an http(s):// or data: URL, as the images of its template's image parts: util/features/images.py; for a
text-only model a request with one is an error record saying so), and its body parameters become the row's
own sampling parameters (`max_tokens`, `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`,
`presence_penalty`, `frequency_penalty`, `logit_bias`, `response_format`, `n`, and `logprobs` with
`top_logprobs`), converted as vLLM's own server converts them (body_sampling): max_completion_tokens over
max_tokens, a stop string or list, logit_bias's token ids given as JSON strings, biases clamped to
[-100, 100]. A null parameter counts as not given; one that asks for no unsupported feature is
accepted (`"stream": false`, `"tools": []`, ...). Parameters a feature serves go to columns of the row, one
each (BODY_COLUMNS: util/features/tool_calls.py's `tools`, `tool_choice` and `parallel_tool_calls`); without that
feature, `tools` must be empty and `tool_choice` "none" or "auto". A line that is not a valid
request (not JSON, no custom_id, another url, a parameter the openai package does not know, a value of the
wrong type, a value that asks for something unsupported, such as `"stream": true`, named in the message)
becomes an error record instead of stopping the job, as the Batch API's error file has it; so does one whose
values vLLM refuses (`"presence_penalty": 3`), with vLLM's reason. `custom_id`s must be unique: the run
resumes, and joins back, on them.

A `/v1/embeddings` request (`body.input`: one string, embedded as given; a list of inputs is refused on
its line, one request line per input) makes the run an embedding job (util/plan.py resolve_task); a file
must not mix the two urls. Its record's body is a CreateEmbeddingResponse: `{"object": "list", "data":
[{"object": "embedding", "index": 0, "embedding": [...]}], "model": ..., "usage": {"prompt_tokens": N,
"total_tokens": N}}`.

A `/v1/score` or `/v1/rerank` request, as vLLM's run-batch takes it (ScoreRequest: `text_1`/`text_2`, or
`queries`/`documents`, `queries`/`items`, `data_1`/`data_2`; RerankRequest: `query`, `documents`, `top_n`), makes
the run a score job (util/features/scoring.py); the two urls may share a file. One query a line, texts only; vLLM's
truncation and score-template parameters are accepted at their defaults only. Its record's body is vLLM's
ScoreResponse (`data`: `{"index", "object": "score", "score"}` per document) or RerankResponse (`results`:
`{"index", "document": {"text"}, "relevance_score"}` by relevance, the top_n first).

An output record:

    {"id": "batch_req_...", "custom_id": "q-1", "error": null,
     "response": {"status_code": 200, "request_id": "...", "body": {"object": "chat.completion", "model": ...,
       "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76}}}}

With --lora adapters (util/features/lora.py), a request's `model` picks its adapter, as ray.data.llm reads it: a
name registered with --lora is that adapter, the base model none, and another model an error record; the
record's `model` names the adapter. Without --lora, `model` is ignored: the job's model answers.

`"n": 2` gives two choices (usage.completion_tokens counts both); `"logprobs": true, "top_logprobs": 3`
gives each choice `logprobs.content`, as the SDK's ChatCompletionTokenLogprob has it; a choice whose answer
called tools has `message.tool_calls` (util/features/tool_calls.py says when `finish_reason` is "tool_calls"); a job run with
--reasoning-parser gives each message its `reasoning_content` (thinking) beside `content` (the answer),
and one run with --prompt-logprobs the body's `prompt_logprobs`, as vLLM's server names them.

A failed request's record has status_code 400, the reason in `response.body.error.message`, and
`error: {"code", "message"}`. A request that asked for JSON (`response_format`) and got text that does not
parse (cut off by max_tokens, say) keeps status 200, with `structured_output_error` in its choice.
"""

import functools
import hashlib
import json
import os
import time
import typing
from typing import NamedTuple

import pyarrow as pa

from util import columns as col
from util.errors import EMPTY_PROMPT, ROW_ERRORS, InputError, RowError, error_text, row_error
from util.parts import Part, registry
from util.output import OutputFormat, jsonl_bytes
from util.prompt_format import PromptFormatter

CHAT_URL = "/v1/chat/completions"
IMAGE_PART = "image_url"  # a content part holding an image: {"type": "image_url", "image_url": {"url": ...}}
EMBEDDINGS_URL, SCORE_URL, RERANK_URL = "/v1/embeddings", "/v1/score", "/v1/rerank"
# The url says the job's task (Config.task): a score job takes /v1/score and /v1/rerank lines alike.
TASK_OF_URL = {CHAT_URL: "generate", EMBEDDINGS_URL: "embed", SCORE_URL: "score", RERANK_URL: "score"}
# vLLM's ScoreRequest (one of its four spellings of the two sides) and RerankRequest (query, documents, top_n),
# vllm/entrypoints/pooling/scoring/protocol.py: the body parameters taken, and those taken at vLLM's defaults only.
SCORE_SIDES = {SCORE_URL: (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2")),
               RERANK_URL: (("query", "documents"),)}
SCORING_IGNORED = {"model", "user", "request_id", "priority", "top_n"}
SCORING_DEFAULT_ONLY = {"use_activation": ([True], "scores after the model's activation"),
                        "truncate_prompt_tokens": ([], "no truncation"), "max_tokens_per_query": ([0], "no truncation"),
                        "max_tokens_per_doc": ([0], "no truncation"), "instruction": ([], "no score template"),
                        "chat_template_kwargs": ([], "no score template"), "mm_processor_kwargs": ([], "text only"),
                        "cache_salt": ([], "no prefix cache salt"), "encoding_format": (["float"], "float scores")}
# Embeddings body parameters: ignored (who asked, the model), or accepted only at the value that asks for
# what this runner gives: float vectors at the model's own size.
EMBEDDING_IGNORED = {"model", "input", "user"}
EMBEDDING_DEFAULT_ONLY = {"encoding_format": (["float"], "float vectors only"),
                          "dimensions": ([], "the model's own size only")}
# Body parameters and the SamplingParams field each one sets (response_format: util/features/structured_output.py),
# each converted as body_sampling says.
SAMPLING_PARAMETERS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
                       "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                       "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                       "logit_bias": "logit_bias", "response_format": "response_format", "n": "n"}
# seed's range in vLLM's ChatCompletionRequest (_INT64_MIN, _INT64_MAX): a 64-bit signed integer.
SEED_RANGE = (-2**63, 2**63 - 1)
# Most stop strings one request may have: OpenAI's limit, and vLLM's ChatCompletionRequest's (StopParam,
# vLLM 0.32), which reads the same environment variable.
MAX_STOP_STRINGS = int(os.environ.get("VLLM_MAX_STOP_STRINGS", "4"))
# OpenAI's and vLLM's bounds of a logit bias (SamplingParams.from_optional clamps to them).
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# OpenAI's logprobs (a flag) and top_logprobs (how many alternatives) become vLLM's one `logprobs`: K.
LOGPROB_PARAMETERS = ("logprobs", "top_logprobs")
# Parameters that change nothing in the answer: who asked, caching and billing hints, the model (the
# job's model answers every request; with --lora, the model picks the row's adapter, util/features/lora.py), and
# settings that only matter beside a feature refused below.
IGNORED_PARAMETERS = {"model", "messages", "user", "metadata", "store", "service_tier", "safety_identifier",
                      "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                      "parallel_tool_calls", "stream_options"}
# Features this runner does not have, and the values of each that ask for none of it (null always does).
# Any other value refuses the request, naming the parameter and its value.
DEFAULT_ONLY_PARAMETERS = {
    "stream": ([False], "a batch is answered whole"),
    "tools": ([[]], "no tool calls"),
    "tool_choice": (["none", "auto"], "no tool calls"),  # "auto" with no tools calls none
    "functions": ([[]], "no function calls"),
    "function_call": (["none", "auto"], "no function calls"),
    "modalities": ([["text"]], "text output only"),
    "audio": ([], "text output only"),
    "prediction": ([], "no predicted outputs"),
    "web_search_options": ([], "no web search"),
    "moderation": ([], "no moderation"),
    "reasoning_effort": ([], "no reasoning settings"),
    "verbosity": ([], "no verbosity setting"),
}
# A request with an image for a model that takes none: that line's error record (util/features/images.py says why).
IMAGE_REFUSED = "image for a text-only model"
ROW_ERRORS[IMAGE_REFUSED] = "an image_url part ({part}), but {reason}"
# Columns the reader gives each request; `messages` is what the prompt formatter reads.
# `request_error`: why a line is not a valid request; the formatter turns it into the row's `error`.
REQUEST_COLUMNS = ("custom_id", "messages", col.SAMPLING_PARAMS, col.REQUEST_MODEL, col.REQUEST_ERROR)


def body_columns() -> dict[str, str]:
    """Body parameters that a present feature serves (its BODY_COLUMNS), each to a column of its name: JSON text."""
    return registry("BODY_COLUMNS")


@functools.cache
def embedding_parameters() -> frozenset[str]:
    """Every body parameter the `openai` package's embeddings request type accepts."""
    from openai.types.embedding_create_params import EmbeddingCreateParams

    return frozenset(typing.get_type_hints(EmbeddingCreateParams))


@functools.cache
def chat_parameters() -> frozenset[str]:
    """Every body parameter the `openai` package's chat-completions request type accepts."""
    from openai.types.chat.completion_create_params import (CompletionCreateParamsNonStreaming,
                                                            CompletionCreateParamsStreaming)

    return frozenset(typing.get_type_hints(CompletionCreateParamsNonStreaming)) | frozenset(
        typing.get_type_hints(CompletionCreateParamsStreaming))


def unsupported_value(name: str, value, accepted=(*SAMPLING_PARAMETERS, *IGNORED_PARAMETERS, *LOGPROB_PARAMETERS),
                      default_only: dict = DEFAULT_ONLY_PARAMETERS) -> str | None:
    """Why `name: value` asks for something this runner cannot do, or None. null means not given.
    `accepted`: the parameters taken as they come; `default_only`: those allowed only at these values."""
    if value is None or name in accepted:
        return None
    if name not in default_only:  # one the openai package has learnt since this table was made
        return f"{name}={json.dumps(value, ensure_ascii=False)} is not supported"
    allowed, why = default_only[name]
    # Compared as JSON, so that true is not taken for 1, nor 0 for false.
    if json.dumps(value) in {json.dumps(a) for a in allowed}:
        return None
    accepted = " or ".join(["null", *(json.dumps(a) for a in allowed)])
    return f"{name}={json.dumps(value, ensure_ascii=False)} is not supported ({why}; {name} may be {accepted})"


def logprob_sampling(logprobs, top_logprobs) -> dict:
    """OpenAI's `logprobs` and `top_logprobs` as vLLM's sampling: {"logprobs": K}, or {} for none."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ValueError(f"logprobs={json.dumps(logprobs)} must be true or false")
    if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                     or not 0 <= top_logprobs <= 20):
        raise ValueError(f"top_logprobs={json.dumps(top_logprobs)} must be an integer from 0 to 20")
    if not logprobs:
        if top_logprobs:  # as OpenAI's API refuses it
            raise ValueError(f"top_logprobs={top_logprobs} needs logprobs=true")
        return {}
    return {"logprobs": top_logprobs or 0}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={_json(value)} must be an integer")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={_json(value)} must be a number")
    return value


def _seed(name: str, value) -> int:
    if not SEED_RANGE[0] <= _integer(name, value) <= SEED_RANGE[1]:
        raise ValueError(f"{name}={value} must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    return value


def _stop(name: str, value) -> list[str]:
    """A string or a list of strings, as vLLM's ChatCompletionRequest takes it; a list either way, as
    SamplingParams makes it."""
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"{name}={_json(value)} must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"{name} has {len(stop)} strings; at most {MAX_STOP_STRINGS} (VLLM_MAX_STOP_STRINGS)")
    return stop


def _logit_bias(name: str, value) -> dict[str, float]:
    """Token ids (JSON object keys: strings) and their biases, as vLLM's SamplingParams.from_optional converts
    them (vllm/sampling_params.py, 0.26 and 0.32 alike): each key through int(), each bias clamped to
    [-100, 100]; a key int() refuses is refused with vLLM's message. The keys stay strings here, since JSON
    has no other (OpenAIBatch.check makes them ints in the replica); one out of the vocabulary is vLLM's to
    refuse, in the replica, with its message."""
    if not isinstance(value, dict):
        raise ValueError(f"{name}={_json(value)} must be an object of token ids (as strings) and biases")
    bad_keys = []
    for token in value:
        try:
            int(token)
        except ValueError:
            bad_keys.append(token)
    if bad_keys:
        raise ValueError(f"{name} contains key(s) that cannot be converted to integer token IDs: {bad_keys!r}")
    low, high = LOGIT_BIAS_RANGE
    return {str(int(token)): float(min(high, max(low, _number(f"{name}[{_json(token)}]", bias))))
            for token, bias in value.items()}


def _positive_integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={_json(value)} must be a positive integer")
    return value


# How each body parameter's value becomes its SamplingParams field's: the JSON type vLLM's ChatCompletionRequest
# declares for it (strictly: a number is not given as a string), converted where vLLM's server converts it. The
# values' ranges are SamplingParams' to check, in the replica, whose message becomes the row's error.
CONVERSIONS = {"max_tokens": _integer, "max_completion_tokens": _integer, "temperature": _number, "top_p": _number,
               "presence_penalty": _number, "frequency_penalty": _number, "seed": _seed, "stop": _stop,
               "logit_bias": _logit_bias, "n": _positive_integer}


def body_sampling(body: dict) -> dict:
    """A chat request's body parameters as SamplingParams' keyword arguments, as vLLM's own server makes
    them (ChatCompletionRequest.to_sampling_params in vllm/entrypoints/openai/chat_completion/protocol.py):
    max_completion_tokens over max_tokens, a stop string as a list, logit_bias by token id, `logprobs` with
    `top_logprobs` as vLLM's one `logprobs`. Only what the body gives (null is not given), so that the job's
    own settings hold for the rest. ValueError naming the parameter and its value, for a wrong one."""
    given = {name: value for name, value in body.items() if name in SAMPLING_PARAMETERS and value is not None}
    if "max_completion_tokens" in given:  # vLLM's serving code reads it first; max_tokens is deprecated
        given.pop("max_tokens", None)
    sampling = {SAMPLING_PARAMETERS[name]: CONVERSIONS[name](name, value) if name in CONVERSIONS else value
                for name, value in given.items()}
    if sampling.get("n") == 1:  # the default: left out, as any parameter not given
        del sampling["n"]
    sampling.update(logprob_sampling(body.get("logprobs"), body.get("top_logprobs")))
    return sampling


def _refused(custom_id: str, reason: str) -> dict:
    return {"custom_id": custom_id, "messages": None, col.SAMPLING_PARAMS: None, col.REQUEST_MODEL: None,
            col.REQUEST_ERROR: reason, **dict.fromkeys(body_columns().values())}


def request_row(line: str, where: str) -> dict:
    """One input line → a row of REQUEST_COLUMNS. `where` (file:line) names the line in errors, and is
    the custom_id of a line that has none."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as error:
        return _refused(where, f"{where}: malformed JSON ({error.msg} at column {error.colno})")
    if not isinstance(request, dict):
        return _refused(where, f"{where}: a request must be a JSON object, got {type(request).__name__}")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _refused(where, f"{where}: no custom_id (a non-empty string)")
    if request.get("method", "POST") != "POST" or request.get("url") not in TASK_OF_URL:
        return _refused(custom_id, f"{where}: only POST to {', '.join(TASK_OF_URL)} is supported, got "
                                   f"{request.get('method', 'POST')} {request.get('url')}")
    body = request.get("body")
    if request["url"] == EMBEDDINGS_URL:
        return embedding_request_row(custom_id, body, where)
    if request["url"] in SCORE_SIDES:
        return scoring_request_row(custom_id, request["url"], body, where)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return _refused(custom_id, f"{where}: body.messages must be a non-empty list of messages")
    unknown = sorted(set(body) - chat_parameters())
    if unknown:
        return _refused(custom_id, f"{where}: unknown body parameter(s): {', '.join(unknown)}")
    served = body_columns()
    for name, value in body.items():
        if name not in served and (reason := unsupported_value(name, value)):
            return _refused(custom_id, f"{where}: {reason}")
    try:
        sampling = body_sampling(body)
    except ValueError as error:
        return _refused(custom_id, f"{where}: {error}")
    return {"custom_id": custom_id, "messages": json.dumps(messages, ensure_ascii=False),
            col.SAMPLING_PARAMS: json.dumps(sampling, ensure_ascii=False) if sampling else None,
            col.REQUEST_MODEL: body.get("model"), col.REQUEST_ERROR: None,
            **{column: None if body.get(name) is None else json.dumps(body[name], ensure_ascii=False)
               for name, column in served.items()}}


def embedding_request_row(custom_id: str, body, where: str) -> dict:
    """An embeddings request's body → a row whose `messages` holds its input, one string, as JSON. A list
    of inputs (strings or token ids) is refused: one request line per text, so that one output row (and
    one resumable id) stands for one embedding."""
    text = body.get("input") if isinstance(body, dict) else None
    if not isinstance(text, str):
        kind = "missing" if text is None else f"a {type(text).__name__}"
        return _refused(custom_id, f"{where}: body.input must be one string, got {kind} (a list of inputs is "
                                   "not supported: one request line per input)")
    unknown = sorted(set(body) - embedding_parameters())
    if unknown:
        return _refused(custom_id, f"{where}: unknown body parameter(s): {', '.join(unknown)}")
    for name, value in body.items():
        if reason := unsupported_value(name, value, EMBEDDING_IGNORED, EMBEDDING_DEFAULT_ONLY):
            return _refused(custom_id, f"{where}: {reason}")
    return {"custom_id": custom_id, "messages": json.dumps(text, ensure_ascii=False), col.SAMPLING_PARAMS: None,
            col.REQUEST_MODEL: body.get("model"), col.REQUEST_ERROR: None, **dict.fromkeys(body_columns().values())}


def scoring_request_row(custom_id: str, url: str, body, where: str) -> dict:
    """A /v1/score or /v1/rerank body → a row whose `messages` holds, as JSON, its query, its documents (a
    string: one pair; a list: a rerank), the url and top_n, for util/features/scoring.py's formatter and the output
    record. One query a line (several queries against as many documents: one line each), texts only."""
    if not isinstance(body, dict):
        return _refused(custom_id, f"{where}: body must be a JSON object")
    sides = next((pair for pair in SCORE_SIDES[url] if pair[0] in body or pair[1] in body), SCORE_SIDES[url][0])
    unknown = sorted(set(body) - {*sides, *SCORING_IGNORED, *SCORING_DEFAULT_ONLY})
    if unknown:
        return _refused(custom_id, f"{where}: unknown body parameter(s): {', '.join(unknown)}")
    for name, value in body.items():
        if reason := unsupported_value(name, value, (*sides, *SCORING_IGNORED), SCORING_DEFAULT_ONLY):
            return _refused(custom_id, f"{where}: {reason}")
    query, documents = body.get(sides[0]), body.get(sides[1])
    if isinstance(query, list) and len(query) == 1 and url == SCORE_URL:
        query = query[0]  # 1:1 or 1:N, as vLLM pairs them
    if not isinstance(query, str):
        kind = "missing" if query is None else f"a {type(query).__name__}"
        return _refused(custom_id, f"{where}: body.{sides[0]} must be one text, got {kind} (several queries: one "
                                   "request line each; multi-modal content is not supported)")
    if not (isinstance(documents, str) or isinstance(documents, list) and documents
            and all(isinstance(d, str) for d in documents)):
        return _refused(custom_id, f"{where}: body.{sides[1]} must be a text or a non-empty list of texts, got "
                                   f"{_json(documents)[:80]}")
    top_n = body.get("top_n") or 0
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        return _refused(custom_id, f"{where}: top_n={_json(top_n)} must be an integer >= 0")
    if url == RERANK_URL and isinstance(documents, str):
        documents = [documents]  # a rerank's results are a list, whatever it was given
    pair = {"query": query, "documents": documents, "url": url, "top_n": top_n}
    return {"custom_id": custom_id, "messages": _json(pair), col.SAMPLING_PARAMS: None,
            col.REQUEST_MODEL: body.get("model"), col.REQUEST_ERROR: None}


def has_image_parts(messages) -> bool:
    """Whether a request's messages hold an image (an `image_url` content part)."""
    return isinstance(messages, list) and first_image_part(messages) is not None


def first_image_part(messages: list) -> str | None:
    """Where the first image_url part of a request's messages stands (`messages[i].content[j]`), or None."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == IMAGE_PART:
                return f"messages[{i}].content[{j}]"
    return None


def request_kind(line: str) -> tuple[str | None, bool]:
    """A request line's url (None for a line that is not a request: the reader reports those), and
    whether its messages hold an image."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError:
        return None, False
    if not isinstance(request, dict):
        return None, False
    body = request.get("body")
    return request.get("url"), has_image_parts(body.get("messages") if isinstance(body, dict) else None)


def request_table(rows: list[dict]) -> pa.Table:
    return pa.table({name: pa.array([row.get(name) for row in rows], pa.string())  # a score line has no tools
                     for name in (*REQUEST_COLUMNS, *body_columns().values())})


def output_record(row: dict, created: int | None = None) -> dict:
    """One output row (util/output.py's columns, and the features' by name: embedding, completions,
    logprobs, ...) → the Batch API's output or error record."""
    # Derived from the row's id, so a record's ids are the same in every run.
    request_id = hashlib.sha1(row[col.ID].encode("utf-8", "surrogatepass")).hexdigest()[:24]
    record = {"id": f"batch_req_{request_id}", "custom_id": row[col.ID]}
    if row[col.ERROR] is not None:
        body = {"error": {"message": row[col.ERROR], "type": "invalid_request_error", "param": None, "code": None}}
        return {**record, "response": {"status_code": 400, "request_id": request_id, "body": body},
                "error": {"code": "invalid_request", "message": row[col.ERROR]}}
    if row.get("score") is not None or row.get("scores") is not None:  # util/features/scoring.py's
        return {**record, "response": {"status_code": 200, "request_id": request_id,
                                       "body": scoring_body(row, request_id, created)}, "error": None}
    if row.get("embedding") is not None:  # an embeddings request: CreateEmbeddingResponse's shape
        tokens = row[col.NUM_INPUT_TOKENS] or 0
        body = {"object": "list", "model": row["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": list(row["embedding"])}],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return {**record, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
    prompt_tokens, completion_tokens = row[col.NUM_INPUT_TOKENS] or 0, row[col.NUM_GENERATED_TOKENS] or 0
    # Each sample in the shape of a `completions` entry (util/columns.py COMPLETION): n of them, or the row's one.
    samples = row.get("completions") or [{"text": row[col.GENERATED_TEXT], "finish_reason": row[col.FINISH_REASON],
                                            "reasoning_content": row.get("reasoning_content"),
                                            "logprobs": row.get("logprobs"), "tool_calls": row.get("tool_calls"),
                                            "structured_output_error": row.get("structured_output_error")}]
    body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion",
            "created": int(time.time()) if created is None else created, "model": row["model"],
            "choices": [_choice(index, sample) for index, sample in enumerate(samples)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    if row.get("prompt_logprobs") is not None:  # --prompt-logprobs: where vLLM's server puts them
        body["prompt_logprobs"] = row["prompt_logprobs"]
    return {**record, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def scoring_body(row: dict, request_id: str, created: int | None) -> dict:
    """A score row as vLLM's ScoreResponse (/v1/score: one `data` entry per document, in order) or
    RerankResponse (/v1/rerank: `results` by relevance, the top_n first when asked)."""
    request = json.loads(row["messages"])
    scores = row["scores"] if row.get("scores") is not None else [row["score"]]
    tokens = row[col.NUM_INPUT_TOKENS] or 0
    if request["url"] == RERANK_URL:
        results = sorted(({"index": i, "document": {"text": text}, "relevance_score": score}
                          for i, (text, score) in enumerate(zip(request["documents"], scores))),
                         key=lambda result: -result["relevance_score"])
        return {"id": f"rerank-{request_id}", "model": row["model"], "results": results[:request["top_n"] or None],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return {"id": f"score-{request_id}", "object": "list", "created": int(time.time()) if created is None else created,
            "model": row["model"], "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


def _token_logprob(token: dict) -> dict:
    return {"token": token["token"], "logprob": token["logprob"], "bytes": list(token["token"].encode("utf-8"))}


def openai_logprobs(tokens: list[dict] | None) -> dict | None:
    """A sample's `logprobs` column (util/request_output.py) as a choice's ChoiceLogprobs."""
    if tokens is None:
        return None
    return {"content": [{**_token_logprob(token), "top_logprobs": [_token_logprob(top) for top in token["top_logprobs"]]}
                        for token in tokens], "refusal": None}


def _choice(index: int, sample: dict) -> dict:
    message = {"role": "assistant", "content": sample["text"]}
    if sample.get("reasoning_content") is not None:  # a reasoning parser ran: the thinking, apart
        message["reasoning_content"] = sample["reasoning_content"]
    if sample.get("tool_calls"):  # the answer called tools (util/features/tool_calls.py)
        message["tool_calls"] = sample["tool_calls"]
    choice = {"index": index, "message": message, "logprobs": openai_logprobs(sample.get("logprobs")),
              "finish_reason": sample["finish_reason"]}
    if sample.get("structured_output_error"):  # asked for JSON (response_format) and the text does not parse
        choice["structured_output_error"] = sample["structured_output_error"]
    return choice


def preview(record: dict) -> dict:
    """An output record, read back, in the shape of an output row: for a glance at the results."""
    body = (record.get("response") or {}).get("body") or {}
    choice = (body.get("choices") or [{}])[0]
    return {col.ID: record.get("custom_id"), col.GENERATED_TEXT: (choice.get("message") or {}).get("content"),
            col.FINISH_REASON: choice.get("finish_reason"),
            col.NUM_GENERATED_TOKENS: (body.get("usage") or {}).get("completion_tokens", 0),
            col.ERROR: (record.get("error") or {}).get("message")}


# --- the feature: an input format, an output format, and the task a file's urls ask for ----------------

class RequestLines:
    """--input-format openai: one request a line, streamed one task per file (an error record names its
    line); a line that is not a valid request is an error row (request_error), not a refused file."""
    extensions = [".jsonl", ".json"]  # never picked by --input-format auto
    text_column, id_column = "messages", "custom_id"

    def read(self, filesystem, path: str, block_rows: int):
        """(a table of REQUEST_COLUMNS, each row's line number), block_rows rows at a time."""
        with filesystem.open_input_stream(path) as stream:
            lines = enumerate(stream.read().decode("utf-8-sig").split("\n"), start=1)
            requests = [(n, line.removesuffix("\r")) for n, line in lines if line.strip()]
        for i in range(0, len(requests), block_rows):
            part = requests[i: i + block_rows]
            yield request_table([request_row(line, f"{os.path.basename(path)}:{n}") for n, line in part]), [n for n, _ in part]


def records_bytes(table: pa.Table) -> bytes:
    created = int(time.time())
    return jsonl_bytes([output_record(row, created) for row in table.to_pylist()])


# What resume and the counts read of an output record.
RECORD_SCHEMA = pa.schema([("custom_id", pa.string()), ("error", pa.struct([("code", pa.string()), ("message", pa.string())]))])
INPUT_FORMATS = {"openai": RequestLines()}
OUTPUT_FORMATS = {"openai": OutputFormat(".jsonl", records_bytes, "custom_id", RECORD_SCHEMA, preview)}


def check(cfg) -> None:
    """An OpenAI file's requests carry their messages and custom_id; its output is records unless told."""
    if cfg.input_format == "openai":
        cfg.text_column, cfg.id_column = RequestLines.text_column, RequestLines.id_column
        if cfg.output_format is None:
            cfg.output_format = "openai"


class BatchKind(NamedTuple):
    task: str  # generate (/v1/chat/completions) or embed (/v1/embeddings), by the requests' urls
    first_image: str | None  # `file:line` of the first request with an image_url part, None if none has one


def batch_kind(source: str) -> BatchKind:
    """The task an OpenAI batch input asks for, by its requests' urls, and where its first image is. One run
    is one task, so a request whose url differs from the first request's refuses the input (InputError,
    naming its file and line) before any engine starts. One pass over the files' lines on the driver: a
    Batch API file holds at most 50,000 requests (200 MB). Lines that are not requests are left to the
    reader's error records."""
    from util.reading import list_files
    from util.storage import resolve

    files, _ = list_files(source, "openai")
    filesystem, _ = resolve(source)
    first, first_image = None, None  # (url, file:line), file:line
    for path, _ in files:
        with filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode("utf-8-sig", errors="replace").split("\n")
        for number, line in enumerate(lines, start=1):
            url, has_image = request_kind(line) if line.strip() else (None, False)
            if url not in TASK_OF_URL:
                continue
            if has_image and first_image is None:
                first_image = f"{path}:{number}"
            if first is None:
                first = (url, f"{path}:{number}")
            elif TASK_OF_URL[url] != TASK_OF_URL[first[0]]:
                raise InputError(f"{path}:{number}: a {url} request in a batch of {first[0]} requests (the "
                                 f"first at {first[1]}); a run is one task: put them in separate files")
    return BatchKind(TASK_OF_URL[first[0]] if first else "generate", first_image)


def has_content(content) -> bool:
    """For the empty-prompt check. A part other than text counts as content, so that the formatter refuses
    it by name instead of calling the prompt empty."""
    if isinstance(content, list):
        return any(str(p.get("text") or "").strip() if isinstance(p, dict) and p.get("type") == "text" else True
                   for p in content)
    return bool(str(content or "").strip())


def join_text_parts(message: dict, index: int = 0) -> dict:
    """A message whose content is a list of text parts, with that content as one string: the parts joined
    with "\n", as vLLM's OpenAI server joins them, so a template that expects text gets the prompt vLLM would
    send. A refusal part counts as text; any other part is refused: ValueError, naming it."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        text = part.get(kind) if kind in ("text", "refusal") else None
        if not isinstance(text, str):
            raise ValueError(f"messages[{index}].content[{j}] is a {kind!r} part; only text parts are supported")
        texts.append(text)
    return {**message, "content": "\n".join(texts)}


class ChatFormatter(PromptFormatter):
    """The formatter of an OpenAI batch job: each request's messages (kept as JSON text) through the model's
    chat template; an embeddings request's input, as given. `no_images`: why the job's model takes no images
    (util/features/images.py sets it for a text-only model), for the error of each request that holds one."""

    def __init__(self, *args, no_images: str | None = None, **options):
        super().__init__(*args, **options)
        self.no_images = no_images

    def prompt(self, value) -> str:
        messages = json.loads(value) if isinstance(value, str) else value
        if not isinstance(messages, list):  # an embeddings request's input
            return super().prompt(messages)
        if self.no_images and (part := first_image_part(messages)):  # this line only, as the Batch API has it
            raise RowError(row_error(IMAGE_REFUSED, part=part, reason=self.no_images))
        if not any(has_content(m.get("content")) for m in messages if isinstance(m, dict)):
            raise RowError(row_error(EMPTY_PROMPT, column=self.text_column))
        try:
            if self.prompt_format != "chat_template":
                raise ValueError("a list of messages needs the model's chat template (--prompt-format chat_template)")
            return self.chat([join_text_parts(m, i) for i, m in enumerate(messages)])
        except Exception as error:  # a template that refuses these roles, say: this row only
            raise RowError(f"cannot format the messages: {error_text(error)}") from None


class OpenAIBatch(Part):
    def __init__(self, kind: BatchKind):
        self.first_image = kind.first_image  # util/features/images.py takes the job for a vision job from it

    def stages(self, plan, stages: list) -> list:
        return [stage.with_options(fn_kwargs={**stage.map_batches["fn_kwargs"], "formatter": ChatFormatter})
                if stage.name == "format" else stage for stage in stages]

    def check(self, request) -> None:
        """logit_bias's token ids as the ints SamplingParams takes: the row's sampling came as JSON, whose keys
        are strings (body_sampling checked that each is one)."""
        bias = request.sampling.get("logit_bias")
        if bias:
            request.sampling["logit_bias"] = {int(token): value for token, value in bias.items()}


def part(plan) -> OpenAIBatch | None:
    """For an OpenAI batch input: the task its urls ask for (InputError for a file that mixes them, or one
    that contradicts an explicit --task), and where its first image is."""
    cfg = plan.cfg
    if cfg.input_format != "openai" or not cfg.input_path:
        return None
    kind = batch_kind(cfg.input_path)
    if kind.task not in ("generate", *registry("TASKS")):
        raise InputError(f"{cfg.input_path} holds requests for the {kind.task} task, which this template does not have")
    if cfg.task != "generate" and kind.task != cfg.task:
        raise InputError(f"--task {cfg.task}, but {cfg.input_path} holds requests for the {kind.task} task")
    plan.task = kind.task
    return OpenAIBatch(kind)
