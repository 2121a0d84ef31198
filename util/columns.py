"""The columns that pass between the pipeline's stages, named once. Each stage declares which of these
it needs and adds (util/pipeline.py), and the output's schema lists them in order (util/output.py).

    from util.columns import ID, PROMPT_TOKEN_IDS, GENERATED_TEXT
"""

ID = "id"  # the row's id: the input's --id-column, else file, position and a hash of the text
PROMPT = "prompt"  # the text sent to the model, its prompt format applied
PROMPT_TOKEN_IDS = "prompt_token_ids"  # the prompt, tokenized once by the formatter; not written
NUM_INPUT_TOKENS = "num_input_tokens"
ERROR = "error"  # null, or why the row failed; a failed row passes through later stages untouched
SAMPLING_PARAMS = "sampling_params"  # optional input column: a row's own sampling, over the job's
REQUEST_ERROR = "request_error"  # an OpenAI request line refused by the reader, for the formatter to keep
GENERATED_TEXT = "generated_text"
FINISH_REASON = "finish_reason"
NUM_GENERATED_TOKENS = "num_generated_tokens"
MODEL = "model"
STRUCTURED_OUTPUT_ERROR = "structured_output_error"
