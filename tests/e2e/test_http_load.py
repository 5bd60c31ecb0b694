"""64 HTTP clients at once, each on its own connection: every request is answered once and
correctly (the vector gRPC's Embed gives for that text, the score ScoreBatch gives for that
pair), and the server forms batches larger than one across them (its batch-size metric)."""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import numpy as np
import pytest

import clipserve
from clipserve_server.models.fake_model import FakeModel

pytestmark = pytest.mark.cost(0.25)  # its CPU cost among the files (tests/conftest.py)

CLIENTS = 64
REQUESTS_EACH = 4


def test_64_concurrent_http_clients_are_each_answered_once_and_batched_together(make_fake_server, image_host):
    # A forward pass that takes a moment, so that requests from many clients meet in a batch.
    server = make_fake_server(FakeModel(forward_delay_s=0.02), max_batch_delay_ms=20.0, allow_private_networks=True)
    base = f"http://127.0.0.1:{server.server.http_port}"
    url = image_host.url("img/photo0.png")
    answers: dict[str, list] = collections.defaultdict(list)

    async def one_client(index: int) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=300)
        ) as session:  # a connection of its own
            for i in range(REQUESTS_EACH):
                text = f"client {index} request {i}"
                async with session.post(f"{base}/v1/embeddings", json={"model": "default", "input": text}) as response:
                    assert response.status == 200, await response.text()
                    answers[text].append((await response.json())["data"][0]["embedding"])
                async with session.post(
                    f"{base}/v1/score", json={"pairs": [{"query": text, "image_url": url}]}
                ) as response:
                    assert response.status == 200, await response.text()
                    answers["score:" + text].append((await response.json())["results"][0]["score"])

    async def everyone() -> None:
        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))

    asyncio.run(everyone())
    texts = [f"client {c} request {i}" for c in range(CLIENTS) for i in range(REQUESTS_EACH)]
    assert sorted(answers) == sorted(texts + ["score:" + t for t in texts])
    assert all(len(values) == 1 for values in answers.values()), "every request answered once"
    with clipserve.CLIP(server.address) as clip:
        expected = clip.embed_texts(texts)
        scores = clip.score_batch([(text, url) for text in texts])
    for text, result, score in zip(texts, expected, scores):
        np.testing.assert_array_equal(np.float32(answers[text][0]), np.float32(result.embedding))
        assert np.float32(answers["score:" + text][0]) == np.float32(score.score)
    registry = server.server.metrics.registry
    passes = registry.get_sample_value("clipserve_batch_size_count", {"model": "default"})
    single = registry.get_sample_value("clipserve_batch_size_bucket", {"model": "default", "le": "1.0"})
    assert passes > single, f"no forward pass held more than one item ({passes} passes)"
    assert registry.get_sample_value(
        "clipserve_http_requests_total", {"route": "/v1/embeddings", "status": "200"}
    ) == len(texts)
    assert registry.get_sample_value(
        "clipserve_items_total", {"rpc": "http.embeddings", "code": "OK", "model": "default"}
    ) == len(texts)
