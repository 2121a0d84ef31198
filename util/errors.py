"""What goes wrong, and what each kind of failure means for the run.

    from util.errors import InputError, exit_code, refusal_reason, row_error, row_error_kind
    raise InputError("prompts.jsonl:7: malformed JSON (Expecting value at column 1)")
    row_error(EMPTY_PROMPT, column="text")      # "empty prompt in column 'text'": one row fails, not the job
    row_error_kind("prompt has 9000 tokens; ...")  # "over max length"

Three kinds of failure, three outcomes:
  - bad input (InputError, or a ValueError from a flag): the run is refused before any GPU work, with
    `error: <message>` on stderr and exit code 2 (EXIT_REFUSED). Nothing already written is touched;
  - a row the engine cannot take (empty, too long, invalid sampling_params, a bad image, an unknown LoRA
    adapter): an error row, written under <output>/errors/ with `error` saying why. Row messages are built
    from ROW_ERRORS here, so that --preflight counts them by kind without matching another module's wording;
  - anything else is a crash: the traceback and exit code 1 (EXIT_FAILED), as for a run with more failed
    rows than --max-error-fraction allows.
"""

import re

import ray

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2

# Why a row cannot go to the engine: kind -> message template. The kind is how --preflight counts them.
EMPTY_PROMPT, TOO_LONG, INVALID_SAMPLING = "empty", "over max length", "invalid sampling_params"
BAD_IMAGE, TOO_MANY_IMAGES = "bad image", "too many images"  # util/images.py
UNKNOWN_ADAPTER, ADAPTER_FAILED = "unknown adapter", "adapter failed"  # util/lora.py
ROW_ERRORS = {
    EMPTY_PROMPT: "empty prompt in column '{column}'",
    TOO_LONG: "prompt has {tokens} tokens; the model accepts at most {most} (max_model_len {max_model_len})",
    INVALID_SAMPLING: "invalid sampling_params: {reason}",
    BAD_IMAGE: "image {number} of the row ({source}): {reason}",
    TOO_MANY_IMAGES: "too many images: {count}; at most {most} per row (--max-images-per-row)",
    UNKNOWN_ADAPTER: "unknown adapter '{name}': {reason}",
    ADAPTER_FAILED: "adapter '{name}' failed to load: {reason}",
}


class InputError(ValueError):
    """Input that cannot be read as asked. The message names the file and line, or the column."""


def row_error(kind: str, **details) -> str:
    """The message of a row that fails for `kind` (a key of ROW_ERRORS)."""
    return ROW_ERRORS[kind].format(**details)


def row_error_kind(message: str) -> str:
    """The kind of a row's error message (a key of ROW_ERRORS), or the message itself if it is none."""
    return next((kind for kind, template in ROW_ERRORS.items() if message.startswith(template.split("{")[0])),
                message)


def unwrap_input_error(exc: BaseException) -> InputError | None:
    """The InputError behind `exc`, which may be Ray's wrapper of an error in a worker; None if none."""
    seen, todo = set(), [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, InputError) and not isinstance(error, ray.exceptions.RayError):
            # Ray Data appends its retry advice to a read task's exception: our messages are one line.
            return error if "\n" not in str(error) else InputError(str(error).split("\n")[0])
        todo += [getattr(error, "cause", None), error.__cause__, error.__context__]
    # Ray Data re-raises a worker's exception as a UserCodeException, and the pickled copy that reaches
    # the driver loses its __cause__: only the worker's traceback text still holds the message.
    text = str(exc)
    start = text.rfind("InputError: ")
    if start < 0:
        return None
    return InputError(text[start + len("InputError: "):].split("\n\n")[0].strip())


def refusal_reason(exc: BaseException) -> Exception | None:
    """Why a run is refused (exit code 2): bad input, a bad flag value, or a gated model without a
    token. None for anything else, which is a crash."""
    return unwrap_input_error(exc) or (exc if isinstance(exc, (ValueError, PermissionError)) else None)


def failure_reason(error: BaseException) -> str:
    """The reason a run failed, for the manifest. Ray hands a worker's exception over as traceback text,
    in which the first `SomeError: message` line is the original exception: that line, not the text."""
    text = str(error).strip()
    if isinstance(error, ray.exceptions.RayError):
        root = re.search(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*: .+)$", re.sub(r"\x1b\[[0-9;]*m", "", text), re.MULTILINE)
        if root:
            return root.group(1)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
