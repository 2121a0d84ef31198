"""Offline checks of job.yaml, the Anyscale Jobs config of this template.

The config is loaded through the anyscale SDK's own model (JobConfig.from_yaml), which runs
its field validators and rejects unknown keys. Nothing here logs in or contacts Anyscale.
"""

import os
import re
import shlex

import pytest

from anyscale.job.models import JobConfig

from conftest import REPO, run_main

JOB_YAML = REPO / "job.yaml"

# Parts of an env var name that mark it as a credential (TOKENIZERS_PARALLELISM is fine:
# names are split on "_" and compared part by part).
SECRET_NAME_PARTS = {
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "KEY",
    "APIKEY",
    "CREDENTIAL",
    "CREDENTIALS",
}
# Value prefixes of well-known credentials: Hugging Face, OpenAI-style, AWS access key ids.
SECRET_VALUE_PREFIXES = ("hf_", "sk-", "AKIA", "ASIA")


@pytest.fixture(scope="module")
def config() -> JobConfig:
    return JobConfig.from_yaml(str(JOB_YAML))


def _entrypoint_flags(entrypoint: str) -> list:
    return [tok.split("=", 1)[0] for tok in shlex.split(entrypoint) if tok.startswith("--")]


def test_the_job_runs_main_py_from_the_folder_it_uploads(config):
    """The SDK's own model loaded it (the fixture): its working dir is this folder, which holds main.py."""
    assert (REPO / config.working_dir / "main.py").is_file()
    assert shlex.split(config.entrypoint)[:2] == ["python", "main.py"]


def test_entrypoint_input_file_exists(config):
    args = shlex.split(config.entrypoint)
    input_path = args[args.index("--input-path") + 1]
    assert (REPO / input_path).is_file(), f"{input_path} is missing from the repository"


def test_requirements_file_exists(config):
    assert isinstance(config.requirements, str), "requirements should be a path to a file"
    assert (REPO / config.requirements).is_file(), (
        f"{config.requirements} is missing from the repository"
    )


def test_env_vars_hold_no_secrets(config):
    env_vars = config.env_vars or {}
    for key, value in env_vars.items():
        assert key != "HF_TOKEN", "HF_TOKEN must be passed at submit time, not committed"
        parts = set(key.upper().split("_"))
        assert not parts & SECRET_NAME_PARTS, f"env var {key!r} looks like a secret"
        assert not value.startswith(SECRET_VALUE_PREFIXES), (
            f"value of env var {key!r} looks like a credential"
        )


def test_entrypoint_flags_are_accepted_by_main_py(config):
    flags = _entrypoint_flags(config.entrypoint)
    assert flags, "expected the entrypoint to pass flags to main.py"

    result = run_main("--help", env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"), timeout=300)
    assert result.returncode == 0, f"main.py --help failed:\n{result.stderr}"
    help_text = result.stdout
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
            f"{flag} is used in job.yaml's entrypoint but not listed by `python main.py --help`"
        )


# Stay the same from one attempt of a job to the next: the cloud's artifact bucket.
STABLE_ENV_VARS = {"ANYSCALE_ARTIFACT_STORAGE"}


def retry_problems(entrypoint: str) -> list:
    """Why a retried attempt of `entrypoint` would not resume the first attempt's output; [] if it would.
    A retry resumes only into the same output path, and only if it does not delete what is there."""
    args = shlex.split(entrypoint)[2:]  # after "python main.py"
    problems = [f"{token!r} runs a command in the shell" for token in args if "`" in token or "$(" in token]
    problems += [f"${name} may differ between attempts" for token in args
                 for name in re.findall(r"\$\{?(\w+)", token) if name not in STABLE_ENV_VARS]
    if problems:
        return problems
    from util.config import parse_args
    from util.storage import generate_output_path

    cfg = parse_args(args)
    if cfg.overwrite:
        problems.append("--overwrite deletes the first attempt's output")
    path = cfg.output_path or generate_output_path(cfg.model, cfg.run_name, base="outputs")
    if re.search(r"\d{8}|\d{4}-\d{2}-\d{2}|[0-9a-f]{8,}", path):
        problems.append(f"output path {path} has a time or random part")
    return problems


def test_a_retried_job_resumes_into_the_same_output(config):
    assert config.max_retries >= 1
    assert retry_problems(config.entrypoint) == []


@pytest.mark.parametrize("entrypoint, problem", [
    ("python main.py --input-path a.txt --overwrite", "--overwrite deletes the first attempt's output"),
    ("python main.py --output-path 'outputs/run-$(date +%s)'", "runs a command in the shell"),
    ("python main.py --output-path s3://bucket/run-$RANDOM", "$RANDOM may differ between attempts"),
    ("python main.py --output-path s3://bucket/${ANYSCALE_JOB_ID}", "$ANYSCALE_JOB_ID may differ"),
    ("python main.py --output-path outputs/run-20250101-1200", "has a time or random part"),
    ("python main.py --run-name nightly-3f9a2c1d7e", "has a time or random part"),
])
def test_retry_check_catches_what_breaks_resume(entrypoint, problem):
    problems = retry_problems(entrypoint)
    assert len(problems) == 1 and problem in problems[0]
    assert retry_problems("python main.py --output-path $ANYSCALE_ARTIFACT_STORAGE/nightly/run") == []
