"""One client, several replicas: gRPC round_robin spreads the streams, a dead replica is survived."""

from __future__ import annotations

import threading
import time

import clipserve
from clipserve._channel import resolve_address

from .conftest import ServerProcess
from .helpers import make_image


def test_several_addresses_become_one_round_robin_target():
    assert resolve_address(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_address("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_address("dns:///clipserve.default.svc:50051") == "dns:///clipserve.default.svc:50051"
    with clipserve.CLIP(["127.0.0.1:1", "127.0.0.1:2"]) as two, clipserve.CLIP("127.0.0.1:1") as one:
        assert (two.streams, one.streams) == (2, 1)  # one stream per replica


def test_two_replicas_share_a_batch_and_one_dying_loses_nothing(tiny_checkpoint, image_host):
    args = ["--model", str(tiny_checkpoint), "--allow-private-networks"]
    replicas = [ServerProcess(args), ServerProcess(args)]
    names = [image_host.add(f"scale{i}.png", make_image(16, 16, seed=3000 + i)).rsplit("/", 1)[1] for i in range(240)]
    inputs = [clipserve.SimilarityInput(f"query {i}", image_host.url(f"slow-img/{n}"), query_id=str(i)) for i, n in enumerate(names)]
    try:
        addresses = [r.address for r in replicas]
        with clipserve.CLIP(addresses, max_in_flight=16, timeout=120) as clip:
            for _ in range(4):  # let round_robin connect to both replicas before the batch starts
                clip.model_info()
            time.sleep(0.5)
            first_half = clip.score_batch(inputs[:120])
            shares = []
            for address in addresses:
                with clipserve.CLIP(address) as replica:
                    shares.append(replica.model_info().image_cache.misses)
            assert all(share > 0 for share in shares), shares  # both replicas did work

            image_host.slow_img_delay = 0.2  # so that the kill lands mid-run
            results: list = []
            runner = threading.Thread(target=lambda: results.extend(clip.score_batch(inputs[120:])))
            runner.start()
            deadline = time.monotonic() + 60
            while sum(image_host.hits.get(f"/slow-img/{n}", 0) for n in names[120:]) < 30:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            replicas[0].proc.kill()  # one replica dies mid-run
            runner.join(120)
        assert [r.query_id for r in first_half + results] == [str(i) for i in range(240)]
        assert all(r.error is None for r in first_half + results), [r.error for r in results if r.error][:3]
    finally:
        image_host.slow_img_delay = 0.05
        for replica in replicas:
            replica.terminate()
