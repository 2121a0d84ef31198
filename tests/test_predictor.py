"""Per-row sampling: a row's own sampling_params override the job's, and bad ones fail that row only. (Each
feature's own check of a row is in the feature's tests.)

    .venv/bin/python -m pytest tests/test_predictor.py
"""

import pyarrow as pa
import pytest

from util.config import Config
from util.errors import RowError
from util.plan import make_plan
from util.predictor import CORE_COLUMNS, checked_request, finish_batch, row_sampling

JOB = {"temperature": 0.0, "max_tokens": 64, "stop": ["###"]}


def test_row_overrides_win_and_nulls_are_ignored():
    assert row_sampling(JOB, None) == JOB
    assert row_sampling(JOB, {"max_tokens": 8, "temperature": None}) == {**JOB, "max_tokens": 8}
    assert row_sampling(JOB, '{"top_p": 0.5}') == {**JOB, "top_p": 0.5}
    assert row_sampling(JOB, "  ") == JOB


@pytest.fixture(scope="module")
def plan():
    return make_plan(Config(concurrency=1, max_tokens=64, stop=["###"]), cluster={"CPU": 2.0}, resolve_model_files=False)


@pytest.mark.parametrize("override, message", [
    ("[1, 2]", "invalid sampling_params: must be a JSON object, got list"),
    ("{not json", "invalid sampling_params: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
])
def test_a_row_with_a_bad_override_fails_alone_saying_why(plan, override, message):
    with pytest.raises(RowError) as refused:
        checked_request({"id": "r", "sampling_params": override}, plan.sampling, plan.parts)
    assert str(refused.value) == message


def test_a_rows_logit_bias_is_keyed_by_token_id_as_vllms_server_keys_it():
    # JSON object keys are strings; SamplingParams wants token ids.
    assert row_sampling(JOB, '{"logit_bias": {"7042": -100}}')["logit_bias"] == {7042: -100}
    assert row_sampling(JOB, {"logit_bias": {"12": 5.0}})["logit_bias"] == {12: 5.0}


def test_a_refused_rows_columns_are_null_and_the_engines_inputs_are_dropped():
    batch = pa.table({"id": ["a", "b"], "prompt_token_ids": [[1], [1]], "error": [None, "empty prompt"]})
    finished = finish_batch(batch, [{"generated_text": "{}", "finish_reason": "stop"}, {"error": "empty prompt"}],
                            CORE_COLUMNS)
    assert finished["generated_text"].to_pylist() == ["{}", None]
    assert finished["num_generated_tokens"].to_pylist() == [0, 0]
    assert finish_batch(batch, [{}, {}], CORE_COLUMNS).schema.field("finish_reason").type == pa.string()
    assert "prompt_token_ids" not in finished.column_names
