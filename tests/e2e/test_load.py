"""Many clients at once: every item answered exactly once, server memory stays bounded."""

from __future__ import annotations

import random
import threading

import psutil
import pytest

import clipserve

from ..helpers import make_image

pytestmark = pytest.mark.cost(6)  # its CPU cost among the files (tests/conftest.py)

CLIENTS = 16
ITEMS_PER_CLIENT = 80


@pytest.mark.load
def test_sixteen_streaming_clients_get_exactly_once_results_in_bounded_memory(real_server, image_host, tmp_path):
    good = [image_host.add(f"load{i}.jpg", make_image(64, 48, seed=2000 + i, fmt="JPEG")) for i in range(30)]
    local = tmp_path / "local.png"
    local.write_bytes(make_image(32, 32, seed=3))
    bad = [image_host.url("status/404"), image_host.url("img/not-an-image.png"), "http://127.0.0.1:9/refused.png", "ftp://x/y.png"]
    process = psutil.Process(real_server.proc.pid)

    def workload(client: int, round_: int) -> list[clipserve.SimilarityInput]:
        rng = random.Random(client * 1000 + round_)
        items = []
        for i in range(ITEMS_PER_CLIENT):
            kind = rng.random()
            url = rng.choice(bad) if kind < 0.2 else (str(local) if kind < 0.3 else rng.choice(good))
            items.append(clipserve.SimilarityInput(f"query {rng.randrange(40)}", url, query_id=f"{client}-{i}"))
        return items

    def run_round(round_: int) -> dict[int, tuple[list, list]]:
        outcomes: dict[int, tuple[list, list]] = {}

        def client(n: int) -> None:
            inputs = workload(n, round_)
            with clipserve.CLIP(real_server.address, timeout=300, max_in_flight=32) as clip:
                outcomes[n] = (inputs, clip.score_batch(inputs))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return outcomes

    run_round(0)  # warm up: caches fill, allocator pools grow
    baseline = process.memory_info().rss
    for round_ in (1, 2):
        outcomes = run_round(round_)
        assert sorted(outcomes) == list(range(CLIENTS))
        for inputs, results in outcomes.values():
            assert [r.query_id for r in results] == [x.query_id for x in inputs]  # exactly once, in order
            for x, r in zip(inputs, results):
                assert (r.score is None) == (r.error is not None)
                assert (r.error is not None) == (x.image_url in bad), (x.image_url, r.error)
    growth_mb = (process.memory_info().rss - baseline) / 2**20
    assert growth_mb < 150, f"server RSS grew {growth_mb:.0f} MiB over two rounds of {CLIENTS * ITEMS_PER_CLIENT} items"
