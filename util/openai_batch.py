"""The OpenAI Batch API's file formats: run a batch input file on your own GPUs, get its output file back.

    python main.py --input-path batch_input.jsonl --input-format openai --output-path out/
    # out/part-*.jsonl: one output record per request that succeeded
    # out/errors/part-*.jsonl: one record per request that failed; join both back on custom_id

An input line is a request, as the Batch API takes it:

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [{"role": "user", "content": "..."}], "max_tokens": 64}}

Its `messages` go through the model's chat template, and its body parameters become the row's own
sampling parameters (`max_tokens`, `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`,
`presence_penalty`, `frequency_penalty`, `response_format`). A line that is not a valid request (not
JSON, no custom_id, another url, a parameter this template cannot honour) becomes an error record
instead of stopping the job, as the Batch API's error file has it. `custom_id`s must be unique: the
run resumes, and joins back, on them.

An output record:

    {"id": "batch_req_...", "custom_id": "q-1", "error": null,
     "response": {"status_code": 200, "request_id": "...", "body": {"object": "chat.completion", "model": ...,
       "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76}}}}

A failed request's record has status_code 400, the reason in `response.body.error.message`, and
`error: {"code", "message"}`. A request that asked for JSON (`response_format`) and got text that does not
parse (cut off by max_tokens, say) keeps status 200, with `structured_output_error` in its choice.
"""

import hashlib
import json
import time

import pyarrow as pa

CHAT_URL = "/v1/chat/completions"
# Body parameters and the SamplingParams field each one sets (response_format: util/structured_output.py).
SAMPLING_PARAMETERS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
                       "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                       "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                       "response_format": "response_format"}
# Parameters that change nothing here: who asked, and the model (the job's model answers every request).
IGNORED_PARAMETERS = {"model", "messages", "user", "metadata", "store", "n", "stream"}
# Columns the reader gives each request; `messages` is what the prompt formatter reads.
# `request_error`: why a line is not a valid request; the formatter turns it into the row's `error`.
REQUEST_COLUMNS = ("custom_id", "messages", "sampling_params", "request_model", "request_error")


def _refused(custom_id: str, reason: str) -> dict:
    return {"custom_id": custom_id, "messages": None, "sampling_params": None, "request_model": None,
            "request_error": reason}


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
    if request.get("method", "POST") != "POST" or request.get("url") != CHAT_URL:
        return _refused(custom_id, f"{where}: only POST {CHAT_URL} is supported, got "
                                   f"{request.get('method', 'POST')} {request.get('url')}")
    body = request.get("body")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return _refused(custom_id, f"{where}: body.messages must be a non-empty list of messages")
    if body.get("n", 1) != 1 or body.get("stream"):
        return _refused(custom_id, f"{where}: n > 1 and stream are not supported in a batch")
    unsupported = sorted(set(body) - set(SAMPLING_PARAMETERS) - IGNORED_PARAMETERS)
    if unsupported:
        return _refused(custom_id, f"{where}: unsupported body parameter(s): {', '.join(unsupported)}")
    sampling = {SAMPLING_PARAMETERS[k]: v for k, v in body.items() if k in SAMPLING_PARAMETERS and v is not None}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    return {"custom_id": custom_id, "messages": json.dumps(messages, ensure_ascii=False),
            "sampling_params": json.dumps(sampling, ensure_ascii=False) if sampling else None,
            "request_model": body.get("model"), "request_error": None}


def request_table(rows: list[dict]) -> pa.Table:
    return pa.table({name: pa.array([row[name] for row in rows], pa.string()) for name in REQUEST_COLUMNS})


def output_record(row: dict, created: int | None = None) -> dict:
    """One output row (util/output.py's columns) → the Batch API's output or error record."""
    # Derived from the row's id, so a record's ids are the same in every run.
    request_id = hashlib.sha1(row["id"].encode("utf-8", "surrogatepass")).hexdigest()[:24]
    record = {"id": f"batch_req_{request_id}", "custom_id": row["id"]}
    if row["error"] is not None:
        body = {"error": {"message": row["error"], "type": "invalid_request_error", "param": None, "code": None}}
        return {**record, "response": {"status_code": 400, "request_id": request_id, "body": body},
                "error": {"code": "invalid_request", "message": row["error"]}}
    prompt_tokens, completion_tokens = row["num_input_tokens"] or 0, row["num_generated_tokens"] or 0
    choice = {"index": 0, "message": {"role": "assistant", "content": row["generated_text"]},
              "logprobs": None, "finish_reason": row["finish_reason"]}
    if row.get("structured_output_error"):  # asked for JSON (response_format) and the text does not parse
        choice["structured_output_error"] = row["structured_output_error"]
    body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion",
            "created": int(time.time()) if created is None else created, "model": row["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    return {**record, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def preview(record: dict) -> dict:
    """An output record, read back, in the shape of an output row: for a glance at the results."""
    body = (record.get("response") or {}).get("body") or {}
    choice = (body.get("choices") or [{}])[0]
    return {"id": record.get("custom_id"), "generated_text": (choice.get("message") or {}).get("content"),
            "finish_reason": choice.get("finish_reason"),
            "num_generated_tokens": (body.get("usage") or {}).get("completion_tokens", 0),
            "error": (record.get("error") or {}).get("message")}
