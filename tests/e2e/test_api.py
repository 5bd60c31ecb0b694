"""The gRPC API over a real port, on the deterministic FakeModel (no weights needed)."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

import clipserve
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc
from clipserve_server.models.fake_model import FakeModel

from ..helpers import ImageHost, make_image


def stub_for(server) -> tuple[grpc.Channel, scorer_pb2_grpc.ScorerStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, scorer_pb2_grpc.ScorerStub(channel)


def test_stream_responses_carry_request_ids_even_out_of_order(make_fake_server):
    """The server answers in completion order: a slow item must not hold back fast ones.

    The slow item's download waits at a gate that opens only once the 20 others are answered,
    so no clock decides the order."""
    host = ImageHost()  # its own gate: the session's image host is shared by other tests
    host.add("late.png", make_image(seed=99))
    server = make_fake_server(allow_private_networks=True, fetch_timeout_s=60)
    requests = [scorer_pb2.ScoreRequest(request_id="slow", query="q", image_url=host.url("gated/late.png"))]
    requests += [
        scorer_pb2.ScoreRequest(
            request_id=f"r{i}", query=f"q{i}", image_bytes=make_image(seed=i), query_id=f"q{i}", image_id=f"i{i}"
        )
        for i in range(20)
    ]
    channel, stub = stub_for(server)
    replies = []
    try:
        with channel:
            for reply in stub.ScoreBatch(iter(requests), timeout=60):
                replies.append(reply)
                if len(replies) == 20:
                    host.gate.set()
    finally:
        host.gate.set()
        host.close()
    assert sorted(r.request_id for r in replies) == sorted(r.request_id for r in requests)
    assert replies[-1].request_id == "slow"  # the rest did not wait for it
    assert replies[-1].HasField("score")
    for reply in replies[:-1]:
        i = reply.request_id[1:]
        assert (reply.query_id, reply.image_id) == (f"q{i}", f"i{i}")
        assert reply.HasField("score") and not reply.HasField("error")


def test_score_batch_returns_one_result_per_input_in_order(fake_server, image_host):
    urls = [image_host.url(f"img/photo{i}.png") for i in range(6)]
    inputs = [
        clipserve.SimilarityInput(f"query {i % 7}", random.Random(i).choice(urls), query_id=str(i)) for i in range(500)
    ]
    with clipserve.CLIP(fake_server.address, max_in_flight=16) as clip:
        results = clip.score_batch(inputs)
        singles = {(x.query, x.image_url): clip.score(x.query, x.image_url) for x in inputs[:10]}
    assert [r.query_id for r in results] == [str(i) for i in range(500)]
    assert all(r.error is None for r in results)
    for x, r in zip(inputs[:10], results[:10]):
        assert r.score == pytest.approx(singles[(x.query, x.image_url)])


def test_score_batch_accepts_tuples_and_dicts(fake_server, image_host):
    url = image_host.url("img/photo0.png")
    with clipserve.CLIP(fake_server.address) as clip:
        results = clip.score_batch([("a", url), {"query": "b", "image_url": url, "image_id": "x"}])
    assert [(r.query, r.image_id, r.error) for r in results] == [("a", None, None), ("b", "x", None)]


def test_empty_batch(fake_server):
    with clipserve.CLIP(fake_server.address) as clip:
        assert clip.score_batch([]) == []


def test_private_network_urls_are_refused_by_default(make_fake_server, image_host):
    server = make_fake_server()  # default config: no --allow-private-networks
    private = image_host.add("private.png", make_image(seed=5))
    with clipserve.CLIP(server.address) as clip:
        for url in (
            private,
            "http://localhost:1/x.png",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/x.png",
            "http://10.0.0.1/x.png",
        ):
            with pytest.raises(clipserve.ClipServeError) as info:
                clip.score("a dog", url)
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED, url
            assert "--allow-private-networks" in info.value.details
    assert "/img/private.png" not in image_host.hits  # refused before any connection


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("file:///etc/passwd", "INVALID_ARGUMENT"),
        ("ftp://example.com/x.png", "INVALID_ARGUMENT"),
        ("gopher://example.com/x", "INVALID_ARGUMENT"),
    ],
)
def test_only_http_and_https_are_fetched(fake_server, url, code):
    channel, stub = stub_for(fake_server)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.Score(scorer_pb2.ScoreRequest(query="q", image_url=url), timeout=30)
    assert info.value.code().name == code
    assert "only http and https" in info.value.details()


def test_a_request_without_an_image_or_query_is_invalid(fake_server):
    channel, stub = stub_for(fake_server)
    with channel:
        for request, words in (
            (scorer_pb2.ScoreRequest(query="q"), "no image_url, image_bytes or image_sha256"),
            (scorer_pb2.ScoreRequest(query="  ", image_bytes=make_image()), "query is only whitespace"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Score(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in info.value.details()


def test_model_info_reports_batching_and_caches(fake_server):
    with clipserve.CLIP(fake_server.address) as clip:
        info = clip.model_info()
    assert info.model_id == "fake"
    assert info.max_batch_delay_ms == 2.0
    assert info.text_cache.capacity == 100_000 and info.image_cache.capacity == 50_000


# -- batching and caching -------------------------------------------------------------------

def test_cached_pairs_are_answered_without_the_model(make_fake_server, image_host):
    model = FakeModel()
    server = make_fake_server(model, allow_private_networks=True)
    inputs = [clipserve.SimilarityInput(f"q{i % 3}", image_host.url(f"img/photo{i % 4}.png")) for i in range(24)]
    with clipserve.CLIP(server.address) as clip:
        first = clip.score_batch(inputs)
        encoded = (len(model.encoded_texts), model.encoded_images)
        second = clip.score_batch(inputs)
        info = clip.model_info()
    assert encoded == (3, 4)  # every distinct text and image encoded exactly once
    assert (len(model.encoded_texts), model.encoded_images) == encoded  # the warm run touched no model
    assert [r.score for r in first] == [r.score for r in second]
    assert info.text_cache.entries == 3 and info.image_cache.entries == 4
    assert info.image_cache.hits >= 24 and info.image_cache.hit_rate > 0.5


def test_concurrent_requests_for_one_image_share_one_download_and_encode(make_fake_server, image_host):
    model = FakeModel(forward_delay_s=0.05)
    server = make_fake_server(model, allow_private_networks=True)
    url = image_host.add("shared.png", make_image(seed=99))
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with clipserve.CLIP(server.address) as clip:
                clip.score_batch([clipserve.SimilarityInput("same query", url) for _ in range(20)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert model.encoded_texts == ["same query"]
    assert model.encoded_images == 1
    assert image_host.hits["/img/shared.png"] == 1


def test_pairs_waiting_for_one_image_cost_no_task_each(make_fake_server, image_host):
    """A benchmark file pairs each image with many queries: the pairs that wait for an image
    being downloaded are callbacks on its computation, not a task each (the event loop's CPU
    per pair), and every one of them is answered when it lands."""
    import asyncio

    server = make_fake_server(allow_private_networks=True, stream_max_in_flight=400)
    image_host.add("awaited.png", make_image(seed=77))
    image_host.gate.clear()  # /gated/ downloads hang until the gate opens
    outcome: dict[str, list] = {}

    def score() -> None:  # one message of 300 pairs (the SDK would start with a window of 16)
        requests = [
            scorer_pb2.ScoreRequest(
                request_id=str(i), query=f"query {i}", image_url=image_host.url("gated/awaited.png")
            )
            for i in range(300)
        ]
        channel, stub = stub_for(server)
        with channel:
            outcome["results"] = [
                r
                for chunk in stub.ScoreChunks(iter([scorer_pb2.ScoreRequestChunk(items=requests)]), timeout=60)
                for r in chunk.items
            ]

    engine = server.server._registry.get()

    def arrived() -> bool:
        """All but the first pair joined the image's download, and the 300 queries are encoded
        (each distinct text is one computation, a task, until the model has it: on a busy
        machine it may not have them yet)."""
        texts, images = engine.cache_stats()
        return images.hits >= 299 and texts.entries >= 300

    caller = threading.Thread(target=score)
    caller.start()
    try:
        deadline = time.monotonic() + 60
        while not server.run_on_loop(arrived):
            assert time.monotonic() < deadline, "the pairs never reached the server"
            time.sleep(0.05)
        tasks = server.run_on_loop(lambda: len(asyncio.all_tasks()))
    finally:
        image_host.gate.set()
        caller.join(60)
    assert tasks < 50, f"{tasks} tasks on the server's loop while 300 pairs waited for one image"
    results = outcome["results"]
    assert sorted(int(r.request_id) for r in results) == list(range(300))
    assert all(r.HasField("score") and not r.HasField("error") for r in results)
    assert image_host.hits["/gated/awaited.png"] == 1


def test_results_are_identical_with_caches_on_and_off(make_fake_server, image_host):
    inputs = [clipserve.SimilarityInput(f"q{i % 5}", image_host.url(f"img/photo{i % 6}.jpg")) for i in range(60)]
    cached_model, uncached_model = FakeModel(), FakeModel()
    cached = make_fake_server(cached_model, allow_private_networks=True)
    uncached = make_fake_server(
        uncached_model, allow_private_networks=True, cache=False, text_cache_size=0, image_cache_size=0
    )
    with clipserve.CLIP(cached.address) as a, clipserve.CLIP(uncached.address) as b:
        with_cache = [a.score_batch(inputs) for _ in range(2)]
        without_cache = [b.score_batch(inputs) for _ in range(2)]
        assert b.model_info().image_cache.capacity == 0
    scores = {tuple(r.score for r in run) for run in with_cache + without_cache}
    assert len(scores) == 1
    assert uncached_model.encoded_images > cached_model.encoded_images


def test_batches_never_exceed_the_limit_and_do_fill_up(make_fake_server):
    model = FakeModel(forward_delay_s=0.02)
    server = make_fake_server(model, max_batch_size=8, max_batch_delay_ms=50)
    channel, stub = stub_for(server)
    requests = [
        scorer_pb2.ScoreRequest(request_id=str(i), query=f"text {i}", image_bytes=make_image(seed=i)) for i in range(64)
    ]
    with channel:
        replies = list(stub.ScoreBatch(iter(requests), timeout=60))
    assert len(replies) == 64
    sizes = [t + i for t, i in model.batches]
    assert max(sizes) <= 8
    assert max(sizes) == 8  # with 128 items waiting, batches fill to the limit
    assert sum(sizes) == 128  # 64 texts + 64 images, each encoded once


def test_progress_true_shows_a_bar_and_changes_nothing_else(fake_server, image_host, capsys):
    """README: score_batch(..., progress=True) shows a tqdm bar (on stderr), counting every pair."""
    inputs = [(f"query {i}", image_host.url(f"img/photo{i % 6}.png")) for i in range(30)]
    with clipserve.CLIP(fake_server.address) as clip:
        quiet = clip.score_batch(inputs)
        capsys.readouterr()
        shown = clip.score_batch(inputs, progress=True)
    err = capsys.readouterr().err
    assert "30/30" in err, err
    assert [r.score for r in shown] == [r.score for r in quiet]
