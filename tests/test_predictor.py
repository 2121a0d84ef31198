"""Per-row sampling: a row's own sampling_params (its structured output too) override the job's;
bad ones fail that row only."""

import pyarrow as pa

from util.predictor import finish_batch, row_sampling, rows_sampling

JOB = {"temperature": 0.0, "max_tokens": 64, "stop": ["###"]}


def test_row_overrides_win_and_nulls_are_ignored():
    assert row_sampling(JOB, None) == JOB
    assert row_sampling(JOB, {"max_tokens": 8, "temperature": None}) == {**JOB, "max_tokens": 8}
    assert row_sampling(JOB, '{"top_p": 0.5}') == {**JOB, "top_p": 0.5}
    assert row_sampling(JOB, "  ") == JOB


def test_rows_refused_earlier_or_with_bad_overrides_become_errors():
    batch = pa.table({"error": [None, "empty prompt in column 'text'", None],
                      "sampling_params": ['{"max_tokens": 4}', None, "{not json"]})
    rows = rows_sampling(batch, JOB)
    assert rows[0] == (False, {**JOB, "max_tokens": 4})
    assert rows[1] == (True, "empty prompt in column 'text'")
    assert rows[2][0] is True and rows[2][1].startswith("invalid sampling_params: Expecting property name")


JOB_JSON = {**JOB, "structured_outputs": {"json": {"type": "object"}}}


def test_a_rows_structured_output_replaces_the_jobs():
    assert row_sampling(JOB_JSON, {"max_tokens": 8}) == {**JOB_JSON, "max_tokens": 8}
    assert row_sampling(JOB_JSON, '{"structured_outputs": {"choice": ["a", "b"]}}') == {
        **JOB, "structured_outputs": {"choice": ["a", "b"]}}
    assert row_sampling(JOB_JSON, {"response_format": {"type": "json_object"}}) == {
        **JOB, "structured_outputs": {"json_object": True}}
    # No constraint for this row, and nothing left over that SamplingParams would not take.
    assert row_sampling(JOB_JSON, {"response_format": {"type": "text"}}) == JOB
    assert row_sampling(JOB, {"structured_outputs": None, "max_tokens": 3}) == {**JOB, "max_tokens": 3}


def test_rows_with_a_bad_structured_output_or_a_non_object_become_errors():
    batch = pa.table({"error": [None, None, None],
                      "sampling_params": ['{"structured_outputs": {"regex": "a", "choice": ["a"]}}', "[1, 2]",
                                          '{"response_format": {"type": "json_object"}}']})
    assert rows_sampling(batch, JOB) == [
        (True, "invalid sampling_params: structured_outputs must have exactly one of json, regex, choice, "
               "grammar, json_object; got regex, choice"),
        (True, "invalid sampling_params: must be a JSON object, got list"),
        (False, {**JOB, "structured_outputs": {"json_object": True}})]


def test_structured_output_error_is_a_string_column_even_when_every_value_is_null():
    batch = pa.table({"id": ["a", "b"], "prompt_token_ids": [[1], [1]], "error": [None, None]})
    flagged = finish_batch(batch, [{"generated_text": "{}"}, {"generated_text": "{", "structured_output_error": "cut"}], "m")
    assert flagged["structured_output_error"].to_pylist() == [None, "cut"]
    assert finish_batch(batch, [{}, {}], "m").schema.field("structured_output_error").type == pa.string()
    assert "prompt_token_ids" not in flagged.column_names
