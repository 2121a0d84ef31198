"""n samples per row, and the log-probabilities of the answer and of the prompt (a feature, util/parts.py).

    python main.py --input-path prompts.jsonl --n 4 --temperature 0.8 --logprobs 5   # 4 samples a row, top-5 logprobs
    python main.py --input-path texts.jsonl --prompt-format plain --prompt-logprobs 1 --max-tokens 1  # score texts

One output row per input row, whatever `n` (a row's sampling_params may set its own n, logprobs,
prompt_logprobs):
- `generated_text`, `finish_reason` and the other per-sample columns are the first sample's, so a reader
  that knows nothing of `n` keeps working; `num_generated_tokens` counts every sample's tokens (as OpenAI's
  usage.completion_tokens does).
- `completions`: every sample, each with its text, reasoning, finish reason, token count, log-probabilities,
  structured-output check and tool calls, when the row asked for n > 1; else null.
- `logprobs`: per generated token, {token, token_id, logprob, top_logprobs: the K likeliest, by rank}, when
  the row asked for them (`logprobs: K`, K = 0 for the chosen token's alone); `prompt_logprobs` the same per
  prompt token (`prompt_logprobs: K`), the first token's logprob null (nothing precedes it).
  Log-probabilities are the model's before temperature and top-p (vLLM's default logprobs_mode,
  raw_logprobs) but after guided decoding's mask: a token it forbids has -inf, written as -9999.0, as vLLM's
  OpenAI server writes it, so that every output stays valid JSON.

Works on vLLM 0.26 to 0.32: a position's logprobs is a mapping of token id to an object with `logprob` and
`rank`, whether the list is vLLM's FlatLogprobs or a plain list.
"""

import dataclasses
import math

import pyarrow as pa

from util.parts import Part, RowAsks, flag, only_for_generation
from util.errors import InputError

COMPLETIONS, LOGPROBS, PROMPT_LOGPROBS = "completions", "logprobs", "prompt_logprobs"
TOP_LOGPROB = pa.struct([("token", pa.string()), ("token_id", pa.int64()), ("logprob", pa.float64())])
TOKEN_LOGPROBS = pa.list_(pa.struct([*TOP_LOGPROB, pa.field("top_logprobs", pa.list_(TOP_LOGPROB))]))
# A sample: its own columns, and those other features give each sample (reasoning, structured output).
# tool_calls: util/features/tool_calls/'s TOOL_CALLS_TYPE, spelled here so that neither feature needs the other.
TOOL_CALLS = pa.list_(pa.struct([("id", pa.string()), ("type", pa.string()),
                                 ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))]))
COMPLETION = pa.struct([("text", pa.string()), ("reasoning_content", pa.string()),
                        ("finish_reason", pa.string()), ("num_generated_tokens", pa.int64()),
                        ("logprobs", TOKEN_LOGPROBS), ("structured_output_error", pa.string()),
                        ("tool_calls", TOOL_CALLS)])
COMPLETIONS_TYPE = pa.list_(COMPLETION)
LOGPROB_FLOOR = -9999.0  # what vLLM's OpenAI server writes for -inf


@dataclasses.dataclass
class Flags:
    n: int = flag("Samples per row, all in the `completions` column (`generated_text` is the first); one output row "
                  "per input row still. Needs --temperature > 0.", default=1)
    logprobs: int | None = flag("Log-probabilities of the generated tokens, in the `logprobs` column: per token its "
                                "logprob and the K likeliest tokens (0: the chosen token's only).", default=None)
    prompt_logprobs: int | None = flag("Log-probabilities of the prompt's tokens, in `prompt_logprobs`, with the K "
                                       "likeliest at each position: to score a given text.", default=None)


def check(cfg) -> None:
    if not cfg.n >= 1:
        raise InputError(f"--n must be >= 1, got {cfg.n}")
    if cfg.n > 1 and cfg.temperature == 0:
        raise InputError(f"--n {cfg.n} needs --temperature > 0: greedy sampling gives one answer")
    most = cfg.engine_arg.get("max_logprobs", 20)  # vLLM refuses more (an engine argument; -1: no limit)
    for name, k in (("--logprobs", cfg.logprobs), ("--prompt-logprobs", cfg.prompt_logprobs)):
        if k is not None and not k >= 0:
            raise InputError(f"{name} must be >= 0, got {k}")
        if k is not None and most != -1 and k > most:
            raise InputError(f"{name} must be <= {most} (the engine's max_logprobs; raise it with "
                             f"--engine-arg max_logprobs=N), got {k}")
    only_for_generation(cfg, {"--n": cfg.n != 1, "--logprobs": cfg.logprobs is not None,
                              "--prompt-logprobs": cfg.prompt_logprobs is not None})


def _finite(logprob):
    if logprob is None:
        return None
    return max(float(logprob), LOGPROB_FLOOR) if not math.isnan(logprob) else LOGPROB_FLOOR


def token_logprobs(token_ids, positions, top_k: int, token_text) -> list[dict] | None:
    """vLLM's per-position logprobs ({token_id: Logprob}, aligned with `token_ids`) as rows of TOKEN_LOGPROBS;
    None when the request asked for none. `token_text(id)` spells a token."""
    if positions is None:
        return None
    tokens = []
    for token_id, position in zip(token_ids, positions):
        chosen = position.get(token_id) if position else None
        # The dict holds the chosen token (with its rank) and the top K; the chosen one may be among them.
        ranked = sorted((lp.rank, -lp.logprob, tid) for tid, lp in (position or {}).items()
                        if lp.rank is not None and lp.rank <= top_k)
        tokens.append({"token": token_text(token_id), "token_id": token_id,
                       "logprob": _finite(chosen.logprob) if chosen else None,
                       "top_logprobs": [{"token": token_text(tid), "token_id": tid, "logprob": _finite(-neg)}
                                        for _, neg, tid in ranked]})
    return tokens


ASKED_BY = RowAsks(sampling=frozenset({"n", "logprobs", "prompt_logprobs"}))  # a row's sampling_params keys


class Samples(Part):
    """Samples or log-probabilities: the flags', or a row's sampling_params'."""
    columns = {COMPLETIONS: COMPLETIONS_TYPE, LOGPROBS: TOKEN_LOGPROBS, PROMPT_LOGPROBS: TOKEN_LOGPROBS}

    def __init__(self, sampling: dict):
        self.sampling = sampling
        self.spelled = {}  # in the replica: token id -> its text, as vLLM's logprobs spell it (decoded alone)

    def check(self, request) -> None:
        n = request.sampling.get("n", 1)
        if isinstance(n, int) and n > 1 and request.sampling.get("temperature", 1.0) == 0:
            raise InputError(f"n={n} needs temperature > 0: greedy sampling gives one answer")

    def spell(self, tokenizer, token_id: int) -> str:
        if token_id not in self.spelled:
            self.spelled[token_id] = tokenizer.decode([token_id])
        return self.spelled[token_id]

    def output(self, request, output, result: dict) -> None:
        sampling = request.sampling
        spell = lambda token_id: self.spell(request.replica.tokenizer, token_id)
        for sample, completion in zip(result["samples"], output.outputs):
            sample[LOGPROBS] = None if sampling.get("logprobs") is None else token_logprobs(
                completion.token_ids, completion.logprobs, sampling["logprobs"], spell)
        result[COMPLETIONS] = list(result["samples"]) if sampling.get("n", 1) > 1 else None
        result[PROMPT_LOGPROBS] = None if sampling.get("prompt_logprobs") is None else token_logprobs(
            output.prompt_token_ids, output.prompt_logprobs, sampling["prompt_logprobs"], spell)


def part(plan) -> Samples | None:
    """Only what was asked for goes into the job's sampling, so that an output made before these flags
    existed still resumes."""
    if plan.task != "generate":
        return None
    cfg = plan.cfg
    asked = {"n": cfg.n if cfg.n != 1 else None, "logprobs": cfg.logprobs, "prompt_logprobs": cfg.prompt_logprobs}
    asked = {k: v for k, v in asked.items() if v is not None}
    return Samples(asked) if asked or plan.row_asks.ask(ASKED_BY) else None
