"""Scores and classes (a feature, util/parts.py): `--task score` writes each pair's `score`, `--task classify`
each text's `probs` and `label`, from a sequence-classification model (a cross-encoder, a reranker, a classifier).

    python main.py --task score --model BAAI/bge-reranker-base --input-path pairs.jsonl   # {"text": q, "text_pair": d}
    python main.py --task classify --model <a classifier> --input-path reviews.jsonl       # {"text": ...}
    python main.py --input-path rerank.jsonl --input-format openai    # /v1/score or /v1/rerank request lines

Each engine is a pooling model (vLLM's runner "pooling", convert "classify"), and each text or pair one
`encode` request for the "classify" task: the model's head on its pooled state (a causal LM's last token, a
BERT's CLS), after the model's activation (softmax over its labels; sigmoid for one label), as vLLM's
score and classify APIs give it.

score: a row is a pair, the query (or first text) in --text-column and the document (second text) in
--text-pair-column, tokenized as vLLM's score API tokenizes it: the tokenizer's own pair encoding (BERT's
`[CLS] q [SEP] d [SEP]`, with its token types), or, for a causal LM made a reranker (`classifier_from_token`
in its config, as Qwen3-Reranker), the two texts joined. The model must have one label (vLLM's rule): the
row's `score` is its probability. A row whose second text is a list of documents is a rerank, one query
against many: one output row all the same, with `scores`, one per document in the documents' order (and no
`score`), each document its own engine request. A row missing its second text fails alone, naming the column.

classify: a row's text as given (prompt format `plain`: no chat template); `probs`, one per label, and
`label`, the likeliest one's name from the model's id2label.

Ids, error rows and resume are as for generation; the task is in the output's fingerprint. An OpenAI batch
file of /v1/score or /v1/rerank requests is a score job without the flag (util/features/openai_batch/), written as
vLLM's server answers them.
"""

import asyncio
import json
import uuid
from dataclasses import dataclass, replace

import pyarrow as pa

from util import columns as col
from util.columns import set_columns
from util.errors import EMPTY_PROMPT, ROW_ERRORS, RowError, row_error
from util.parts import Part, flag
from util.predictor import LLMPredictor, finish_batch
from util.prompt_format import PromptFormatter

SCORE, SCORES, PROBS, LABEL = "score", "scores", "probs", "label"
TASKS = {"score": "a `score` per pair of texts (a cross-encoder, a reranker)",
         "classify": "`probs` and the likeliest `label` per text"}
# A pair's token ids, one list per document (a rerank's several), and where each one's second segment starts
# in BERT's token types (null: no token types): the replica's inputs, dropped after it.
PAIR_TOKEN_IDS, PAIR_TYPE_STARTS = "pair_token_ids", "pair_type_starts"
NO_SECOND_TEXT, BAD_SECOND_TEXT = "no second text", "bad second text"
ROW_ERRORS[NO_SECOND_TEXT] = "no second text (the document) in column '{column}'"
ROW_ERRORS[BAD_SECOND_TEXT] = "column '{column}' must hold a text or a non-empty list of texts (a rerank), got {got}"
COLUMNS = {"score": {SCORE: pa.float64(), SCORES: pa.list_(pa.float64())},
           "classify": {PROBS: pa.list_(pa.float64()), LABEL: pa.string()}}


@dataclass
class Flags:
    text_pair_column: str = flag("--task score: the column of each pair's second text (the document), beside "
                                 "--text-column's query; a list of texts there is a rerank.", default="text_pair")


def token_type_start(token_type_ids: list[int] | None) -> int | None:
    """Where the second segment starts in a pair's token types (zeros, then ones), as vLLM hands them to a BERT
    (PoolingParams.extra_kwargs["compressed_token_type_ids"]); None where the tokenizer gives no second segment."""
    if not token_type_ids or 1 not in token_type_ids:
        return None
    start = token_type_ids.index(1)
    if any(kind != 1 for kind in token_type_ids[start:]) or any(kind != 0 for kind in token_type_ids[:start]):
        raise RowError(f"token types must be zeros followed by ones, got {token_type_ids}")  # as vLLM refuses them
    return start


def second_texts(value, column: str) -> list[str]:
    """A row's second text as a list of documents (one for a pair); RowError naming the column."""
    if value is None or isinstance(value, str) and not value.strip():
        raise RowError(row_error(NO_SECOND_TEXT, column=column))
    documents = [value] if isinstance(value, str) else value
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        got = "an empty list" if documents == [] else type(value).__name__ if not isinstance(value, list) else "a list with non-texts"
        raise RowError(row_error(BAD_SECOND_TEXT, column=column, got=got))
    for index, document in enumerate(documents):
        if not document.strip():
            raise RowError(row_error(NO_SECOND_TEXT, column=f"{column}[{index}]"))
    return documents


class PairFormatter(PromptFormatter):
    """The formatter of a score job: each row's query and documents as the engine's token ids. Adds prompt (the
    pair as the model reads it; a rerank's query), prompt_token_ids (the first pair's), num_input_tokens (all
    pairs'), error, and the replica's inputs PAIR_TOKEN_IDS and PAIR_TYPE_STARTS. `hf_overrides`: the engine's, as
    JSON (they may make a causal LM a reranker, which reads the texts joined). `request_lines`: the texts come as
    an OpenAI request row's JSON."""

    def __init__(self, model: str, text_column: str, text_pair_column: str = "text_pair",
                 hf_overrides: str | None = None, request_lines: bool = False, no_images: str | None = None,
                 **options):
        super().__init__(model, text_column, **options)  # no_images: util/features/images/'s, for chat requests
        self.text_pair_column, self.request_lines = text_pair_column, request_lines
        self.joined = joins_pair(model, options.get("revision"), json.loads(hf_overrides) if hf_overrides else None)

    def encode(self, query: str, document: str) -> tuple[list[int], int | None, str]:
        """One pair's token ids, where its second segment starts (or None) and its text, as vLLM's
        CrossEncoderIOProcessor.get_score_prompt makes them."""
        if self.joined:
            text = query + document
            return self.tokenizer(text)["input_ids"], None, text
        encoded = self.tokenizer(text=query, text_pair=document)
        ids = encoded["input_ids"]
        return ids, token_type_start(encoded.get("token_type_ids")), self.tokenizer.decode(ids)

    def pair(self, first, second) -> tuple[str, list[str], bool]:
        """A row's query, its documents, and whether it is a rerank (its documents a list)."""
        if self.request_lines:  # util/features/openai_batch/: {"query": ..., "documents": ...} as JSON
            request = json.loads(first)
            first, second = request["query"], request["documents"]
        if first is None or not str(first).strip():
            raise RowError(row_error(EMPTY_PROMPT, column=self.text_column))
        return str(first), second_texts(second, self.text_pair_column), isinstance(second, list)

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = [None] * batch.num_rows
        if col.REQUEST_ERROR in batch.column_names:  # a bad request line stays refused
            errors, batch = batch[col.REQUEST_ERROR].to_pylist(), batch.drop_columns([col.REQUEST_ERROR])
        firsts = batch[self.text_column].to_pylist()
        seconds = (batch[self.text_pair_column].to_pylist() if self.text_pair_column in batch.column_names
                   else [None] * batch.num_rows)
        prompts, first_ids, counts, pair_ids, type_starts = [], [], [], [], []
        for i in range(batch.num_rows):
            prompt, ids, starts = "", [], []
            if errors[i] is None:
                try:
                    query, documents, rerank = self.pair(firsts[i], seconds[i])
                    for document in documents:
                        one_ids, start, text = self.encode(query, document)
                        ids.append(one_ids)
                        starts.append(start)
                        if error := self.too_long(len(one_ids)):
                            raise RowError(error)
                    prompt = query if rerank else text
                except RowError as refused:
                    errors[i], ids, starts, rerank = str(refused), [], [], False
            prompts.append(prompt)
            first_ids.append(ids[0] if ids else [])
            counts.append(sum(map(len, ids)))
            pair_ids.append(ids if rerank else None)  # a pair's one list is prompt_token_ids
            type_starts.append(starts)
        return set_columns(batch, {
            col.PROMPT: pa.array(prompts, pa.string()),
            col.PROMPT_TOKEN_IDS: pa.array(first_ids, pa.list_(pa.int32())),
            col.NUM_INPUT_TOKENS: pa.array(counts, pa.int64()),
            col.ERROR: pa.array(errors, pa.string()),
            PAIR_TOKEN_IDS: pa.array(pair_ids, pa.list_(pa.list_(pa.int32()))),
            PAIR_TYPE_STARTS: pa.array(type_starts, pa.list_(pa.int64())),
        })


class ScoringPredictor(LLMPredictor):
    """One AsyncLLM pooling engine per replica, for the classify and score tasks. The same row contract as
    LLMPredictor: needs id, prompt_token_ids and error (and a score job's pair columns), passes rows with an
    error through, adds the task's columns, error and model."""
    COLUMNS = {col.ERROR: pa.string(), col.MODEL: pa.string()}

    def engine_args(self, engine_args_class, model: str, engine_kwargs: dict):
        # vLLM 0.10.1 and later: runner and convert; before that one `task` argument. A model that is a
        # classifier already takes convert="classify" too. The user's --engine-arg keys win.
        try:
            return engine_args_class(model=model, **{"runner": "pooling", "convert": "classify", **engine_kwargs})
        except TypeError:
            return engine_args_class(model=model, **{"task": "classify", **engine_kwargs})

    async def answer(self, batch: pa.Table, sampling: dict, parts: list) -> pa.Table:
        task = next(part.task for part in parts if isinstance(part, Scoring))
        results = await asyncio.gather(*[self.score_row(row, task) for row in batch.to_pylist()])
        self.progress.rows_done(len(results), 0, flush=True)
        for result in results:
            result[col.MODEL] = self.model_name
        columns = {**self.COLUMNS, **{k: v for part in parts for k, v in part.columns.items()}}
        return finish_batch(batch, results, columns, tuple(name for part in parts for name in part.engine_inputs))

    async def score_row(self, row: dict, task: str) -> dict:
        if row[col.ERROR] is not None:
            return {col.ERROR: row[col.ERROR]}
        rerank = task == "score" and row[PAIR_TOKEN_IDS] is not None
        token_ids = row[PAIR_TOKEN_IDS] if rerank else [row[col.PROMPT_TOKEN_IDS]]
        sequences = list(zip(token_ids, row[PAIR_TYPE_STARTS] if task == "score" else [None]))
        try:
            outputs = await self.supervisor.run(row[col.ID], lambda engine: asyncio.gather(
                *[self.classify(engine, row[col.ID], ids, start) for ids, start in sequences]))
        except RowError as refused:
            return {col.ERROR: str(refused)}
        if task == "classify":
            probs, labels = outputs[0], self.engine.model_config.hf_config.id2label
            best = max(range(len(probs)), key=probs.__getitem__)
            return {PROBS: probs, LABEL: labels.get(best, f"LABEL_{best}")}
        if any(len(probs) != 1 for probs in outputs):  # vLLM's score API: only for num_labels == 1
            return {col.ERROR: f"--task score needs a model with one label (a cross-encoder, a reranker); this one "
                               f"has {len(outputs[0])}: use --task classify"}
        scores = [probs[0] for probs in outputs]
        return {SCORES: scores} if rerank else {SCORE: scores[0]}

    async def classify(self, engine, row_id: str, token_ids: list[int], type_start: int | None) -> list[float]:
        from vllm import PoolingParams

        # A BERT's token types, as vLLM's score API hands them over: where the second segment starts.
        extra = {"extra_kwargs": {"compressed_token_type_ids": type_start}} if type_start is not None else {}
        final = None
        try:
            async for output in engine.encode({"prompt_token_ids": token_ids}, PoolingParams(task="classify", **extra),
                                              f"{row_id}-{uuid.uuid4().hex[:8]}"):
                final = output
        except Exception as error:
            raise self.supervisor.refusal(error, engine) from None
        data = final.outputs.data  # a tensor of the model's labels
        return data.float().tolist() if hasattr(data, "float") else list(data)


class Scoring(Part):
    def __init__(self, task: str, formatter_options: dict | None = None, pair_column: str | None = None):
        self.task, self.formatter_options = task, formatter_options
        self.columns = COLUMNS[task]
        self.fingerprint = {"task": task}
        self.glance = (col.ID, *COLUMNS[task], col.ERROR)
        self.engine_inputs = (PAIR_TOKEN_IDS, PAIR_TYPE_STARTS) if task == "score" else ()
        self.input_columns = (pair_column,) if pair_column else ()

    def stages(self, plan, stages: list) -> list:
        if self.task != "score":
            return stages
        return [replace(stage.with_options(fn_kwargs={**stage.map_batches["fn_kwargs"], "formatter": PairFormatter,
                                                      **self.formatter_options}), adds=stage.adds + self.engine_inputs)
                if stage.name == "format" else stage for stage in stages]


def joins_pair(model: str, revision: str | None, hf_overrides) -> bool:
    """Whether vLLM joins a pair's texts instead of pairing them: a causal LM made a reranker from its tokens
    (`method` in its config: SequenceClassificationConfig), unless its config says use_sep_token."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision).to_dict()
    except Exception:  # no config on the driver: the tokenizer's own pair encoding
        config = {}
    config.update(hf_overrides if isinstance(hf_overrides, dict) else {})
    return not config.get("use_sep_token", config.get("method") is None)


def part(plan) -> Scoring | None:
    if plan.task not in TASKS:
        return None
    cfg = plan.cfg
    if plan.task == "classify":
        scoring = Scoring("classify")
    else:
        request_lines, overrides = cfg.input_format == "openai", cfg.engine_arg.get("hf_overrides")
        options = {"text_pair_column": cfg.text_pair_column, "request_lines": request_lines,  # hashable: the formatter is cached
                   "hf_overrides": json.dumps(overrides) if isinstance(overrides, dict) else None}
        scoring = Scoring("score", options, None if request_lines else cfg.text_pair_column)
    # The texts as given: no chat template.
    scoring.plan = {"predictor": ScoringPredictor, **({"prompt_format": "plain"} if cfg.prompt_format == "auto" else {})}
    return scoring
