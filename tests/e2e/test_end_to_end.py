"""The real server (`clipserve serve`, tiny random-weight checkpoint) over real gRPC."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import clipserve
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

from ..conftest import ServerProcess
from ..helpers import grpcurl, json_objects, make_image

pytestmark = pytest.mark.cost(12)  # its CPU cost among the files (tests/conftest.py)

QUERIES = ["a dog on the beach", "a red car", "the cat in the hat", "x"]


@pytest.fixture()
def clip(real_server) -> clipserve.CLIP:
    with clipserve.CLIP(real_server.address, timeout=60) as client:
        yield client


def test_score_matches_an_in_process_transformers_forward(clip, image_host, reference):
    for i, query in enumerate(QUERIES):
        url = image_host.url(f"img/photo{i}.png")
        expected = reference(query, image_host.images[f"photo{i}.png"])
        assert clip.score(query, url) == pytest.approx(expected, abs=reference.tolerance)


def test_score_batch_matches_reference_in_input_order_with_ids(clip, image_host, reference):
    inputs = [
        clipserve.SimilarityInput(q, image_host.url(f"img/photo{j}.jpg"), query_id=f"q{i}", image_id=f"im{j}")
        for i, q in enumerate(QUERIES)
        for j in range(6)
    ]
    results = clip.score_batch(inputs)
    assert [(r.query, r.image_url, r.query_id, r.image_id) for r in results] == [
        (x.query, x.image_url, x.query_id, x.image_id) for x in inputs
    ]
    for x, r in zip(inputs, results):
        assert r.error is None
        expected = reference(x.query, image_host.images[x.image_url.rsplit("/", 1)[1]])
        assert r.score == pytest.approx(expected, abs=reference.tolerance)


def test_local_paths_and_file_urls_are_uploaded_as_bytes(clip, tmp_path, reference):
    data = make_image(33, 77, seed=7, fmt="JPEG")
    path = tmp_path / "holiday photo.jpg"
    path.write_bytes(data)
    expected = reference("a photo", data)
    assert clip.score("a photo", str(path)) == pytest.approx(expected, abs=reference.tolerance)
    assert clip.score("a photo", path.as_uri()) == pytest.approx(expected, abs=reference.tolerance)
    [result] = clip.score_batch([clipserve.SimilarityInput("a photo", str(path))])
    assert result.score == pytest.approx(expected, abs=reference.tolerance)


def test_image_bytes_over_the_raw_stub(real_server, reference):
    data = make_image(20, 20, seed=3)
    with grpc.insecure_channel(real_server.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        reply = stub.Score(
            scorer_pb2.ScoreRequest(request_id="r1", query="a dog", image_bytes=data, query_id="q", image_id="i")
        )
    assert (reply.request_id, reply.query_id, reply.image_id) == ("r1", "q", "i")
    assert not reply.HasField("error")
    assert reply.score == pytest.approx(reference("a dog", data), abs=reference.tolerance)


def test_bad_items_get_their_own_error_and_the_rest_score(clip, image_host, tmp_path):
    good = image_host.url("img/photo1.png")
    inputs = [
        clipserve.SimilarityInput("ok", good),
        clipserve.SimilarityInput("unreachable", "http://127.0.0.1:9/nothing.png"),
        clipserve.SimilarityInput("not an image", image_host.url("img/not-an-image.png")),
        clipserve.SimilarityInput("missing", image_host.url("status/404")),
        clipserve.SimilarityInput("no such file", str(tmp_path / "absent.png")),
        clipserve.SimilarityInput("ok again", good),
    ]
    results = clip.score_batch(inputs)
    codes = [r.error_code for r in results]
    assert codes == [None, "FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND", "NOT_FOUND", None]
    assert results[0].score is not None and results[5].score is not None
    assert all(r.score is None for r in results[1:5])
    assert "127.0.0.1:9" in results[1].error
    assert "not a recognised image" in results[2].error


def test_unary_score_raises_with_the_status_code(clip, image_host):
    with pytest.raises(clipserve.ClipServeError) as info:
        clip.score("a dog", image_host.url("img/not-an-image.png"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not-an-image.png" in info.value.details


def test_model_info_describes_the_loaded_model(clip, tiny_checkpoint):
    info = clip.model_info()
    assert info.model_id == str(tiny_checkpoint)
    assert (info.device, info.dtype, info.embedding_dim, info.max_text_tokens) == ("cpu", "float32", 16, 77)
    assert info.logit_scale == pytest.approx(14.2857, rel=1e-3)
    assert info.max_batch_size == 32
    assert not info.compiled


def test_compiled_image_tower_changes_speed_not_scores(tiny_checkpoint, image_host, reference):
    # --no-cache: every item goes through the compiled graph, in batches of one and of many.
    server = ServerProcess(["--model", str(tiny_checkpoint), "--allow-private-networks", "--compile", "--no-cache"])
    try:
        with clipserve.CLIP(server.address, timeout=120) as clip:
            assert clip.model_info().compiled
            url = image_host.url("img/photo2.png")
            assert clip.score("a red car", url) == pytest.approx(
                reference("a red car", image_host.images["photo2.png"]), abs=reference.tolerance
            )
            names = [f"photo{j}.{ext}" for j in range(6) for ext in ("png", "jpg")]
            results = clip.score_batch([clipserve.SimilarityInput("a dog", image_host.url(f"img/{n}")) for n in names])
            for name, result in zip(names, results):
                assert result.score == pytest.approx(
                    reference("a dog", image_host.images[name]), abs=reference.tolerance
                )
    finally:
        assert server.terminate() == 0, "".join(server.log)


def test_health_is_serving_via_sdk_cli(real_server):
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "health", "--address", real_server.address],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SERVING"


def test_cli_score_prints_the_score(real_server, image_host, reference):
    url = image_host.url("img/photo2.png")
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "score", "a dog", url, "--address", real_server.address],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(
        reference("a dog", image_host.images["photo2.png"]), abs=reference.tolerance
    )


def test_cli_score_reports_errors_without_traceback(real_server, image_host):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipserve.cli",
            "score",
            "a dog",
            image_host.url("status/404"),
            "--address",
            real_server.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: NOT_FOUND")
    assert "Traceback" not in done.stderr


# -- grpcurl: no proto files on the caller's side, everything through reflection ----------------

def test_grpcurl_lists_services_through_reflection(real_server):
    done = grpcurl(real_server.address, "list")
    assert done.returncode == 0, done.stderr
    services = set(done.stdout.split())
    assert {"clipserve.v1.Scorer", "grpc.health.v1.Health"} <= services


def test_grpcurl_scores_a_url(real_server, image_host, reference):
    url = image_host.url("img/photo3.png")
    done = grpcurl(
        "-d",
        json.dumps({"query": "a dog", "image_url": url, "request_id": "7"}),
        real_server.address,
        "clipserve.v1.Scorer/Score",
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["request_id"] == "7"
    assert reply["score"] == pytest.approx(reference("a dog", image_host.images["photo3.png"]), abs=reference.tolerance)


def test_grpcurl_streams_a_batch_with_a_bad_item(real_server, image_host):
    requests = "\n".join(
        json.dumps(r)
        for r in (
            {"request_id": "a", "query": "one", "image_url": image_host.url("img/photo0.png")},
            {"request_id": "b", "query": "two", "image_url": image_host.url("status/500")},
        )
    )
    done = grpcurl("-d", requests, real_server.address, "clipserve.v1.Scorer/ScoreBatch")
    assert done.returncode == 0, done.stderr
    replies = {r["request_id"]: r for r in map(json.loads, json_objects(done.stdout))}
    assert "score" in replies["a"]
    assert replies["b"]["error"]["code"] == "FAILED_PRECONDITION"
    assert "HTTP 500" in replies["b"]["error"]["message"]


def test_grpcurl_health_check(real_server):
    done = grpcurl(real_server.address, "grpc.health.v1.Health/Check")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "SERVING"}


def test_cli_info_prints_the_model_as_json(real_server, tiny_checkpoint):
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "info", "--address", real_server.address],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["modelId"] == str(tiny_checkpoint) and info["embeddingDim"] == 16
    assert info["textCache"]["capacity"] == "100000"  # uint64 is a string in protobuf JSON
