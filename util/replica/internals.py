"""Every private attribute of Ray or vLLM this project uses, and its one patch of vLLM, each with why, as
checked on Ray 2.60 and vLLM 0.26 (GPU) and 0.32 (CPU). Each fails loudly, by name (Moved), when it is not
where it was; tests/test_internals.py checks them all, so a version bump cannot quietly turn a wait into a
skip, or a forked engine start into a spawned one. Code imports an item where it uses it, so that a reader
of the template meets these shims only there.
"""

import asyncio
import contextlib
import functools
import importlib
import os
import time


class Moved(RuntimeError):
    """An internal of Ray or vLLM that this project relies on is not where it was."""


def _find(path: str):
    """`module:attribute.attribute` imported and looked up, or Moved naming it."""
    module, _, attributes = path.partition(":")
    try:
        value = importlib.import_module(module)
        for name in filter(None, attributes.split(".")):
            value = getattr(value, name)
    except (ImportError, AttributeError) as error:
        raise Moved(f"{path} is gone ({type(error).__name__}: {error}); util/replica/internals.py says what it was for") from None
    return value


# --- Ray -------------------------------------------------------------------------------------------

def set_last_operator_cpus(ds, cpus: float):
    """`ds` with its last operator's tasks asking for `cpus` CPUs. Ray Data's streaming repartition takes
    no num_cpus and asks for a whole CPU, which a small machine may never have free beside the replicas;
    with the data tasks' share it also fuses into the formatting task (util/pipeline.py)."""
    try:
        ds._logical_plan.dag.ray_remote_args["num_cpus"] = cpus
    except AttributeError as error:
        raise Moved(f"ray.data.Dataset._logical_plan.dag.ray_remote_args is gone ({error})") from None
    return ds


def wait_for_actors_to_exit(class_prefix: str, timeout_s: float) -> None:
    """Wait, at most `timeout_s`, until the processes of this job's actors on this node whose class name
    starts with `class_prefix` have ended, dead actors' included (an actor is marked dead before its exit
    hooks have run). Read from the GCS actor table (ray._private.state): ray.util.state needs the
    dashboard, which a job may run without."""
    import ray

    context, deadline = ray.get_runtime_context(), time.monotonic() + timeout_s
    pids = [a["Pid"] for a in _find("ray._private.state:actors")().values()
            if a["JobID"] == context.get_job_id() and a["ActorClassName"].startswith(class_prefix)
            and a["Address"]["NodeID"] == context.get_node_id() and a.get("Pid")]
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _running(pid)]
        time.sleep(0.2)


def wait_for_replicas_to_exit(timeout_s: float = 60.0) -> None:
    """This job's Ray Data actors on this node (the replicas among them), each shutting its engine down: a
    driver that ends first takes a local Ray cluster down under them, and vLLM logs that as a crash, after
    the report. (Replicas on other nodes exit on their own.)"""
    wait_for_actors_to_exit("MapWorker(", timeout_s)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone (or, by now, someone else's)
        return False
    return True


def without_setup_hook_field(vllm_config) -> None:
    """The runtime env an engine of Ray workers (tensor or pipeline parallel) passes on, without its
    `worker_process_setup_hook` field. vLLM hands the replica's runtime env (ray.get_runtime_context()) to
    its engine process, which calls ray.init with it; by then Ray has turned the job's setup hook into an env
    var, and left in the field only the function's name, for show. Ray's ray.init takes that name for a module
    path, and refuses it: "Conflicting worker_process_setup_hook" (ray/_private/runtime_env/setup_hook.py).
    The env var alone still runs the hook in each of the engine's workers."""
    runtime_env = vllm_config.parallel_config.ray_runtime_env
    hook_env_var = _find("ray._private.ray_constants:WORKER_PROCESS_SETUP_HOOK_ENV_VAR")
    if runtime_env and "worker_process_setup_hook" in runtime_env:
        assert hook_env_var in runtime_env.get("env_vars", {}), "the setup hook's env var is not where it was"
        vllm_config.parallel_config.ray_runtime_env = type(runtime_env)(
            **{key: value for key, value in runtime_env.items() if key != "worker_process_setup_hook"})


def ray_data_file_handler() -> type:
    """Ray Data's handler of its log file, which keeps every level when the console shows warnings only."""
    return _find("ray.data._internal.logging:SessionFileHandler")


# --- vLLM ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def not_in_ray_actor():
    """vLLM, for the time of the `with` block, takes this process for no Ray actor: from an actor it
    always spawns its engine process (vllm/utils/system_utils.py, _maybe_force_spawn), and the new
    interpreter imports torch and vLLM again (about 20 s of a replica's start on an H200). A one-GPU
    engine runs in one process and never talks to Ray, so it may be forked (engine_process_forked)."""
    system_utils = _find("vllm.utils.system_utils")
    checked = _find("vllm.utils.system_utils:is_in_ray_actor")
    system_utils.is_in_ray_actor = lambda: False
    try:
        yield
    finally:
        system_utils.is_in_ray_actor = checked


@contextlib.contextmanager
def engine_process_forked(engine: dict):
    """Around a one-GPU replica's engine start: vLLM forks its engine process, as from a plain script, instead
    of spawning it, as it does from a Ray actor, where the new interpreter imports torch and vLLM again:
    21-23 s of every replica's start on an H200, against 1-2 s (BENCHMARKS.md). An engine of several GPUs
    (its Ray workers must find the cluster) still spawns, as do vLLM's other cases (CUDA initialized,
    VLLM_WORKER_MULTIPROC_METHOD=spawn, every engine on CPU)."""
    if engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1) > 1 \
            or engine.get("distributed_executor_backend") is not None:
        yield
        return
    with not_in_ray_actor():
        yield


def engine_dead_error() -> type:
    """vLLM v1's EngineDeadError: the engine process is gone, and every request in flight with it."""
    return _find("vllm.v1.engine.exceptions:EngineDeadError")


ENGINE_STOP_S = 30.0


def shutdown_engine(engine) -> None:
    """AsyncLLM's shutdown, its output task first. vLLM's own stops the engine process first and cancels the
    task that reads its outputs (AsyncLLM.output_handler, None before the first request) after, so that the
    task can find the engine gone and log EngineDeadError after a run that went well: it is cancelled first,
    on its own event loop (Ray runs an async actor's loop in another thread), and awaited."""
    if not hasattr(engine, "output_handler"):
        raise Moved("vllm AsyncLLM.output_handler is gone")
    handler = engine.output_handler
    if handler is not None and not handler.done():
        loop = handler.get_loop()
        try:
            running_here = asyncio.get_running_loop() is loop
        except RuntimeError:
            running_here = False
        if loop.is_running() and not running_here:
            try:
                asyncio.run_coroutine_threadsafe(_cancel(handler), loop).result(timeout=10)
            except Exception:  # the loop is going away too: shut down regardless
                pass
        else:
            handler.cancel()  # not running, or this is its thread: it will resume only to be cancelled
    import inspect

    # vLLM 0.3x gives its engine process 5 s after SIGTERM, then kills it and logs that; a CPU engine on a
    # busy node takes longer to stop its worker. 0.26 takes no timeout.
    timeout = {"timeout": ENGINE_STOP_S} if "timeout" in inspect.signature(engine.shutdown).parameters else {}
    engine.shutdown(**timeout)


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def lora_ranks() -> tuple[int, ...]:
    """The max_lora_rank values vLLM accepts (a typing Literal in vLLM's LoRA config)."""
    import typing

    return tuple(sorted(typing.get_args(_find("vllm.config.lora:MaxLoRARanks"))))


@functools.cache
def reasoning_parser_names() -> tuple[str, ...]:
    """The reasoning parsers vLLM registers: list_registered() where it has one, else its two registries."""
    manager = _find("vllm.reasoning:ReasoningParserManager")
    if hasattr(manager, "list_registered"):
        return tuple(sorted(manager.list_registered()))
    return tuple(sorted(set(manager.reasoning_parsers) | set(getattr(manager, "lazy_parsers", {}))))


def chat_completion_request() -> type:
    """vLLM's ChatCompletionRequest, which reasoning and tool parsers take (its module moved in 0.3x)."""
    for path in ("vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.protocol"):
        with contextlib.suppress(Moved):
            return _find(f"{path}:ChatCompletionRequest")
    raise Moved("vllm ChatCompletionRequest is in neither vllm.entrypoints.openai.chat_completion.protocol "
                "nor vllm.entrypoints.openai.protocol")


@functools.cache
def tool_parser_names() -> tuple[str, ...]:
    """The tool-call parsers vLLM registers (`vllm serve --tool-call-parser`)."""
    return tuple(sorted(_find("vllm.tool_parsers:ToolParserManager").list_registered()))


def tool_parser(name: str) -> type:
    """vLLM's tool-call parser class of that name: ToolParser(tokenizer, tools).extract_tool_calls(text, request)."""
    return _find("vllm.tool_parsers:ToolParserManager").get_tool_parser(name)


def tool_call_schema():
    """vLLM's get_json_schema_from_tools(tool_choice, tools): the JSON schema its server guides a named or
    "required" tool_choice's text to (vllm.tool_parsers.utils in 0.26 and 0.32)."""
    return _find("vllm.tool_parsers.utils:get_json_schema_from_tools")


def image_media_io() -> type:
    """vLLM's image decoder for multi_modal_data, the one its OpenAI server decodes an image_url with."""
    return _find("vllm.multimodal.media:ImageMediaIO")


CHECKS = {
    "ray.data: Dataset._logical_plan.dag.ray_remote_args": lambda: repartition_remote_args_declared(),
    "ray._private.state.actors": lambda: _find("ray._private.state:actors"),
    "ray.data._internal.logging.SessionFileHandler": ray_data_file_handler,
    "ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR":
        lambda: _find("ray._private.ray_constants:WORKER_PROCESS_SETUP_HOOK_ENV_VAR"),
    "vllm ParallelConfig.ray_runtime_env": lambda: _declared("vllm.config:ParallelConfig", "ray_runtime_env"),
    "vllm.utils.system_utils.is_in_ray_actor (patched)": lambda: _find("vllm.utils.system_utils:is_in_ray_actor"),
    "vllm.utils.system_utils._maybe_force_spawn (reads it)": lambda: _find("vllm.utils.system_utils:_maybe_force_spawn"),
    "vllm.v1.engine.exceptions.EngineDeadError": engine_dead_error,
    "vllm AsyncLLM.output_handler": lambda: _declared("vllm:AsyncLLMEngine", "self.output_handler"),
    "vllm.config.lora.MaxLoRARanks": lora_ranks,
    "vllm.reasoning.ReasoningParserManager": reasoning_parser_names,
    "vllm ChatCompletionRequest": chat_completion_request,
    "vllm.multimodal.media.ImageMediaIO": image_media_io,
    "vllm.tool_parsers.ToolParserManager": tool_parser_names,
    "vllm.tool_parsers.ToolParserManager.get_tool_parser": lambda: tool_parser("hermes"),
    "vllm.tool_parsers.utils.get_json_schema_from_tools": tool_call_schema,
}


def _declared(path: str, text: str) -> bool:
    """An attribute set on instances only (no class attribute to look up): the class's source sets it."""
    import inspect

    if text not in inspect.getsource(_find(path)):
        raise Moved(f"{path} no longer sets {text}")
    return True


def repartition_remote_args_declared() -> bool:
    """Dataset keeps its plan in `_logical_plan`, whose `dag` is the last operator: a streaming repartition,
    a dataclass with a `ray_remote_args` dict field (Ray 2.60)."""
    import dataclasses

    _declared("ray.data:Dataset", "self._logical_plan")
    if not isinstance(_find("ray.data._internal.logical.interfaces:LogicalPlan.dag"), property) or "ray_remote_args" \
            not in {f.name for f in dataclasses.fields(_find("ray.data._internal.logical.operators.map_operator:StreamingRepartition"))}:
        raise Moved("ray.data LogicalPlan.dag or StreamingRepartition.ray_remote_args is gone")
    return True
