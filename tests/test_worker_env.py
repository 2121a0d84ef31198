"""What ray.init gets: the workers' log levels (none with --verbose) beside the job's own runtime env.

    .venv/bin/python -m pytest tests/test_worker_env.py
"""

import logging

from util.config import parse_args
from util.worker_env import ray_init_kwargs


def test_a_run_shows_warnings_up_and_keeps_the_jobs_runtime_env(monkeypatch):
    def hook():
        pass

    for handler in logging.getLogger("ray.data").handlers:  # set back after the test: it quiets this process
        monkeypatch.setattr(handler, "level", handler.level)
    kwargs = ray_init_kwargs({"worker_process_setup_hook": hook, "env_vars": {"A": "1"}})
    assert kwargs == {"logging_level": logging.WARNING, "runtime_env": {
        "worker_process_setup_hook": hook,
        "env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "RAY_DATA_LOG_LEVEL": "WARNING", "A": "1"}}}
    console = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    assert console and all(h.level == logging.WARNING for h in console)


def test_verbose_shows_every_line():
    assert parse_args(["--verbose"]).verbose and not parse_args([]).verbose
    assert ray_init_kwargs({}, verbose=True) == {"runtime_env": {}}
