"""Which GPU a replica asks for (util/engine.py, util/cloud.py), with fake cluster resources and fake metadata servers on 127.0.0.1 only."""

import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import closed_local_port_url
from util import cloud
from util.cloud import get_a10g_or_equivalent_accelerator_type
from util.engine import AcceleratorChoice, choose_accelerator

GPU_CLUSTER = {"CPU": 8.0, "GPU": 4.0}


@contextmanager
def fake_metadata_server(status: int = 200, headers: dict[str, str] | None = None):
    """A local HTTP server answering every request with `status` and `headers`; yields (url, hits)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_GET

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_real_clouds(monkeypatch):
    """Every test starts with both probes pointing at a closed local port, never at a real metadata server."""
    monkeypatch.setattr(cloud, "GCP_METADATA_URL", closed_local_port_url())
    monkeypatch.setattr(cloud, "AWS_METADATA_URL", closed_local_port_url())


@pytest.mark.parametrize(
    "advertised, expected",
    [(["A10G"], "A10G"), (["L4"], "L4"), (["L4", "A10G", "T4"], "A10G")],
)
def test_cluster_advertised_type_wins_without_probing(monkeypatch, advertised, expected):
    with fake_metadata_server(200, {"Metadata-Flavor": "Google"}) as (url, hits):
        monkeypatch.setattr(cloud, "GCP_METADATA_URL", url)
        monkeypatch.setattr(cloud, "AWS_METADATA_URL", url)
        resources = {**GPU_CLUSTER, **{f"accelerator_type:{t}": 1.0 for t in advertised}}
        assert get_a10g_or_equivalent_accelerator_type(resources) == expected
        assert choose_accelerator("auto", resources).accelerator_type == expected
    assert hits == []


def test_gcp_metadata_server_means_l4(monkeypatch):
    with fake_metadata_server(200, {"Metadata-Flavor": "Google"}) as (url, hits):
        monkeypatch.setattr(cloud, "GCP_METADATA_URL", url)
        assert get_a10g_or_equivalent_accelerator_type(GPU_CLUSTER) == "L4"
    assert len(hits) == 1


def test_server_without_google_header_is_not_gcp(monkeypatch):
    with fake_metadata_server(200) as (url, hits):
        monkeypatch.setattr(cloud, "GCP_METADATA_URL", url)
        assert get_a10g_or_equivalent_accelerator_type(GPU_CLUSTER) is None
    assert len(hits) == 1  # it was asked, and its answer was judged, without a crash


@pytest.mark.parametrize("status", [200, 401])  # 401: an instance that requires IMDSv2 tokens
def test_aws_metadata_server_means_a10g(monkeypatch, status):
    with fake_metadata_server(status) as (url, hits):
        monkeypatch.setattr(cloud, "AWS_METADATA_URL", url)
        assert get_a10g_or_equivalent_accelerator_type(GPU_CLUSTER) == "A10G"
    assert len(hits) == 1


def test_unreachable_metadata_servers_give_none_quickly():
    start = time.monotonic()
    assert get_a10g_or_equivalent_accelerator_type(GPU_CLUSTER, timeout_s=0.5) is None
    assert time.monotonic() - start < 1.0


def test_no_gpu_means_cpu_and_no_probing(monkeypatch):
    with fake_metadata_server(200, {"Metadata-Flavor": "Google"}) as (url, hits):
        monkeypatch.setattr(cloud, "GCP_METADATA_URL", url)
        monkeypatch.setattr(cloud, "AWS_METADATA_URL", url)
        for resources in ({"CPU": 2.0}, {"CPU": 2.0, "GPU": 0.0}):
            assert choose_accelerator("auto", resources) == AcceleratorChoice(False, None, 0.0)
    assert hits == []


def test_requested_type_missing_from_cluster_is_an_error():
    resources = {**GPU_CLUSTER, "accelerator_type:L4": 1.0, "accelerator_type:T4": 1.0}
    with pytest.raises(ValueError, match=r"'H100'.*L4, T4"):
        choose_accelerator("H100", resources)


def test_requested_type_is_kept_when_advertised_or_unknown():
    assert choose_accelerator("L4", {**GPU_CLUSTER, "accelerator_type:L4": 1.0}).accelerator_type == "L4"
    # Nothing advertised (e.g. GPU nodes still scaling up): trust the request.
    assert choose_accelerator("H100", GPU_CLUSTER) == AcceleratorChoice(True, "H100", 4.0)
    assert choose_accelerator("any", {**GPU_CLUSTER, "accelerator_type:L4": 1.0}).accelerator_type is None


def test_ray_remote_args():
    assert AcceleratorChoice(False, None, 0.0).ray_remote_args(gpus_per_replica=1) == {"num_cpus": 0.5}
    assert AcceleratorChoice(True, "L4", 4.0).ray_remote_args(gpus_per_replica=2) == {
        "num_gpus": 2,
        "accelerator_type": "L4",
    }
    assert AcceleratorChoice(True, None, 4.0).ray_remote_args(gpus_per_replica=0.5) == {"num_gpus": 0.5}


def test_without_a_running_ray_cluster_nothing_is_advertised(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert get_a10g_or_equivalent_accelerator_type(timeout_s=0.5) is None
