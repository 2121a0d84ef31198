"""Rows repaired instead of cut (util/features/repair.py, --repair): the flag, the fingerprint, the retry's size, the
predictor's loop on a stand-in engine (a row cut, run again, written once; an engine death during the
retry), the run report's counts, --preflight's bound; then one job on the session's warm engine (SmolLM2,
guided to a JSON schema) with a row repaired, a row still cut, a row never cut, and a row without a spec.

    .venv/bin/python -m pytest tests/test_repair.py
"""

import asyncio
import json
from types import SimpleNamespace

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from util import columns as col
from util.config import Config, parse_args
from util.plan import make_plan
from util.predictor import LLMPredictor, checked_request
from util.features.preflight import MAX_OUTPUT_TOKENS, row_budgets
from util.features.repair import RETRY_MAX_TOKENS, Repair, retry_max_tokens
from util.replica.supervisor import EngineSupervisor
from util.report import ProgressLog
from util.results import build_report, format_report
from util.resume import fingerprint_changes
from util.features.structured_output import StructuredOutput


ASKING = [{"text": "x", "sampling_params": {"structured_outputs": {"regex": "a+"}, "n": 2}}]  # rows with their own spec


def plan_of(*args: str, source: list | None = None):
    return make_plan(parse_args(["--concurrency", "1", *args]), cluster={"CPU": 2.0}, resolve_model_files=False,
                     source=source)


# --- the flag, the part, the fingerprint ---

def test_repair_is_off_by_default_and_adds_its_columns_only_when_on():
    assert "Repair" not in [type(p).__name__ for p in plan_of().parts]
    assert "attempts" not in plan_of().columns and "repair" not in plan_of().fingerprint
    plan = plan_of("--repair", "structured")
    assert [type(p).__name__ for p in plan.parts][-1] == "Repair"  # after structured output's part, which sets the spec
    assert list(plan.columns)[-2:] == ["attempts", "first_finish_reason"]
    assert plan_of("--repair", "all").parts[-1].mode == "all"


@pytest.mark.parametrize("kwargs, message", [
    ({"repair": "some"}, "--repair takes structured or all, got 'some'"),
    ({"repair": "all", "task": "embed"}, "--task embed takes no generation flags; got --repair"),
])
def test_a_bad_repair_flag_is_refused_at_start(kwargs, message):
    with pytest.raises(ValueError) as refused:
        Config(**kwargs)
    assert str(refused.value) == message


def test_the_setting_is_in_the_fingerprint_so_a_resume_under_another_is_refused():
    off, structured, every = (plan_of(*args).fingerprint for args in ([], ["--repair", "structured"], ["--repair", "all"]))
    assert fingerprint_changes(off, structured) == ['repair: (unset) -> "structured"']
    assert fingerprint_changes(structured, every) == ['repair: "structured" -> "all"']
    assert fingerprint_changes(off, plan_of().fingerprint) == []  # an output made before the flag still resumes


# --- which rows, and how much room ---

def test_the_retry_doubles_max_tokens_up_to_what_max_model_len_leaves():
    assert retry_max_tokens(48, 20, 2048) == 96
    assert retry_max_tokens(48, 2000, 2048) is None  # 48 tokens is all the room there is
    assert retry_max_tokens(48, 1990, 2048) == 58
    assert retry_max_tokens(48, 20, None) == 96  # unknown here: the engine stops at its own limit


def retry_of(plan, sampling_params=None, tokens: int = 20):
    row = {"id": "r", "sampling_params": sampling_params, col.NUM_INPUT_TOKENS: tokens}
    return checked_request(row, plan.sampling, plan.parts).state.get(RETRY_MAX_TOKENS, "not repaired")


def test_structured_repairs_rows_with_a_spec_and_all_repairs_every_row():
    structured = plan_of("--repair", "structured", "--max-tokens", "48", "--engine-arg", "max_model_len=100",
                         source=ASKING)
    assert retry_of(structured) == "not repaired"  # no spec
    assert retry_of(structured, {"response_format": {"type": "json_object"}}) == 80  # 100 - 20 prompt tokens
    assert retry_of(structured, {"structured_outputs": {"regex": "a+"}, "max_tokens": 8}) == 16
    assert retry_of(structured, {"structured_outputs": {"regex": "a+"}, "max_tokens": 80}) is None  # no room: stays cut
    schema = plan_of("--repair", "structured", "--json-schema", '{"type": "object"}', "--max-tokens", "48")
    assert retry_of(schema) == 96 and retry_of(schema, {"response_format": {"type": "text"}}) == "not repaired"
    every = plan_of("--repair", "all", "--max-tokens", "48")
    assert retry_of(every) == 96 and retry_of(every, {"max_tokens": "many"}) == "not repaired"  # vLLM's to refuse


# --- the predictor's loop, on a stand-in engine ---

ANSWER = '{"name":"Ada","ok":true}'  # one token per character


class Dead(Exception):
    """Stands in for vLLM's EngineDeadError."""


class StandInEngine:
    """Answers every prompt with `answer`, cut at the request's max_tokens; dies at a request of `die_at`
    max_tokens (a retry), if given."""

    def __init__(self, answer: str = ANSWER, die_at: int | None = None):
        self.answer, self.die_at, self.errored, self.asked = answer, die_at, False, []

    async def generate(self, prompt, params, request_id, **kwargs):
        self.asked.append(params.max_tokens)
        if params.max_tokens == self.die_at:
            self.errored = True
            raise Dead("dead")
        tokens = [ord(c) for c in self.answer[:params.max_tokens]]
        completion = SimpleNamespace(index=0, token_ids=tokens, text=None,
                                     finish_reason="length" if len(self.answer) > params.max_tokens else "stop")
        yield SimpleNamespace(outputs=[completion], metrics=None)


def stand_in_predictor(engines: list) -> tuple[LLMPredictor, dict]:
    """An LLMPredictor without vLLM's engine: its supervisor runs `engines` in turn (a new one at a death)."""
    predictor, counts, factories = LLMPredictor.__new__(LLMPredictor), {}, iter(engines)
    predictor.model_name = "m"
    predictor.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join(map(chr, ids)))
    predictor.progress = SimpleNamespace(rows_done=lambda rows, tokens, flush=False, **cache_counts: None,
                                         count=lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n))
    predictor.supervisor = EngineSupervisor(lambda: next(factories), max_tokens=8, stop_engine=lambda engine: None,
                                            is_dead=lambda error: isinstance(error, Dead))
    return predictor, counts


def run_rows(predictor: LLMPredictor, rows: list[dict], mode: str = "structured") -> list[dict]:
    parts = [StructuredOutput({"json_object": True}), Repair(mode, max_model_len=100)]
    batch = pa.table({"id": [r["id"] for r in rows], "prompt_token_ids": [[1, 2, 3]] * len(rows),
                      "error": pa.array([None] * len(rows), pa.string()),
                      "sampling_params": [json.dumps(r["sampling"]) for r in rows]})
    finished = asyncio.run(predictor.answer(batch, {"max_tokens": 64, "temperature": 0.0}, parts))
    return finished.to_pylist()


def test_a_cut_row_runs_once_more_and_is_written_once_with_its_final_answer():
    engine = StandInEngine()
    predictor, counts = stand_in_predictor([engine])
    repaired, still_cut, whole, no_room = run_rows(predictor, [
        {"id": "a", "sampling": {"max_tokens": 16}}, {"id": "b", "sampling": {"max_tokens": 4}},
        {"id": "c", "sampling": {}}, {"id": "d", "sampling": {"max_tokens": 97}}])
    pick = lambda row: (row["generated_text"], row["finish_reason"], row["num_generated_tokens"], row["attempts"],
                        row["first_finish_reason"])
    assert pick(repaired) == (ANSWER, "stop", len(ANSWER), 2, "length") and repaired["structured_output_error"] is None
    assert pick(still_cut) == (ANSWER[:8], "length", 8, 2, "length")
    assert still_cut["structured_output_error"].endswith("(finish_reason length)")
    assert pick(whole) == (ANSWER, "stop", len(ANSWER), 1, "stop")
    assert pick(no_room)[3:] == (1, "stop")  # 97 tokens were enough: not cut, and no room to grow in any case
    assert sorted(engine.asked) == [4, 8, 16, 32, 64, 97]  # one retry each for a and b, at twice their max_tokens
    assert counts == {"repaired": 1, "still_cut": 1}
    assert predictor.supervisor.max_tokens == 32  # the stall bound counts the longest request, the retry's


def test_a_row_with_no_room_to_grow_stays_cut_and_is_counted():
    engine = StandInEngine(answer="x" * 120)
    predictor, counts = stand_in_predictor([engine])
    (row,) = run_rows(predictor, [{"id": "a", "sampling": {"max_tokens": 97}}], mode="all")  # 100 - 3 prompt tokens
    assert (row["attempts"], row["first_finish_reason"], row["finish_reason"]) == (1, "length", "length")
    assert engine.asked == [97]
    assert counts == {"repaired": 0, "still_cut": 1}


def test_an_engine_death_during_the_retry_runs_the_retry_again_not_the_row():
    first, second = StandInEngine(die_at=32), StandInEngine()
    predictor, counts = stand_in_predictor([first, second])
    (row,) = run_rows(predictor, [{"id": "a", "sampling": {"max_tokens": 16}}])
    assert (first.asked, second.asked) == ([16, 32], [32])
    assert (row["generated_text"], row["attempts"], row["first_finish_reason"]) == (ANSWER, 2, "length")
    assert counts == {"repaired": 1, "still_cut": 0}


# --- the report and --preflight ---

def test_the_run_report_counts_repaired_and_still_cut_rows_on_its_rows_line():
    log = ProgressLog()
    for name, n in (("repaired", 0), ("still_cut", 0), ("repaired", 1), ("engine_restarts", 1), ("repaired", 1),
                    ("still_cut", 1)):
        log.count(name, n)
    report = build_report(log.snapshot(), {"ok": 9, "error": 1, "input_tokens": 70, "output_tokens": 50}, 0.0, 10.0, 0)
    assert report["rows"] == {"ok": 9, "error": 1, "repaired": 2, "still_cut": 1}
    assert report["survived"] == {"engine_restarts": 1, "rows_rerun": 0, "rows_isolated": 0, "replica_restarts": 0,
                                  "nodes_lost": 0}
    assert format_report(report).splitlines()[1] == "  rows           9 ok, 1 error, 2 repaired, 1 still cut"


def test_preflight_counts_the_retry_in_its_output_token_bound():
    plan = plan_of("--repair", "structured", "--max-tokens", "48", "--engine-arg", "max_model_len=100", source=ASKING)
    rows = [{"id": "spec", "sampling_params": json.dumps({"response_format": {"type": "json_object"}})},
            {"id": "spec-n2", "sampling_params": json.dumps({"response_format": {"type": "json_object"}, "n": 2,
                                                             "temperature": 1.0})},
            {"id": "none", "sampling_params": None}]
    batch = pa.table({"id": [r["id"] for r in rows], "sampling_params": [r["sampling_params"] for r in rows],
                      col.NUM_INPUT_TOKENS: [20, 20, 20], col.PROMPT_TOKEN_IDS: [[1] * 20] * 3,
                      col.ERROR: pa.array([None] * 3, pa.string())})
    budgets = row_budgets(batch, plan.sampling, plan.max_model_len, plan.parts)
    assert budgets[MAX_OUTPUT_TOKENS].to_pylist() == [48 + 80, 2 * (48 + 80), 48]  # the retry: 100 - 20 left


# --- on the real engine ---

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


def test_a_row_cut_under_a_json_schema_is_repaired_on_the_real_engine(run_job, tmp_path):
    rows = [{"id": "repaired", "text": "Describe a person.", "sampling_params": {"max_tokens": 14}},
            {"id": "still-cut", "text": "Describe a person.", "sampling_params": {"max_tokens": 2}},
            {"id": "whole", "text": "Describe a person."},
            {"id": "no-spec", "text": "Describe a person.",
             "sampling_params": {"max_tokens": 2, "response_format": {"type": "text"}}}]
    job = run_job("--input-path", write_jsonl(tmp_path / "in.jsonl", rows), "--id-column", "id", "--output-path",
                  tmp_path / "out", "--json-schema", json.dumps(PERSON), "--max-tokens", 48, "--repair", "structured",
                  "--max-error-fraction", 1)
    assert job.code == 0, job.err[-3000:]
    out = {row["id"]: row for row in pq.read_table(tmp_path / "out").to_pylist()}
    repaired, still_cut, whole, no_spec = (out[name] for name in ("repaired", "still-cut", "whole", "no-spec"))
    assert len(out) == 4
    pick = lambda row: (row["attempts"], row["first_finish_reason"], row["finish_reason"])
    assert pick(repaired) == (2, "length", "stop") and repaired["structured_output_error"] is None
    jsonschema.validate(json.loads(repaired["generated_text"]), PERSON)
    assert 14 < repaired["num_generated_tokens"] <= 28  # the retry's answer (23 tokens), at twice the row's max_tokens
    assert pick(still_cut) == (2, "length", "length") and still_cut["num_generated_tokens"] == 4
    assert still_cut["structured_output_error"].endswith("(finish_reason length)")
    assert pick(whole) == (1, "stop", "stop") and whole["generated_text"] == repaired["generated_text"]
    assert pick(no_spec) == (1, "length", "length")  # --repair structured leaves a row without a spec cut
    assert "  rows           4 ok, 0 error, 1 repaired, 1 still cut" in job.out
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert report["rows"] == {"ok": 4, "error": 0, "repaired": 1, "still_cut": 1}
