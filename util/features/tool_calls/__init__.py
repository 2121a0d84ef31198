"""Tool calls (a feature, util/parts.py): a row's tools go through the model's chat template, and its
answer comes back as tool calls, as vLLM's OpenAI server answers a chat request with `tools`.

    python main.py --input-path rows.jsonl --tool-call-parser hermes
    # rows.jsonl: {"text": "Weather in Paris?", "tools": [{"type": "function", "function": {"name": "get_weather",
    #               "parameters": {...}}}], "tool_choice": "required"}
    python main.py --input-path batch_input.jsonl --input-format openai --tool-call-parser hermes  # body.tools

A row asks for tools in its `tools` column (OpenAI's list of function tools: a list, or its JSON text), with
`tool_choice` and `parallel_tool_calls` beside it; in an OpenAI batch file, the request body's parameters of
those names fill these columns (util/features/openai_batch/ BODY_COLUMNS). The tools reach the chat template as
`apply_chat_template(messages, tools=...)`; a template that ignores them (SmolLM2's) leaves them out of the
prompt. What the row's `tool_choice` asks for, as vLLM's server does it:
  - a function (`{"type": "function", "function": {"name": ...}}`) or "required": guided decoding constrains
    the text to that function's `parameters` schema (or to a list of `{"name", "parameters"}` of any tool),
    vLLM's own schema (get_json_schema_from_tools), and the text becomes the calls;
  - "auto" (the default with tools): --tool-call-parser NAME (the names of `vllm serve --tool-call-parser`)
    reads the calls out of the text; without one the row is refused, naming the flag;
  - "none": the tools are shown to the template, and the text is the answer.
The row's `tool_calls` column holds the calls (`{id, type: "function", function: {name, arguments}}`, the
arguments a JSON string), null when it made none; `generated_text` holds the rest of the text ("" when the
calls are all of it; a forced text cut off before it holds a call is kept, and structured output's check says
why); `finish_reason` is "tool_calls" for a named function or "required" that stopped by itself (vLLM's server
says "stop" for a named one), and for "auto" with calls. A forced call's id is derived from the row's id;
a parser's calls keep the parser's ids. Earlier turns' `tool_calls` and `role: "tool"` results
in an OpenAI request's messages go to the template as vLLM gives them: each call's arguments as an object.

A bad `tools` or `tool_choice` fails its row alone, naming what is wrong (`invalid tools: tools[0].function
has no name (a non-empty string)`), as does a row with tools whose prompt format is not the chat template,
or whose job has images.
"""

import dataclasses
import hashlib
import json
import logging

import pyarrow as pa

from util import columns as col
from util.errors import ROW_ERRORS, InputError, RowError, error_text, row_error
from util.parts import Part, RowAsks, flag, only_for_generation
from util.replica.internals import chat_completion_request, tool_call_schema, tool_parser, tool_parser_names
from util.prompt_format import PromptFormatter
# A row's tools, read and checked; tool_request is imported from here by the tests.
from util.features.tool_calls.tool_request import (INVALID_TOOLS, PARALLEL_TOOL_CALLS, TOOL_CHOICE, TOOLS, ToolRequest,
                                                   row_tool_request, tool_request)

TOOL_CALLS = "tool_calls"  # the output column
TOOL_CALL = pa.struct([("id", pa.string()), ("type", pa.string()),
                       ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
TOOL_CALLS_TYPE = pa.list_(TOOL_CALL)
# An OpenAI request's body parameters that this feature takes, each into the row's column of that name.
BODY_COLUMNS = {TOOLS: TOOLS, TOOL_CHOICE: TOOL_CHOICE, PARALLEL_TOOL_CALLS: PARALLEL_TOOL_CALLS}
NO_PARSER, TOOLS_NOT_RENDERED = "tool calls without a parser", "tools not rendered"
ROW_ERRORS[NO_PARSER] = ('tool_choice "auto" needs --tool-call-parser NAME to read the calls out of the text (a name '
                         'of `vllm serve --tool-call-parser`, e.g. hermes); or ask for "required" or a function')
ROW_ERRORS[TOOLS_NOT_RENDERED] = "tools cannot be given to the model: {reason}"

logger = logging.getLogger(__name__)


def template_messages(messages: list) -> list:
    """Messages as vLLM gives them to a chat template (its _postprocess_messages and content parsing): an
    assistant turn's tool call arguments as an object ({} for none or text that is not JSON, as vLLM coerces
    it), an empty tool_calls list dropped, and a null content as ""."""
    shown = []
    for message in messages:
        if not isinstance(message, dict):
            shown.append(message)
            continue
        message = {**message, "content": "" if message.get("content") is None else message["content"]}
        calls = message.get(TOOL_CALLS)
        if message.get("role") == "assistant" and isinstance(calls, list):
            if not calls:
                del message[TOOL_CALLS]
            else:
                message[TOOL_CALLS] = [_call_with_object_arguments(call) for call in calls]
        shown.append(message)
    return shown


def _call_with_object_arguments(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise InputError("an assistant message's tool_calls must each be {\"type\": \"function\", \"function\": {...}}")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = {}
    return {**call, "function": {**function, "arguments": arguments or {}}}


class ToolFormatter:
    """The format stage's formatter in a generation job: the job's own (`base`: the core's, an OpenAI batch's,
    a vision job's) with each row's tools passed to the chat template. Its messages go as vLLM's server gives
    them (template_messages); a row whose tools are bad fails here, before any engine."""

    def __init__(self, base: type = PromptFormatter, **options):
        self.inner, self.tools, self.row_tools = base(**options), None, []
        self.plain_template = self.inner.apply_chat_template
        self.inner.apply_chat_template = self.apply_chat_template
        # The core's loop over rows, or a formatter's own (a vision job's), which a row's tools cannot reach.
        self.per_row = type(self.inner).prompts is PromptFormatter.prompts
        if self.per_row:
            self.inner.prompts = self.prompts

    def apply_chat_template(self, messages: list[dict]) -> str:
        messages = template_messages(messages)
        if not self.tools:
            return self.plain_template(messages)
        return self.inner.templates.apply_chat_template(messages, tools=list(self.tools), tokenize=False,
                                                        add_generation_prompt=True)

    def row_request(self, row: dict) -> tuple[ToolRequest | None, str | None]:
        """A row's ToolRequest, and why its tools cannot go to the model (bad, or not shown), or None."""
        try:
            request = row_tool_request(row)
        except RowError as error:
            return None, str(error)
        return request, request and self.refusal()

    def refusal(self) -> str | None:
        if not self.per_row:
            return row_error(TOOLS_NOT_RENDERED, reason="a job with images formats its rows on its own")
        if self.inner.prompt_format != "chat_template":
            return row_error(TOOLS_NOT_RENDERED, reason=f"they need the model's chat template (the prompt format is "
                                                        f"{self.inner.prompt_format})")
        return None

    def prompts(self, batch: pa.Table, errors: list) -> list[str]:
        """The core's loop (PromptFormatter.prompts), each row's tools set for its template."""
        prompts = [""] * batch.num_rows
        for i, value in enumerate(batch[self.inner.text_column].to_pylist()):
            if errors[i] is None:
                self.tools = self.row_tools[i].tools if self.row_tools[i] else None
                try:
                    prompts[i] = self.inner.prompt(value)
                except RowError as error:
                    errors[i] = str(error)
                except Exception as error:  # a template that refuses these tools: this row only
                    if not self.tools:
                        raise
                    errors[i] = f"cannot format the prompt with its tools: {error_text(error)}"
                finally:
                    self.tools = None
        return prompts

    def __call__(self, batch: pa.Table) -> pa.Table:
        given = [name for name in (TOOLS, TOOL_CHOICE, PARALLEL_TOOL_CALLS) if name in batch.column_names]
        self.row_tools = [None] * batch.num_rows
        if given and batch.num_rows:  # a bad row refused as a bad request line is: the formatter keeps it
            self.row_tools, refusals = zip(*map(self.row_request, batch.select(given).to_pylist()))
            earlier = (batch[col.REQUEST_ERROR].to_pylist() if col.REQUEST_ERROR in batch.column_names
                       else [None] * batch.num_rows)
            errors = [error or refusal for error, refusal in zip(earlier, refusals)]
            batch = col.set_columns(batch, {col.REQUEST_ERROR: pa.array(errors, pa.string())})
        return self.inner(batch)


def call_id(row_id: str, sample: int, call: int) -> str:
    """A call's id, in the shape of vLLM's (chatcmpl-tool-...), derived from the row so that it is the same in
    every run (vLLM's server draws it at random)."""
    key = f"{row_id}:{sample}:{call}".encode("utf-8", "surrogatepass")
    return "chatcmpl-tool-" + hashlib.sha1(key).hexdigest()[:16]


def forced_calls(request: ToolRequest, text: str) -> list[tuple[str, str]] | None:
    """The (name, arguments) calls in a text that guided decoding wrote for a named function (the text is its
    arguments) or for "required" (a list of {"name", "parameters"}), as vLLM's server reads them; None when
    there are none (empty, or not a list of calls: cut off by max_tokens, say)."""
    if request.function:
        return [(request.function, text)] if text.strip() else None
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    return [(c["name"], json.dumps(c.get("parameters"), ensure_ascii=False)) for c in calls] or None


def forced_schema(request: ToolRequest) -> dict:
    """The JSON schema guided decoding holds a named function's or "required" text to: vLLM's own."""
    vllm_request = chat_completion_request()(model="", messages=[{"role": "user", "content": ""}],
                                             tools=list(request.tools), tool_choice=request.openai_choice)
    schema = tool_call_schema()(vllm_request.tool_choice, vllm_request.tools)
    schema = schema or {"type": "object", "properties": {}}  # a function without parameters (vLLM 0.26 says None)
    if request.choice == "required" and not request.parallel:  # vLLM 0.32's, which 0.26 does not make
        schema["maxItems"] = 1
    return schema


# --- the feature: its flag, its check, the plan's part ----------------------------------------------------

@dataclasses.dataclass
class Flags:
    tool_call_parser: str | None = flag("vLLM tool-call parser (hermes, mistral, llama3_json, pythonic, ...): reads "
                                        "the tool calls out of the text of rows whose tool_choice is \"auto\".",
                                        default=None)


def check_parser_name(name) -> str:
    if not isinstance(name, str) or name not in tool_parser_names():
        import vllm

        raise InputError(f"--tool-call-parser: unknown tool-call parser {name!r}; vLLM {vllm.__version__} has "
                         f"{', '.join(tool_parser_names())}")
    return name


def check(cfg) -> None:
    if cfg.tool_call_parser is not None:
        check_parser_name(cfg.tool_call_parser)  # known to this vLLM, before any engine starts
    only_for_generation(cfg, {"--tool-call-parser": cfg.tool_call_parser is not None})


ASKED_BY = RowAsks(columns=frozenset({TOOLS, TOOL_CHOICE, PARALLEL_TOOL_CALLS}))  # a row's own tools


class ToolCalls(Part):
    """Rows that carry tools, or a tool call parser."""
    columns = {TOOL_CALLS: TOOL_CALLS_TYPE}

    def __init__(self, parser: str | None):
        self.parser = parser
        self.fingerprint = {"tool_call_parser": parser} if parser else {}

    def stages(self, plan, stages: list) -> list:
        def with_tools(stage):
            options = stage.map_batches["fn_kwargs"]
            return stage.with_options(fn_kwargs={**options, "formatter": ToolFormatter,
                                                 "base": options.get("formatter", PromptFormatter)})

        return [with_tools(stage) if stage.name == "format" else stage for stage in stages]

    def check(self, request) -> None:
        tools = row_tool_request(request.row)
        if tools is None or tools.choice == "none":
            return
        if tools.choice == "auto" and not self.parser:
            raise RowError(row_error(NO_PARSER))
        request.state[TOOLS] = tools
        if tools.choice != "auto":  # over the row's or the job's own structured output, as vLLM's server does
            try:
                spec = {"json": forced_schema(tools)}
            except Exception as error:  # vLLM's request refuses these tools
                raise RowError(row_error(INVALID_TOOLS, reason=error_text(error))) from None
            request.sampling["structured_outputs"] = request.state["structured_outputs"] = spec

    async def prepare(self, request) -> None:
        spec = request.sampling.get("structured_outputs")
        if TOOLS in request.state and isinstance(spec, dict):  # not made vLLM's already (util/features/structured_output.py)
            from vllm.sampling_params import StructuredOutputsParams

            request.sampling["structured_outputs"] = StructuredOutputsParams(**spec)

    def output(self, request, output, result: dict) -> None:
        tools = request.state.get(TOOLS)
        if tools is None:
            return
        for index, sample in enumerate(result["samples"]):
            if tools.choice == "auto":
                calls, content = self.parsed_calls(request, tools, sample["text"])
                called = bool(calls)
            else:
                found = forced_calls(tools, sample["text"])
                calls = [{"id": call_id(request.row[col.ID], index, i), "type": "function",
                          "function": {"name": name, "arguments": arguments}}
                         for i, (name, arguments) in enumerate(found or [])]
                content = "" if found else sample["text"]  # a text that holds no calls is kept, to see why
                called = bool(found) and sample["finish_reason"] == "stop"  # named or "required", ended by itself
            if not tools.parallel:
                calls = calls[:1]
            sample[TOOL_CALLS], sample["text"] = calls or None, content
            if called:
                sample["finish_reason"] = "tool_calls"

    def parsed_calls(self, request, tools: ToolRequest, text: str) -> tuple[list[dict], str]:
        """The calls the job's parser reads out of a text, and the rest of the text."""
        vllm_request = chat_completion_request()(model="", messages=[{"role": "user", "content": ""}],
                                                 tools=list(tools.tools), tool_choice="auto")
        try:
            parser = tool_parser(self.parser)(request.replica.tokenizer, vllm_request.tools)
        except Exception as error:  # a tokenizer without the parser's tokens
            raise RowError(f"tool-call parser {self.parser} cannot read this model's tokenizer "
                           f"({type(error).__name__}: {error_text(error)})") from None
        try:
            found = parser.extract_tool_calls(text, vllm_request)
        except Exception as error:  # a parser that chokes on text it does not expect: no calls it can read
            logger.warning("tool-call parser %s failed on row %s (%s: %s); the row's text is kept whole, with no "
                           "calls", self.parser, request.row.get("id"), type(error).__name__, error_text(error))
            return [], text
        if not found.tools_called:
            return [], text
        calls = [{"id": call.id, "type": "function",
                  "function": {"name": call.function.name, "arguments": call.function.arguments}}
                 for call in found.tool_calls]
        return calls, found.content or ""


def part(plan) -> ToolCalls | None:
    asked = plan.cfg.tool_call_parser is not None or plan.row_asks.ask(ASKED_BY)
    return ToolCalls(plan.cfg.tool_call_parser) if plan.task == "generate" and asked else None
