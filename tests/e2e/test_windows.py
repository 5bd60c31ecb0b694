"""How far ahead of its answers a stream is fed: the server says how many items it reads ahead
(initial metadata ``clipserve-max-in-flight``, its ``--stream-max-in-flight``), and a fresh SDK
client, with nothing set, keeps that many outstanding: no more (they would only wait in gRPC's
buffers, out of reach of the other replicas), and, past the old fixed 256, as many as a server
set up for a big model on a GPU asks for."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

import clipserve

from ..helpers import make_image

KEY = "clipserve-max-in-flight"


def told_window(server, rpc: str = "ScoreChunks") -> str | None:
    """The window a stream of ``rpc`` to ``server`` is told, before anything is sent."""
    with grpc.insecure_channel(server.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        nothing = threading.Event()

        def requests():
            nothing.wait(30)  # hold the stream open, empty, until the metadata is read
            return
            yield

        call = getattr(stub, rpc)(requests(), timeout=30)
        try:
            return dict(call.initial_metadata()).get(KEY)
        finally:
            nothing.set()
            call.cancel()


@pytest.mark.parametrize(
    ("settings", "window"),
    [({}, "256"), ({"max_batch_size": 100}, "400"), ({"stream_max_in_flight": 7}, "7")],
    ids=["default", "four-batches", "set"],
)
def test_every_stream_tells_how_far_the_server_reads_ahead(make_fake_server, settings, window):
    """By default four batches of --max-batch-size (a forward pass overlaps the decoding of the
    next ones), at least 256; --stream-max-in-flight sets it."""
    server = make_fake_server(**settings)
    for rpc in ("ScoreBatch", "ScoreChunks", "Embed", "EmbedChunks"):
        assert told_window(server, rpc) == window, rpc


class WindowProbe(scorer_pb2_grpc.ScorerServicer):
    """A stand-in server that tells each stream ``window`` (or nothing, like servers before the
    metadata) and holds its answers until ``answer_at`` items are unanswered (the most a test
    expects the client to put out), or the client has sent nothing for ``quiet_s`` (while its
    window is still small). Records the most items it ever had unanswered.

    A pause of the client on a busy machine can only bring an answer early in a round; the
    window keeps growing, so a later round still reaches ``answer_at``: the lower bound does
    not depend on the machine keeping up with a clock."""

    def __init__(self, window: int | None, answer_at: int, quiet_s: float = 0.5) -> None:
        self.window = window
        self.answer_at = answer_at
        self.quiet_s = quiet_s
        self.most_outstanding = 0
        self._lock = threading.Lock()

    def ScoreChunks(self, request_iterator, context):
        if self.window is not None:
            context.send_initial_metadata(((KEY, str(self.window)),))
        unanswered: list[str] = []
        state = {"last": time.monotonic(), "done": False}

        def read() -> None:
            for chunk in request_iterator:
                with self._lock:
                    unanswered.extend(item.request_id for item in chunk.items)
                    state["last"] = time.monotonic()
                    self.most_outstanding = max(self.most_outstanding, len(unanswered))
            state["done"] = True

        threading.Thread(target=read, daemon=True).start()
        while True:
            time.sleep(0.005)
            with self._lock:
                quiet = (
                    state["done"]
                    or len(unanswered) >= self.answer_at
                    or time.monotonic() - state["last"] > self.quiet_s
                )
                if not (quiet and unanswered):
                    if state["done"]:
                        return
                    continue
                ids, unanswered[:] = list(unanswered), []
            yield scorer_pb2.ScoreResponseChunk(items=[scorer_pb2.ScoreResponse(request_id=i, score=1.0) for i in ids])


@pytest.fixture()
def probe_server():
    """Start a WindowProbe on a real port: ``start(window)`` -> (probe, address)."""
    servers: list[grpc.Server] = []

    def start(window: int | None, answer_at: int) -> tuple[WindowProbe, str]:
        probe = WindowProbe(window, answer_at)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        scorer_pb2_grpc.add_ScorerServicer_to_server(probe, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return probe, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def pairs(n: int) -> list[clipserve.SimilarityInput]:
    return [clipserve.SimilarityInput(f"q{i}", f"http://images.invalid/{i}.jpg") for i in range(n)]


@pytest.mark.parametrize(
    ("told", "max_in_flight", "at_most", "at_least", "n"),
    # A window below 16: the first 16 items may leave before the stream's metadata arrives (the
    # server's flow control holds them); after that the window never grows past what it reads.
    [(4, None, 16, 4, 60), (1000, None, 1000, 257, 1500), (None, None, 256, 256, 600), (1000, 50, 50, 50, 300)],
    ids=["small-window", "gpu-window", "server-says-nothing", "caller-caps-it"],
)
def test_a_fresh_client_keeps_outstanding_what_the_server_reads_ahead(
    probe_server, told, max_in_flight, at_most, at_least, n
):
    probe, address = probe_server(told, answer_at=at_least)
    with clipserve.CLIP(address, max_in_flight=max_in_flight) as clip:
        results = clip.score_batch(pairs(n))
    assert [r.score for r in results] == [1.0] * n
    # The window grows by one per answer from 16 up to its limit: here past the old fixed 256.
    assert at_least <= probe.most_outstanding <= at_most


def test_the_async_client_follows_the_servers_window_too(probe_server):
    probe, address = probe_server(1000, answer_at=257)

    async def main() -> list:
        async with clipserve.AsyncCLIP(address) as clip:
            return await clip.score_batch(pairs(1500))

    results = asyncio.run(main())
    assert [r.score for r in results] == [1.0] * 1500
    assert 256 < probe.most_outstanding <= 1000


def test_a_small_server_window_still_answers_everything(make_fake_server, image_host):
    """The real server with a slow model and a window of 3: the SDK's default client sends no
    more than it reads, and every pair is scored."""
    from clipserve_server.models.fake_model import FakeModel

    server = make_fake_server(
        FakeModel(forward_delay_s=0.01), allow_private_networks=True, stream_max_in_flight=3, max_batch_size=2
    )
    image_host.add("window.png", make_image(seed=31))
    with clipserve.CLIP(server.address) as clip:
        results = clip.score_batch(
            [clipserve.SimilarityInput(f"q{i}", image_host.url("img/window.png")) for i in range(40)]
        )
    assert all(r.error is None and r.score is not None for r in results)
