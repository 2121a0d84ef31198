"""Per-row sampling: a row's own sampling_params override the job's; bad ones fail that row only."""

import pyarrow as pa

from util.predictor import row_sampling, rows_sampling

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
