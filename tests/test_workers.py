"""What the workers get (util/replica/workers.py): a Hugging Face token, checked against a stand-in for the hub on
127.0.0.1 (no real hub, no real token), and the log levels (none with --verbose) beside the job's runtime env."""

import json
import logging
import logging.config
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import pytest

from conftest import closed_local_port_url
from util.replica import workers as hf_token
from util.config import parse_args
from util.replica.workers import (QUIET_LOGGERS, model_access, prompt_for_hugging_face_token, ray_init_kwargs,
                          resolve_hugging_face_token, worker_runtime_env)

GRANTED = "hf_granted_token"  # the one token the stand-in accepts for the gated model
DENIED = "hf_denied_token"  # a valid-looking token whose account was never granted access
# What the real hub answers: gated repos describe themselves to anyone; missing/private repos get 401 + RepoNotFound.
MODELS = {
    "org/public": {"gated": False, "private": False},
    "org/gated": {"gated": "manual", "private": False},
    "org/gated-slow": {"gated": "auto", "private": False},
}
HANGING_PATHS = {"/api/models/org/hangs", "/api/models/org/gated-slow/auth-check"}


class HubStandIn(BaseHTTPRequestHandler):
    requests: list[tuple[str, str | None]] = []  # (path, Authorization header) per request, reset per test
    release = threading.Event()  # a hanging request waits for this (bounded), so the server always stops

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Authorization")))
        if self.path.split("?")[0] in HANGING_PATHS:
            self.release.wait(timeout=5)  # never answers: the client gave up long before
            return
        repo_id = self.path.split("?")[0].removeprefix("/api/models/").removesuffix("/auth-check")
        if repo_id not in MODELS:
            return self.reply(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if not self.path.endswith("/auth-check"):
            return self.reply(200, {"id": repo_id, **MODELS[repo_id]})
        if self.headers.get("Authorization") == f"Bearer {GRANTED}":
            return self.reply(200, {})
        self.reply(403, {"error": "Access to this model is restricted"}, {"X-Error-Code": "GatedRepo"})

    def reply(self, status: int, body: dict, headers: dict[str, str] | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def isolated_hugging_face(monkeypatch, tmp_path):
    """No real token (env or stored) and no route to the real hub: every test starts logged out and offline."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub computed these paths from the real HF_HOME at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    monkeypatch.setenv("HF_ENDPOINT", closed_local_port_url())  # overridden by the `hub` fixture where one is up
    # Building request headers would otherwise fetch an "agent harnesses" list from the import-time endpoint
    # (huggingface.co), whatever endpoint HfApi was given. Telemetry off skips it; the endpoint is a backstop.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_local_port_url())
    monkeypatch.setattr(hf_token.getpass, "getpass", fail_if_prompted)


def fail_if_prompted(prompt: str = "") -> str:
    raise AssertionError("the user was prompted for a token")


@pytest.fixture
def hub(monkeypatch):
    """Starts the stand-in, points HF_ENDPOINT at it, yields its request log, and stops it."""
    HubStandIn.requests = []
    HubStandIn.release.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield HubStandIn.requests
    HubStandIn.release.set()
    server.shutdown()
    server.server_close()


def store_token(tmp_path, token: str) -> None:
    (tmp_path / "token").write_text(token)  # where `hf auth login` keeps it


def test_env_token_beats_stored_token(monkeypatch, tmp_path):
    store_token(tmp_path, "hf_stored")
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert resolve_hugging_face_token() == "hf_env"


def test_stored_token_used_when_env_absent(tmp_path):
    assert resolve_hugging_face_token() is None
    store_token(tmp_path, "hf_stored")
    assert resolve_hugging_face_token(interactive=True) == "hf_stored"  # found: no prompt


def test_prompt_only_when_interactive(monkeypatch):
    assert resolve_hugging_face_token(interactive=False) is None  # fail_if_prompted would raise
    monkeypatch.setattr(hf_token.getpass, "getpass", lambda prompt: " hf_typed \n")
    assert resolve_hugging_face_token(interactive=True) == "hf_typed"
    monkeypatch.setattr(hf_token.getpass, "getpass", lambda prompt: "")
    assert resolve_hugging_face_token(interactive=True) is None


@pytest.mark.parametrize(
    "model_id, token, expected",
    [
        ("org/public", None, "public"),
        ("org/public", GRANTED, "public"),
        ("org/gated", None, "gated"),
        ("org/gated", DENIED, "gated"),
        ("org/gated", GRANTED, "authorized"),
        ("org/missing", None, "private_or_missing"),
    ],
)
def test_model_access(hub, model_id, token, expected):
    assert model_access(model_id, token) == expected


def test_anonymous_check_sends_no_token_even_if_one_is_set(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    assert model_access("org/gated", None) == "gated"
    assert hub and all(authorization is None for _, authorization in hub)


def test_local_directory_makes_no_request(hub, tmp_path):
    assert model_access(str(tmp_path), None) == "local"
    assert prompt_for_hugging_face_token(str(tmp_path), interactive=True) is None
    assert hub == []


def test_unreachable_or_hanging_hub_is_unknown_within_timeout(monkeypatch, hub):
    start = time.monotonic()
    assert model_access("org/hangs", None, timeout_s=0.3) == "unknown"
    assert model_access("org/gated-slow", GRANTED, timeout_s=0.3) == "unknown"  # hangs in the auth check
    monkeypatch.setenv("HF_ENDPOINT", closed_local_port_url())
    assert model_access("org/gated", GRANTED, timeout_s=0.3) == "unknown"
    assert time.monotonic() - start < 3


def test_gated_model_without_token_raises_with_instructions(hub):
    with pytest.raises(PermissionError) as error:
        prompt_for_hugging_face_token("org/gated", interactive=False)
    message = str(error.value)
    assert "org/gated" in message and "gated" in message
    assert "export HF_TOKEN=hf_..." in message and "hf auth login" in message and "notebook" in message


def test_rejected_token_never_appears_in_error_or_output(monkeypatch, hub, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", DENIED)
    with pytest.raises(PermissionError, match="not accepted") as error:
        prompt_for_hugging_face_token("org/gated", interactive=False)
    captured = capsys.readouterr()
    assert DENIED not in str(error.value) + captured.out + captured.err + caplog.text


def test_notebook_prompts_once_a_token_is_needed(monkeypatch, hub):
    monkeypatch.setattr(hf_token.getpass, "getpass", lambda prompt: GRANTED)
    assert prompt_for_hugging_face_token("org/gated", interactive=True) == GRANTED
    assert ("/api/models/org/gated/auth-check", f"Bearer {GRANTED}") in hub
    # Outside a notebook (no ipykernel loaded) the default is not to prompt.
    monkeypatch.delitem(hf_token.sys.modules, "ipykernel", raising=False)
    with pytest.raises(PermissionError):
        prompt_for_hugging_face_token("org/gated")


def test_public_model_needs_no_token(hub):
    assert prompt_for_hugging_face_token("org/public", interactive=True) is None


def test_granted_env_token_is_returned(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    assert prompt_for_hugging_face_token("org/gated") == GRANTED


def test_worker_runtime_env_sets_the_token_through_a_setup_hook(monkeypatch):
    runtime_env = worker_runtime_env("hf_abc")
    assert list(runtime_env) == ["worker_process_setup_hook"]  # no env_vars: Ray logs those in plain text
    monkeypatch.setenv("HF_TOKEN", "hf_other")  # so the test's end restores the environment
    runtime_env["worker_process_setup_hook"]()  # what each Ray worker runs before its first task
    assert os.environ["HF_TOKEN"] == "hf_abc"
    assert worker_runtime_env(None) == {} and worker_runtime_env("") == {}


# --- the log levels ---

def test_a_run_shows_warnings_up_and_keeps_the_jobs_runtime_env(monkeypatch):
    ran = []

    def hook():
        ran.append("token")

    for handler in logging.getLogger("ray.data").handlers:  # set back after the test: it quiets this process
        monkeypatch.setattr(handler, "level", handler.level)
    for name in QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    kwargs = ray_init_kwargs({"worker_process_setup_hook": hook, "env_vars": {"A": "1"}})
    quiet_hook = kwargs["runtime_env"].pop("worker_process_setup_hook")
    assert kwargs == {"logging_level": logging.WARNING, "include_dashboard": False, "runtime_env": {
        "env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "RAY_DATA_LOG_LEVEL": "WARNING", "A": "1",
                     "PYTHONWARNINGS": "ignore::FutureWarning:vllm.triton_utils.dispatcher"}}}
    console = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    assert console and all(h.level == logging.WARNING for h in console)
    assert all(passes_errors_only(name) for name in QUIET_LOGGERS)  # in this process
    for name in QUIET_LOGGERS:
        logging.getLogger(name).filters = []
    quiet_hook()  # what each worker runs first: the job's own hook, then the same filters
    assert ran == ["token"] and all(passes_errors_only(name) for name in QUIET_LOGGERS)
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,  # as vLLM sets its logging up
                               "loggers": {"vllm": {"level": "INFO"}}})
    assert all(passes_errors_only(name) for name in QUIET_LOGGERS)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).filters = []
    ray_init_kwargs({}), ray_init_kwargs({})  # a second run in this process adds no second filter
    assert all(len(logging.getLogger(name).filters) == 1 for name in QUIET_LOGGERS)


def test_the_workers_hook_runs_where_this_project_cannot_be_imported(tmp_path):
    import ray.cloudpickle

    hook = ray_init_kwargs({})["runtime_env"]["worker_process_setup_hook"]  # as Ray pickles it for the workers
    worker = subprocess.run([sys.executable, "-c", "import logging, pickle, sys; "
                             "pickle.loads(sys.stdin.buffer.read())(); "
                             f"print(all(logging.getLogger(n).filters for n in {QUIET_LOGGERS!r}), "
                             "'fsspec.implementations.http' in sys.modules)"],
                            input=ray.cloudpickle.dumps(hook), capture_output=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    # Quieted, and Ray Data's listing finds fsspec's HTTP filesystem imported (util/replica/workers.py says why).
    assert worker.returncode == 0 and worker.stdout.strip() == b"True True", worker.stderr.decode()[-2000:]


def passes_errors_only(name: str) -> bool:
    logger = logging.getLogger(name)
    record = lambda level: logger.makeRecord(name, level, __file__, 0, "a line", (), None)
    return not logger.filter(record(logging.WARNING)) and logger.filter(record(logging.ERROR))


def test_a_users_python_warnings_filter_is_kept(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    import importlib

    import util.replica.workers

    assert importlib.reload(util.replica.workers).QUIET_ENV_VARS["PYTHONWARNINGS"] == \
        "error::DeprecationWarning,ignore::FutureWarning:vllm.triton_utils.dispatcher"
    monkeypatch.delenv("PYTHONWARNINGS")
    importlib.reload(util.replica.workers)


def test_verbose_shows_every_line(monkeypatch):
    assert parse_args(["--verbose"]).verbose and not parse_args([]).verbose
    kwargs = ray_init_kwargs({}, verbose=True)
    hook = kwargs["runtime_env"].pop("worker_process_setup_hook")
    assert kwargs == {"runtime_env": {}, "include_dashboard": False}  # no log levels, no filter here or in workers
    for name in QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    hook()
    assert not any(logging.getLogger(name).filters for name in QUIET_LOGGERS)
