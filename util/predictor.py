"""The vLLM stage: a Ray Data callable class that turns formatted prompts into generated text.

    from util.predictor import LLMPredictor
    ds = ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model": ..., "engine_kwargs": {...},
                        "sampling": {"temperature": 0, "max_tokens": 256}}, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=64)

`LLMPredictor` (the default) holds one vLLM AsyncLLM engine per replica. Ray Data hands each replica
several batches at once, and every row of every batch becomes its own engine request, so the engine's
scheduler always has work queued: a short row frees its slot for a new one instead of waiting for the
longest row of its batch. `SyncLLMPredictor` is the simpler, blocking `LLM.generate` form, kept for
teaching and for comparison; each of its batches waits for its slowest row. `EmbeddingPredictor`
(--task embed) runs the same engine as a pooling model and writes each row's `embedding` instead.

Needs the columns id, prompt, prompt_token_ids, error (from util/prompt_format.py) and, optionally,
`sampling_params` (a dict or JSON object per row, overriding the job's sampling), `lora` (the row's
LoRA adapter, util/lora.py; for OpenAI batch input, the request's model) and, for a vision job,
`prompt_images` (each row's images, encoded: util/images.py). Adds generated_text, finish_reason,
num_generated_tokens, model (the adapter's name for a row with one) and structured_output_error, and the
richer outputs of util/request_output.py (completions for n > 1, logprobs, prompt_logprobs,
reasoning_content, per-row timings); drops prompt_token_ids and prompt_images.

Images: a row's prompt goes to vLLM as its token ids, with one image placeholder per image as the chat
template put it, and `multi_modal_data` holding its images, decoded here. vLLM's own processor expands
each placeholder to the image's tokens for token prompts as for text ones (vLLM 0.26 and 0.32 alike), so
the prompt is tokenized once, by the formatter, which counts the expanded length in num_input_tokens.

Structured output (util/structured_output.py): the job's sampling may hold `structured_outputs` (from
--json-schema, --regex or --choice), and a row's sampling_params its own `structured_outputs` or
OpenAI's `response_format`. vLLM's guided decoding then constrains the row's tokens, and
`structured_output_error` says why its text still does not conform (cut off by max_tokens, say),
or is null. A row whose own spec is invalid fails alone, with `error` saying why.
"""

import asyncio
import atexit
import json
import os
import uuid
import weakref

import pyarrow as pa

from util import columns as col
from util.columns import COMPLETIONS_TYPE, EMBEDDING_TYPE, TIMINGS, TOKEN_LOGPROBS, set_columns
from util.engine import engine_process_forked
from util.errors import INVALID_SAMPLING, row_error
from util.images import engine_images
from util.lora import ReplicaAdapters
from util.reasoning import ReasoningSplitter, check_parser_name
from util.request_output import row_result
from util.structured_output import row_spec, vllm_params

# Sampling keys that are the predictor's, not SamplingParams'.
OWN_KEYS = ("reasoning_parser",)
# Columns the formatter made for the engine alone: dropped from the output.
ENGINE_INPUTS = (col.PROMPT_TOKEN_IDS, col.PROMPT_IMAGES)


def row_sampling(job_sampling: dict, row_override) -> dict:
    """The job's sampling parameters with one row's overrides on top (None values ignored). A row's
    `structured_outputs` or `response_format` replaces the job's `structured_outputs` (checked: ValueError)."""
    if row_override is None or (isinstance(row_override, str) and not row_override.strip()):
        return dict(job_sampling)
    override = json.loads(row_override) if isinstance(row_override, str) else dict(row_override)
    if not isinstance(override, dict):
        raise ValueError(f"must be a JSON object, got {type(override).__name__}")
    override = {k: v for k, v in override.items() if v is not None}
    spec = row_spec(override, job_sampling.get("structured_outputs"))
    if "reasoning_parser" in override:
        check_parser_name(override["reasoning_parser"], "reasoning_parser")
    sampling = {k: v for k, v in {**job_sampling, **override}.items()
                if k not in ("structured_outputs", "response_format")}
    n = sampling.get("n", 1)
    # vLLM refuses it too, but only in the replica; preflight counts it this way.
    if isinstance(n, int) and n > 1 and sampling.get("temperature", 1.0) == 0:
        raise ValueError(f"n={n} needs temperature > 0: greedy sampling gives one answer")
    return {**sampling, "structured_outputs": spec} if spec else sampling


def engine_params(sampling: dict) -> dict:
    """A row's sampling as SamplingParams' keyword arguments: the structured-output spec as vLLM's
    type, the predictor's own keys left out."""
    params = {k: v for k, v in sampling.items() if k not in OWN_KEYS}
    return {**params, "structured_outputs": vllm_params(sampling.get("structured_outputs"))}


def rows_sampling(batch: pa.Table, job_sampling: dict) -> list[tuple[bool, dict | str]]:
    """Per row: (False, sampling kwargs) when it can go to the engine, else (True, why not)."""
    errors = batch[col.ERROR].to_pylist()
    overrides = batch[col.SAMPLING_PARAMS].to_pylist() if col.SAMPLING_PARAMS in batch.column_names else None
    rows = []
    for i, error in enumerate(errors):
        if error is not None:  # refused before the engine (empty, too long, ...)
            rows.append((True, error))
            continue
        try:
            rows.append((False, row_sampling(job_sampling, None if overrides is None else overrides[i])))
        except (ValueError, TypeError) as bad:
            rows.append((True, row_error(INVALID_SAMPLING, reason=bad)))
    return rows


def engine_prompt(token_ids: list[int], images: list[bytes] | None = None) -> dict:
    """A row as vLLM's prompt: its token ids and, if it has images, the images decoded (vLLM expands
    each image placeholder among the ids to the image's tokens)."""
    prompt = {"prompt_token_ids": token_ids}
    if images:
        prompt["multi_modal_data"] = {"image": engine_images(images)}
    return prompt


def row_images(batch: pa.Table) -> list:
    """Each row's encoded images (None for a row without), or Nones for a batch of a text job."""
    return batch[col.PROMPT_IMAGES].to_pylist() if col.PROMPT_IMAGES in batch.column_names else [None] * len(batch)


def engine_inputs_dropped(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([name for name in ENGINE_INPUTS if name in batch.column_names])


def replica_adapters(model: str, model_name: str, engine_kwargs: dict, adapters: dict | None) -> ReplicaAdapters:
    """The replica's LoRA adapters: those registered with --lora, and any path a row names, when the engine
    has LoRA on. An OpenAI request whose body.model names the base model (`model_name`) asks for none."""
    return ReplicaAdapters(adapters, bool(engine_kwargs.get("enable_lora")), engine_kwargs.get("max_lora_rank"),
                           base_names={model, model_name})


def ready_rows(batch: pa.Table, job_sampling: dict, adapters: ReplicaAdapters) -> list[tuple]:
    """Per row: (why it cannot go to the engine, or None; its sampling kwargs; its LoRA adapter, or None)."""
    rows = []
    for (failed, sampling), (adapter, unknown) in zip(rows_sampling(batch, job_sampling), adapters.of_rows(batch)):
        refused = sampling if failed else unknown
        rows.append((refused, None if refused else sampling, adapter))
    return rows


def _tokenizer(model: str, engine_kwargs: dict):
    """The tokenizer the engine uses, as the engine arguments name it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        engine_kwargs.get("tokenizer") or model,
        revision=engine_kwargs.get("tokenizer_revision") or engine_kwargs.get("revision"),
        trust_remote_code=engine_kwargs.get("trust_remote_code", False))


def wait_for_replicas_to_exit(timeout_s: float = 60.0) -> None:
    """Wait, at most `timeout_s`, until this job's Ray Data actors on this node (the replicas among
    them) have exited. Ray Data lets them go when the dataset is done, and each replica shuts its engine
    down on the way out (LLMPredictor.shutdown). A driver that ends first takes a local Ray cluster down
    under them, and the worker kills its engine's processes first: vLLM logs that as a crash. (On a
    cluster the driver's end leaves the nodes running; replicas elsewhere exit on their own.)"""
    import time

    import ray
    from ray._private import state  # the GCS actor table; ray.util.state needs the dashboard running

    context, deadline = ray.get_runtime_context(), time.monotonic() + timeout_s
    try:
        pids = [a["Pid"] for a in state.actors().values()
                if a["JobID"] == context.get_job_id() and a["ActorClassName"].startswith("MapWorker(")
                and a["Address"]["NodeID"] == context.get_node_id() and a.get("Pid")]
    except Exception:  # another Ray version: no wait, at worst vLLM's exit messages after the report
        return
    # The processes, dead actors' included: an actor is marked dead before its exit hooks have run.
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _running(pid)]
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone (or, by now, someone else's)
        return False
    return True


def _shutdown_if_alive(predictor_ref: weakref.ref) -> None:
    predictor = predictor_ref()
    if predictor is not None:
        predictor.shutdown()


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def finish_batch(batch: pa.Table, results: list[dict], model: str, adapters: list | None = None) -> pa.Table:
    """The batch with each row's result as columns (PREDICTOR_ADDS of util/pipeline.py); the engine's
    inputs (token ids, images) dropped. `model` names the model of every row, except one whose LoRA
    adapter (`adapters`, per row) it names."""
    column = lambda name, kind: pa.array([r.get(name) for r in results], kind)
    adapters = adapters or [None] * len(results)
    return set_columns(engine_inputs_dropped(batch), {
        col.GENERATED_TEXT: column("generated_text", pa.string()),
        col.FINISH_REASON: column("finish_reason", pa.string()),
        col.NUM_GENERATED_TOKENS: pa.array([r.get("num_generated_tokens", 0) for r in results], pa.int64()),
        col.ERROR: column("error", pa.string()),
        col.MODEL: pa.array([adapter or model for adapter in adapters], pa.string()),
        col.STRUCTURED_OUTPUT_ERROR: column("structured_output_error", pa.string()),
        col.COMPLETIONS: column("completions", COMPLETIONS_TYPE),
        col.LOGPROBS: column("logprobs", TOKEN_LOGPROBS),
        col.PROMPT_LOGPROBS: column("prompt_logprobs", TOKEN_LOGPROBS),
        col.REASONING_CONTENT: column("reasoning_content", pa.string()),
        **{name: column(name, pa.float64()) for name in TIMINGS},
    })


class _Spelling:
    """Token ids to text, for the predictor's own decoding, its log-probabilities and its reasoning
    parsers (built once per replica, each parser on first use)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: dict[int, str] = {}
        self.splitters: dict[str, ReasoningSplitter] = {}

    def token(self, token_id: int) -> str:
        """One token's text, as vLLM's logprobs spell it: the token decoded on its own."""
        text = self.tokens.get(token_id)
        if text is None:
            text = self.tokens[token_id] = self.tokenizer.decode([token_id])
        return text

    def reasoning(self, name: str | None):
        if name is None:
            return None
        if name not in self.splitters:
            self.splitters[name] = ReasoningSplitter(name, self.tokenizer)
        return self.splitters[name]


class LLMPredictor:
    """One AsyncLLM engine per replica; all rows of all in-flight batches run concurrently."""

    def __init__(self, model: str, engine_kwargs: dict | None = None, sampling: dict | None = None,
                 model_name: str | None = None, adapters: dict | None = None):
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_name = model_name or model
        self.sampling = dict(sampling or {})
        self.adapters = replica_adapters(model, self.model_name, engine_kwargs or {}, adapters)
        self.tokenizer = _tokenizer(model, engine_kwargs or {})
        self.spelling = _Spelling(self.tokenizer)
        # The job's reasoning parser, built now: a tokenizer without its tags fails before the engine starts.
        self.spelling.reasoning(self.sampling.get("reasoning_parser"))
        # LLM_CLASS selects vLLM's offline defaults (on an H100: 1024 sequences, 16k batched tokens);
        # the engine's own default context is sized for online serving and halves throughput here.
        with engine_process_forked(engine_kwargs or {}):  # its engine process forked, not spawned: 20 s less
            self.engine = AsyncLLM.from_engine_args(self.engine_args(AsyncEngineArgs, model, engine_kwargs or {}),
                                                    usage_context=UsageContext.LLM_CLASS)
        # Exit hooks run last-registered first, so this one runs before multiprocessing's, which would
        # end the engine's processes under it. A weak reference: it must not keep the replica alive.
        atexit.register(_shutdown_if_alive, weakref.ref(self))
        from util.report import ProgressClient

        self.progress = ProgressClient.connect()  # the run's progress actor, if one is listening

    def engine_args(self, engine_args_class, model: str, engine_kwargs: dict):
        return engine_args_class(model=model, **engine_kwargs)

    async def row_or_error(self, request) -> dict:
        """A row's result from the coroutine `request`, or, when the engine refuses the request (bad
        sampling values, ...), the row's error; a dead engine is not a row's fault and fails the job."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return await request
        except EngineDeadError:
            raise
        except Exception as error:
            if getattr(self.engine, "errored", False):
                raise
            return {"error": f"{type(error).__name__}: {error}"}

    async def generate_row(self, row_id: str, token_ids, sampling: dict, images: list[bytes] | None = None,
                           adapter: str | None = None) -> dict:
        """One row as one engine request: its generated text, finish reason and token count, or its error.
        With an `adapter`, the engine loads it on its first row; one that cannot be loaded fails its rows."""
        lora_request = None
        if adapter is not None:
            lora_request = await self.adapters.load(adapter, self.engine.add_lora)
            if isinstance(lora_request, str):
                return {"error": lora_request}
        return await self.row_or_error(self._generate(row_id, token_ids, sampling, images, lora_request))

    async def _generate(self, row_id: str, token_ids, sampling: dict, images: list[bytes] | None = None,
                        lora_request=None) -> dict:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: one result per request, not a cumulative copy of the output at every step,
        # which would cost the front-end process more CPU than the GPU needs to decode.
        # Rows without stop strings are decoded once, at the end, here: the engine's own
        # detokenizer works token by token for every running row, on the process that feeds it.
        decode_here = not sampling.get("stop")
        reasoning = self.spelling.reasoning(sampling.get("reasoning_parser"))
        params = SamplingParams(**engine_params(sampling), output_kind=RequestOutputKind.FINAL_ONLY,
                                detokenize=not decode_here)
        final = None
        # Images are decoded off the event loop, which meanwhile feeds the engine the other rows.
        request = await asyncio.to_thread(engine_prompt, token_ids, images) if images else engine_prompt(token_ids)
        # A fresh request id per attempt: a retried batch must not collide with its first try.
        async for output in self.engine.generate(request, params, f"{row_id}-{uuid.uuid4().hex[:8]}",
                                                 lora_request=lora_request):
            final = output
        decode = ((lambda c: self.tokenizer.decode(c.token_ids, skip_special_tokens=params.skip_special_tokens))
                  if decode_here else (lambda c: c.text))
        return row_result(final, sampling, decode, self.spelling.token, reasoning)

    def shutdown(self) -> None:
        """Stop the engine and its processes, once: at the actor's exit (an exit hook, registered in
        __init__) or when the replica is dropped earlier (__del__). Otherwise the engine's processes die
        under it as the actor exits (Ray's worker kills its children unless util/worker_env.py says not
        to; multiprocessing's exit hook ends daemon children), and vLLM logs a crash, EngineDeadError,
        after a run that went well. main.py waits for this before its report (wait_for_replicas_to_exit)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is None:
            return
        # vLLM's own shutdown stops the engine core first and cancels the task that reads its outputs
        # after, so that task can find the engine gone and log EngineDeadError: cancel it first, on its
        # own event loop (Ray runs an async actor's loop in another thread), and wait until it has ended.
        handler = getattr(engine, "output_handler", None)
        if handler is not None and not handler.done():
            loop = handler.get_loop()
            if loop.is_running() and not _in_loop(loop):
                try:
                    asyncio.run_coroutine_threadsafe(_cancel(handler), loop).result(timeout=10)
                except Exception:  # the loop is going away too: shut down regardless
                    pass
            else:
                handler.cancel()  # not running, or this is its thread: it will resume only to be cancelled
        engine.shutdown()
        del engine  # collected now, while modules are loaded: AsyncLLM.__del__ shuts down again, harmlessly

    def __del__(self) -> None:
        self.shutdown()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        ids, token_ids, images = batch[col.ID].to_pylist(), batch[col.PROMPT_TOKEN_IDS].to_pylist(), row_images(batch)
        rows = ready_rows(batch, self.sampling, self.adapters)
        tasks = [asyncio.sleep(0, {"error": refused}) if refused
                 else self.generate_row(ids[i], token_ids[i], sampling, images[i], adapter)
                 for i, (refused, sampling, adapter) in enumerate(rows)]
        results = await asyncio.gather(*tasks)
        self.progress.batch_done(len(results), sum(r.get("num_generated_tokens", 0) for r in results))
        return finish_batch(batch, results, self.model_name, [adapter for _, _, adapter in rows])


class EmbeddingPredictor(LLMPredictor):
    """--task embed: one AsyncLLM pooling engine per replica, each row one `encode` request whose pooled
    vector (for a causal LM, vLLM's default embed pooling: the last token's hidden state, L2-normalized)
    becomes the row's `embedding`. The same row contract as LLMPredictor: needs id, prompt_token_ids and
    error, passes rows with an error through, keeps num_input_tokens, adds embedding and model and drops
    prompt_token_ids (EMBEDDING_ADDS of util/pipeline.py)."""

    def engine_args(self, engine_args_class, model: str, engine_kwargs: dict):
        # vLLM 0.10.1 and later: runner and convert; before that one `task` argument. A model that is an
        # embedding model already takes convert="embed" too. The user's --engine-arg keys win.
        try:
            return engine_args_class(model=model, **{"runner": "pooling", "convert": "embed", **engine_kwargs})
        except TypeError:
            return engine_args_class(model=model, **{"task": "embed", **engine_kwargs})

    async def _embed(self, row_id: str, token_ids) -> dict:
        from vllm import PoolingParams

        final = None
        params = PoolingParams(task="embed")
        async for output in self.engine.encode({"prompt_token_ids": token_ids}, params,
                                               f"{row_id}-{uuid.uuid4().hex[:8]}"):
            final = output
        data = final.outputs.data  # a tensor of the model's hidden size
        return {"embedding": data.float().tolist() if hasattr(data, "float") else list(data)}

    async def __call__(self, batch: pa.Table) -> pa.Table:
        ids, token_ids = batch[col.ID].to_pylist(), batch[col.PROMPT_TOKEN_IDS].to_pylist()
        tasks = [asyncio.sleep(0, {"error": error}) if error else self.row_or_error(self._embed(ids[i], token_ids[i]))
                 for i, error in enumerate(batch[col.ERROR].to_pylist())]
        results = await asyncio.gather(*tasks)
        self.progress.batch_done(len(results), 0)
        return set_columns(engine_inputs_dropped(batch), {
            col.EMBEDDING: pa.array([r.get("embedding") for r in results], EMBEDDING_TYPE),
            col.ERROR: pa.array([r.get("error") for r in results], pa.string()),
            col.MODEL: pa.array([self.model_name] * len(results), pa.string()),
        })


class SyncLLMPredictor:
    """The blocking form: one `LLM.generate` call per batch. Simple, but each batch waits for its
    longest row while the GPU idles, and vLLM never sees more than one batch of sequences."""

    def __init__(self, model: str, engine_kwargs: dict | None = None, sampling: dict | None = None,
                 model_name: str | None = None, adapters: dict | None = None):
        from vllm import LLM

        self.model_name = model_name or model
        self.sampling = dict(sampling or {})
        self.adapters = replica_adapters(model, self.model_name, engine_kwargs or {}, adapters)
        with engine_process_forked(engine_kwargs or {}):
            self.llm = LLM(model=model, **(engine_kwargs or {}))
        self.spelling = _Spelling(self.llm.get_tokenizer())

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vllm import SamplingParams

        token_ids, rows = batch[col.PROMPT_TOKEN_IDS].to_pylist(), ready_rows(batch, self.sampling, self.adapters)
        images = row_images(batch)
        results = [{"error": refused} for refused, _, _ in rows]
        loras = {}  # each row's loaded adapter (LLMEngine.add_lora first: see util/lora.py), or its error
        for i, (refused, _, adapter) in enumerate(rows):
            if not refused and adapter is not None:
                loras[i] = self.adapters.load_now(adapter, self.llm.llm_engine.add_lora)
                if isinstance(loras[i], str):
                    results[i] = {"error": loras[i]}
        ready = [i for i, result in enumerate(results) if not result["error"]]
        prompts = [engine_prompt(token_ids[i], images[i]) for i in ready]
        params = [SamplingParams(**engine_params(rows[i][1])) for i in ready]
        lora_requests = [loras.get(i) for i in ready]
        outputs = self.llm.generate(prompts, params, use_tqdm=False,
                                    lora_request=lora_requests if any(lora_requests) else None) if prompts else []
        for i, output in zip(ready, outputs):
            try:
                results[i] = row_result(output, rows[i][1], lambda c: c.text, self.spelling.token,
                                        self.spelling.reasoning(rows[i][1].get("reasoning_parser")))
            except Exception as error:  # a row's reasoning parser that cannot be built: that row fails
                results[i] = {"error": f"{type(error).__name__}: {error}"}
        return finish_batch(batch, results, self.model_name, [adapter for _, _, adapter in rows])
