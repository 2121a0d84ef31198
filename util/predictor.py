"""The vLLM stage: a Ray Data callable class that turns formatted prompts into generated text.

    ds = ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model": ..., "engine_kwargs": {...},
                        "sampling": {"temperature": 0, "max_tokens": 256}}, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=64)

Each replica holds one vLLM AsyncLLM engine, and every row of every batch it holds is its own request, so
the scheduler always has work queued: a short row frees its slot instead of waiting for its batch's
longest. A row's `sampling_params` (a dict or JSON object) go over the job's; the job's features (`parts`,
util/parts.py) see each row's Request before the engine does, and turn its output into their columns.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa

from util import columns as col
from util.columns import TIMINGS, set_columns
from util.errors import INVALID_SAMPLING, InputError, RowError, RunStopped, row_error
from util.prompt_format import load_tokenizer, tokenizer_args

PROMPT_TOKENS, CACHED_TOKENS = "prompt_tokens", "cached_tokens"  # a result's counts for the run report
STOPPED_REPLICA_EXIT_S = 2.0  # a stopped replica's actor ends this long after it failed its batch
CORE_COLUMNS = {col.GENERATED_TEXT: pa.string(), col.FINISH_REASON: pa.string(),
                col.NUM_GENERATED_TOKENS: pa.int64(), col.ERROR: pa.string(), col.MODEL: pa.string(),
                **{name: pa.float64() for name in TIMINGS}}


@dataclass
class Request:
    """One row on its way to the engine, as the job's features see it (util/parts.py)."""
    row: dict  # the row's columns
    sampling: dict  # SamplingParams' keyword arguments: the job's, with the row's own on top
    prompt: dict  # vLLM's prompt: {"prompt_token_ids": [...]}, and what a feature adds (multi_modal_data)
    replica: "LLMPredictor | None" = None  # None where no engine runs (--preflight)
    model: str | None = None  # the model that answers it (a LoRA adapter's name)
    generate_kwargs: dict = field(default_factory=dict)  # for engine.generate (lora_request)
    state: dict = field(default_factory=dict)  # what a feature keeps for this row between its hooks


def row_sampling(job_sampling: dict, row_override) -> dict:
    """The job's sampling parameters with one row's own on top (JSON text or a dict; nulls ignored)."""
    if row_override is None or (isinstance(row_override, str) and not row_override.strip()):
        return dict(job_sampling)
    override = json.loads(row_override) if isinstance(row_override, str) else dict(row_override)
    if not isinstance(override, dict):
        raise InputError(f"must be a JSON object, got {type(override).__name__}")
    if isinstance(override.get("logit_bias"), dict):  # JSON's keys are strings; vLLM's are token ids, as its server's
        override["logit_bias"] = {int(token): bias for token, bias in override["logit_bias"].items()}
    return {**job_sampling, **{k: v for k, v in override.items() if v is not None}}


def checked_request(row: dict, job_sampling: dict, parts: list, replica=None) -> Request:
    """The row's Request, checked: the job's sampling with the row's own on top, then each feature's check.
    RowError why the row cannot run (an invalid sampling value, a feature's refusal)."""
    return check(Request(row, {}, {"prompt_token_ids": row.get(col.PROMPT_TOKEN_IDS)}, replica), job_sampling, parts)


def check(request: Request, job_sampling: dict, parts: list) -> Request:
    try:
        request.sampling = row_sampling(job_sampling, request.row.get(col.SAMPLING_PARAMS))
        for part in parts:
            part.check(request)
    except RowError:
        raise
    except (ValueError, TypeError) as bad:
        raise RowError(row_error(INVALID_SAMPLING, reason=bad)) from None
    return request


def timings(metrics) -> dict:
    """Seconds in queue, to first token and generating, from vLLM v1's RequestStateStats; None where vLLM
    gives no number (stats disabled, or not reached)."""
    seconds = lambda later, earlier: float(later - earlier) if later and earlier and later >= earlier else None
    if metrics is None or not hasattr(metrics, "scheduled_ts"):
        return dict.fromkeys(TIMINGS)
    ttft = getattr(metrics, "first_token_latency", None)
    return {"time_in_queue_s": seconds(metrics.scheduled_ts, getattr(metrics, "queued_ts", None)),
            "time_to_first_token_s": float(ttft) if ttft else None,
            "generation_time_s": seconds(getattr(metrics, "last_token_ts", None), getattr(metrics, "first_token_ts", None))}


def finish_batch(batch: pa.Table, results: list[dict], columns: dict, engine_inputs: tuple = ()) -> pa.Table:
    """The batch with each row's result as `columns` (name -> Arrow type); the engine's inputs dropped."""
    dropped = [name for name in (col.PROMPT_TOKEN_IDS, *engine_inputs) if name in batch.column_names]
    return set_columns(batch.drop_columns(dropped), {
        name: pa.array([r.get(name, 0 if name == col.NUM_GENERATED_TOKENS else None) for r in results], kind)
        for name, kind in columns.items()})


def end_stopped_replica(stop_engine) -> None:
    """A stopped run's replica: its engine ends now, and its actor once its batch's failure has reached Ray Data.
    Ray Data drops the actor as it aborts, but a task callback of its executor can hold the actor's handle in
    a long-lived driver (a notebook, a test session), so the actor would keep its GPU reserved."""
    import threading

    import ray

    stop_engine()
    threading.Timer(STOPPED_REPLICA_EXIT_S, ray.kill, (ray.get_runtime_context().current_actor,),
                    {"no_restart": True}).start()


class LLMPredictor:
    """One AsyncLLM engine per replica; all rows of all in-flight batches run concurrently."""
    COLUMNS = CORE_COLUMNS  # what it adds to each row, before the features' columns

    def __init__(self, model: str, engine_kwargs: dict | None = None, sampling: dict | None = None,
                 parts: list | None = None, model_name: str | None = None, max_engine_restarts: int = 3,
                 stall_timeout_s: float | None = None):
        entered = time.time()  # the replica's start, step by step, for the run's timeline (util/results.py)
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.usage.usage_lib import UsageContext

        imported = time.time()
        from util.replica.host import prepare_replica_host
        from util.replica.internals import engine_process_forked, without_setup_hook_field
        from util.replica.supervisor import EngineSupervisor, ProgressClient
        engine_kwargs = engine_kwargs or {}
        prepare_replica_host(engine_kwargs)  # its engine's processes end with it; on CPU, its own cores
        self.model_name = model_name or model
        self.sampling, self.parts = dict(sampling or {}), list(parts or [])
        self.tokenizer = load_tokenizer(tokenizer_args(model, engine_kwargs))
        # LLM_CLASS selects vLLM's offline defaults (on an H100: 1024 sequences, 16k batched tokens); the
        # engine's own default context is sized for online serving and halves throughput here.
        def start_engine():
            args = self.engine_args(AsyncEngineArgs, model, engine_kwargs)
            with engine_process_forked(engine_kwargs):  # its engine process forked, not spawned: 20 s less
                config = args.create_engine_config(UsageContext.LLM_CLASS)  # as from_engine_args makes it
                without_setup_hook_field(config)  # an engine of Ray workers starts (util/replica/internals.py)
                return AsyncLLMEngine.from_vllm_config(config, usage_context=UsageContext.LLM_CLASS,
                                                       enable_log_requests=args.enable_log_requests,
                                                       disable_log_stats=args.disable_log_stats)

        # The engine: a new one whenever it dies or hangs, stopped at the replica's exit (util/replica/supervisor.py).
        self.supervisor = EngineSupervisor(start_engine, max_engine_restarts, stall_timeout_s,
                                           self.sampling.get("max_tokens", 2048), lambda name, n: self.progress.count(name, n))
        self.progress = ProgressClient.connect({"actor_start": entered, "vllm_imported": imported})  # the run's, if any

    @property
    def engine(self):
        return self.supervisor.engine

    def engine_args(self, engine_args_class, model: str, engine_kwargs: dict):
        return engine_args_class(model=model, **engine_kwargs)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return await self.predict(batch, self.sampling, self.parts)
        except RunStopped:  # its run was stopped before any row ran (util/scan.py): Ray Data aborts it now
            end_stopped_replica(self.shutdown)
            raise

    async def predict(self, batch: pa.Table, sampling: dict, parts: list) -> pa.Table:
        """The batch answered with the job's `sampling` and features' `parts` (a warm replica serves a job
        of its own: util/features/replica_pool.py), once the run lets rows run (its input passed its check)."""
        await self.progress.released()
        return await self.answer(batch, sampling, parts)

    async def answer(self, batch: pa.Table, sampling: dict, parts: list) -> pa.Table:  # a task's own: embed, score
        results = await asyncio.gather(*[self.run_row(row, sampling, parts) for row in batch.to_pylist()])
        self.progress.rows_done(0, 0, flush=True)  # the batch's last rows: Ray Data writes it now
        columns = {**self.COLUMNS, **{k: v for part in parts for k, v in part.columns.items()}}
        return finish_batch(batch, results, columns, tuple(name for part in parts for name in part.engine_inputs))

    async def run_row(self, row: dict, sampling: dict, parts: list) -> dict:
        """One row as one engine request: its columns, or its error. A dead engine is not a row's fault: it
        is raised."""
        if row[col.ERROR] is not None:  # refused before the engine (empty, too long, ...)
            self.progress.rows_done(1, 0)
            return {col.ERROR: row[col.ERROR], col.MODEL: self.model_name}
        request = Request(row, {}, {"prompt_token_ids": row[col.PROMPT_TOKEN_IDS]}, replica=self)
        try:
            check(request, sampling, parts)  # a feature may name the row's model (LoRA) before it refuses
            result = await self.supervisor.run(row[col.ID], attempt := lambda engine: self.generate(engine, request, parts))
            while any(part.again(request, result) for part in parts):  # a feature runs it once more (util/features/repair.py)
                result = await self.supervisor.run(row[col.ID], attempt)  # timed, and rerun at a death, as its own row
        except RowError as refused:
            result = {col.ERROR: str(refused), col.MODEL: request.model or self.model_name}
        # The progress line moves row by row; the report's prefix-cache hit rate counts the rows that ran.
        self.progress.rows_done(1, result.get(col.NUM_GENERATED_TOKENS, 0), prompt_tokens=result.get(PROMPT_TOKENS, 0),
                                cached_tokens=result.get(CACHED_TOKENS, 0))
        return result

    async def generate(self, engine, request: Request, parts: list) -> dict:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        for part in parts:
            await part.prepare(request)
        try:
            # FINAL_ONLY: one result per request, not a cumulative copy at every step. Rows without stop
            # strings are decoded once, at the end, here: the engine's detokenizer works token by token for
            # every running row, on the process that feeds the engine.
            decode_here = not request.sampling.get("stop")
            params = SamplingParams(**request.sampling, output_kind=RequestOutputKind.FINAL_ONLY,
                                    detokenize=not decode_here)
            final = None
            # A fresh request id per attempt: a retried batch must not collide with its first try.
            async for output in engine.generate(request.prompt, params, f"{request.row[col.ID]}-{uuid.uuid4().hex[:8]}",
                                                     **request.generate_kwargs):
                final = output
        except Exception as error:
            raise self.supervisor.refusal(error, engine) from None
        final.outputs.sort(key=lambda completion: completion.index)
        samples = [{"text": self.tokenizer.decode(c.token_ids, skip_special_tokens=params.skip_special_tokens)
                    if decode_here else c.text, "finish_reason": c.finish_reason,
                    "num_generated_tokens": len(c.token_ids)} for c in final.outputs]
        # vLLM's own count of the prompt's tokens that its prefix cache held (not columns: the run report's)
        result = {"samples": samples, col.MODEL: request.model or self.model_name,
                  PROMPT_TOKENS: len(request.prompt.get("prompt_token_ids") or ()),
                  CACHED_TOKENS: getattr(final, "num_cached_tokens", None) or 0,
                  **timings(getattr(final, "metrics", None))}
        for part in parts:  # each feature's columns: from each sample, and from the whole request
            part.output(request, final, result)
        first = samples[0]
        return {**{k: v for k, v in first.items() if k != "text"}, **result, col.GENERATED_TEXT: first["text"],
                col.NUM_GENERATED_TOKENS: sum(s["num_generated_tokens"] for s in samples)}

    def shutdown(self) -> None:  # the engine's processes stopped now, not as the actor exits
        self.supervisor.shutdown()
