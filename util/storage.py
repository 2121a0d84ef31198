"""Where data lives: local paths, s3:// (s3://anonymous@bucket/... for public buckets) and gs://.

    from util.storage import generate_output_path, resolve
    generate_output_path("mistralai/Mistral-7B-Instruct-v0.1")   # outputs/batch-llm/mistralai--Mistral-...
    filesystem, path = resolve("s3://anonymous@air-example-data/prompts_100.txt")

Everything goes through pyarrow's filesystems, which Ray Data's readers and writers accept as they are.
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) points s3:// at an S3-compatible store such as MinIO.
"""

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs


def generate_output_path(model_id: str, run_name: str = "batch-llm", base: str | None = None) -> str:
    """A deterministic output location for a model and run name: no random suffix, so a re-run of the
    same job finds, and resumes from, its earlier output. Base: `base`, else
    $ANYSCALE_ARTIFACT_STORAGE (an Anyscale cloud's bucket), else the local folder `outputs`."""
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
        anonymous = parsed.username == "anonymous"
        bucket = parsed.netloc.rpartition("@")[2]  # not parsed.hostname, which lowercases the bucket name
        bucket_path = bucket + parsed.path if bucket else parsed.path.lstrip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            endpoint_url = urlparse(endpoint)
            filesystem = pafs.S3FileSystem(
                anonymous=anonymous, endpoint_override=endpoint_url.netloc or endpoint,
                scheme=endpoint_url.scheme or "https", region=os.environ.get("AWS_REGION", "us-east-1"))
            return filesystem, bucket_path.rstrip("/")
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
