"""Rows cut by max_tokens run once more, with room to finish, instead of being written cut (a feature,
util/parts.py).

    python main.py --input-path prompts.jsonl --json-schema schema.json --max-tokens 256 --repair structured
    python main.py --input-path prompts.jsonl --max-tokens 256 --repair all

A row whose answer ends with finish_reason `length` is run again, once, by the replica that ran it, right
after the cut answer, with twice its max_tokens (the job's, or its own), up to what max_model_len leaves
after its prompt. The row is written once, with the final answer: its text, finish_reason, token count and
structured_output_error are the retry's. Which rows:
  - `--repair structured`: rows with a structured-output spec (--json-schema, --regex, --choice, or the
    row's own): a JSON object cut in the middle is no answer at all;
  - `--repair all`: any row.
A row with n > 1 samples is cut when any of its samples is. A row whose max_tokens already reaches
max_model_len has no room to grow: it is not run again, and stays cut.

Columns, with --repair only: `attempts` (1, or 2 for a row run again) and `first_finish_reason` (the first
answer's; `length` when any of its samples was cut). The run report's rows line counts the rows it
repaired (run again and no longer cut) and those still cut (cut after the retry, or with no room for one):
`rows  98 ok, 2 error, 5 repaired, 1 still cut`. `num_generated_tokens` and the report's output tokens
count the answer written, not the cut one before it. --preflight counts each such row's retry in its
output-token bound (RETRY_MAX_TOKENS). The setting is in the fingerprint: a resume under another is refused.

Each attempt is its own `EngineSupervisor.run` (util/predictor.py run_row): timed on its own for the stall
bound's pace, and an engine that dies during the retry runs the retry again, not the first attempt. The
replica's stall bound grows to the retry's max_tokens, so a long retry is not taken for a hung engine.
"""

import dataclasses

import pyarrow as pa

from util import columns as col
from util.parts import Part, flag, only_for_generation
from util.errors import InputError

MODES = ("structured", "all")
ATTEMPTS, FIRST_FINISH_REASON = "attempts", "first_finish_reason"
REPAIRED, STILL_CUT = "repaired", "still_cut"  # the run report's counts (util/report.py: the rows line)
# In request.state of a row this setting repairs: the retry's max_tokens, None where there is no room for
# more. --preflight reads it (util/features/preflight.py).
RETRY_MAX_TOKENS = "retry_max_tokens"


@dataclasses.dataclass
class Flags:
    repair: str | None = flag("Run a row cut by max_tokens (finish_reason length) once more, with twice its max_tokens "
                              "up to max_model_len: `structured` for rows with a structured-output spec, `all` for any "
                              "row. Adds the columns `attempts` and `first_finish_reason`.", metavar="structured|all",
                              default=None)


def check(cfg) -> None:
    if cfg.repair is not None and cfg.repair not in MODES:
        raise InputError(f"--repair takes {' or '.join(MODES)}, got {cfg.repair!r}")
    only_for_generation(cfg, {"--repair": cfg.repair is not None})


def retry_max_tokens(max_tokens: int, prompt_tokens: int, max_model_len: int | None) -> int | None:
    """Twice `max_tokens`, up to what `max_model_len` leaves after the prompt (no bound where it is unknown: the
    engine stops there); None where that is no more than `max_tokens`."""
    larger = 2 * max_tokens if max_model_len is None else min(2 * max_tokens, max_model_len - prompt_tokens)
    return larger if larger > max_tokens else None


def is_cut(result: dict) -> bool:
    return any(sample["finish_reason"] == "length" for sample in result["samples"])


class Repair(Part):
    columns = {ATTEMPTS: pa.int64(), FIRST_FINISH_REASON: pa.string()}

    def __init__(self, mode: str, max_model_len: int | None):
        self.mode, self.max_model_len = mode, max_model_len
        self.fingerprint = {"repair": mode}
        self.counting = False  # in the replica: whether its report's counts were started (at 0)

    def check(self, request) -> None:
        """After structured output's check (FEATURES' order), which puts the row's spec in request.state."""
        max_tokens = request.sampling.get("max_tokens")
        if isinstance(max_tokens, int) and (self.mode == "all" or request.state.get("structured_outputs")):
            prompt = request.row.get(col.NUM_INPUT_TOKENS) or len(request.prompt.get("prompt_token_ids") or ())
            request.state[RETRY_MAX_TOKENS] = retry_max_tokens(max_tokens, prompt, self.max_model_len)

    def output(self, request, output, result: dict) -> None:
        if not self.counting:  # the report shows both counts, in this order, even where they stay 0
            self.counting = True
            for name in (REPAIRED, STILL_CUT):
                request.replica.progress.count(name, 0)
        state = request.state  # the same for both attempts
        state[ATTEMPTS] = state.get(ATTEMPTS, 0) + 1
        state.setdefault(FIRST_FINISH_REASON, "length" if is_cut(result) else result["samples"][0]["finish_reason"])
        result[ATTEMPTS], result[FIRST_FINISH_REASON] = state[ATTEMPTS], state[FIRST_FINISH_REASON]

    def again(self, request, result: dict) -> bool:
        state = request.state
        if RETRY_MAX_TOKENS not in state:  # a row this setting leaves as it is
            return False
        cut, retry = is_cut(result), state[RETRY_MAX_TOKENS]
        if cut and state[ATTEMPTS] == 1 and retry:
            request.sampling["max_tokens"] = retry
            supervisor = request.replica.supervisor  # its stall bound: the slowest pace over the longest request
            supervisor.max_tokens = max(supervisor.max_tokens, retry)
            return True
        if cut or state[ATTEMPTS] > 1:
            request.replica.progress.count(STILL_CUT if cut else REPAIRED, 1)
        return False


def part(plan) -> Repair | None:
    if plan.task != "generate" or plan.cfg.repair is None:
        return None
    return Repair(plan.cfg.repair, plan.max_model_len)
