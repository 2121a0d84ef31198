"""Where data lives: local paths, s3:// (s3://anonymous@bucket/... for public buckets) and gs://.

    from util.storage import commit_file, generate_output_path, resolve
    generate_output_path("mistralai/Mistral-7B-Instruct-v0.1")   # outputs/batch-llm/mistralai--Mistral-...
    filesystem, path = resolve("s3://anonymous@air-example-data/prompts_100.txt")
    commit_file(filesystem, f"{path}/_report.json", data)         # the file is whole or absent, never half

Everything goes through pyarrow's filesystems, which Ray Data's readers and writers accept as they are.
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) points s3:// at an S3-compatible store such as MinIO.
"""

import os
import uuid
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

TEMP_SUFFIX = ".tmp"  # commit_file's temporary files: hidden (a leading dot) and ending in this


class S3Location(NamedTuple):
    bucket: str  # as written: urlparse's hostname would lowercase it
    key: str  # without leading or trailing slashes
    anonymous: bool  # s3://anonymous@bucket/...: unsigned requests, for public buckets


def s3_location(uri: str) -> S3Location:
    """The parts of an s3:// URI; the one parser every s3 access goes through."""
    parsed = urlparse(uri)
    return S3Location(parsed.netloc.rpartition("@")[2], parsed.path.strip("/"), parsed.username == "anonymous")


def generate_output_path(model_id: str, run_name: str = "batch-llm", base: str | None = None) -> str:
    """A deterministic output location for a model and run name: no random part, so a re-run of the same job
    finds, and resumes, its earlier output. Base: `base`, else $ANYSCALE_ARTIFACT_STORAGE, else `outputs`."""
    base = base or os.environ.get("ANYSCALE_ARTIFACT_STORAGE") or "outputs"
    model_name = model_id.rstrip("/").replace("/", "--")
    if os.path.isabs(model_id) or os.path.isdir(model_id):  # a local model directory: its name, not its path
        model_name = os.path.basename(model_id.rstrip("/"))
    return f"{base.rstrip('/')}/{run_name}/{model_name}"


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "gs", "gcs")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `uri` and the path inside it."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        bucket, key, anonymous = s3_location(uri)
        bucket_path = "/".join(part for part in (bucket, key) if part)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            endpoint_url = urlparse(endpoint)
            return pafs.S3FileSystem(anonymous=anonymous, endpoint_override=endpoint_url.netloc or endpoint,
                                     scheme=endpoint_url.scheme or "https",
                                     region=os.environ.get("AWS_REGION", "us-east-1")), bucket_path
        filesystem, path = pafs.FileSystem.from_uri(f"s3://{bucket_path}")  # finds the bucket's region
        if anonymous:
            filesystem = pafs.S3FileSystem(anonymous=True, region=filesystem.region)
        return filesystem, path.rstrip("/")
    if parsed.scheme in ("gs", "gcs"):
        filesystem, path = pafs.FileSystem.from_uri(uri)
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri[len("file://"):] if parsed.scheme == "file" else uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def commit_file(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that the file is either absent or complete, even if the process dies: an
    object store's object exists once its upload completes; a local file is written under a hidden
    temporary name in its folder (readers skip it, the next write removes it), then renamed."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    # Unique, so two attempts at the same file never write into each other's temporary file.
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as file:
            file.write(data)
        os.replace(temp, path)  # atomic within one filesystem, and it replaces an earlier attempt's file
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
