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
url is an http(s):// or data: URL, as the images of its template's image parts: util/features/images/; for a
text-only model a request with one is an error record saying so), and its body parameters become the row's
own sampling parameters (`max_tokens`, `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`,
`presence_penalty`, `frequency_penalty`, `logit_bias`, `response_format`, `n`, and `logprobs` with
`top_logprobs`), converted as vLLM's own server converts them (body_sampling): max_completion_tokens over
max_tokens, a stop string or list, logit_bias's token ids given as JSON strings, biases clamped to
[-100, 100]. A null parameter counts as not given; one that asks for no unsupported feature is
accepted (`"stream": false`, `"tools": []`, ...). Parameters a feature serves go to columns of the row, one
each (BODY_COLUMNS of util/features/tool_calls/: `tools`, `tool_choice` and `parallel_tool_calls`); without that
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
called tools has `message.tool_calls` (util/features/tool_calls/ says when `finish_reason` is "tool_calls"); a job run with
--reasoning-parser gives each message its `reasoning_content` (thinking) beside `content` (the answer),
and one run with --prompt-logprobs the body's `prompt_logprobs`, as vLLM's server names them.

A failed request's record has status_code 400, the reason in `response.body.error.message`, and
`error: {"code", "message"}`. A request that asked for JSON (`response_format`) and got text that does not
parse (cut off by max_tokens, say) keeps status 200, with `structured_output_error` in its choice.
"""

import json
from typing import NamedTuple

from util.errors import EMPTY_PROMPT, InputError, RowError, error_text, row_error
from util.parts import Part, RowAsks, registry
from util.output import OutputFormat
from util.prompt_format import PromptFormatter
# The request lines (request_rows) and the output records (records); request_row, request_table and
# output_record are imported from here by the tests.
from util.features.openai_batch.request_rows import (IMAGE_REFUSED, TASK_OF_URL, RequestLines, first_image_part,
                                                     request_kind, request_row, request_table)
from util.features.openai_batch.records import RECORD_SCHEMA, output_record, preview, records_bytes


# --- the feature: an input format, an output format, and the task a file's urls ask for ----------------

INPUT_FORMATS = {"openai": RequestLines()}
OUTPUT_FORMATS = {"openai": OutputFormat(".jsonl", records_bytes, "custom_id", RECORD_SCHEMA, preview)}


def check(cfg) -> dict:
    """An OpenAI file's requests carry their messages and custom_id; its output is records unless told."""
    if cfg.input_format != "openai":
        return {}
    return {"text_column": RequestLines.text_column, "id_column": RequestLines.id_column,
            **({"output_format": "openai"} if cfg.output_format is None else {})}


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
            raise InputError(f"messages[{index}].content[{j}] is a {kind!r} part; only text parts are supported")
        texts.append(text)
    return {**message, "content": "\n".join(texts)}


class ChatFormatter(PromptFormatter):
    """The formatter of an OpenAI batch job: each request's messages (kept as JSON text) through the model's
    chat template; an embeddings request's input, as given. `no_images`: why the job's model takes no images
    (util/features/images/ sets it for a text-only model), for the error of each request that holds one."""

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
                raise InputError("a list of messages needs the model's chat template (--prompt-format chat_template)")
            return self.chat([join_text_parts(m, i) for i, m in enumerate(messages)])
        except Exception as error:  # a template that refuses these roles, say: this row only
            raise RowError(f"cannot format the messages: {error_text(error)}") from None


class OpenAIBatch(Part):
    def __init__(self, kind: BatchKind):
        self.first_image = kind.first_image  # util/features/images/ takes the job for a vision job from it

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
    batch = OpenAIBatch(kind)
    batch.plan = {"task": kind.task, "row_asks": RowAsks(every=True)}  # any request may ask for any feature
    return batch
