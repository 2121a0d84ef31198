"""--task score and --task classify (util/features/scoring.py), and OpenAI batch files of /v1/score and /v1/rerank
requests. One engine for the whole file, kept warm (util/features/replica_pool.py): SmolLM2 (util/model_dirs/smol_model.py) in
float32, made a yes/no reranker as vLLM makes Qwen3-Reranker one (hf_overrides: classifier_from_token
["no", "yes"], method from_2_way_softmax: one label, sigmoid(logit(yes) - logit(no)) at the last token),
which serves both tasks. Its scores and probabilities match transformers' causal LM on the same tokens.
The pair tokenization (a BERT's token types included), the request lines, the records and the plans need no
engine.

    .venv/bin/python -m pytest tests/test_scoring.py
"""

import asyncio
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import scan_error, write_jsonl
from util.config import Config
from util.errors import InputError, refusal_reason
from util.features.openai_batch import output_record, request_row
from util.pipeline import check_contracts, pipeline_stages
from util.plan import make_plan
from util.features.scoring import PairFormatter, ScoringPredictor, Scoring, joins_pair, token_type_start
from util.model_dirs.tiny_model import tiny_model_dir

RERANKER = {"architectures": ["LlamaForSequenceClassification"], "classifier_from_token": ["no", "yes"],
            "method": "from_2_way_softmax"}
QUESTION = "Answer yes or no. Is Paris the capital of France?\nAnswer:"
PAIRS = [(QUESTION, " yes"), (QUESTION, " no"), ("Is the sky green? Answer:", " no")]
TEXTS = ["Paris is the capital of France. True?", "Water is dry. True?"]


def model_args(model: str) -> list[str]:
    return ["--model", model, "--concurrency", "1", "--engine-arg", "dtype=float32",
            "--engine-arg", f"hf_overrides={RERANKER!r}"]


@pytest.fixture(scope="module")
def reranker(ray_local, main_here):
    """The reranker's engine, warm for the module; `run(*args)` runs main.py on it."""
    from util.config import parse_args
    from util.features.replica_pool import ReplicaPool
    from util.model_dirs.smol_model import smol_model_dir

    model = smol_model_dir()
    plan = make_plan(parse_args([*model_args(model), "--task", "score"]))
    plan.replica_resources["num_cpus"] = 0.01  # as the session's warm engine: leaves the CPUs to the data tasks
    with ReplicaPool(plan) as pool:
        yield lambda *args: main_here(*model_args(model), *args, replicas=pool)


@pytest.fixture(scope="module")
def score_run(reranker, tmp_path_factory):
    """A score job over PAIRS and one row without its second text, then the same job again (a resume)."""
    folder = tmp_path_factory.mktemp("score")
    source = write_jsonl(folder / "pairs.jsonl", [{"text": q, "text_pair": d} for q, d in PAIRS]
                         + [{"text": QUESTION, "text_pair": None}])
    args = ("--task", "score", "--input-path", source, "--max-error-fraction", "0.5", "--output-path", folder / "out")
    first = reranker(*args)
    assert first.code == 0, first.out[-3000:] + first.err[-3000:]
    return first, reranker(*args), folder / "out"


def reference_scores(hf_model, texts: list[str]) -> list[float]:
    """transformers' sigmoid(logit(yes) - logit(no)) at each text's last token: the reranker's one label."""
    import torch

    model, tokenizer = hf_model
    no, yes = tokenizer.convert_tokens_to_ids(["no", "yes"])
    scores = []
    for text in texts:
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1]
        scores.append(torch.sigmoid(logits[yes] - logits[no]).item())
    return scores


@pytest.mark.engine
def test_scores_match_transformers_and_a_row_without_its_second_text_fails_alone(score_run, hf_model):
    _, _, out = score_run
    rows = pq.read_table(out).to_pylist()  # errors/ included
    assert len(rows) == len(PAIRS) + 1 and len({row["id"] for row in rows}) == len(rows)
    failed = [row for row in rows if row["error"] is not None]
    assert [row["error"] for row in failed] == ["no second text (the document) in column 'text_pair'"]
    assert failed[0]["score"] is None
    done = {(row["text"], row["text_pair"]): row for row in rows if row["error"] is None}
    # A reranker made from a causal LM reads the pair joined (vLLM's use_sep_token False).
    expected = reference_scores(hf_model, [q + d for q, d in PAIRS])
    for (query, document), score in zip(PAIRS, expected):
        row = done[(query, document)]
        assert row["prompt"] == query + document and row["scores"] is None and row["generated_text"] is None
        assert row["score"] == pytest.approx(score, abs=1e-4), (query, document)
    assert done[(QUESTION, " yes")]["score"] != pytest.approx(done[(QUESTION, " no")]["score"], abs=1e-3)


@pytest.mark.engine
def test_a_second_run_of_the_score_job_resumes_with_nothing_left(score_run):
    first, second, out = score_run
    assert second.code == 0, second.out[-3000:] + second.err[-3000:]
    assert pq.read_table(out).num_rows == len(PAIRS) + 1  # nothing written twice
    assert "'score': " in first.out and "generated_text" not in first.out  # the glance: the task's columns


@pytest.mark.engine
def test_classify_on_the_same_engine_matches_transformers(reranker, tmp_path, hf_model):
    source = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    job = reranker("--task", "classify", "--input-path", source, "--output-path", tmp_path / "out")
    assert job.code == 0, job.out[-3000:] + job.err[-3000:]
    rows = {row["text"]: row for row in pq.read_table(tmp_path / "out").to_pylist()}
    for text, probability in zip(TEXTS, reference_scores(hf_model, TEXTS)):
        assert rows[text]["probs"] == pytest.approx([probability], abs=1e-4) and rows[text]["label"] == "LABEL_0"
        assert rows[text]["prompt"] == text  # plain: no chat template


@pytest.mark.engine
def test_score_and_rerank_request_lines_are_answered_in_vllms_shapes(reranker, tmp_path, hf_model):
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    documents = [" no", " yes", " maybe"]
    source = write_jsonl(tmp_path / "batch.jsonl", [
        {"custom_id": "s-1", "method": "POST", "url": "/v1/score", "body": {"model": "m", "text_1": QUESTION,
                                                                             "text_2": " yes"}},
        {"custom_id": "r-1", "method": "POST", "url": "/v1/rerank", "body": {"query": QUESTION, "documents": documents,
                                                                              "top_n": 2}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/rerank", "body": {"query": QUESTION}},
    ])
    job = reranker("--input-path", source, "--input-format", "openai", "--max-error-fraction", "0.5",
                   "--output-path", tmp_path / "out")
    assert job.code == 0, job.out[-3000:] + job.err[-3000:]
    records = {r["custom_id"]: r for path in sorted((tmp_path / "out").rglob("part-*.jsonl"))
               for r in map(json.loads, path.read_text().splitlines())}
    assert set(records) == {"s-1", "r-1", "bad"}
    assert records["bad"]["error"]["message"] == ("batch.jsonl:3: body.documents must be a text or a non-empty "
                                                  "list of texts, got null")
    expected = reference_scores(hf_model, [QUESTION + d for d in documents])
    score = ScoreResponse.model_validate(records["s-1"]["response"]["body"])
    assert [d.score for d in score.data] == pytest.approx([expected[1]], abs=1e-4)
    rerank = RerankResponse.model_validate(records["r-1"]["response"]["body"])
    best = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [r.index for r in rerank.results] == best and [r.document.text for r in rerank.results] == [
        documents[i] for i in best]
    assert [r.relevance_score for r in rerank.results] == pytest.approx([expected[i] for i in best], abs=1e-4)


# --- no engine -------------------------------------------------------------------------------------------

def bert_directory(tmp_path) -> str:
    """A BERT tokenizer of a few words, saved as a model directory's tokenizer."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "paris", "a", "city", "?", "."]
    directory = tmp_path / "bert"
    BertTokenizer(vocab={word: index for index, word in enumerate(words)}).save_pretrained(directory)
    return str(directory)


def test_a_pair_is_tokenized_as_vllm_pairs_it_with_the_token_types_where_the_second_text_starts(tmp_path):
    formatter = PairFormatter(bert_directory(tmp_path), "text", prompt_format="plain", max_model_len=11)
    table = formatter(pa.table({"id": ["a", "b", "c", "d"], "text": ["what is paris?", "paris", "paris", "paris"],
                                "text_pair": ["a city.", "a city a city a city a city", "", "a"]}))
    rows = table.to_pylist()
    assert rows[0]["prompt"] == "[CLS] what is paris? [SEP] a city. [SEP]"
    assert rows[0]["prompt_token_ids"] == [2, 5, 6, 7, 10, 3, 8, 9, 11, 3] and rows[0]["num_input_tokens"] == 10
    assert rows[0]["pair_type_starts"] == [6] and rows[0]["pair_token_ids"] is None and rows[0]["error"] is None
    assert rows[1]["error"] == "prompt has 12 tokens; the model accepts at most 10 (max_model_len 11)"
    assert rows[2]["error"] == "no second text (the document) in column 'text_pair'"
    assert rows[3]["error"] is None and rows[3]["pair_type_starts"] == [3]


def test_a_list_of_documents_is_a_rerank_row_and_a_bad_one_fails_alone_naming_the_column(tmp_path):
    formatter = PairFormatter(bert_directory(tmp_path), "text", prompt_format="plain", max_model_len=64,
                              text_pair_column="document")
    table = formatter(pa.table({"id": list("abcd"), "text": ["paris"] * 4, "document": [
        ["a city", "a"], [], ["a", " "], ["a"]]}))
    rows = table.to_pylist()
    assert rows[0]["prompt"] == "paris" and rows[0]["pair_token_ids"] == [[2, 7, 3, 8, 9, 3], [2, 7, 3, 8, 3]]
    assert rows[0]["num_input_tokens"] == 11 and rows[0]["pair_type_starts"] == [3, 3]
    assert rows[1]["error"] == "column 'document' must hold a text or a non-empty list of texts (a rerank), got an empty list"
    assert rows[2]["error"] == "no second text (the document) in column 'document[1]'"
    assert rows[3]["error"] is None and rows[3]["pair_token_ids"] == [[2, 7, 3, 8, 3]]  # a list of one: a rerank


def test_a_reranker_made_from_a_causal_lm_joins_the_pair(tmp_path):
    model = tiny_model_dir()
    assert not joins_pair(model, None, None)  # a cross-encoder's own pair encoding
    assert joins_pair(model, None, RERANKER)  # vLLM: `llm as reranker` uses no separator
    assert not joins_pair(model, None, {**RERANKER, "use_sep_token": True})
    formatter = PairFormatter(model, "text", prompt_format="plain", max_model_len=64, hf_overrides=json.dumps(RERANKER))
    row = formatter(pa.table({"id": ["a"], "text": ["Question?"], "text_pair": [" Yes"]})).to_pylist()[0]
    assert row["prompt"] == "Question? Yes" and row["pair_type_starts"] == [None]
    assert row["prompt_token_ids"] == formatter.tokenizer("Question? Yes")["input_ids"]


def test_token_types_must_be_zeros_then_ones():
    assert token_type_start([0, 0, 1, 1]) == 2 and token_type_start([0, 0]) is None and token_type_start(None) is None
    with pytest.raises(ValueError, match="zeros followed by ones"):
        token_type_start([0, 1, 0])


def run_predictor(task: str, rows: list[dict], outputs: dict, id2label: dict) -> list[dict]:
    """ScoringPredictor.predict on `rows`, its engine a stand-in whose classify output for each token id
    list (as a tuple) is `outputs[...]`."""
    class Engine:
        model_config = SimpleNamespace(hf_config=SimpleNamespace(id2label=id2label))

        async def encode(self, prompt, params, request_id):
            assert params.task == "classify"
            yield SimpleNamespace(outputs=SimpleNamespace(data=outputs[tuple(prompt["prompt_token_ids"])]))

    engine = Engine()
    predictor = ScoringPredictor.__new__(ScoringPredictor)
    predictor.model_name = "m"
    predictor.progress = SimpleNamespace(rows_done=lambda *args, **kwargs: None)
    predictor.supervisor = SimpleNamespace(engine=engine, run=lambda row_id, attempt: attempt(engine))
    part = Scoring(task, {}, "text_pair" if task == "score" else None)
    batch = pa.Table.from_pylist(rows)
    return asyncio.run(predictor.answer(batch, {}, [part])).to_pylist()


def test_classify_names_the_likeliest_label_from_id2label():
    rows = [{"id": "a", "prompt_token_ids": [1, 2], "error": None}, {"id": "b", "prompt_token_ids": [3], "error": None},
            {"id": "c", "prompt_token_ids": [], "error": "empty prompt in column 'text'"}]
    out = run_predictor("classify", rows, {(1, 2): [0.1, 0.7, 0.2], (3,): [0.5, 0.2, 0.3]}, {0: "neg", 1: "pos"})
    assert [(r["probs"], r["label"], r["error"]) for r in out] == [
        ([0.1, 0.7, 0.2], "pos", None), ([0.5, 0.2, 0.3], "neg", None), (None, None, "empty prompt in column 'text'")]
    assert all(r["model"] == "m" and "prompt_token_ids" not in r for r in out)


def test_a_pair_gets_a_score_a_rerank_scores_and_a_model_of_two_labels_is_refused_by_row():
    rows = [{"id": "a", "prompt_token_ids": [1], "error": None, "pair_token_ids": None, "pair_type_starts": [None]},
            {"id": "b", "prompt_token_ids": [1], "error": None, "pair_token_ids": [[1], [2]], "pair_type_starts": [None, None]},
            {"id": "c", "prompt_token_ids": [5], "error": None, "pair_token_ids": None, "pair_type_starts": [None]}]
    out = run_predictor("score", rows, {(1,): [0.25], (2,): [0.75], (5,): [0.5, 0.5]}, {})
    assert (out[0]["score"], out[0]["scores"]) == (0.25, None) and (out[1]["score"], out[1]["scores"]) == (None, [0.25, 0.75])
    assert out[2]["error"] == ("--task score needs a model with one label (a cross-encoder, a reranker); this one has 2: "
                               "use --task classify")
    assert all("pair_token_ids" not in r and "pair_type_starts" not in r for r in out)


def test_score_plans_a_pair_formatter_and_the_score_stage_and_needs_the_pair_column(tmp_path):
    plan = make_plan(Config(model=tiny_model_dir(), concurrency=1, task="score", text_pair_column="doc"),
                     cluster={"CPU": 2.0})
    assert plan.task == "score" and plan.prompt_format == "plain" and plan.fingerprint["task"] == "score"
    stages = pipeline_stages(plan)
    assert [s.name for s in stages] == ["format", "cut_blocks", "score"]
    assert stages[0].map_batches["fn_kwargs"]["formatter"] is PairFormatter
    assert stages[-1].adds == ("error", "model", "score", "scores")
    check_contracts(stages, ("id", "text", "doc"))
    assert plan.input_columns == ("doc",)
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "q"}])
    assert "doc" in scan_error(source, required=plan.input_columns)
    classify = make_plan(Config(model=tiny_model_dir(), concurrency=1, task="classify"), cluster={"CPU": 2.0})
    assert [s.name for s in pipeline_stages(classify)] == ["format", "cut_blocks", "classify"]
    assert classify.fingerprint["task"] == "classify" and classify.input_columns == ()


def test_score_and_classify_refuse_generation_flags():
    with pytest.raises(ValueError, match="--task score takes no generation flags; got --n"):
        Config(task="score", n=2, temperature=1.0)
    with pytest.raises(ValueError, match="--task classify takes no generation flags"):
        Config(task="classify", logprobs=1)


def scoring_line(custom_id: str, url: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_score_and_rerank_lines_become_rows_of_one_query():
    score = request_row(scoring_line("s", "/v1/score", model="m", queries=["q"], documents=["a", "b"]), "in.jsonl:1")
    assert json.loads(score["messages"]) == {"query": "q", "documents": ["a", "b"], "url": "/v1/score", "top_n": 0}
    assert score["request_error"] is None and score["request_model"] == "m"
    pair = request_row(scoring_line("p", "/v1/score", text_1="q", text_2="a", use_activation=True), "in.jsonl:2")
    assert json.loads(pair["messages"])["documents"] == "a"  # one pair: one score
    rerank = request_row(scoring_line("r", "/v1/rerank", query="q", documents="a", top_n=3), "in.jsonl:3")
    assert json.loads(rerank["messages"]) == {"query": "q", "documents": ["a"], "url": "/v1/rerank", "top_n": 3}


@pytest.mark.parametrize("url, body, reason", [
    ("/v1/score", {"text_1": ["q", "p"], "text_2": ["a", "b"]},
     "body.text_1 must be one text, got a list (several queries: one request line each; multi-modal content is not supported)"),
    ("/v1/score", {"text_1": "q"}, "body.text_2 must be a text or a non-empty list of texts, got null"),
    ("/v1/rerank", {"query": "q", "documents": []}, "body.documents must be a text or a non-empty list of texts, got []"),
    ("/v1/rerank", {"query": "q", "documents": ["a", 3]}, 'body.documents must be a text or a non-empty list of texts, got ["a", 3]'),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n=-1 must be an integer >= 0"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "messages": []}, "unknown body parameter(s): messages"),
    ("/v1/score", {"text_1": "q", "text_2": "a", "use_activation": False},
     "use_activation=false is not supported (scores after the model's activation; use_activation may be null or true)"),
    ("/v1/rerank", {"query": {"content": []}, "documents": ["a"]},
     "body.query must be one text, got a dict (several queries: one request line each; multi-modal content is not supported)"),
])
def test_a_scoring_line_that_cannot_be_served_is_refused_by_line(url, body, reason):
    assert request_row(scoring_line("x", url, **body), "in.jsonl:2")["request_error"] == f"in.jsonl:2: {reason}"


def test_score_and_rerank_rows_become_vllms_responses():
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    rerank = {"query": "q", "documents": ["a", "b", "c"], "url": "/v1/rerank", "top_n": 2}
    row = {"id": "r", "error": None, "model": "m", "num_input_tokens": 9, "score": None, "scores": [0.1, 0.9, 0.5],
           "messages": json.dumps(rerank)}
    body = RerankResponse.model_validate(output_record(row, created=0)["response"]["body"])
    assert [(r.index, r.document.text, r.relevance_score) for r in body.results] == [(1, "b", 0.9), (2, "c", 0.5)]
    assert body.usage.prompt_tokens == body.usage.total_tokens == 9 and body.model == "m"
    pair = {**row, "score": 0.25, "scores": None, "messages": json.dumps({**rerank, "url": "/v1/score", "documents": "a"})}
    record = output_record(pair, created=0)
    assert record["error"] is None and record["response"]["status_code"] == 200
    body = ScoreResponse.model_validate(record["response"]["body"])
    assert [(d.index, d.score) for d in body.data] == [(0, 0.25)] and body.usage.prompt_tokens == 9


def test_a_file_of_score_and_rerank_lines_is_a_score_job_and_one_with_chat_lines_is_refused(tmp_path):
    def task(path) -> str:
        return make_plan(Config(input_format="openai", concurrency=1, input_path=path), cluster={"CPU": 2.0},
                         resolve_model_files=False).task

    lines = [json.loads(scoring_line("s", "/v1/score", text_1="q", text_2="a")),
             json.loads(scoring_line("r", "/v1/rerank", query="q", documents=["a"]))]
    assert task(write_jsonl(tmp_path / "both.jsonl", lines)) == "score"
    chat = {"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "Hi"}]}}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*lines, chat])
    with pytest.raises(InputError) as refused:
        task(mixed)
    assert str(refusal_reason(refused.value)) == (
        f"{mixed}:3: a /v1/chat/completions request in a batch of /v1/score requests (the first at {mixed}:1); a run "
        "is one task: put them in separate files")


def test_the_task_separates_the_fingerprints():
    def fingerprint(task: str) -> dict:
        return make_plan(Config(task=task, concurrency=1), cluster={"CPU": 2.0}, resolve_model_files=False).fingerprint

    assert len({json.dumps(fingerprint(t), sort_keys=True) for t in ("generate", "embed", "score", "classify")}) == 4
