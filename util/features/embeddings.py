"""Embeddings (a feature, util/parts.py): `--task embed` writes each row's `embedding` instead of text.

    python main.py --input-path corpus.jsonl --task embed --model BAAI/bge-base-en-v1.5

The text is embedded as given (prompt format `plain` unless one is asked for: no chat template), by the
same replicas, placement and batches as generation, each engine a pooling model: each row one `encode`
request, whose pooled vector (for a causal LM, vLLM's default: the last token's hidden state,
L2-normalized) becomes the row's `embedding`. Row errors, ids and resume are as for generation. An OpenAI
batch file of /v1/embeddings requests is an embedding job without the flag (util/features/openai_batch/).
"""

import asyncio
import uuid

import pyarrow as pa

from util import columns as col
from util.errors import RowError
from util.parts import Part
from util.predictor import LLMPredictor, finish_batch

EMBEDDING = "embedding"
EMBEDDING_TYPE = pa.list_(pa.float32())
TASKS = {"embed": "one `embedding` vector per row"}


class EmbeddingPredictor(LLMPredictor):
    """One AsyncLLM pooling engine per replica. The same row contract as LLMPredictor: needs id,
    prompt_token_ids and error, passes rows with an error through, adds embedding and model."""
    COLUMNS = {EMBEDDING: EMBEDDING_TYPE, col.ERROR: pa.string(), col.MODEL: pa.string()}

    def engine_args(self, engine_args_class, model: str, engine_kwargs: dict):
        # vLLM 0.10.1 and later: runner and convert; before that one `task` argument. A model that is an
        # embedding model already takes convert="embed" too. The user's --engine-arg keys win.
        try:
            return engine_args_class(model=model, **{"runner": "pooling", "convert": "embed", **engine_kwargs})
        except TypeError:
            return engine_args_class(model=model, **{"task": "embed", **engine_kwargs})

    async def embed(self, row: dict) -> dict:
        if row[col.ERROR] is not None:
            return {col.ERROR: row[col.ERROR]}
        try:
            return await self.supervisor.run(row[col.ID], lambda engine: self.encode(engine, row))
        except RowError as refused:
            return {col.ERROR: str(refused)}

    async def encode(self, engine, row: dict) -> dict:
        from vllm import PoolingParams

        final = None
        try:
            async for output in engine.encode({"prompt_token_ids": row[col.PROMPT_TOKEN_IDS]},
                                              PoolingParams(task="embed"), f"{row[col.ID]}-{uuid.uuid4().hex[:8]}"):
                final = output
        except Exception as error:
            raise self.supervisor.refusal(error, engine) from None
        data = final.outputs.data  # a tensor of the model's hidden size
        return {EMBEDDING: data.float().tolist() if hasattr(data, "float") else list(data)}

    async def answer(self, batch: pa.Table, sampling: dict, parts: list) -> pa.Table:
        results = await asyncio.gather(*[self.embed(row) for row in batch.to_pylist()])
        self.progress.rows_done(len(results), 0, flush=True)
        for result in results:
            result[col.MODEL] = self.model_name
        return finish_batch(batch, results, self.COLUMNS)


class Embeddings(Part):
    columns = {EMBEDDING: EMBEDDING_TYPE}
    fingerprint = {"task": "embed"}
    glance = (col.ID, EMBEDDING, col.ERROR)


def part(plan) -> Embeddings | None:
    if plan.task != "embed":
        return None
    embeddings = Embeddings()
    # The text embedded as given: no chat template.
    embeddings.plan = {"predictor": EmbeddingPredictor, **({"prompt_format": "plain"} if plan.cfg.prompt_format == "auto" else {})}
    return embeddings
