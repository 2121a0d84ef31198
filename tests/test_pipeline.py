"""The pipeline's chain (util/pipeline.py): its stages in order, each stage's contract (the columns it
needs, adds and drops) checked when the pipeline is built, and rows already written dropped before
the formatter, the same rows whether or not --limit is given.

    .venv/bin/python -m pytest tests/test_pipeline.py -q
"""

import ast
import json

import pytest

from conftest import REPO, done_index
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


def test_the_formatter_loads_the_tokenizer_the_engine_and_the_predictor_load(monkeypatch):
    """Its token ids go straight to the engine: its tokenizer comes from the engine's own arguments."""
    import transformers

    from util.prompt_format import PromptFormatter, tokenizer_args

    loaded = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda **kwargs: loaded.append(kwargs) or object())
    monkeypatch.setattr(PromptFormatter, "chat_templates", lambda self, model, revision: None)
    monkeypatch.setattr("util.prompt_format.choose_prompt_format", lambda model, templates, requested: "plain")
    monkeypatch.setattr("util.prompt_format.model_max_length", lambda model, revision, override: None)
    plan = plan_of(revision="main", engine_arg={"tokenizer": "other/tokenizer", "tokenizer_revision": "v2",
                                                 "trust_remote_code": True})
    options = {k: v for k, v in formatter_stage(plan).map_batches["fn_kwargs"].items()}
    PromptFormatter(**options)
    engine_side = {"pretrained_model_name_or_path": "other/tokenizer", "revision": "v2", "trust_remote_code": True}
    assert loaded == [engine_side] == [tokenizer_args(plan.cfg.model, plan.engine_kwargs)]  # LLMPredictor's
    assert tokenizer_args(plan.cfg.model, plan_of(revision="main").engine_kwargs) == {
        "pretrained_model_name_or_path": plan.cfg.model, "revision": "main", "trust_remote_code": False}


def notebook_call(fn_name: str) -> ast.Call:
    """README.ipynb's one literal `ds.map_batches(<fn_name>, ...)` call."""
    cells = [cell["source"] for cell in json.loads((REPO / "README.ipynb").read_text())["cells"]
             if cell["cell_type"] == "code"]
    [call] = [node for cell in cells for node in ast.walk(ast.parse("".join(cell))) if isinstance(node, ast.Call)
              and getattr(node.func, "attr", None) == "map_batches" and getattr(node.args[0], "id", None) == fn_name]
    return call


def pool_shape(compute) -> tuple:
    return (compute.min_size, compute.max_size, compute.max_tasks_in_flight_per_actor,
            compute.max_concurrent_calls_per_actor)


def test_the_notebooks_stage_calls_take_what_the_pipeline_builder_gives():
    """The notebook spells out the formatter's and the predictor's map_batches arguments for its reader: they
    must be the ones main.py's pipeline (util/pipeline.py) gives, whatever the job's flags."""
    import ray

    from util.prompt_format import tokenizer_args
    from util.resources import TASK_CPUS

    plan = plan_of(system_prompt="Be brief.", revision="main", max_engine_restarts=5, stall_timeout_s=90.0,
                   batch_size=16, batches_in_flight=3, concurrency=1)
    names = {"cfg": plan.cfg, "plan": plan, "ray": ray, "TASK_CPUS": TASK_CPUS, "tokenizer_args": tokenizer_args}
    for fn_name, stage in (("format_prompts", formatter_stage(plan)), ("LLMPredictor", predictor_stage(plan))):
        call = notebook_call(fn_name)
        given = {k.arg: eval(compile(ast.Expression(k.value), "README.ipynb", "eval"), names) for k in call.keywords
                 if k.arg is not None}
        for spread in [k.value for k in call.keywords if k.arg is None]:  # **plan.replica_resources
            given.update(eval(compile(ast.Expression(spread), "README.ipynb", "eval"), names))
        built = {k: v for k, v in stage.map_batches.items() if k != "fn"}
        if "compute" in built:
            assert pool_shape(given.pop("compute")) == pool_shape(built.pop("compute"))
        assert given == built, fn_name
