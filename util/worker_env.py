"""What the run's Ray workers get in their environment, and how much a run prints: by default vLLM's and
Ray's warnings and errors, the progress bars (or our progress lines) and our own lines; with
`--verbose`, every log line as well.

    from util.worker_env import ray_init_kwargs
    ray.init(**ray_init_kwargs(runtime_env, verbose=cfg.verbose))

Without it a CPU smoke run of 20 rows prints about 400 lines: vLLM's engine configuration and load
messages from every replica, and Ray Data's progress logged as INFO lines every 10 s when stdout is not
a terminal. Ray Data still writes its full log to the session's ray-data.log, whatever the level here.
"""

import logging

# Read by vLLM and by Ray Data in each worker process (an engine's own processes inherit them).
QUIET_ENV_VARS = {"VLLM_LOGGING_LEVEL": "WARNING", "RAY_DATA_LOG_LEVEL": "WARNING"}
# Ray's own kill_child_processes_on_worker_exit stays on: a replica killed outright (SIGKILL, a lost
# node) runs no exit hook, and only Ray then stops its engine's processes, which would otherwise keep
# their GPU. A worker that exits normally may kill its engine before LLMPredictor.shutdown (an exit
# hook) runs; main.py waits for the replicas before its summary, so what vLLM logs then comes before it.


def quiet_driver() -> None:
    """This process: Ray Data's console handler at WARNING. Its log file keeps every level."""
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, (SessionFileHandler, logging.FileHandler)):
            handler.setLevel(logging.WARNING)


def ray_init_kwargs(runtime_env: dict | None = None, verbose: bool = False) -> dict:
    """`ray.init` keyword arguments: `runtime_env` with the workers' variables added (log levels unless
    verbose), and the level of the "ray" logger in this process. Actors that set their own env_vars
    (the CPU settings of util/engine.py) keep these: Ray merges a child's env_vars into the job's."""
    runtime_env = dict(runtime_env or {})
    if verbose:
        return {"runtime_env": runtime_env}
    runtime_env["env_vars"] = {**QUIET_ENV_VARS, **runtime_env.get("env_vars", {})}
    quiet_driver()
    return {"runtime_env": runtime_env, "logging_level": logging.WARNING}
