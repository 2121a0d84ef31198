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
url is an http(s):// or data: URL, as the images of its template's image parts: util/images.py), and its
body parameters become the row's own
sampling parameters (`max_tokens`, `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`,
`presence_penalty`, `frequency_penalty`, `logit_bias`, `response_format`, `n`, and `logprobs` with
`top_logprobs`). A null parameter counts as not given; one that asks for no unsupported feature is
accepted (`"stream": false`, `"tools": []`, `parallel_tool_calls`, ...). A line that is not a valid
request (not JSON, no custom_id, another url, a parameter the openai package does not know, a value that
asks for something unsupported, such as `"stream": true`, named in the message) becomes an error record
instead of stopping the job, as the Batch API's error file has it. `custom_id`s must be unique: the run resumes,
and joins back, on them.

A `/v1/embeddings` request (`body.input`: one string, embedded as given; a list of inputs is refused on
its line, one request line per input) makes the run an embedding job (util/plan.py resolve_task); a file
must not mix the two urls. Its record's body is a CreateEmbeddingResponse: `{"object": "list", "data":
[{"object": "embedding", "index": 0, "embedding": [...]}], "model": ..., "usage": {"prompt_tokens": N,
"total_tokens": N}}`.

An output record:

    {"id": "batch_req_...", "custom_id": "q-1", "error": null,
     "response": {"status_code": 200, "request_id": "...", "body": {"object": "chat.completion", "model": ...,
       "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76}}}}

With --lora adapters (util/lora.py), a request's `model` picks its adapter, as ray.data.llm reads it: a
name registered with --lora is that adapter, the base model none, and another model an error record; the
record's `model` names the adapter. Without --lora, `model` is ignored: the job's model answers.

`"n": 2` gives two choices (usage.completion_tokens counts both); `"logprobs": true, "top_logprobs": 3`
gives each choice `logprobs.content`, as the SDK's ChatCompletionTokenLogprob has it; a job run with
--reasoning-parser gives each message its `reasoning_content` (thinking) beside `content` (the answer),
and one run with --prompt-logprobs the body's `prompt_logprobs`, as vLLM's server names them.

A failed request's record has status_code 400, the reason in `response.body.error.message`, and
`error: {"code", "message"}`. A request that asked for JSON (`response_format`) and got text that does not
parse (cut off by max_tokens, say) keeps status 200, with `structured_output_error` in its choice.
"""

import functools
import hashlib
import json
import time
import typing

import pyarrow as pa

from util import columns as col

CHAT_URL = "/v1/chat/completions"
IMAGE_PART = "image_url"  # a content part holding an image: {"type": "image_url", "image_url": {"url": ...}}
EMBEDDINGS_URL = "/v1/embeddings"
TASK_OF_URL = {CHAT_URL: "generate", EMBEDDINGS_URL: "embed"}  # the url says the job's task (Config.task)
# Embeddings body parameters: ignored (who asked, the model), or accepted only at the value that asks for
# what this runner gives: float vectors at the model's own size.
EMBEDDING_IGNORED = {"model", "input", "user"}
EMBEDDING_DEFAULT_ONLY = {"encoding_format": (["float"], "float vectors only"),
                          "dimensions": ([], "the model's own size only")}
# Body parameters and the SamplingParams field each one sets (response_format: util/structured_output.py).
SAMPLING_PARAMETERS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
                       "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                       "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                       "logit_bias": "logit_bias", "response_format": "response_format", "n": "n"}
# OpenAI's logprobs (a flag) and top_logprobs (how many alternatives) become vLLM's one `logprobs`: K.
LOGPROB_PARAMETERS = ("logprobs", "top_logprobs")
# Parameters that change nothing in the answer: who asked, caching and billing hints, the model (the
# job's model answers every request; with --lora, the model picks the row's adapter, util/lora.py), and
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
# Columns the reader gives each request; `messages` is what the prompt formatter reads.
# `request_error`: why a line is not a valid request; the formatter turns it into the row's `error`.
REQUEST_COLUMNS = ("custom_id", "messages", col.SAMPLING_PARAMS, col.REQUEST_MODEL, col.REQUEST_ERROR)


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


def _refused(custom_id: str, reason: str) -> dict:
    return {"custom_id": custom_id, "messages": None, col.SAMPLING_PARAMS: None, col.REQUEST_MODEL: None,
            col.REQUEST_ERROR: reason}


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
        return _refused(custom_id, f"{where}: only POST {CHAT_URL} or POST {EMBEDDINGS_URL} is supported, got "
                                   f"{request.get('method', 'POST')} {request.get('url')}")
    body = request.get("body")
    if request["url"] == EMBEDDINGS_URL:
        return embedding_request_row(custom_id, body, where)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return _refused(custom_id, f"{where}: body.messages must be a non-empty list of messages")
    unknown = sorted(set(body) - chat_parameters())
    if unknown:
        return _refused(custom_id, f"{where}: unknown body parameter(s): {', '.join(unknown)}")
    for name, value in body.items():
        if reason := unsupported_value(name, value):
            return _refused(custom_id, f"{where}: {reason}")
    sampling = {SAMPLING_PARAMETERS[k]: v for k, v in body.items() if k in SAMPLING_PARAMETERS and v is not None}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    n = sampling.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return _refused(custom_id, f"{where}: n={json.dumps(n)} must be a positive integer")
    if n == 1:  # the default: left out, as any parameter not given
        sampling.pop("n", None)
    try:
        sampling.update(logprob_sampling(body.get("logprobs"), body.get("top_logprobs")))
    except ValueError as error:
        return _refused(custom_id, f"{where}: {error}")
    return {"custom_id": custom_id, "messages": json.dumps(messages, ensure_ascii=False),
            col.SAMPLING_PARAMS: json.dumps(sampling, ensure_ascii=False) if sampling else None,
            col.REQUEST_MODEL: body.get("model"), col.REQUEST_ERROR: None}


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
            col.REQUEST_MODEL: body.get("model"), col.REQUEST_ERROR: None}


def has_image_parts(messages) -> bool:
    """Whether a request's messages hold an image (an `image_url` content part)."""
    return isinstance(messages, list) and any(
        isinstance(part, dict) and part.get("type") == IMAGE_PART
        for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"])


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
    return pa.table({name: pa.array([row[name] for row in rows], pa.string()) for name in REQUEST_COLUMNS})


def output_record(row: dict, created: int | None = None) -> dict:
    """One output row (util/output.py's columns) → the Batch API's output or error record."""
    # Derived from the row's id, so a record's ids are the same in every run.
    request_id = hashlib.sha1(row[col.ID].encode("utf-8", "surrogatepass")).hexdigest()[:24]
    record = {"id": f"batch_req_{request_id}", "custom_id": row[col.ID]}
    if row[col.ERROR] is not None:
        body = {"error": {"message": row[col.ERROR], "type": "invalid_request_error", "param": None, "code": None}}
        return {**record, "response": {"status_code": 400, "request_id": request_id, "body": body},
                "error": {"code": "invalid_request", "message": row[col.ERROR]}}
    if row.get(col.EMBEDDING) is not None:  # an embeddings request: CreateEmbeddingResponse's shape
        tokens = row[col.NUM_INPUT_TOKENS] or 0
        body = {"object": "list", "model": row["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": list(row[col.EMBEDDING])}],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return {**record, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
    prompt_tokens, completion_tokens = row[col.NUM_INPUT_TOKENS] or 0, row[col.NUM_GENERATED_TOKENS] or 0
    # Each sample in the shape of a `completions` entry (util/columns.py COMPLETION): n of them, or the row's one.
    samples = row.get(col.COMPLETIONS) or [{"text": row[col.GENERATED_TEXT], "finish_reason": row[col.FINISH_REASON],
                                            "reasoning_content": row.get(col.REASONING_CONTENT),
                                            "logprobs": row.get(col.LOGPROBS),
                                            "structured_output_error": row.get(col.STRUCTURED_OUTPUT_ERROR)}]
    body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion",
            "created": int(time.time()) if created is None else created, "model": row["model"],
            "choices": [_choice(index, sample) for index, sample in enumerate(samples)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    if row.get(col.PROMPT_LOGPROBS) is not None:  # --prompt-logprobs: where vLLM's server puts them
        body["prompt_logprobs"] = row[col.PROMPT_LOGPROBS]
    return {**record, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


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
