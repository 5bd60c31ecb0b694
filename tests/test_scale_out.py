"""Several replicas behind one address: a fresh client spreads every batch over all of them,
a faster replica takes more, replicas may die or appear mid-run, and every pair is answered
exactly once, in input order."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import clipserve
import clipserve._replicas
from clipserve._replicas import Discovery, ReplicaAddress, split_address

from .conftest import ServerProcess
from .helpers import GatedModel, make_image


def start_replicas(*args_per_replica: list[str]) -> list[ServerProcess]:
    """Replicas started together, as an orchestrator does (in no particular order)."""
    replicas = [ServerProcess(args, metrics=True, wait=False) for args in args_per_replica]
    return [replica.wait_ready() for replica in replicas]


def stop(replicas: list[ServerProcess]) -> None:
    for replica in replicas:
        replica.terminate()


def pairs(n: int, image: str) -> list[clipserve.SimilarityInput]:
    # Distinct queries: every pair costs the server a text encode, so the split of pairs is
    # the split of work.
    return [clipserve.SimilarityInput(f"query number {i}", image, query_id=str(i)) for i in range(n)]


def assert_exactly_once_in_order(results: list[clipserve.SimilarityResult], n: int) -> None:
    assert [r.query_id for r in results] == [str(i) for i in range(n)]
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]


def test_address_forms_name_their_replicas():
    assert split_address(["127.0.0.1:1", "127.0.0.1:2"]) == ["127.0.0.1:1", "127.0.0.1:2"]
    assert split_address("127.0.0.1:1, 127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert split_address("ipv4:10.0.0.1:5,10.0.0.2:5") == ["10.0.0.1:5", "10.0.0.2:5"]
    assert [r.target for r in Discovery(["gpu1:50051", "gpu2:50051"]).replicas()] == ["gpu1:50051", "gpu2:50051"]
    found = Discovery(["dns:///clipserve.default.svc:50051"], resolver=lambda host, port: [f"10.1.0.{i}:{port}" for i in (1, 2)]).replicas()
    assert found == [ReplicaAddress(f"10.1.0.{i}:50051", authority="clipserve.default.svc:50051", tls_name="clipserve.default.svc") for i in (1, 2)]
    with pytest.raises(ValueError):
        Discovery(["dns:///no-port"])


@pytest.mark.parametrize("count, least_share", [(2, 0.30), (3, 0.20)])
def test_a_fresh_client_spreads_one_batch_over_every_replica(image_host, count, least_share):
    # Equal replicas, as on equal machines: accelerator time is simulated (the stand-in model's
    # forward pass sleeps), so that the split does not follow which process this busy 2-core
    # machine happens to schedule (work stealing rightly gives a faster replica more).
    replicas = start_replicas(*[["--model", "fake:forward_ms=40", "--max-batch-size", "8", "--allow-private-networks"]] * count)
    try:
        # No warm-up call: the client's first request is the batch itself.
        with clipserve.CLIP([r.address for r in replicas], timeout=120) as clip:
            results = clip.score_batch(pairs(400, image_host.url("img/photo0.png")))
        assert_exactly_once_in_order(results, 400)
        shares = [r.items() / 400 for r in replicas]
        assert sum(r.items() for r in replicas) >= 400
        assert min(shares) >= least_share, shares
    finally:
        stop(replicas)


def test_a_faster_replica_takes_more_and_a_slow_one_does_not_hold_the_run_back(image_host):
    # Accelerator time simulated by the stand-in model: each forward pass sleeps, so the two
    # replicas do not compete for this machine's cores. The second is three times slower.
    batching = ["--max-batch-size", "8", "--max-batch-delay-ms", "2", "--allow-private-networks"]
    fast, slow = start_replicas(["--model", "fake:forward_ms=60", *batching], ["--model", "fake:forward_ms=180", *batching])
    try:
        with clipserve.CLIP([fast.address, slow.address], timeout=120) as clip:
            results = clip.score_batch(pairs(400, image_host.url("img/photo1.png")))
        assert_exactly_once_in_order(results, 400)
        fast_items, slow_items = fast.items(), slow.items()
        assert fast_items / (fast_items + slow_items) >= 0.60, (fast_items, slow_items)
    finally:
        stop([fast, slow])


def test_an_idle_replica_takes_over_the_last_pairs_of_a_stalled_one(make_fake_server, image_host):
    """README: at the end of a batch, an idle replica also takes over pairs that a much slower
    one would answer last (the first answer wins); `clip.stats()` counts the hedges.

    The slow replica never answers until the batch is over (its model waits at a gate), so
    the batch can only complete through hedging: no clock decides the outcome."""
    stalled_model = GatedModel()
    fast = make_fake_server(allow_private_networks=True)
    stalled = make_fake_server(stalled_model, allow_private_networks=True)
    stalled_model.hold()
    try:
        # Without hedging the stalled replica's pairs would run out this timeout instead.
        with clipserve.CLIP([fast.address, stalled.address], timeout=60) as clip:
            results = clip.score_batch(pairs(200, image_host.url("img/photo1.png")))
            stats = clip.stats()
    finally:
        stalled_model.release()
    assert_exactly_once_in_order(results, 200)
    assert stalled_model.held.is_set()  # the stalled replica did get pairs...
    assert stats.items_by_replica.get(stalled.address, 0) == 0  # ...and answered none of them
    assert stats.hedges >= 1, stats


def test_a_replica_that_dies_mid_run_costs_nothing(tiny_checkpoint, image_host):
    replicas = start_replicas(*[["--model", str(tiny_checkpoint), "--allow-private-networks"]] * 2)
    image_host.slow_img_delay = 0.2  # so that the kill lands mid-run
    try:
        names = [image_host.add(f"dying{i}.png", make_image(16, 16, seed=3000 + i)).rsplit("/", 1)[1] for i in range(240)]
        inputs = [clipserve.SimilarityInput(f"query {i}", image_host.url(f"slow-img/{n}"), query_id=str(i)) for i, n in enumerate(names)]
        results: list = []
        with clipserve.CLIP([r.address for r in replicas], timeout=120) as clip:
            runner = threading.Thread(target=lambda: results.extend(clip.score_batch(inputs)))
            runner.start()
            deadline = time.monotonic() + 60
            while sum(image_host.hits.get(f"/slow-img/{n}", 0) for n in names) < 40:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            replicas[0].proc.kill()
            runner.join(120)
        assert_exactly_once_in_order(results, 240)
    finally:
        image_host.slow_img_delay = 0.05
        stop(replicas)


def test_a_replica_that_appears_in_dns_mid_run_gets_work(make_fake_server, image_host, monkeypatch):
    """README: `dns:///` names are resolved again every 2 s while calls run: a replica that
    appears gets work.

    The first replica holds every pair until the new one has answered some (its model waits
    at a gate), so the run cannot end before the new replica joins, however busy the machine."""
    assert clipserve._replicas.DNS_REFRESH_S == 2.0
    # This machine has no DNS server to change: the name's answers come from a stand-in for
    # the system resolver, which the SDK asks again every DNS_REFRESH_S seconds.
    first_model = GatedModel()
    first = make_fake_server(first_model, allow_private_networks=True)
    second = make_fake_server(allow_private_networks=True)
    answers = {"clipserve.test": [first.address]}
    monkeypatch.setattr(clipserve._replicas, "resolve_ips", lambda host, port: list(answers[host]))
    first_model.hold()
    results: list = []
    try:
        with clipserve.CLIP(f"dns:///clipserve.test:{first.port}", timeout=120) as clip:
            runner = threading.Thread(target=lambda: results.extend(clip.score_batch(pairs(600, image_host.url("img/photo2.png")))))
            runner.start()
            assert first_model.held.wait(60), "the run never reached the first replica"
            assert second.address not in clip.stats().items_by_replica
            answers["clipserve.test"] = [first.address, second.address]  # a new pod is ready
            deadline = time.monotonic() + 60  # a safety net only: the gate decides the order
            while clip.stats().items_by_replica.get(second.address, 0) == 0:
                assert time.monotonic() < deadline, "the new replica got no work"
                time.sleep(0.05)
            first_model.release()
            runner.join(120)
            stats = clip.stats()
    finally:
        first_model.release()
    assert_exactly_once_in_order(results, 600)
    assert stats.items_by_replica[second.address] >= 100, stats.items_by_replica


def test_info_says_which_replica_answered():
    replicas = start_replicas(["--model", "fake", "--replica-name", "pod-a"], ["--model", "fake", "--replica-name", "pod-b"])
    try:
        address = ",".join(r.address for r in replicas)
        done = subprocess.run([sys.executable, "-m", "clipserve.cli", "info", "--address", address], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["replica"] in {"pod-a", "pod-b"}
        with clipserve.CLIP(address) as clip:  # unary calls take turns over the replicas
            assert {clip.model_info().replica for _ in range(4)} == {"pod-a", "pod-b"}
    finally:
        stop(replicas)


def test_score_file_reports_the_pairs_each_replica_answered(image_host, tmp_path):
    replicas = start_replicas(["--model", "fake", "--allow-private-networks"], ["--model", "fake", "--allow-private-networks"])
    rows = [{"query_text": f"query {i}", "image_id": "photo3.png"} for i in range(300)]
    (tmp_path / "qrels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "clipserve.cli", "score-file", str(tmp_path / "qrels.jsonl"), "--image-base-url", image_host.url("img"),
             "-o", str(tmp_path / "out.jsonl"), "--no-progress"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "CLIPSERVE_ADDRESS": ",".join(r.address for r in replicas)},
        )
        assert done.returncode == 0, done.stderr
        [line] = [line for line in done.stderr.splitlines() if line.startswith("pairs per replica: ")]
        counts = {name: int(count) for name, count in (part.rsplit(" ", 1) for part in line.removeprefix("pairs per replica: ").split(", "))}
        assert set(counts) == {r.address for r in replicas} and sum(counts.values()) == 300
        # A server may also have answered a few pairs that the other answered first (hedged).
        assert all(0 < counts[r.address] <= r.items() for r in replicas), (counts, [r.items() for r in replicas])
    finally:
        stop(replicas)


def test_the_async_client_spreads_a_batch_too(image_host):
    replicas = start_replicas(*[["--model", "fake:forward_ms=20", "--max-batch-size", "8", "--allow-private-networks"]] * 2)

    async def run() -> list:
        async with clipserve.AsyncCLIP([r.address for r in replicas], timeout=120) as clip:
            return await clip.score_batch(pairs(300, image_host.url("img/photo4.png")))

    try:
        assert_exactly_once_in_order(asyncio.run(run()), 300)
        shares = [r.items() / 300 for r in replicas]
        assert min(shares) >= 0.30, shares
    finally:
        stop(replicas)
