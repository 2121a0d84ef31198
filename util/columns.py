"""The columns that pass between the pipeline's stages, named once. Each stage declares which of these
it needs and adds (util/pipeline.py), and the output's schema lists them in order (util/output.py).

    from util.columns import ID, PROMPT_TOKEN_IDS, GENERATED_TEXT, set_columns
"""

import pyarrow as pa

ID = "id"  # the row's id: the input's --id-column, else file, position and a hash of the text
ID_SCHEME = "file:byte-offset(text,jsonl)|row(csv,parquet,openai):sha1[:8]"  # how util/reading.py derives ids
PROMPT = "prompt"  # the text sent to the model, its prompt format applied
PROMPT_TOKEN_IDS = "prompt_token_ids"  # the prompt, tokenized once by the formatter; not written
PROMPT_IMAGES = "prompt_images"  # a vision job's images, encoded, in prompt order (util/images.py); not written
NUM_INPUT_TOKENS = "num_input_tokens"
ERROR = "error"  # null, or why the row failed; a failed row passes through later stages untouched
SAMPLING_PARAMS = "sampling_params"  # optional input column: a row's own sampling, over the job's
LORA = "lora"  # optional input column: the row's LoRA adapter, a --lora name or a path (util/lora.py)
REQUEST_MODEL = "request_model"  # an OpenAI request's body.model: with --lora, the row's adapter or the base
REQUEST_ERROR = "request_error"  # an OpenAI request line refused by the reader, for the formatter to keep
GENERATED_TEXT = "generated_text"
FINISH_REASON = "finish_reason"
NUM_GENERATED_TOKENS = "num_generated_tokens"
MODEL = "model"
STRUCTURED_OUTPUT_ERROR = "structured_output_error"
COMPLETIONS = "completions"  # every sample when n > 1 (util/request_output.py)
LOGPROBS = "logprobs"
PROMPT_LOGPROBS = "prompt_logprobs"
REASONING_CONTENT = "reasoning_content"
EMBEDDING = "embedding"  # --task embed: the prompt's embedding vector (util/predictor.py EmbeddingPredictor)
TIMINGS = ("time_in_queue_s", "time_to_first_token_s", "generation_time_s")  # seconds, from vLLM's metrics

# Arrow types of the richer columns, so that every file of a run has the same schema (util/output.py).
TOP_LOGPROB = pa.struct([("token", pa.string()), ("token_id", pa.int64()), ("logprob", pa.float64())])
TOKEN_LOGPROBS = pa.list_(pa.struct([*TOP_LOGPROB, pa.field("top_logprobs", pa.list_(TOP_LOGPROB))]))
COMPLETION = pa.struct([("text", pa.string()), ("reasoning_content", pa.string()),
                        ("finish_reason", pa.string()), ("num_generated_tokens", pa.int64()),
                        ("logprobs", TOKEN_LOGPROBS), ("structured_output_error", pa.string())])
COMPLETIONS_TYPE = pa.list_(COMPLETION)
EMBEDDING_TYPE = pa.list_(pa.float32())
PROMPT_IMAGES_TYPE = pa.list_(pa.large_binary())  # large: a batch's images may pass 2 GiB


def set_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` added, or replaced where they already exist."""
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, values) if index >= 0 else table.append_column(name, values)
    return table
