"""Data from the wild: every bad item gets its own clear error, good ones still score."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import clipserve
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

from clipserve_server.models.fake_model import FakeModel

from ..conftest import FAKE_SERVER_CONFIG, ServerProcess
from ..helpers import InProcessServer, make_image

pytestmark = pytest.mark.cost(14)  # its CPU cost among the files (tests/conftest.py)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


_RGB = Image.fromarray((np.random.default_rng(5).random((30, 40, 3)) * 255).astype("uint8"))
_FRAMES = [Image.new("RGB", (16, 16), c) for c in ((200, 10, 10), (10, 200, 10))]
SCORABLE = {
    "cmyk.jpg": encode(_RGB.convert("CMYK"), "JPEG"),
    "palette.png": encode(_RGB.convert("P"), "PNG"),
    "sixteen-bit.png": encode(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG"),
    "gray.png": encode(_RGB.convert("L"), "PNG"),
    "gray-alpha.png": encode(_RGB.convert("LA"), "PNG"),
    "alpha.png": encode(_RGB.convert("RGBA"), "PNG"),
    "one-pixel.png": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
    "animated.gif": (
        lambda b: (_FRAMES[0].save(b, format="GIF", save_all=True, append_images=_FRAMES[1:]), b.getvalue())[1]
    )(io.BytesIO()),
}


@pytest.fixture(scope="module")
def clip(real_server):
    with clipserve.CLIP(real_server.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def clip_of_worker_processes(tiny_checkpoint):
    """The same server, decoding (and so downloading) in worker processes, as on a many-core box."""
    server = ServerProcess(
        [
            "--model",
            str(tiny_checkpoint),
            "--allow-private-networks",
            "--fetch-timeout-s",
            "2",
            "--decode-pool",
            "processes",
            "--decode-workers",
            "2",
        ]
    )
    try:
        with clipserve.CLIP(server.address, timeout=120) as client:
            yield client
    finally:
        assert server.terminate() == 0, "".join(server.log)


@pytest.mark.parametrize("name", sorted(SCORABLE))
def test_unusual_but_valid_images_score_like_the_reference_adapter(clip, image_host, reference, name):
    url = image_host.add(f"valid-{name}", SCORABLE[name])
    assert clip.score("a picture", url) == pytest.approx(
        reference("a picture", SCORABLE[name]), abs=reference.tolerance
    )


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_each_bad_item_in_a_stream_gets_its_own_error(pool, request, image_host, tmp_path):
    clip = request.getfixturevalue("clip" if pool == "threads" else "clip_of_worker_processes")
    truncated = make_image(64, 64, seed=1, fmt="JPEG")[:400]
    bomb = encode(Image.new("L", (12_000, 12_000)), "PNG")  # 144 Mpx in a small file
    good = image_host.url("img/photo0.png")
    cases = [
        ("unreachable host", "http://127.0.0.1:9/x.png", "FAILED_PRECONDITION", "cannot connect"),
        ("http 404", image_host.url("status/404"), "NOT_FOUND", "HTTP 404"),
        ("http 500", image_host.url("status/500"), "FAILED_PRECONDITION", "HTTP 500"),
        ("slow server", image_host.url("slow"), "DEADLINE_EXCEEDED", "longer than 2s"),
        ("redirect loop", image_host.url("loop"), "FAILED_PRECONDITION", "more than 5 redirects"),
        ("body over the cap", image_host.url("huge"), "INVALID_ARGUMENT", "byte limit"),
        ("not an image", image_host.url("img/not-an-image.png"), "INVALID_ARGUMENT", "not a recognised image"),
        ("truncated jpeg", image_host.add("truncated.jpg", truncated), "INVALID_ARGUMENT", "corrupt or truncated"),
        ("decompression bomb", image_host.add("bomb.png", bomb), "INVALID_ARGUMENT", "pixel limit"),
        ("", good, "INVALID_ARGUMENT", "query is empty"),
        (" \t\n", good, "INVALID_ARGUMENT", "query is only whitespace"),
        ("lone surrogate \ud800", good, "INVALID_ARGUMENT", "not valid Unicode"),
        ("missing local file", str(tmp_path / "nope.jpg"), "NOT_FOUND", "not found"),
    ]
    inputs = [clipserve.SimilarityInput("fine", good, query_id="first")]
    inputs += [clipserve.SimilarityInput(query, url, query_id=str(i)) for i, (query, url, _, _) in enumerate(cases)]
    inputs += [clipserve.SimilarityInput("fine", good, query_id="last")]
    results = clip.score_batch(inputs)
    assert results[0].score is not None and results[-1].score is not None
    for (query, url, code, words), result in zip(cases, results[1:-1]):
        assert (result.error_code, result.score) == (code, None), (query, url, result.error)
        assert words in result.error, (query, result.error)
    with grpc.insecure_channel(clip.address) as channel:  # and the server is still healthy
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def test_queries_longer_than_the_context_are_truncated(clip, image_host, reference):
    long_query = " ".join(["a very long query about dogs and beaches"] * 40)  # far over 77 tokens
    url = image_host.url("img/photo1.png")
    assert clip.score(long_query, url) == pytest.approx(
        reference(long_query, image_host.images["photo1.png"]), abs=reference.tolerance
    )


def test_invalid_utf8_costs_one_item_not_the_stream(real_server):
    def raw(request_id: str, query: bytes) -> bytes:
        placeholder = b"Q" * len(query)
        data = scorer_pb2.ScoreRequest(
            request_id=request_id, query=placeholder.decode(), image_bytes=make_image(seed=2)
        ).SerializeToString()
        return data.replace(placeholder, query, 1)

    with grpc.insecure_channel(real_server.address) as channel:
        call = channel.stream_stream(
            "/clipserve.v1.Scorer/ScoreBatch",
            request_serializer=lambda b: b,
            response_deserializer=scorer_pb2.ScoreResponse.FromString,
        )
        replies = {
            r.request_id: r
            for r in call(
                iter([raw("good", b"a dog"), raw("bad", b"\xff\xfe dog"), raw("good2", b"a cat")]), timeout=60
            )
        }
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(
                "/clipserve.v1.Scorer/Score",
                request_serializer=lambda b: b,
                response_deserializer=scorer_pb2.ScoreResponse.FromString,
            )(raw("u", b"\xc3\x28"), timeout=60)
    assert replies["bad"].error.code == "INVALID_ARGUMENT" and "UTF-8" in replies["bad"].error.message
    assert replies["good"].HasField("score") and replies["good2"].HasField("score")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_oversized_local_file_fails_locally(real_server, tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(make_image(300, 300, seed=3))
    with clipserve.CLIP(real_server.address, max_upload_bytes=1000) as clip:
        [result] = clip.score_batch([clipserve.SimilarityInput("q", str(path))])
    assert result.error_code == "INVALID_ARGUMENT" and "upload limit" in result.error


def test_a_message_over_the_server_limit_is_resource_exhausted(make_fake_server):
    server = make_fake_server(max_message_mb=1)
    with grpc.insecure_channel(server.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(scorer_pb2.ScoreRequest(query="q", image_bytes=b"\0" * (2 * 1024 * 1024)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- randomised: any mix of requests gets exactly one well-formed answer each ----------------------

_GOOD_PNG = make_image(12, 10, seed=11)
_IMAGES = st.sampled_from(
    [
        {"image_bytes": _GOOD_PNG},
        {"image_bytes": b""},
        {"image_bytes": b"GIF89a garbage"},
        {"image_bytes": _GOOD_PNG[: len(_GOOD_PNG) // 2]},
        {"image_url": "http://127.0.0.1:9/refused.png"},
        {"image_url": "ftp://example.com/x.png"},
        {"image_url": ""},
        {},
    ]
)


@pytest.fixture(scope="module")
def quickly_retrying_server() -> Iterator[InProcessServer]:
    """fake_server's twin, retrying a refused connection (the port-9 URL) as shipped,
    four tries, but 10 ms apart instead of 0.5, 1 and 2 s: 25 examples would otherwise wait on
    backoff ~3.5 s each. How long retries wait is tests/unit/test_fetch_retries.py's claim."""
    server = InProcessServer(dataclasses.replace(FAKE_SERVER_CONFIG, fetch_backoff_s=0.01), FakeModel())
    yield server
    server.stop()


@settings(max_examples=25, deadline=None)
@given(batch=st.lists(st.tuples(st.text(max_size=60), _IMAGES, st.text(max_size=8)), min_size=1, max_size=12))
def test_random_requests_get_exactly_one_well_formed_answer_each(quickly_retrying_server, batch):
    requests = [
        scorer_pb2.ScoreRequest(request_id=str(i), query=q, query_id=qid, **image)
        for i, (q, image, qid) in enumerate(batch)
    ]
    with grpc.insecure_channel(quickly_retrying_server.address) as channel:
        replies = list(scorer_pb2_grpc.ScorerStub(channel).ScoreBatch(iter(requests), timeout=60))
    assert sorted(int(r.request_id) for r in replies) == list(range(len(requests)))
    for reply in replies:
        request = requests[int(reply.request_id)]
        assert reply.query_id == request.query_id
        assert reply.HasField("score") != reply.HasField("error")
        if reply.HasField("score"):
            assert math.isfinite(reply.score)
        else:
            assert reply.error.code in {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED", "NOT_FOUND"}, (
                reply.error
            )
            assert reply.error.message
