"""A reasoning model's thinking kept apart from its answer, by vLLM's own reasoning parsers, offline.

    from util.reasoning import check_parser_name, ReasoningSplitter
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
without them as single tokens: the replica says so before its engine starts.
"""

import functools


@functools.cache
def parser_names() -> tuple[str, ...]:
    """The reasoning parsers the installed vLLM registers (eagerly or lazily)."""
    from vllm.reasoning import ReasoningParserManager

    listed = getattr(ReasoningParserManager, "list_registered", None)
    if listed is not None:
        return tuple(sorted(listed()))
    return tuple(sorted(set(ReasoningParserManager.reasoning_parsers)
                        | set(getattr(ReasoningParserManager, "lazy_parsers", {}))))


def check_parser_name(name, where: str = "--reasoning-parser") -> str:
    """`name` if vLLM has a reasoning parser of that name; else ValueError naming `where` and the known ones."""
    if not isinstance(name, str) or name not in parser_names():
        import vllm

        raise ValueError(f"{where}: unknown reasoning parser {name!r}; vLLM {vllm.__version__} has "
                         f"{', '.join(parser_names())}")
    return name


def _chat_request():
    """An empty chat request, for parsers that look at the request (most ignore it); None if this vLLM's
    request type cannot be built so."""
    for module in ("vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.protocol"):
        try:
            request_type = getattr(__import__(module, fromlist=["ChatCompletionRequest"]), "ChatCompletionRequest")
            return request_type(model="", messages=[{"role": "user", "content": ""}])
        except Exception:  # moved or changed in this vLLM: try the next place
            continue
    return None


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
        self.request = _chat_request()

    def __call__(self, text: str) -> tuple[str | None, str]:
        thinking, answer = self.extract(text, self.request)
        return thinking, answer or ""
