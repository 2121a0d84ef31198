"""A chat request's body parameters (util/features/openai_batch/): which this runner takes as they come, which
only at values that ask for nothing it lacks (unsupported_value), and how each becomes vLLM's SamplingParams,
converted as vLLM's own server converts it (body_sampling)."""

import json
import os

from util.errors import InputError

# Body parameters and the SamplingParams field each one sets (response_format: util/features/structured_output.py),
# each converted as body_sampling says.
SAMPLING_PARAMETERS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
                       "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                       "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                       "logit_bias": "logit_bias", "response_format": "response_format", "n": "n"}
# seed's range in vLLM's ChatCompletionRequest (_INT64_MIN, _INT64_MAX): a 64-bit signed integer.
SEED_RANGE = (-2**63, 2**63 - 1)
# Most stop strings one request may have: OpenAI's limit, and vLLM's ChatCompletionRequest's (StopParam,
# vLLM 0.32), which reads the same environment variable.
MAX_STOP_STRINGS = int(os.environ.get("VLLM_MAX_STOP_STRINGS", "4"))
# OpenAI's and vLLM's bounds of a logit bias (SamplingParams.from_optional clamps to them).
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# OpenAI's logprobs (a flag) and top_logprobs (how many alternatives) become vLLM's one `logprobs`: K.
LOGPROB_PARAMETERS = ("logprobs", "top_logprobs")
# Parameters that change nothing in the answer: who asked, caching and billing hints, the model (the
# job's model answers every request; with --lora, the model picks the row's adapter, util/features/lora.py), and
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
        raise InputError(f"logprobs={json.dumps(logprobs)} must be true or false")
    if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                     or not 0 <= top_logprobs <= 20):
        raise InputError(f"top_logprobs={json.dumps(top_logprobs)} must be an integer from 0 to 20")
    if not logprobs:
        if top_logprobs:  # as OpenAI's API refuses it
            raise InputError(f"top_logprobs={top_logprobs} needs logprobs=true")
        return {}
    return {"logprobs": top_logprobs or 0}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}={_json(value)} must be an integer")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name}={_json(value)} must be a number")
    return value


def _seed(name: str, value) -> int:
    if not SEED_RANGE[0] <= _integer(name, value) <= SEED_RANGE[1]:
        raise InputError(f"{name}={value} must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    return value


def _stop(name: str, value) -> list[str]:
    """A string or a list of strings, as vLLM's ChatCompletionRequest takes it; a list either way, as
    SamplingParams makes it."""
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InputError(f"{name}={_json(value)} must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise InputError(f"{name} has {len(stop)} strings; at most {MAX_STOP_STRINGS} (VLLM_MAX_STOP_STRINGS)")
    return stop


def _logit_bias(name: str, value) -> dict[str, float]:
    """Token ids (JSON object keys: strings) and their biases, as vLLM's SamplingParams.from_optional converts
    them (vllm/sampling_params.py, 0.26 and 0.32 alike): each key through int(), each bias clamped to
    [-100, 100]; a key int() refuses is refused with vLLM's message. The keys stay strings here, since JSON
    has no other (OpenAIBatch.check makes them ints in the replica); one out of the vocabulary is vLLM's to
    refuse, in the replica, with its message."""
    if not isinstance(value, dict):
        raise InputError(f"{name}={_json(value)} must be an object of token ids (as strings) and biases")
    bad_keys = []
    for token in value:
        try:
            int(token)
        except ValueError:
            bad_keys.append(token)
    if bad_keys:
        raise InputError(f"{name} contains key(s) that cannot be converted to integer token IDs: {bad_keys!r}")
    low, high = LOGIT_BIAS_RANGE
    return {str(int(token)): float(min(high, max(low, _number(f"{name}[{_json(token)}]", bias))))
            for token, bias in value.items()}


def _positive_integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}={_json(value)} must be a positive integer")
    return value


# How each body parameter's value becomes its SamplingParams field's: the JSON type vLLM's ChatCompletionRequest
# declares for it (strictly: a number is not given as a string), converted where vLLM's server converts it. The
# values' ranges are SamplingParams' to check, in the replica, whose message becomes the row's error.
CONVERSIONS = {"max_tokens": _integer, "max_completion_tokens": _integer, "temperature": _number, "top_p": _number,
               "presence_penalty": _number, "frequency_penalty": _number, "seed": _seed, "stop": _stop,
               "logit_bias": _logit_bias, "n": _positive_integer}


def body_sampling(body: dict) -> dict:
    """A chat request's body parameters as SamplingParams' keyword arguments, as vLLM's own server makes
    them (ChatCompletionRequest.to_sampling_params in vllm/entrypoints/openai/chat_completion/protocol.py):
    max_completion_tokens over max_tokens, a stop string as a list, logit_bias by token id, `logprobs` with
    `top_logprobs` as vLLM's one `logprobs`. Only what the body gives (null is not given), so that the job's
    own settings hold for the rest. ValueError naming the parameter and its value, for a wrong one."""
    given = {name: value for name, value in body.items() if name in SAMPLING_PARAMETERS and value is not None}
    if "max_completion_tokens" in given:  # vLLM's serving code reads it first; max_tokens is deprecated
        given.pop("max_tokens", None)
    sampling = {SAMPLING_PARAMETERS[name]: CONVERSIONS[name](name, value) if name in CONVERSIONS else value
                for name, value in given.items()}
    if sampling.get("n") == 1:  # the default: left out, as any parameter not given
        del sampling["n"]
    sampling.update(logprob_sampling(body.get("logprobs"), body.get("top_logprobs")))
    return sampling
