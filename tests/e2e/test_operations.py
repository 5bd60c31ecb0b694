"""Operating it: Prometheus metrics, JSON logs, deployment files."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

import pytest

import clipserve
from clipserve_server.utils.logs import JsonFormatter, TextFormatter

from ..conftest import free_port
from ..helpers import make_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("pool", ["threads", "processes"])  # processes download for themselves
def test_metrics_describe_traffic_batches_caches_and_failures(make_fake_server, image_host, tmp_path, pool):
    port = free_port()
    server = make_fake_server(allow_private_networks=True, metrics_port=port, decode_pool=pool, decode_workers=1)
    path = tmp_path / "x.png"
    path.write_bytes(make_image(seed=4))
    with clipserve.CLIP(server.address) as clip:
        clip.score_batch(
            [
                ("a", str(path)),
                ("a", str(path)),
                ("b", image_host.url("status/404")),
                ("c", image_host.url("img/photo0.png")),
            ]
        )
        clip.score("a", str(path))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    # The SDK packs a batch's pairs several to a message (ScoreChunks); items are counted one by one.
    assert samples['clipserve_items_total{code="OK",model="default",rpc="ScoreChunks"}'] == 3
    assert samples['clipserve_items_total{code="NOT_FOUND",model="default",rpc="ScoreChunks"}'] == 1
    assert samples['clipserve_requests_total{code="OK",rpc="ScoreChunks"}'] == 1
    assert samples['clipserve_requests_total{code="OK",rpc="Score"}'] == 1
    assert samples['clipserve_fetch_failures_total{reason="not_found"}'] == 1
    assert (
        samples['clipserve_batch_size_count{model="default"}'] >= 1
        and samples['clipserve_encode_seconds_count{model="default"}'] >= 1
    )
    assert samples['clipserve_cache_hits_total{cache="image",model="default"}'] >= 2
    assert (
        samples['clipserve_cache_entries{cache="image",model="default"}'] == 2
    )  # the upload and photo0; failures are not cached
    assert samples['clipserve_queue_depth{model="default"}'] == 0
    assert (
        samples["clipserve_upload_bytes_total"] == 2 * path.stat().st_size
    )  # the batch's upload (once), then the unary call's
    assert (
        'clipserve_model_info{backend="fake",compiled="false",device="cpu",dtype="float32",'
        'embedding_dim="16",model="default",model_id="fake"} 1.0'
        in text
    )
    assert 'clipserve_item_latency_seconds_count{model="default",rpc="ScoreChunks"}' in samples


def test_json_logs_carry_request_ids():
    record = logging.makeLogRecord(
        {
            "name": "clipserve",
            "levelname": "INFO",
            "msg": "item failed",
            "call_id": "abc123",
            "request_id": "7",
            "code": "NOT_FOUND",
        }
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "item failed"
    assert (entry["call_id"], entry["request_id"], entry["code"], entry["level"]) == (
        "abc123",
        "7",
        "NOT_FOUND",
        "INFO",
    )
    assert entry["ts"].endswith("Z")
    assert TextFormatter().format(record).endswith("item failed call_id=abc123 request_id=7 code=NOT_FOUND")


def test_kubernetes_manifests_probe_the_grpc_health_service():
    import yaml  # transformers depends on PyYAML

    documents = [
        d
        for f in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]
    kinds = {d["kind"]: d for d in documents}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    assert kinds["Service"]["spec"]["clusterIP"] == "None"  # headless: the client balances over pod IPs


def test_what_the_server_loaded_is_out_of_the_cyclic_collectors_sight(make_fake_server):
    """A full collection walks every tracked object: with torch and a model loaded, ~0.3 s of
    the event loop (measured). Whatever exists once the server is ready is frozen instead, and
    the youngest generation is big enough that what is in flight (a callback and a response
    message per pair) is not re-scanned hundreds of times a pass (~12% of a cold pass's loop,
    measured)."""
    import gc

    gc.unfreeze()
    gc.set_threshold(700, 10, 10)  # Python's default
    server = make_fake_server()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (10_000, 10, 10)
    with clipserve.CLIP(server.address) as clip:
        assert clip.embed_texts(["still serving"])[0].error is None


def test_every_unary_call_is_counted_by_its_code(fake_server):
    """GetModelInfo and ListModels go through the same guard as Score and the Open Inference
    Protocol's calls: counted by final code, a bad model name refused with NOT_FOUND."""
    registry = fake_server.server.metrics.registry

    def calls(rpc: str, code: str) -> float:
        return registry.get_sample_value("clipserve_requests_total", {"rpc": rpc, "code": code}) or 0.0

    before = {key: calls(*key) for key in (("GetModelInfo", "OK"), ("GetModelInfo", "NOT_FOUND"), ("ListModels", "OK"))}
    with clipserve.CLIP(fake_server.address) as clip:
        clip.model_info()
        clip.list_models()
        with pytest.raises(clipserve.ClipServeError) as refused:
            clip.model_info("no-such-model")
    assert refused.value.code.name == "NOT_FOUND"
    assert {key: calls(*key) - count for key, count in before.items()} == {key: 1.0 for key in before}
