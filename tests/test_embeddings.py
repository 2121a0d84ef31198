"""--task embed (util/features/embeddings.py), and OpenAI batch files of /v1/embeddings requests: one main.py run in
this process with real weights (SmolLM2, util/model_dirs/smol_model.py, float32 on CPU) for the whole file, whose
embeddings match transformers' pooling of the same model (the last token's final hidden state, L2-normalized, as vLLM pools a causal
LM converted to embed); the OpenAI records, the task's resolution and the mixed-url refusal without an
engine.

    .venv/bin/python -m pytest tests/test_embeddings.py
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import conftest
from conftest import write_jsonl
from util.config import Config
from util.errors import InputError, refusal_reason
from util.features.openai_batch import output_record, request_row
from util.pipeline import check_contracts, pipeline_stages
from util.plan import make_plan
from util.model_dirs.tiny_model import tiny_model_dir

TEXTS = [*conftest.PROMPTS[:3], "What is the capital of France?"]


def embeddings_request(custom_id: str, text, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": text, **body}}


@pytest.fixture(scope="module")
def embed_run(main_here, tmp_path_factory):
    """One main.py --task embed run over the texts and one empty text (a row that fails before the engine)."""
    folder = tmp_path_factory.mktemp("embed")
    source = write_jsonl(folder / "corpus.jsonl", [{"text": t} for t in [*TEXTS, ""]])
    job = main_here("--smoke", "--task", "embed", "--input-path", source, "--engine-arg", "dtype=float32",
                    "--max-error-fraction", "0.5", "--output-path", folder / "out")
    assert job.code == 0, job.out[-3000:] + job.err[-3000:]
    return job.out, pq.read_table(folder / "out")


@pytest.mark.engine
def test_embeddings_match_transformers_pooling(embed_run):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from util.model_dirs.smol_model import smol_model_dir

    _, table = embed_run
    rows = {row["text"]: row for row in table.to_pylist()}
    directory = smol_model_dir()
    tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for text in TEXTS:
            ids = tokenizer(text)["input_ids"]  # plain: the text as given, no chat template
            assert rows[text]["prompt"] == text and rows[text]["num_input_tokens"] == len(ids)
            with torch.no_grad():
                hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
            expected = torch.nn.functional.normalize(hidden, dim=0)
            got = torch.tensor(rows[text]["embedding"])
            assert got.shape == expected.shape == (576,)
            assert torch.dot(got, expected) / got.norm() >= 0.999, text
    finally:
        torch.set_num_threads(threads)


@pytest.mark.engine
def test_the_output_has_one_row_per_input_row_and_a_fixed_embedding_type(embed_run):
    stdout, table = embed_run
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    rows = {row["text"]: row for row in table.to_pylist()}
    assert set(rows) == {*TEXTS, ""}
    failed = rows[""]
    assert failed["embedding"] is None and "empty" in failed["error"]
    assert all(rows[t]["error"] is None and rows[t]["generated_text"] is None for t in TEXTS)
    assert "576 values" in stdout  # the sample rows show the vector's size


def test_an_embedding_row_becomes_a_create_embedding_response():
    from openai.types import CreateEmbeddingResponse

    row = {"id": "e-1", "error": None, "model": "smol", "num_input_tokens": 5, "num_generated_tokens": None,
           "embedding": [0.6, 0.8], "generated_text": None}
    record = output_record(row, created=0)
    assert record["custom_id"] == "e-1" and record["error"] is None and record["response"]["status_code"] == 200
    body = CreateEmbeddingResponse.model_validate(record["response"]["body"])
    assert body.data[0].embedding == [0.6, 0.8] and body.data[0].index == 0
    assert body.usage.prompt_tokens == body.usage.total_tokens == 5 and body.model == "smol"


def test_an_embeddings_request_line_becomes_a_row_of_its_input():
    row = request_row(json.dumps(embeddings_request("e-1", "Hello", encoding_format="float", user="u")), "in.jsonl:1")
    assert row["request_error"] is None and json.loads(row["messages"]) == "Hello"
    assert row["request_model"] == "text-embedding-3-small" and row["sampling_params"] is None


@pytest.mark.parametrize("body, reason", [
    ({"input": ["a", "b"]}, "in.jsonl:2: body.input must be one string, got a list (a list of inputs is not "
                            "supported: one request line per input)"),
    ({"input": "a", "encoding_format": "base64"},
     'in.jsonl:2: encoding_format="base64" is not supported (float vectors only; encoding_format may be null or "float")'),
    ({"input": "a", "dimensions": 64},
     "in.jsonl:2: dimensions=64 is not supported (the model's own size only; dimensions may be null)"),
    ({"input": "a", "messages": []}, "in.jsonl:2: unknown body parameter(s): messages"),
])
def test_an_embeddings_request_that_cannot_be_served_is_refused_by_line(body, reason):
    line = json.dumps({"custom_id": "e-1", "url": "/v1/embeddings", "body": body})
    assert request_row(line, "in.jsonl:2")["request_error"] == reason


def test_the_url_says_the_task_and_a_mixed_file_is_refused_before_any_engine(tmp_path):
    chat = {"custom_id": "c-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi"}]}}
    embeds = write_jsonl(tmp_path / "embeds.jsonl", [embeddings_request("e-1", "a"), embeddings_request("e-2", "b")])
    def task(**config) -> str:
        return make_plan(Config(input_format="openai", concurrency=1, **config), cluster={"CPU": 2.0},
                         resolve_model_files=False).task

    assert task(input_path=embeds) == "embed"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [embeddings_request("e-1", "a"), chat, embeddings_request("e-3", "c")])
    with pytest.raises(InputError) as refused:
        task(input_path=mixed)
    # main.py prints this as `error: ...` and exits 2 (util/errors.py)
    assert str(refusal_reason(refused.value)) == (
        f"{mixed}:2: a /v1/chat/completions request in a batch of /v1/embeddings requests (the first at "
        f"{mixed}:1); a run is one task: put them in separate files")
    with pytest.raises(InputError, match="--task embed, but .* holds requests for the generate task"):
        task(input_path=write_jsonl(tmp_path / "chat.jsonl", [chat]), task="embed")


def test_the_task_is_in_the_fingerprint_only_when_not_the_default():
    def settings(task: str) -> dict:
        return make_plan(Config(task=task, concurrency=1), cluster={"CPU": 2.0}, resolve_model_files=False).fingerprint

    assert "task" not in settings("generate")  # outputs made before --task still resume
    assert settings("embed")["task"] == "embed"


def test_embed_plans_plain_prompts_and_the_embed_stage():
    plan = make_plan(Config(model=tiny_model_dir(), concurrency=1, task="embed"), cluster={"CPU": 2.0})
    assert plan.task == "embed" and plan.prompt_format == "plain" and plan.fingerprint["task"] == "embed"
    stages = pipeline_stages(plan)
    assert [s.name for s in stages] == ["format", "cut_blocks", "embed"]
    assert stages[-1].adds == ("embedding", "error", "model")
    check_contracts(stages, ("id", "text"))


def test_embed_refuses_generation_flags():
    with pytest.raises(ValueError, match="--task embed takes no generation flags; got --n, --logprobs"):
        Config(task="embed", n=2, temperature=1.0, logprobs=1)
