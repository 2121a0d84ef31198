"""The columns that pass between the core's stages, named once. Each stage declares which of these it
needs and adds (util/pipeline.py); a feature names its own columns in its module.

    from util.columns import ID, PROMPT_TOKEN_IDS, GENERATED_TEXT, set_columns
"""

import pyarrow as pa

ID = "id"  # the row's id: the input's --id-column, else file, position and a hash of the text
ID_SCHEME = "file:byte-offset(text,jsonl)|row(csv,parquet,openai):sha1[:8]"  # how util/reading.py derives ids
PROMPT = "prompt"  # the text sent to the model, its prompt format applied
PROMPT_TOKEN_IDS = "prompt_token_ids"  # the prompt, tokenized once by the formatter; not written
NUM_INPUT_TOKENS = "num_input_tokens"
ERROR = "error"  # null, or why the row failed; a failed row passes through later stages untouched
SAMPLING_PARAMS = "sampling_params"  # optional input column: a row's own sampling, over the job's
REQUEST_ERROR = "request_error"  # why the reader refused a row (a bad request line); the formatter keeps it
REQUEST_MODEL = "request_model"  # the model a row's request names (an OpenAI request's body.model)
GENERATED_TEXT = "generated_text"
FINISH_REASON = "finish_reason"
NUM_GENERATED_TOKENS = "num_generated_tokens"
MODEL = "model"
TIMINGS = ("time_in_queue_s", "time_to_first_token_s", "generation_time_s")  # seconds, from vLLM's metrics


def set_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` added, or replaced where they already exist."""
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, values) if index >= 0 else table.append_column(name, values)
    return table
