"""The pipeline's chain (util/pipeline.py): its stages in order, each stage's contract (the columns it
needs, adds and drops) checked when the pipeline is built, and rows already written dropped before
the formatter, the same rows whether or not --limit is given.

    .venv/bin/python -m pytest tests/test_pipeline.py -q
"""

import pytest

from conftest import done_index
from util.config import Config
from util.pipeline import Stage, build_pipeline, check_contracts, formatter_stage, pipeline_stages, predictor_stage
from util.plan import make_plan
from util.reading import read_prompts
from util.resume import DoneIndex
from util.model_dirs.tiny_model import tiny_model_dir

READ = ("id", "text")  # what the reader gives every stage after it


def plan_of(**config):
    cfg = Config(model=tiny_model_dir(), **{"concurrency": 1, **config})
    return make_plan(cfg, cluster={"CPU": 2.0}, resolve_model_files=False)


@pytest.fixture(scope="module")
def plan():
    return plan_of()


def names(stages) -> list[str]:
    return [stage.name for stage in stages]


def test_the_stages_in_order(plan):
    done = DoneIndex(rows=1, ref=None)
    assert names(pipeline_stages(plan)) == ["format", "cut_blocks", "predict"]
    assert names(pipeline_stages(plan, done)) == ["format", "cut_blocks", "predict"]  # the read drops them
    assert names(pipeline_stages(plan, until="format")) == ["format"]  # --preflight's, then its budget stage
    limited = pipeline_stages(plan_of(limit=3), done)
    assert names(limited) == ["drop_done", "format", "cut_blocks", "predict"]  # after --limit's rows are taken
    check_contracts(limited, READ)  # the chains the project builds hold


def test_a_stage_before_the_one_that_adds_its_column_fails_when_the_pipeline_is_built(plan):
    with pytest.raises(ValueError) as info:  # before anything is read
        build_pipeline(plan, stages=[predictor_stage(plan), formatter_stage(plan)])
    assert str(info.value) == ("stage 'predict' needs column 'prompt_token_ids', which no stage before it adds "
                               "(it gets: id, text)")


def test_a_column_a_stage_drops_is_gone_for_the_stages_after_it(plan):
    reads_tokens = Stage("reads_tokens", needs=("prompt_token_ids",), adds=())
    check_contracts([formatter_stage(plan), reads_tokens], READ)
    with pytest.raises(ValueError) as info:
        check_contracts(pipeline_stages(plan) + [reads_tokens], READ)
    assert str(info.value) == (
        "stage 'reads_tokens' needs column 'prompt_token_ids', which no stage before it adds (it gets: id, text, "
        "prompt, num_input_tokens, error, generated_text, finish_reason, num_generated_tokens, model, "
        f"time_in_queue_s, time_to_first_token_s, generation_time_s{''.join(', ' + c for c in plan.columns)})")


def test_the_formatter_needs_the_text_column(plan):
    question = plan_of(text_column="question")
    check_contracts(pipeline_stages(question), ("id", "question"))
    with pytest.raises(ValueError) as info:
        check_contracts(pipeline_stages(question), READ)
    assert str(info.value) == "stage 'format' needs column 'question', which no stage before it adds (it gets: id, text)"


def test_rows_already_written_are_dropped_before_the_formatter_with_or_without_limit(ray_local, tmp_path):
    items = ["alpha", "beta", "gamma", "delta", "epsilon"]
    ids = [row["id"] for row in read_prompts(items).take_all()]
    done = done_index(tmp_path / "out", [ids[1], ids[3]])

    def formatted(plan) -> list[tuple[str, int]]:
        ds = build_pipeline(plan, done, source=items, stages=pipeline_stages(plan, done, until="format"))
        return sorted((row["id"], row["num_input_tokens"] > 0) for row in ds.take_all())

    assert formatted(plan_of()) == [(ids[0], True), (ids[2], True), (ids[4], True)]
    # --limit 3 takes the first three rows, as the first run did, then drops the one already written.
    assert formatted(plan_of(limit=3)) == [(ids[0], True), (ids[2], True)]
