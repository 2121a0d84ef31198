"""An OpenAI batch input file's request lines, read (util/features/openai_batch/): each line a row of
REQUEST_COLUMNS, or a row whose request_error says why the line is not a valid request; the urls, the
body parameters each url takes, and the request columns a feature serves (body_columns)."""

import functools
import json
import os
import typing

import pyarrow as pa

from util import columns as col
from util.errors import ROW_ERRORS
from util.parts import registry
from util.features.openai_batch.sampling import _json, body_sampling, unsupported_value

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
# A request with an image for a model that takes none: that line's error record (util/features/images/ says why).
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
