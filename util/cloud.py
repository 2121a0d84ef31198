"""What the cloud tells: which A10G-class GPU --accelerator-type auto asks for, and whether an output path
(local, s3:// or gs://) takes writes. Imported only when a job needs one of them.

    get_a10g_or_equivalent_accelerator_type(ray.cluster_resources())    # "A10G", "L4", or None
    check_output_writable("s3://bucket/run/")                            # InputError if it cannot be written

The GPU's name comes from what the cluster advertises, else from the cloud's metadata server ("A10G" on AWS,
"L4" on GCP), asked when no GPU node is up yet (an autoscaling cluster): a short probe, and anything that
does not answer as the cloud's server does is "not this cloud".
"""

import os
import urllib.error
import urllib.request
import uuid
from email.message import Message

import pyarrow.fs as pafs

from util.errors import InputError
from util.storage import is_remote, join, resolve, s3_location


A10G_EQUIVALENTS = ("A10G", "L4")  # preference order when a cluster advertises both
# Module constants, so that tests point the probes at a local server instead of a real cloud.
GCP_METADATA_URL = "http://metadata.google.internal"
AWS_METADATA_URL = "http://169.254.169.254/latest/meta-data/"
# Metadata servers are link-local: going through an HTTP(S)_PROXY from the environment would be wrong.
_no_proxy_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _probe(request: urllib.request.Request, timeout_s: float) -> tuple[int, Message] | None:
    """(status, headers) of whatever answered in time, or None when nothing did."""
    try:
        with _no_proxy_opener.open(request, timeout=timeout_s) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:  # an HTTP answer all the same, e.g. 401 (caught before Exception)
        error.close()
        return error.code, error.headers
    except Exception:  # refused, unresolvable, timed out, garbled: whatever it is, it is not this cloud
        return None


def a10g_class_gpu(timeout_s: float = 1.0) -> str | None:
    gcp = _probe(urllib.request.Request(GCP_METADATA_URL, headers={"Metadata-Flavor": "Google"}), timeout_s)
    if gcp is not None and gcp[0] == 200 and gcp[1].get("Metadata-Flavor") == "Google":  # only Google's sets it
        return "L4"
    # One tokenless GET: 200 from IMDSv1, 401 where IMDSv2 tokens are required. (The IMDSv2 token PUT is
    # skipped on purpose: with the default hop limit its answer never reaches a container.)
    aws = _probe(urllib.request.Request(AWS_METADATA_URL), timeout_s)
    return "A10G" if aws is not None and aws[0] in (200, 401) else None


def get_a10g_or_equivalent_accelerator_type(cluster_resources: dict | None = None, timeout_s: float = 1.0) -> str | None:
    """"A10G" or "L4" (the 24 GB class on AWS / GCP), or None when neither the cluster nor the cloud tells."""
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources() if ray.is_initialized() else {}
    advertised = {key.split(":", 1)[1] for key in cluster_resources if key.startswith("accelerator_type:")}
    if advertised:  # GPUs of another class (H100, ...) are up: ask for none, the replicas fit there
        return next((t for t in A10G_EQUIVALENTS if t in advertised), None)
    return a10g_class_gpu(timeout_s)  # no GPU node up yet (autoscaling): the cloud's name for the class


def s3_write_refusal(location, probe: str) -> str | None:
    """Start a multipart upload, the first request Ray's writer makes, and abort it: unlike writing and
    deleting an object, this leaves nothing (pyarrow's delete_file writes a marker object for the folder,
    and a versioned bucket keeps a deleted object). `location`: util.storage.S3Location. Why S3 refuses the
    write, or None."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = location.bucket, "/".join(part for part in (location.key, probe) if part)
    # boto3 reads AWS_ENDPOINT_URL(_S3) itself; the region matters only for a custom endpoint's signature.
    client = boto3.client("s3", config=BotoConfig(signature_version=UNSIGNED) if location.anonymous else None,
                          region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    try:
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    except ClientError as error:
        return error.response.get("Error", {}).get("Message") or str(error)
    except BotoCoreError as error:  # no credentials, no connection
        return str(error)
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except (ClientError, BotoCoreError):
        pass  # the path is writable; an unfinished upload is no object, and bucket lifecycle rules expire it
    return None


def check_output_writable(output_path: str) -> None:
    """Create a small file under `output_path` and delete it again (on S3: start an upload and abort it);
    InputError if that fails. Nothing stays: no probe file, no folder the probe created, no S3 marker object."""
    probe = f".write-probe-{uuid.uuid4().hex[:12]}"  # hidden: if it ever stayed, readers would skip it
    try:
        if output_path.startswith("s3://"):
            if refusal := s3_write_refusal(s3_location(output_path), probe):
                raise InputError(refusal)
            return
        filesystem, path = resolve(output_path)
        first_missing = None  # a refused (or later failed) run must leave no empty folder that looks like a result
        if not is_remote(output_path):  # gs:// has no folders to create
            if filesystem.get_file_info(path).type == pafs.FileType.File:
                raise InputError("it is a file, not a folder")
            parent = path
            while filesystem.get_file_info(parent).type == pafs.FileType.NotFound and parent != os.path.dirname(parent):
                first_missing, parent = parent, os.path.dirname(parent)
        try:
            if not is_remote(output_path):
                filesystem.create_dir(path, recursive=True)
            filesystem.open_output_stream(join(path, probe)).close()
            filesystem.delete_file(join(path, probe))
        finally:
            if first_missing and filesystem.get_file_info(first_missing).type == pafs.FileType.Directory:
                filesystem.delete_dir(first_missing)
    except InputError as error:
        raise InputError(f"output path {output_path} is not writable: {error}") from None
    except OSError as error:
        raise InputError(f"output path {output_path} is not writable: "
                         f"{os.strerror(error.errno) if error.errno else error}") from None
