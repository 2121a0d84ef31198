"""Shared fixtures for the reading, storage and output tests.

- `s3_server` (session): moto's S3 server on 127.0.0.1, a free port; yields its endpoint URL. While it
  runs, os.environ points every S3 client at it (AWS_ENDPOINT_URL, fake keys, us-east-1), so boto3,
  pyarrow and util.storage.resolve() in this process never reach real AWS. The previous values come
  back at session end, so later subprocess-based tests (main.py) see the environment they started with.
- `ray_local` (session, needs `s3_server`): one local Ray with 2 CPUs. Ray's worker processes copy the
  environment when ray.init() starts them, which is why the S3 settings must be in place first.
  Tests that monkeypatch os.environ reach the driver only, not workers that are already running.
- `s3_bucket`: a fresh, uniquely named bucket on the moto server; yields its name.
- `ids_in(path, fmt)`: a plain helper, imported by tests (`from conftest import ids_in`): the set of ids
  an output folder holds, read on the driver the way resume reads them (util.output.output_dataset).

Nothing here may contact anything but 127.0.0.1.
"""

import logging
import os
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exactly these are set (or, where None, removed) while the S3 fixtures are up.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials or a region
    "AWS_ENDPOINT_URL_S3": None,  # it would win over AWS_ENDPOINT_URL in util.storage.resolve()
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,  # a profile missing from ~/.aws makes botocore fail before it reads the keys
}


def _restore(environ: dict) -> None:
    """Make os.environ equal `environ` again, so tests after these (main.py in subprocesses) see it."""
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def ids_in(path: str, fmt: str = "parquet") -> set:
    """The ids in the committed files of an output folder (errors/ included); empty when it has none."""
    from util.output import output_dataset

    files, id_column = output_dataset(str(path), fmt)
    return set() if files is None else set(files.to_table(columns=[id_column])[id_column].to_pylist())


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = dict(os.environ)
    for name, value in settings.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield endpoint
    finally:
        _restore(saved)
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    import ray

    if ray.is_initialized():  # started without our environment: its workers would miss the S3 settings
        ray.shutdown()
    # Workers unpickle util.* functions by reference, so they must import this repo whatever their cwd.
    python_path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    environ = dict(os.environ)  # ray.init() sets RAY_AUTH_MODE, PYTHONBREAKPOINT and others in os.environ
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 1024**2, runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    context = ray.data.DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, False  # quiet test output
    try:
        yield ray
    finally:
        ray.shutdown()
        context.enable_progress_bars = progress_bars
        _restore(environ)


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def line_ids(source: str, lines: list[str]) -> list[str]:
    """The ids util.reading gives the lines of a text file written as "\\n".join(lines): the file's
    name, each line's byte offset, and a hash of its text."""
    from util.reading import row_id

    ids, offset = [], 0
    for line in lines:
        ids.append(row_id(source, offset, line))
        offset += len(line.encode("utf-8")) + 1
    return ids
