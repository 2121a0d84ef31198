"""Find a Hugging Face token, check it opens the model, and hand it to the Ray workers.

    from util.hf_token import prompt_for_hugging_face_token, worker_runtime_env
    token = prompt_for_hugging_face_token("meta-llama/Meta-Llama-3-8B-Instruct")   # PermissionError if gated
    ray.init(runtime_env=worker_runtime_env(token))

The token comes from $HF_TOKEN, then the token `hf auth login` stored, then (in a notebook only) a prompt.
This module never prints, logs or writes the token.

Why not `runtime_env={"env_vars": {"HF_TOKEN": token}}`: Ray writes every runtime environment it sets
up, env_vars values included, in plain text to `logs/runtime_env_agent.log` of each node's session
folder, and its state API and job details return them too (the dashboard masks them for browsers only).
A worker setup hook instead travels as a pickled function in the cluster's internal store, which Ray
names in its logs by a hash only; each worker runs it before any task, and the processes it starts
(vLLM's engine) inherit the variable.
"""

import getpass
import os
import sys
from typing import Literal

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import (
    GatedRepoError,
    RepositoryNotFoundError,
    build_hf_headers,
    get_session,
    hf_raise_for_status,
)

# "authorized": gated or private, and the hub accepted our token for it.
ModelAccess = Literal["local", "public", "authorized", "gated", "private_or_missing", "unknown"]


def resolve_hugging_face_token(interactive: bool = False) -> str | None:
    """$HF_TOKEN, else the stored login token, else (only if `interactive`) what the user types; None if none."""
    token = os.environ.get("HF_TOKEN", "").strip() or get_token()
    if not token and interactive:
        token = getpass.getpass("Hugging Face token: ").strip()  # getpass: the answer is not echoed
    return token or None


def _hub() -> HfApi:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, at import.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def _check_token_opens(api: HfApi, model_id: str, token: str, timeout_s: float) -> None:
    """HfApi.auth_check's request, plus a timeout: auth_check takes none and the hub client's default is 'forever'."""
    url = f"{api.endpoint}/api/models/{model_id}/auth-check"
    hf_raise_for_status(get_session().get(url, headers=build_hf_headers(token=token), timeout=timeout_s))


def model_access(model_id: str, token: str | None, timeout_s: float = 10.0) -> ModelAccess:
    """Whether `token` (None: anonymously) can download `model_id`. Never raises: "unknown" on network errors."""
    if os.path.isdir(model_id):
        return "local"
    api = _hub()
    try:
        # `token or False`: with None, huggingface_hub would quietly send the stored or $HF_TOKEN token.
        info = api.model_info(model_id, token=token or False, timeout=timeout_s)
        if not (info.gated or info.private):
            return "public"
        if not token:
            return "gated"
        # Gated repos describe themselves to anyone; only auth-check says whether this account was granted access.
        _check_token_opens(api, model_id, token, timeout_s)
        return "authorized"
    except GatedRepoError:  # a subclass of RepositoryNotFoundError, so it comes first
        return "gated"
    except RepositoryNotFoundError:  # the hub answers 401/404 alike for missing and private repos
        return "private_or_missing"
    except Exception:  # offline, timeout, 5xx, rejected token...: the engine will report the real error later
        return "unknown"


def _how_to_give_a_token(model_id: str, access: ModelAccess, had_token: bool) -> str:
    what = {
        "gated": f"'{model_id}' is a gated model on Hugging Face: it needs a token from an account that was "
        "granted access (request it on the model's page).",
        "private_or_missing": f"'{model_id}' was not found on Hugging Face, or it is private: check the name, "
        "or use a token from an account that can read it.",
    }[access]
    found = " The token found was not accepted for it." if had_token else " No Hugging Face token was found."
    return (
        what + found + " Give a token in one of these ways: `export HF_TOKEN=hf_...` before starting; "
        "`hf auth login` (older versions: `huggingface-cli login`); or, in the notebook, run this cell again "
        "and paste the token at the prompt."
    )


def prompt_for_hugging_face_token(
    model_id: str, interactive: bool | None = None, timeout_s: float = 10.0
) -> str | None:
    """The token to run `model_id` with (None if none is needed and none was found).

    Raises PermissionError, explaining how to give a token, when the model is gated or private and no
    token that opens it was found. Prompts only in a notebook (`interactive` defaults to "in IPython kernel"),
    and only once the model turns out to need a token.
    """
    if interactive is None:
        interactive = "ipykernel" in sys.modules
    token = resolve_hugging_face_token(interactive=False)
    access = model_access(model_id, token, timeout_s)
    if access in ("gated", "private_or_missing") and not token and interactive:
        token = resolve_hugging_face_token(interactive=True)
        if token:
            access = model_access(model_id, token, timeout_s)
    if access in ("gated", "private_or_missing"):
        raise PermissionError(_how_to_give_a_token(model_id, access, had_token=token is not None))
    return token


def worker_runtime_env(token: str | None) -> dict:
    """`ray.init(runtime_env=...)` that sets $HF_TOKEN in every Ray worker, so the replicas that download
    the model get the token, on every node, without the token appearing in Ray's logs (see above)."""
    if not token:
        return {}

    def set_hugging_face_token():  # a closure: it is pickled by value, with the token, not imported by name
        os.environ["HF_TOKEN"] = token

    return {"worker_process_setup_hook": set_hugging_face_token}
