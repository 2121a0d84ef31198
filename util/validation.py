"""Refuse bad input before any model stage starts: an output path that cannot be written, input files
that cannot be read or parsed, duplicate ids.

    from util.validation import check_before_run, check_output_writable
    checked = check_before_run(cfg, use_gpu=True, output_path="s3://bucket/run/")  # all of the below, in order
    check_output_writable("s3://bucket/run/")          # InputError if the path cannot be written
    print(checked.scan.rows, checked.scan.already_done)

Both raise util.reading.InputError, whose message names the path, file and line, or column.
"""

import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow.fs as pafs
import ray

from util.reading import InputError
from util.storage import is_remote, join, resolve

if TYPE_CHECKING:
    from util.resume import DoneIndex
    from util.scan import InputScan


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def check_output_writable(output_path: str) -> None:
    """Create a small file under `output_path` and delete it again (on S3: start an upload and abort it);
    InputError if that fails. Nothing stays: no probe file, no folder the probe created, no S3 marker object."""
    try:
        if urlparse(output_path).scheme == "s3":
            _probe_s3(output_path)
        else:
            _probe_filesystem(output_path)
    except InputError as error:
        raise InputError(f"output path {output_path} is not writable: {error}") from None
    except OSError as error:
        raise InputError(f"output path {output_path} is not writable: {_reason(error)}") from None


def _probe_name() -> str:
    # A dot first: if the probe ever stayed, readers of the output (pyarrow datasets, Ray) would skip it.
    return f".write-probe-{uuid.uuid4().hex[:12]}"


def _probe_filesystem(output_path: str) -> None:
    filesystem, path = resolve(output_path)
    if is_remote(output_path):  # gs://: no folders to create
        _write_and_delete(filesystem, join(path, _probe_name()))
        return
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError("it is a file, not a folder")
    first_missing, parent = None, path
    while filesystem.get_file_info(parent).type == pafs.FileType.NotFound and parent != os.path.dirname(parent):
        first_missing, parent = parent, os.path.dirname(parent)
    try:
        filesystem.create_dir(path, recursive=True)
        _write_and_delete(filesystem, join(path, _probe_name()))
    finally:
        # A refused (or later failed) run must not leave an empty output folder that looks like a result.
        if first_missing and filesystem.get_file_info(first_missing).type == pafs.FileType.Directory:
            filesystem.delete_dir(first_missing)


def _write_and_delete(filesystem: pafs.FileSystem, probe: str) -> None:
    with filesystem.open_output_stream(probe) as stream:
        stream.write(b"probe")
    filesystem.delete_file(probe)


def _probe_s3(output_path: str) -> None:
    """Start a multipart upload, the first request Ray's writer makes, and abort it. Unlike writing and
    deleting an object, this leaves nothing: pyarrow's delete_file writes a marker object for the folder
    it deleted from, and a versioned bucket would keep the deleted object."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(output_path)
    bucket = parsed.netloc.rpartition("@")[2]
    key = "/".join(part for part in (parsed.path.strip("/"), _probe_name()) if part)
    anonymous = BotoConfig(signature_version=UNSIGNED) if parsed.username == "anonymous" else None
    # boto3 reads AWS_ENDPOINT_URL(_S3) itself; the region matters only for a custom endpoint's signature.
    client = boto3.client("s3", config=anonymous,
                          region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    try:
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    except ClientError as error:
        raise InputError(error.response.get("Error", {}).get("Message") or str(error)) from None
    except BotoCoreError as error:  # no credentials, no connection
        raise InputError(str(error)) from None
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except (ClientError, BotoCoreError):
        pass  # the path is writable; an unfinished upload is no object, and bucket lifecycle rules expire it


@dataclass
class CheckedRun:
    done: "DoneIndex | None"  # ids already in the output, hashed, in the object store
    scan: "InputScan"
    settings: dict  # the fingerprint the output is (or will be) made with


def check_before_run(cfg, use_gpu: bool, output_path: str) -> CheckedRun:
    """Everything a run checks before it writes a row or takes a GPU: the input's files are listed, the
    output path can be written, an earlier output there was made with the same settings (unless
    --overwrite), and the input reads cleanly, in one distributed pass, with unique ids. Raises
    InputError where the run must be refused."""
    from util.manifest import check_fingerprint, fingerprint
    from util.reading import SAMPLE_PROMPTS, read_prompts
    from util.resume import DoneIndex
    from util.scan import scan_input
    from util.stages import check_cluster_fits

    check_cluster_fits(cfg, use_gpu, ray.cluster_resources())  # a cluster too small would wait forever
    source = cfg.input_path or SAMPLE_PROMPTS
    ds = read_prompts(source, cfg.input_format, cfg.text_column, cfg.id_column, cfg.limit,
                      with_where=bool(cfg.id_column))  # lists the files now: a missing path stops here
    check_output_writable(output_path)
    settings = fingerprint(cfg, use_gpu)
    if not cfg.overwrite:
        check_fingerprint(output_path, settings)
    done = None if cfg.overwrite else DoneIndex.build(output_path, cfg.output_format)
    scan = scan_input(ds, cfg.id_column, done, cfg.input_path, cfg.input_format)
    return CheckedRun(done, scan, settings)
