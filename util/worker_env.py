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
# A Ray worker kills its child processes as it exits, before Python's exit hooks run: a replica's
# engine processes would die before LLMPredictor.shutdown (an exit hook) stops them, and vLLM would log
# a crash after every successful run. The replica stops them itself. (A killed worker runs neither.)
ENGINE_EXIT_ENV_VARS = {"RAY_kill_child_processes_on_worker_exit": "0"}


def quiet_driver() -> None:
    """This process: Ray Data's console handler at WARNING. Its log file keeps every level."""
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, (SessionFileHandler, logging.FileHandler)):
            handler.setLevel(logging.WARNING)


def ray_init_kwargs(runtime_env: dict | None = None, verbose: bool = False) -> dict:
    """`ray.init` keyword arguments: `runtime_env` with the workers' variables added (log levels unless
    verbose), and the level of the "ray" logger in this process. Actors that set their own env_vars
    (the CPU settings of util/stages.py) keep these: Ray merges a child's env_vars into the job's."""
    runtime_env = dict(runtime_env or {})
    env_vars = {**ENGINE_EXIT_ENV_VARS, **({} if verbose else QUIET_ENV_VARS)}
    runtime_env["env_vars"] = {**env_vars, **runtime_env.get("env_vars", {})}
    if verbose:
        return {"runtime_env": runtime_env}
    quiet_driver()
    return {"runtime_env": runtime_env, "logging_level": logging.WARNING}
