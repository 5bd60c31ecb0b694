"""Several replicas behind one address: a fresh client spreads every batch over all of them,
a faster replica takes more, replicas may die, appear or leave DNS mid-run, and every pair is answered
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
from clipserve_server.config_loaders import load_config

from ..conftest import ServerProcess
from ..helpers import GatedModel, make_image

pytestmark = pytest.mark.cost(8)  # its CPU cost among the files (tests/conftest.py)


def start_replicas(*args_per_replica: list[str]) -> list[ServerProcess]:
    """Server processes started together, as an orchestrator does (in no particular order)."""
    replicas = [ServerProcess(args, wait=False) for args in args_per_replica]
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
    found = Discovery(
        ["dns:///clipserve.default.svc:50051"], resolver=lambda host, port: [f"10.1.0.{i}:{port}" for i in (1, 2)]
    ).replicas()
    assert found == [
        ReplicaAddress(f"10.1.0.{i}:50051", authority="clipserve.default.svc:50051", tls_name="clipserve.default.svc")
        for i in (1, 2)
    ]
    with pytest.raises(ValueError):
        Discovery(["dns:///no-port"])


class CountingModel(GatedModel):
    """A GatedModel that sets ``reached`` once it has encoded ``target`` texts: with distinct
    queries, once it has taken that many pairs."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.reached = threading.Event()

    def forward(self, texts, images):
        out = super().forward(texts, images)
        if len(self.encoded_texts) >= self.target:
            self.reached.set()
        return out


@pytest.mark.parametrize("count", [2, 3])
def test_a_fresh_client_spreads_one_batch_over_every_replica(make_fake_server, image_host, count):
    """README: "the SDK spreads every batch over them" (docs/sdk.md: "a fresh client uses
    every replica from its first batch").

    A barrier instead of shares: every replica's model waits at a gate, so no pair is
    answered until every replica has received some; a client that kept the batch on the
    first replicas would leave a gate unreached. No clock decides the outcome."""
    models = [GatedModel() for _ in range(count)]
    servers = [make_fake_server(model, allow_private_networks=True) for model in models]
    for model in models:
        model.hold()
    results: list = []
    try:
        # No warm-up call: the client's first request is the batch itself.
        with clipserve.CLIP([s.address for s in servers], timeout=120) as clip:
            runner = threading.Thread(
                target=lambda: results.extend(clip.score_batch(pairs(400, image_host.url("img/photo0.png"))))
            )
            runner.start()
            deadline = time.monotonic() + 60  # a safety net only: a correct client gets there at once
            reached = [model.held.wait(max(0.0, deadline - time.monotonic())) for model in models]
            assert clip.stats().items_by_replica == {}  # nothing answered before the barrier
            for model in models:
                model.release()
            runner.join(120)
            stats = clip.stats()
    finally:
        for model in models:
            model.release()
    assert reached == [True] * count, (
        f"replicas that got no pair of the first batch: {[s.address for s, r in zip(servers, reached) if not r]}"
    )
    assert_exactly_once_in_order(results, 400)
    assert sum(stats.items_by_replica.values()) == 400, stats.items_by_replica
    assert all(stats.items_by_replica.get(s.address, 0) > 0 for s in servers), stats.items_by_replica


def test_a_faster_replica_takes_more_and_a_slow_one_does_not_hold_the_run_back(make_fake_server, image_host):
    """README: "a faster one takes more" (docs/sdk.md: each replica pulls pairs from one
    shared queue as it answers, "a faster replica simply takes more").

    The slow replica's model waits at a gate until the fast one has taken 300 of the 400
    pairs: "slower" is "answers nothing yet", decided by events, not by sleeps racing on a
    busy machine. A client that gave each replica an equal share (200) would never let the
    fast one reach 300."""
    taken_first = 300
    fast_model, slow_model = CountingModel(taken_first), GatedModel()
    fast = make_fake_server(fast_model, allow_private_networks=True)
    slow = make_fake_server(slow_model, allow_private_networks=True)
    slow_model.hold()
    results: list = []
    try:
        with clipserve.CLIP([fast.address, slow.address], timeout=120) as clip:
            runner = threading.Thread(
                target=lambda: results.extend(clip.score_batch(pairs(400, image_host.url("img/photo1.png"))))
            )
            runner.start()
            assert slow_model.held.wait(60), "the slow replica got no pair"
            # A safety net only: the fast replica gets there as fast as it answers.
            fast_went_on = fast_model.reached.wait(60)
            fast_took = len(fast_model.encoded_texts)
            slow_answered_meanwhile = clip.stats().items_by_replica.get(slow.address, 0)
            slow_model.release()
            runner.join(120)
            stats = clip.stats()
    finally:
        slow_model.release()
    assert fast_went_on, f"the fast replica took {fast_took} pairs, then waited on the slow one"
    assert slow_answered_meanwhile == 0
    assert_exactly_once_in_order(results, 400)
    fast_items, slow_items = stats.items_by_replica.get(fast.address, 0), stats.items_by_replica.get(slow.address, 0)
    assert fast_items + slow_items == 400
    assert fast_items / 400 >= 0.60, (fast_items, slow_items)


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


def test_a_replica_that_dies_mid_run_costs_nothing(image_host):
    """docs/sdk.md: "A replica that dies mid-run costs nothing: its unanswered pairs go to the
    others." Every pair is answered exactly once, in input order.

    A real server process, killed. "Mid-run" is held by events, not by slow downloads racing
    the kill: every image download waits at the image host's gate, so no pair is answered
    before the kill, and each replica downloads at most ``connections`` images at once, so
    ``connections + 1`` downloads waiting at the gate mean that both replicas hold pairs."""
    connections = 2
    # No download may run out while it waits at the gate, however busy the machine.
    args = [
        "--model",
        "fake",
        "--allow-private-networks",
        "--decode-pool",
        "threads",
        "--fetch-host-connections",
        str(connections),
        "--fetch-timeout-s",
        "120",
        "--fetch-attempt-timeout-s",
        "0",
    ]
    replicas = start_replicas(args, args)
    dying, surviving = replicas
    image_host.gate.clear()  # /gated/ downloads hang until the gate opens
    try:
        names = [
            image_host.add(f"dying{i}.png", make_image(16, 16, seed=3000 + i)).rsplit("/", 1)[1] for i in range(240)
        ]
        inputs = [
            clipserve.SimilarityInput(f"query {i}", image_host.url(f"gated/{n}"), query_id=str(i))
            for i, n in enumerate(names)
        ]
        results: list = []
        with clipserve.CLIP([r.address for r in replicas], timeout=120) as clip:
            runner = threading.Thread(target=lambda: results.extend(clip.score_batch(inputs)))
            runner.start()
            both_hold_pairs = image_host.wait_at_gate(connections + 1, 60)  # a safety net only
            answered_before_the_kill = clip.stats().items_by_replica
            dying.proc.kill()
            dying.proc.wait(60)
            image_host.gate.set()
            runner.join(120)
            stats = clip.stats()
        assert both_hold_pairs, f"the replicas never held pairs together ({image_host.at_gate} downloads at the gate)"
        assert answered_before_the_kill == {}
        assert_exactly_once_in_order(results, 240)
        assert stats.items_by_replica == {surviving.address: 240}, stats.items_by_replica
    finally:
        image_host.gate.set()
        stop(replicas)


def test_a_replica_that_appears_in_dns_mid_run_gets_work(make_fake_server, image_host, monkeypatch):
    """README: `dns:///` names are resolved again every 2 s while calls run: a replica that
    appears gets work.

    Events, not a time limit: the first replica holds every pair (its model waits at a gate)
    until the client has asked the resolver again and the new replica has taken ``taken``
    pairs, so the run cannot end before the new replica joins, however busy the machine."""
    assert clipserve._replicas.DNS_REFRESH_S == 2.0
    taken = 100
    # This machine has no DNS server to change: the name's answers come from a stand-in for
    # the system resolver, which the SDK asks again every DNS_REFRESH_S seconds.
    first_model, second_model = GatedModel(), CountingModel(taken)
    first = make_fake_server(first_model, allow_private_networks=True)
    second = make_fake_server(second_model, allow_private_networks=True)
    answers = {"clipserve.test": [first.address]}
    grown_answer_given = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        found = list(answers[host])
        if second.address in found:
            grown_answer_given.set()
        return found

    monkeypatch.setattr(clipserve._replicas, "resolve_ips", resolver)
    first_model.hold()
    results: list = []
    try:
        with clipserve.CLIP(f"dns:///clipserve.test:{first.port}", timeout=120) as clip:
            runner = threading.Thread(
                target=lambda: results.extend(clip.score_batch(pairs(600, image_host.url("img/photo2.png"))))
            )
            runner.start()
            assert first_model.held.wait(60), "the run never reached the first replica"
            assert second.address not in clip.stats().items_by_replica
            answers["clipserve.test"] = [first.address, second.address]  # a new pod is ready
            # Safety nets only: the client gets there as fast as it re-resolves and the new replica answers.
            assert grown_answer_given.wait(60), "the client did not resolve the name again"
            joined = second_model.reached.wait(60)
            second_took = len(second_model.encoded_texts)
            first_answered_meanwhile = clip.stats().items_by_replica.get(first.address, 0)
            first_model.release()
            runner.join(120)
            stats = clip.stats()
    finally:
        first_model.release()
    assert joined, f"the new replica took {second_took} pairs"
    assert first_answered_meanwhile == 0
    assert_exactly_once_in_order(results, 600)
    assert stats.items_by_replica[second.address] >= taken, stats.items_by_replica


def test_a_replica_that_leaves_dns_mid_run_gets_no_more_work(make_fake_server, image_host, monkeypatch):
    """docs/sdk.md ("Several replicas"): `dns:///` names are resolved again every 2 s while
    calls run: a replica that appears gets work within about 2 s, one that disappears gets no
    more.

    The departing replica stays up (it left DNS, it did not die): its stream ends by itself,
    so what is shown is that the client stops sending, not that a broken connection re-routes.
    Both models wait at a gate until the client has re-resolved, so nothing is answered (and no
    window grows) before then: the departing replica holds at most ``max_in_flight`` pairs
    when it leaves, and the hundreds of pairs after that all go to the other one."""
    assert clipserve._replicas.DNS_REFRESH_S == 2.0
    window = 16
    staying_model, leaving_model = GatedModel(), GatedModel()
    staying = make_fake_server(staying_model, allow_private_networks=True)
    leaving = make_fake_server(leaving_model, allow_private_networks=True)
    answers = {"clipserve.test": [staying.address, leaving.address]}
    shrunk_answers = [0]
    re_resolved = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        found = list(answers[host])
        if found == [staying.address]:
            shrunk_answers[0] += 1
            # The SDK matches its replicas to an answer before it asks again: a second call
            # after the name shrank means the client has acted on the first.
            if shrunk_answers[0] >= 2:
                re_resolved.set()
        return found

    # No DNS server to change here: the name's answers come from a stand-in for the system resolver.
    monkeypatch.setattr(clipserve._replicas, "resolve_ips", resolver)
    staying_model.hold()
    leaving_model.hold()
    results: list = []
    url = image_host.url("img/photo5.png")
    try:
        with clipserve.CLIP(f"dns:///clipserve.test:{staying.port}", timeout=120, max_in_flight=window) as clip:
            runner = threading.Thread(target=lambda: results.extend(clip.score_batch(pairs(600, url))))
            runner.start()
            assert staying_model.held.wait(60) and leaving_model.held.wait(60), "the run did not reach both replicas"
            answers["clipserve.test"] = [staying.address]  # the pod is no longer ready
            assert re_resolved.wait(60), "the client did not resolve the name again"
            assert clip.stats().items_by_replica == {}  # nothing answered yet: no window grew
            leaving_model.release()  # up and as fast as the other from here on
            staying_model.release()
            runner.join(120)
            stats = clip.stats()
        with clipserve.CLIP(leaving.address, timeout=60) as direct:
            direct.score("still up", url)  # it left DNS; it did not die
    finally:
        staying_model.release()
        leaving_model.release()
    assert_exactly_once_in_order(results, 600)
    received = len([t for t in leaving_model.encoded_texts if t != "still up"])
    assert received <= window, (
        f"the replica that left DNS took {received} pairs (at most {window} were in flight when it left)"
    )
    assert stats.items_by_replica.get(leaving.address, 0) <= window, stats.items_by_replica
    assert stats.items_by_replica[staying.address] >= 600 - window, stats.items_by_replica


def test_info_says_which_replica_answered(make_fake_server):
    # The flag a user starts each server with: in-process servers take the config it makes.
    assert load_config(["--replica-name", "pod-a"], environ={}).replica_name == "pod-a"
    servers = [make_fake_server(replica_name=name) for name in ("pod-a", "pod-b")]
    address = ",".join(s.address for s in servers)
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "info", "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replica"] in {"pod-a", "pod-b"}
    with clipserve.CLIP(address) as clip:  # unary calls take turns over the replicas
        assert {clip.model_info().replica for _ in range(4)} == {"pod-a", "pod-b"}


def test_score_file_reports_the_pairs_each_replica_answered(make_fake_server, image_host, tmp_path):
    """`clipserve score-file` against several replicas prints the pairs each one answered.

    Both models wait at a gate until each has received pairs, so every replica answers some
    however busy the machine (the spread itself is shown above)."""
    models = [GatedModel(), GatedModel()]
    servers = [make_fake_server(model, allow_private_networks=True) for model in models]
    rows = [{"query_text": f"query {i}", "image_id": "photo3.png"} for i in range(300)]
    (tmp_path / "qrels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for model in models:
        model.hold()
    try:
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clipserve.cli",
                "score-file",
                str(tmp_path / "qrels.jsonl"),
                "--image-base-url",
                image_host.url("img"),
                "-o",
                str(tmp_path / "out.jsonl"),
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CLIPSERVE_ADDRESS": ",".join(s.address for s in servers)},
        )
        try:
            deadline = time.monotonic() + 60  # a safety net only
            reached = [model.held.wait(max(0.0, deadline - time.monotonic())) for model in models]
            for model in models:
                model.release()
            _, stderr = run.communicate(timeout=120)
        finally:
            run.kill()
    finally:
        for model in models:
            model.release()
    assert reached == [True, True], (
        f"replicas that got no pair: {[s.address for s, r in zip(servers, reached) if not r]}"
    )
    assert run.returncode == 0, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("pairs per replica: ")]
    counts = {
        name: int(count)
        for name, count in (part.rsplit(" ", 1) for part in line.removeprefix("pairs per replica: ").split(", "))
    }
    assert set(counts) == {s.address for s in servers} and sum(counts.values()) == 300
    # A server may also have answered a few pairs that the other answered first (hedged):
    # each distinct query is one text its model encoded.
    encoded = [len(model.encoded_texts) for model in models]
    assert all(0 < counts[s.address] <= n for s, n in zip(servers, encoded)), (counts, encoded)


@pytest.mark.parametrize("count", [2, 3])
def test_the_async_client_spreads_a_batch_too(make_fake_server, image_host, count):
    """`AsyncCLIP` spreads a fresh client's first batch over every replica, as `CLIP` does: the
    barrier of test_a_fresh_client_spreads_one_batch_over_every_replica, with the client on an
    event loop (every replica's model waits at a gate until all have received pairs)."""
    models = [GatedModel() for _ in range(count)]
    servers = [make_fake_server(model, allow_private_networks=True) for model in models]
    for model in models:
        model.hold()

    async def run() -> tuple[list[bool], dict[str, int], list, clipserve.ClientStats]:
        # No warm-up call: the client's first request is the batch itself.
        async with clipserve.AsyncCLIP([s.address for s in servers], timeout=120) as clip:
            batch = asyncio.ensure_future(clip.score_batch(pairs(400, image_host.url("img/photo4.png"))))
            deadline = time.monotonic() + 60  # a safety net only: a correct client gets there at once
            # Off the event loop: the client runs on it meanwhile.
            reached = [
                await asyncio.to_thread(model.held.wait, max(0.0, deadline - time.monotonic())) for model in models
            ]
            answered_before = clip.stats().items_by_replica
            for model in models:
                model.release()
            return reached, answered_before, await asyncio.wait_for(batch, 120), clip.stats()

    try:
        reached, answered_before, results, stats = asyncio.run(run())
    finally:
        for model in models:
            model.release()
    assert reached == [True] * count, (
        f"replicas that got no pair of the first batch: {[s.address for s, r in zip(servers, reached) if not r]}"
    )
    assert answered_before == {}  # nothing answered before the barrier
    assert_exactly_once_in_order(results, 400)
    assert sum(stats.items_by_replica.values()) == 400, stats.items_by_replica
    assert all(stats.items_by_replica.get(s.address, 0) > 0 for s in servers), stats.items_by_replica
