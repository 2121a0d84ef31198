"""What the run's Ray workers get, set up before the run: a Hugging Face token, the log levels, and an import
that Ray Data's file listing would otherwise do in its threads (worker_setup_hook says why).

    token = prompt_for_hugging_face_token("meta-llama/Meta-Llama-3-8B-Instruct")   # PermissionError if gated
    ray.init(**ray_init_kwargs(worker_runtime_env(token), verbose=False))

The token comes from $HF_TOKEN, then the token `hf auth login` stored, then (in a notebook only) a prompt.
It reaches the workers through a worker setup hook, a pickled function that Ray's logs name by a hash only,
not as a runtime-env variable, whose value Ray logs in plain text. Nothing here prints or writes it.
A run prints Ray's and vLLM's warnings and errors and its own lines, less the warnings that say nothing to
the user (QUIET_ENV_VARS, QUIET_LOGGERS); with --verbose, every log line (Ray Data keeps its full log in the
session's ray-data.log whatever the level).
"""

import getpass
import logging
import os
import sys
from typing import Literal

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, build_hf_headers, get_session, hf_raise_for_status

# "authorized": gated or private, and the hub accepted our token for it.
ModelAccess = Literal["local", "public", "authorized", "gated", "private_or_missing", "unknown"]


def resolve_hugging_face_token(interactive: bool = False) -> str | None:
    """$HF_TOKEN, else the stored login token, else (only if `interactive`) what the user types; None if none."""
    token = os.environ.get("HF_TOKEN", "").strip() or get_token()
    if not token and interactive:
        token = getpass.getpass("Hugging Face token: ").strip()  # getpass: the answer is not echoed
    return token or None


def model_access(model_id: str, token: str | None, timeout_s: float = 10.0) -> ModelAccess:
    """Whether `token` (None: anonymously) can download `model_id`. Never raises: "unknown" on network errors."""
    if os.path.isdir(model_id):
        return "local"
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now: the hub reads it once, at import
    try:
        # `token or False`: with None, huggingface_hub would quietly send the stored or $HF_TOKEN token.
        info = api.model_info(model_id, token=token or False, timeout=timeout_s)
        if not (info.gated or info.private):
            return "public"
        if not token:
            return "gated"
        # Gated repos describe themselves to anyone; only auth-check says whether this account was granted
        # access. HfApi.auth_check's request, with a timeout: auth_check takes none.
        hf_raise_for_status(get_session().get(f"{api.endpoint}/api/models/{model_id}/auth-check",
                                              headers=build_hf_headers(token=token), timeout=timeout_s))
        return "authorized"
    except GatedRepoError:  # a subclass of RepositoryNotFoundError, so it comes first
        return "gated"
    except RepositoryNotFoundError:  # the hub answers 401/404 alike for missing and private repos
        return "private_or_missing"
    except Exception:  # offline, timeout, 5xx, rejected token...: the engine will report the real error later
        return "unknown"


def prompt_for_hugging_face_token(model_id: str, interactive: bool | None = None, timeout_s: float = 10.0) -> str | None:
    """The token to run `model_id` with (None if none is needed and none was found). PermissionError, saying
    how to give one, when the model is gated or private and no token opens it. Prompts only in a notebook
    (`interactive` defaults to "in an IPython kernel"), and only once the model turns out to need a token."""
    if interactive is None:
        interactive = "ipykernel" in sys.modules
    token = resolve_hugging_face_token(interactive=False)
    access = model_access(model_id, token, timeout_s)
    if access in ("gated", "private_or_missing") and not token and interactive:
        token = resolve_hugging_face_token(interactive=True)
        if token:
            access = model_access(model_id, token, timeout_s)
    if access in ("gated", "private_or_missing"):
        what = {"gated": f"'{model_id}' is a gated model on Hugging Face: it needs a token from an account that was "
                         "granted access (request it on the model's page).",
                "private_or_missing": f"'{model_id}' was not found on Hugging Face, or it is private: check the "
                                      "name, or use a token from an account that can read it."}[access]
        found = " The token found was not accepted for it." if token else " No Hugging Face token was found."
        raise PermissionError(what + found + " Give a token in one of these ways: `export HF_TOKEN=hf_...` before "
                              "starting; `hf auth login` (older versions: `huggingface-cli login`); or, in the "
                              "notebook, run this cell again and paste the token at the prompt.")
    return token


def worker_runtime_env(token: str | None) -> dict:
    """`ray.init(runtime_env=...)` that sets $HF_TOKEN in every Ray worker, on every node, without the token
    appearing in Ray's logs (see above)."""
    if not token:
        return {}

    def set_hugging_face_token():  # a closure: it is pickled by value, with the token, not imported by name
        os.environ["HF_TOKEN"] = token

    return {"worker_process_setup_hook": set_hugging_face_token}


# Read by vLLM and by Ray Data in each worker process (an engine's own processes inherit them), and by
# Python there: a deprecated torch name that vLLM's dispatcher touches says nothing to the user.
QUIET_ENV_VARS = {"VLLM_LOGGING_LEVEL": "WARNING", "RAY_DATA_LOG_LEVEL": "WARNING",
                  "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                           "ignore::FutureWarning:vllm.triton_utils.dispatcher"]))}
# Loggers whose warnings say nothing to the user: in the driver and the replicas they pass errors only (the
# engine's own processes start afresh: vLLM's logging reaches them only through VLLM_LOGGING_LEVEL).
QUIET_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",  # a new local cluster has token auth: Ray's default
    "vllm.triton_utils.importing",  # a Triton without a CPU backend (xgrammar's dependency): vLLM goes without
    "vllm.v1.engine.input_processor",  # token ids as a prompt: vLLM 0.32 deprecates it, 0.26 takes nothing else
)
# Ray's kill_child_processes_on_worker_exit is off for the replicas (util/engine.py REPLICA_ENV_VARS): Ray
# would kill a replica's engine before the replica's exit hook stops it. util/replica/host.py ends what a
# replica leaves behind when it dies any other way.


def quiet_loggers() -> None:
    """QUIET_LOGGERS pass errors only, in this process (worker_setup_hook: in each worker)."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if errors_only not in logger.filters:
            logger.addFilter(errors_only)


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_driver() -> None:
    """This process: Ray Data's console handler at WARNING (its log file keeps every level), QUIET_LOGGERS."""
    from util.replica.internals import ray_data_file_handler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, (ray_data_file_handler(), logging.FileHandler)):
            handler.setLevel(logging.WARNING)
    quiet_loggers()


def ray_init_kwargs(runtime_env: dict | None = None, verbose: bool = False) -> dict:
    """`ray.init` keyword arguments: `runtime_env` with the workers' setup hook and, unless verbose, their
    log levels, and the level of the "ray" logger in this process. Actors that set their own env_vars
    (the CPU settings of util/engine.py) keep these: Ray merges a child's env_vars into the job's."""
    runtime_env = dict(runtime_env or {})
    runtime_env["worker_process_setup_hook"] = worker_setup_hook(runtime_env.get("worker_process_setup_hook"),
                                                                 quiet=not verbose)
    # A cluster started here (no address: one machine) gets no dashboard: where its packages are installed, it
    # starts with the cluster, and on a loaded machine its start can fail ray.init. Ray ignores this for a
    # cluster that is already running (a GPU cluster's, with its own dashboard).
    kwargs = {"runtime_env": runtime_env, "include_dashboard": False}
    if verbose:
        return kwargs
    runtime_env["env_vars"] = {**QUIET_ENV_VARS, **runtime_env.get("env_vars", {})}
    quiet_driver()
    return {**kwargs, "logging_level": logging.WARNING}


def worker_setup_hook(setup_hook=None, quiet: bool = True):
    """A worker setup hook: `setup_hook` (the token's); fsspec's HTTP filesystem imported (below); and, when
    `quiet`, QUIET_LOGGERS pass errors only, by a filter on each logger: vLLM's logging setup, when its engine
    starts, sets its loggers' levels back, not their filters.

    Ray Data's file listing imports fsspec's HTTP filesystem on first use, in each of its threads at once. A
    listing cancelled meanwhile (a read stopped early: --limit, a refused input) once left its worker with
    that import half done, and the worker's next listing waited on it for good: imported before any task,
    a listing imports nothing."""
    names = QUIET_LOGGERS if quiet else ()

    def set_up_worker():  # a closure, pickled by value: a worker need not import this module
        import logging

        def errors_only(record) -> bool:
            return record.levelno >= logging.ERROR

        if setup_hook is not None:
            setup_hook()
        try:
            import fsspec.implementations.http  # noqa: F401
        except ImportError:  # without fsspec, Ray Data's listing imports nothing either
            pass
        for name in names:
            logging.getLogger(name).addFilter(errors_only)

    return set_up_worker
