"""A reasoning model's thinking kept apart from its answer, by vLLM's own reasoning parsers, offline (a
feature, util/parts.py).

    python main.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --reasoning-parser deepseek_r1

    from util.features.reasoning import check_parser_name, ReasoningSplitter
    check_parser_name("deepseek_r1")              # ValueError naming the parsers this vLLM has, if unknown
    split = ReasoningSplitter("deepseek_r1", tokenizer)
    split("<think>add them</think>4")             # ("add them", "4")
    split("<think>add th")                        # ("add th", ""): cut by max_tokens inside the thinking

`--reasoning-parser NAME` (or a row's `"reasoning_parser": NAME` in its sampling_params) names one of
vLLM's parsers (`deepseek_r1`, `qwen3`, `granite`, ...: the same names as `vllm serve --reasoning-parser`).
The predictor parses each sample's whole text after generation, as vLLM's OpenAI server does for a
non-streaming request: the thinking goes to `reasoning_content`, the rest to `generated_text` ("" when
there is none). What a parser does with text that lacks its tags is the parser's: deepseek_r1 takes
text without `</think>` for thinking, as R1 may omit the opening tag.

The parser only reads the text: it does not change what the engine generates. Guided decoding (util/
structured_output.py) constrains the whole text, thinking included, and its check reads the whole text.

vLLM renamed the method (extract_reasoning_content, then extract_reasoning); both are looked for.
Parsers that find their tags by token id (deepseek_r1's BaseThinkingReasoningParser) refuse a tokenizer
without them as single tokens: the rows that ask for such a parser fail, each saying why.
"""

import dataclasses

import pyarrow as pa

from util.errors import InputError, RowError
from util.parts import Part, RowAsks, flag, only_for_generation
from util.replica.internals import chat_completion_request, reasoning_parser_names

REASONING_CONTENT = "reasoning_content"  # a reasoning parser's thinking; generated_text holds the rest


def check_parser_name(name, where: str = "--reasoning-parser") -> str:
    """`name` if vLLM has a reasoning parser of that name; else ValueError naming `where` and the known ones."""
    if not isinstance(name, str) or name not in reasoning_parser_names():
        import vllm

        raise InputError(f"{where}: unknown reasoning parser {name!r}; vLLM {vllm.__version__} has "
                         f"{', '.join(reasoning_parser_names())}")
    return name


def _extractor(parser):
    """The parser's whole-text method under either name: the one its class implements, not the base
    class's abstract stub (a version in between may declare both)."""
    from vllm.reasoning import ReasoningParser

    names = ("extract_reasoning", "extract_reasoning_content")
    for name in names:
        method = getattr(type(parser), name, None)
        if method is not None and method is not getattr(ReasoningParser, name, None):
            return getattr(parser, name)
    return getattr(parser, next(name for name in names if hasattr(parser, name)))


class ReasoningSplitter:
    """Splits a sample's text into (thinking or None, answer) with one of vLLM's reasoning parsers."""

    def __init__(self, name: str, tokenizer):
        from vllm.reasoning import ReasoningParserManager

        self.name = check_parser_name(name)
        self.parser = ReasoningParserManager.get_reasoning_parser(name)(tokenizer)
        self.extract = _extractor(self.parser)
        try:  # parsers that look at the request (most ignore it) get an empty chat request
            self.request = chat_completion_request()(model="", messages=[{"role": "user", "content": ""}])
        except Exception:
            self.request = None

    def __call__(self, text: str) -> tuple[str | None, str]:
        thinking, answer = self.extract(text, self.request)
        return thinking, answer or ""


# --- the feature: its flag, its check, the plan's part ----------------------------------------------------

@dataclasses.dataclass
class Flags:
    reasoning_parser: str | None = flag("vLLM reasoning parser (deepseek_r1, qwen3, ...): a reasoning model's thinking "
                                        "goes to `reasoning_content`, the rest to `generated_text`.", default=None)


def check(cfg) -> None:
    if cfg.reasoning_parser is not None:
        check_parser_name(cfg.reasoning_parser)  # known to this vLLM, before any engine starts
    only_for_generation(cfg, {"--reasoning-parser": cfg.reasoning_parser is not None})


ASKED_BY = RowAsks(sampling=frozenset({"reasoning_parser"}))  # a row's own parser


class Reasoning(Part):
    """The job's reasoning parser, or a row's own (its sampling_params)."""
    columns = {REASONING_CONTENT: pa.string()}

    def __init__(self, parser: str | None):
        self.sampling = {"reasoning_parser": parser} if parser else {}
        self.splitters = {}  # in the replica: one per parser name, built on its first row

    def check(self, request) -> None:
        name = request.sampling.pop("reasoning_parser", None)  # the predictor's key, not SamplingParams'
        if name is not None:
            request.state["reasoning_parser"] = check_parser_name(name, "reasoning_parser")

    async def prepare(self, request) -> None:
        name = request.state.get("reasoning_parser")
        if name is not None and name not in self.splitters:  # a tokenizer without its tags fails its rows
            try:
                self.splitters[name] = ReasoningSplitter(name, request.replica.tokenizer)
            except Exception as error:
                raise RowError(f"reasoning parser {name} cannot read this model's tokenizer ({type(error).__name__}: "
                               f"{error})") from None

    def output(self, request, output, result: dict) -> None:
        name = request.state.get("reasoning_parser")
        for sample in result["samples"]:
            sample[REASONING_CONTENT], sample["text"] = self.splitters[name](sample["text"]) if name else (None, sample["text"])


def part(plan) -> Reasoning | None:
    asked = plan.cfg.reasoning_parser is not None or plan.row_asks.ask(ASKED_BY)
    return Reasoning(plan.cfg.reasoning_parser) if plan.task == "generate" and asked else None
