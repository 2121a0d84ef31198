"""Output rows as the OpenAI Batch API's output and error records (util/features/openai_batch/): a chat
completion, an embedding, a score or a rerank response, or the error of a failed request; and a record read
back for a glance at the results."""

import hashlib
import json
import time

import pyarrow as pa

from util import columns as col
from util.output import jsonl_bytes
from util.features.openai_batch.request_rows import RERANK_URL


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
    if sample.get("tool_calls"):  # the answer called tools (util/features/tool_calls/)
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


def records_bytes(table: pa.Table) -> bytes:
    created = int(time.time())
    return jsonl_bytes([output_record(row, created) for row in table.to_pylist()])


# What resume and the counts read of an output record.
RECORD_SCHEMA = pa.schema([("custom_id", pa.string()), ("error", pa.struct([("code", pa.string()), ("message", pa.string())]))])
