"""What one finished vLLM request becomes in an output row: its samples, log-probabilities and timings.

    from util.request_output import row_result
    result = row_result(final, sampling, decode=lambda c: c.text, token_text=lambda i: tokenizer.decode([i]))
    result["generated_text"], result["completions"], result["logprobs"], result["time_in_queue_s"]

`final` is vLLM's RequestOutput (FINAL_ONLY: every sample whole). One row per request, whatever `n`:

- `generated_text`, `finish_reason`, `reasoning_content`, `structured_output_error`, `logprobs`: the
  first sample's, so a reader that knows nothing of `n` keeps working.
- `num_generated_tokens`: every sample's tokens together (what the engine generated, as OpenAI's
  usage.completion_tokens counts them).
- `completions`: every sample, each with its own text, reasoning, finish reason, token count,
  log-probabilities and structured-output check, when the row asked for n > 1; else null.
- `logprobs`: per generated token, {token, token_id, logprob, top_logprobs: the K likeliest, by rank},
  when the row asked for them (`logprobs: K`, K = 0 for the chosen token's alone); `prompt_logprobs`
  the same per prompt token (`prompt_logprobs: K`), the first token's logprob null (nothing precedes it).
  Log-probabilities are the model's before temperature and top-p (vLLM's default logprobs_mode,
  raw_logprobs) but after guided decoding's mask: a guided row's are over the tokens its grammar allows,
  and a token it forbids has -inf, written as -9999.0, as vLLM's OpenAI server writes it, so that every
  output stays valid JSON.
- `time_in_queue_s`, `time_to_first_token_s`, `generation_time_s`: from the request's metrics where
  the running vLLM gives them (vLLM v1: RequestStateStats; older: RequestMetrics), else null. Queue:
  arrival in the engine's scheduler to first scheduled; first token: since the request reached the
  engine; generation: first token to last.

Works on the metrics and logprobs objects of vLLM 0.26 to 0.32: a position's logprobs is a mapping of
token id to an object with `logprob` and `rank`, whether the list is vLLM's FlatLogprobs or a plain list.
"""

import math


from util.columns import TIMINGS
from util.structured_output import output_error

LOGPROB_FLOOR = -9999.0  # what vLLM's OpenAI server writes for -inf


def _finite(logprob):
    if logprob is None:
        return None
    return max(float(logprob), LOGPROB_FLOOR) if not math.isnan(logprob) else LOGPROB_FLOOR


def token_logprobs(token_ids, positions, top_k: int, token_text) -> list[dict] | None:
    """vLLM's per-position logprobs ({token_id: Logprob}, aligned with `token_ids`) as rows of
    TOKEN_LOGPROBS; None when the request asked for none. `token_text(id)` spells a token."""
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


def _seconds(later, earlier):
    if not later or not earlier or later < earlier:  # 0.0: not recorded (stats off, or not reached)
        return None
    return float(later - earlier)


def timings(metrics) -> dict:
    """Time in queue, to first token and generating, in seconds; each None where vLLM gives no number."""
    if metrics is None:  # stats disabled (disable_log_stats), or a version without per-request metrics
        return dict.fromkeys(TIMINGS)
    if hasattr(metrics, "scheduled_ts"):  # vLLM v1's RequestStateStats (engine-core timestamps)
        ttft = getattr(metrics, "first_token_latency", None)
        return {"time_in_queue_s": _seconds(metrics.scheduled_ts, getattr(metrics, "queued_ts", None)),
                "time_to_first_token_s": float(ttft) if ttft else None,
                "generation_time_s": _seconds(getattr(metrics, "last_token_ts", None),
                                              getattr(metrics, "first_token_ts", None))}
    # The older RequestMetrics: wall-clock times of arrival, first token and last token.
    queue = getattr(metrics, "time_in_queue", None)
    return {"time_in_queue_s": float(queue) if queue is not None else None,
            "time_to_first_token_s": _seconds(getattr(metrics, "first_token_time", None),
                                              getattr(metrics, "arrival_time", None)),
            "generation_time_s": _seconds(getattr(metrics, "last_token_time", None),
                                          getattr(metrics, "first_token_time", None))}


def row_result(final, sampling: dict, decode, token_text, reasoning=None) -> dict:
    """One finished request as an output row's values (see the module's docstring). `decode(completion)`
    gives a sample's whole text; `reasoning(text)`, when given, splits it into (thinking, answer)."""
    spec = sampling.get("structured_outputs")
    top_k, prompt_k = sampling.get("logprobs"), sampling.get("prompt_logprobs")
    samples = []
    for completion in sorted(final.outputs, key=lambda c: c.index):
        text = decode(completion)
        thinking, answer = reasoning(text) if reasoning else (None, text)
        samples.append({
            "text": answer, "reasoning_content": thinking, "finish_reason": completion.finish_reason,
            "num_generated_tokens": len(completion.token_ids),
            "logprobs": None if top_k is None else token_logprobs(completion.token_ids, completion.logprobs,
                                                                  top_k, token_text),
            # The whole text, thinking included: that is what guided decoding constrained.
            "structured_output_error": output_error(spec, text, completion.finish_reason)})
    first = samples[0]
    return {"generated_text": first["text"], "reasoning_content": first["reasoning_content"],
            "finish_reason": first["finish_reason"], "logprobs": first["logprobs"],
            "structured_output_error": first["structured_output_error"],
            "num_generated_tokens": sum(s["num_generated_tokens"] for s in samples),
            "completions": samples if sampling.get("n", 1) > 1 else None,
            "prompt_logprobs": None if prompt_k is None else token_logprobs(
                final.prompt_token_ids, final.prompt_logprobs, prompt_k, token_text),
            **timings(getattr(final, "metrics", None))}
