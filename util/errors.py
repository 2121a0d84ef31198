"""What goes wrong, and what it means for the run.

    raise InputError("prompts.jsonl:7: malformed JSON (Expecting value at column 1)")   # the run: exit 2
    raise RowError(row_error(EMPTY_PROMPT, column="text"))   # one row fails: "empty prompt in column 'text'"

Bad input (InputError, this project's own: never a library's ValueError) refuses the run before any GPU work: `error: <message>`
on stderr, exit 2. A row the engine cannot take is an error row, its message built from ROW_ERRORS so that
--preflight counts rows by kind (a feature adds its kinds). Anything else is a crash: exit 1.
"""

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2

EMPTY_PROMPT, TOO_LONG, INVALID_SAMPLING = "empty", "over max length", "invalid sampling_params"
ROW_ERRORS = {  # kind -> message template
    EMPTY_PROMPT: "empty prompt in column '{column}'",
    TOO_LONG: "prompt has {tokens} tokens; the model accepts at most {most} (max_model_len {max_model_len})",
    INVALID_SAMPLING: "invalid sampling_params: {reason}",
}


class InputError(ValueError):
    """Input that cannot be run as asked. The message names the file and line, the column or the flag."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # Ray Data appends its retry advice to `args`: the message stays ours
        return self.message

    def __reduce__(self):  # pickled by Ray, from a worker to the driver, with the message it was raised with
        return type(self), (self.message,)


class RowError(InputError):
    """Why one row cannot go to the engine: that row is written as an error row, and the run goes on."""


class RunStopped(Exception):
    """Raised in a replica's first batch when the run was stopped before any row ran (its input was refused,
    or no row is left to run): Ray Data then ends the run and its replicas (util/scan.py ScanBeside)."""


def row_error(kind: str, **details) -> str:
    return ROW_ERRORS[kind].format(**details)


def error_text(error: BaseException) -> str:
    """What went wrong, never a bare class name: the message; for an exception raised without one, its cause's."""
    cause, seen = error, set()
    while cause is not None and id(cause) not in seen:
        if str(cause).strip():
            return str(cause) if cause is error else f"{type(cause).__name__}: {cause}"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return f"{type(error).__name__}, with no message"


def original(error: BaseException) -> BaseException:
    """The exception a Ray task or actor raised, behind Ray's wrappers, which keep it as `cause`: Ray Data
    raises the task's own exception (util/reading.py asks it to), not its UserCodeException."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return error


def refusal_reason(error: BaseException) -> Exception | None:
    """Why a run is refused (exit 2): bad input or a bad flag value (InputError, raised by this project only),
    a gated model without a token (PermissionError); else None: any other exception, a ValueError from a
    library or a bug included, is a crash, with its traceback (exit 1)."""
    error = original(error)
    return error if isinstance(error, (InputError, PermissionError)) else None


def failure_reason(error: BaseException) -> str:
    """Why a run failed, for the manifest: the original exception's type and message."""
    error = original(error)
    text = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
