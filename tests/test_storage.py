"""Tests for util/storage.py and util/output.py, and reading from S3: against moto's S3 on 127.0.0.1.

The `s3_server` fixture points AWS_ENDPOINT_URL at moto for this process and, through `ray_local`,
for Ray's workers; nothing here contacts real AWS.
"""

import json
import os

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from conftest import h8
from util.output import OUTPUT_SCHEMA, write_results
from util.results import read_results, summarize
from util.reading import read_prompts
from util.storage import S3Location, generate_output_path, resolve, s3_location

pytestmark = pytest.mark.usefixtures("few_parquet_footer_readers")


def s3_options(filesystem: pafs.S3FileSystem) -> dict:
    """The options an S3FileSystem was made with (pyarrow has no getters for most of them)."""
    return filesystem.__reduce__()[1][0]


# --- generate_output_path ---

def test_output_path_is_deterministic_and_flattens_model_id(monkeypatch):
    monkeypatch.delenv("ANYSCALE_ARTIFACT_STORAGE", raising=False)
    path = generate_output_path("mistralai/Mistral-7B-Instruct-v0.1")
    assert path == "outputs/batch-llm/mistralai--Mistral-7B-Instruct-v0.1"
    assert generate_output_path("mistralai/Mistral-7B-Instruct-v0.1") == path  # nothing random in it
    assert generate_output_path("org/model", "nightly") == "outputs/nightly/org--model"


def test_output_path_of_local_model_directory_is_its_name(monkeypatch, tmp_path):
    monkeypatch.delenv("ANYSCALE_ARTIFACT_STORAGE", raising=False)
    model_dir = tmp_path / "models" / "tiny-llm"
    model_dir.mkdir(parents=True)
    assert generate_output_path(str(model_dir) + "/", "run") == "outputs/run/tiny-llm"
    monkeypatch.chdir(tmp_path)  # a relative path to a local directory too, not "models--tiny-llm"
    assert generate_output_path("models/tiny-llm", "run") == "outputs/run/tiny-llm"
    assert generate_output_path("./models/tiny-llm", "run") == "outputs/run/tiny-llm"


def test_output_path_base_from_anyscale_artifact_storage_and_explicit_base_wins(monkeypatch):
    monkeypatch.setenv("ANYSCALE_ARTIFACT_STORAGE", "s3://org-bucket/artifacts/")
    assert generate_output_path("org/model", "run") == "s3://org-bucket/artifacts/run/org--model"
    assert generate_output_path("org/model", "run", base="/data/out") == "/data/out/run/org--model"
    monkeypatch.setenv("ANYSCALE_ARTIFACT_STORAGE", "")
    assert generate_output_path("org/model", "run") == "outputs/run/org--model"


# --- s3_location, resolve ---

@pytest.mark.parametrize("uri, location", [
    ("s3://bucket/key", S3Location("bucket", "key", False)),
    ("s3://Legacy-Bucket/Some/Deeper/Key/", S3Location("Legacy-Bucket", "Some/Deeper/Key", False)),  # case kept
    ("s3://anonymous@air-example-data/prompts_100.txt", S3Location("air-example-data", "prompts_100.txt", True)),
    ("s3://bucket", S3Location("bucket", "", False)),
    ("s3://bucket/", S3Location("bucket", "", False)),
    ("s3://someone@bucket//a//", S3Location("bucket", "a", False)),  # a user other than anonymous signs
])
def test_s3_location_parts(uri, location):
    assert s3_location(uri) == location


def test_resolve_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = resolve("out/run")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert path == str(tmp_path / "out" / "run")
    assert resolve(f"file://{tmp_path}/x.jsonl")[1] == f"{tmp_path}/x.jsonl"


def test_resolve_s3_with_endpoint(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    filesystem, path = resolve("s3://anonymous@bucket/key/")
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert path == "bucket/key"
    options = s3_options(filesystem)
    assert options["anonymous"] is True
    assert f"{options['scheme']}://{options['endpoint_override']}" == s3_server

    filesystem, path = resolve("s3://Legacy-Bucket/Some/Key")  # bucket names keep their case
    assert path == "Legacy-Bucket/Some/Key"
    assert s3_options(filesystem)["anonymous"] is False

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9000")  # the S3-specific one wins
    assert s3_options(resolve("s3://bucket/key")[0])["endpoint_override"] == "minio.example:9000"


# --- S3 round trips against moto ---

def put(bucket: str, endpoint: str, key: str, body: str) -> None:
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"))


def output_rows(with_error: bool, start: int) -> list[dict]:
    return [{"id": f"row-{start + i}", "prompt": f"p{start + i}", "generated_text": None if with_error else "g",
             "finish_reason": None if with_error else "stop", "num_input_tokens": 5 + i,
             "num_generated_tokens": None if with_error else 7, "error": "too long" if with_error else None,
             "model": "org/model", "topic": f"t{start + i}"} for i in range(3 if not with_error else 2)]


def output_dataset():
    """Two blocks: one whose `error`s are all null (typed null by Arrow), one with errors."""
    import ray

    return ray.data.from_arrow([pa.Table.from_pylist(output_rows(False, 0)),
                                pa.Table.from_pylist(output_rows(True, 3))])


def test_read_prompts_from_s3_file_and_folder(ray_local, s3_server, s3_bucket):
    lines = [json.dumps({"question": "q1", "topic": "a"}), "", json.dumps({"question": "q2", "topic": "b"})]
    put(s3_bucket, s3_server, "prompts.jsonl", "\n".join(lines) + "\n")
    out = read_prompts(f"s3://{s3_bucket}/prompts.jsonl", text_column="question").take_all()
    third = len(lines[0]) + 2  # the byte offset of the third line: the first, its newline, a blank line
    assert [(r["id"], r["question"], r["topic"]) for r in out] == [
        (f"prompts.jsonl:0:{h8('q1')}", "q1", "a"), (f"prompts.jsonl:{third}:{h8('q2')}", "q2", "b")]

    put(s3_bucket, s3_server, "folder/one.txt", "alpha\nbeta\n")
    put(s3_bucket, s3_server, "folder/two.txt", "alpha\n")
    out = read_prompts(f"s3://{s3_bucket}/folder/").take_all()
    assert sorted(r["id"] for r in out) == sorted(
        [f"one.txt:0:{h8('alpha')}", f"one.txt:6:{h8('beta')}", f"two.txt:0:{h8('alpha')}"])


@pytest.mark.parametrize("output_format", ["parquet", "jsonl"])
def test_write_and_read_results_on_s3(ray_local, s3_bucket, output_format):
    uri = f"s3://{s3_bucket}/out/{output_format}"
    write_results(output_dataset(), uri, output_format)
    objects = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
        Bucket=s3_bucket, Prefix=f"out/{output_format}/")
    keys = [o["Key"] for o in objects.get("Contents", [])]
    extension = ".parquet" if output_format == "parquet" else ".jsonl"
    # in the bucket (not a local folder named "s3:"), data files only: no folder-marker objects
    assert keys and all(k.endswith(extension) for k in keys)

    results = read_results(uri, output_format).materialize()  # read once; each read starts its own actors
    schema = results.schema()
    assert list(schema.names[:len(OUTPUT_SCHEMA)]) == OUTPUT_SCHEMA.names
    assert "topic" in schema.names
    assert {name: schema.base_schema.field(name).type for name in OUTPUT_SCHEMA.names} == \
        {field.name: field.type for field in OUTPUT_SCHEMA}  # `error` is string, not null
    for block in results.iter_batches(batch_format="pyarrow", batch_size=None):  # in every file too
        assert block.schema.field("error").type == pa.string()
        assert block.schema.field("num_generated_tokens").type == pa.int64()
    rows = results.take_all()
    assert sorted(r["id"] for r in rows) == [f"row-{i}" for i in range(5)]
    by_id = {r["id"]: r for r in rows}
    assert by_id["row-0"]["error"] is None and by_id["row-4"]["error"] == "too long"
    assert by_id["row-4"]["topic"] == "t4"
    assert summarize(results) == {"rows": 5, "ok": 3, "errors": 2, "input_tokens": 5 + 6 + 7 + 5 + 6,
                                  "output_tokens": 21}


def test_write_results_to_anyscale_artifact_storage(ray_local, s3_bucket, monkeypatch):
    monkeypatch.setenv("ANYSCALE_ARTIFACT_STORAGE", f"s3://{s3_bucket}/artifacts")
    uri = generate_output_path("org/model", "run")
    assert uri == f"s3://{s3_bucket}/artifacts/run/org--model"
    write_results(output_dataset(), uri)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
        Bucket=s3_bucket)["Contents"]]
    # only data files: no folder-marker objects such as "artifacts/", which a prefix-scoped policy refuses
    assert keys and all(k.startswith("artifacts/run/org--model/") and k.endswith(".parquet") for k in keys)
    assert read_results(uri).count() == 5
