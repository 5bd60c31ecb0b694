"""Several items per message (ScoreChunks, EmbedChunks): the same answers as one per message,
packed; a bad item in a chunk fails alone; the SDK packs, and falls back to one item per
message on a server that predates the packed RPCs."""

from __future__ import annotations

import asyncio
import urllib.request
from concurrent import futures

import grpc
import pytest

import clipserve
from clipserve._chunks import CHUNK_BYTES, CHUNK_ITEMS, Packer
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

from ..conftest import free_port
from ..helpers import make_image


def test_a_chunked_stream_answers_every_item_of_every_chunk(fake_server, image_host):
    urls = [image_host.url(f"img/photo{i}.png") for i in range(6)]
    chunks = [
        scorer_pb2.ScoreRequestChunk(
            items=[
                scorer_pb2.ScoreRequest(request_id=f"{c}.{i}", query=f"q{i}", image_url=urls[i % 6], query_id=f"q{i}")
                for i in range(20)
            ]
        )
        for c in range(3)
    ]
    with grpc.insecure_channel(fake_server.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        packed = [item for reply in stub.ScoreChunks(iter(chunks), timeout=60) for item in reply.items]
        single = {
            r.request_id: r.score
            for r in stub.ScoreBatch(iter([item for chunk in chunks for item in chunk.items]), timeout=60)
        }
    assert sorted(r.request_id for r in packed) == sorted(single)
    for reply in packed:
        assert reply.query_id == f"q{reply.request_id.split('.')[1]}"
        assert reply.score == single[reply.request_id]  # the same pair, the same score


def test_an_invalid_item_in_a_chunk_fails_alone(fake_server):
    """protobuf refuses a whole chunk with one invalid UTF-8 string; the server splits it and
    answers the bad item with INVALID_ARGUMENT, the others with scores."""
    placeholder = "Q" * 5
    items = [
        scorer_pb2.ScoreRequest(request_id=rid, query=query, image_bytes=make_image(seed=2))
        for rid, query in (("good", "a dog"), ("bad", placeholder), ("good2", "a cat"))
    ]
    raw = scorer_pb2.ScoreRequestChunk(items=items).SerializeToString().replace(placeholder.encode(), b"\xff\xfe dg", 1)
    with grpc.insecure_channel(fake_server.address) as channel:
        call = channel.stream_stream(
            "/clipserve.v1.Scorer/ScoreChunks",
            request_serializer=lambda b: b,
            response_deserializer=scorer_pb2.ScoreResponseChunk.FromString,
        )
        replies = {r.request_id: r for reply in call(iter([raw]), timeout=60) for r in reply.items}
    assert set(replies) == {"good", "bad", "good2"}
    assert replies["bad"].error.code == "INVALID_ARGUMENT" and "UTF-8" in replies["bad"].error.message
    assert replies["good"].HasField("score") and replies["good2"].HasField("score")


def test_embed_chunks_give_the_vectors_embed_gives(fake_server):
    requests = [scorer_pb2.EmbedRequest(request_id=str(i), text=f"text {i}") for i in range(10)]
    with grpc.insecure_channel(fake_server.address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        packed = {
            r.request_id: list(r.embedding)
            for reply in stub.EmbedChunks(iter([scorer_pb2.EmbedRequestChunk(items=requests)]), timeout=60)
            for r in reply.items
        }
        single = {r.request_id: list(r.embedding) for r in stub.Embed(iter(requests), timeout=60)}
    assert packed == single and len(packed) == 10


def test_the_sdk_sends_a_batch_through_the_packed_rpc(make_fake_server, image_host):
    port = free_port()
    server = make_fake_server(allow_private_networks=True, metrics_port=port)
    url = image_host.url("img/photo1.png")
    with clipserve.CLIP(server.address) as clip:
        results = clip.score_batch([(f"q{i}", url) for i in range(200)])
        vectors = clip.embed_texts(["a", "b"])
    assert all(r.error is None for r in results) and all(v.error is None for v in vectors)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'clipserve_items_total{code="OK",model="default",rpc="ScoreChunks"} 200.0' in text
    assert 'clipserve_items_total{code="OK",model="default",rpc="EmbedChunks"} 2.0' in text
    assert 'rpc="ScoreBatch"' not in text


# -- a server from before the packed RPCs ------------------------------------------------------------


class _OldScorer:
    """A clipserve 0.1 stand-in: ScoreBatch and Embed, one item per message, and no ScoreChunks or
    EmbedChunks at all (gRPC itself answers UNIMPLEMENTED, as for a server built before them)."""

    def __init__(self) -> None:
        self.streams: list[str] = []

    def ScoreBatch(self, requests, context):
        self.streams.append("ScoreBatch")
        for request in requests:
            yield scorer_pb2.ScoreResponse(
                request_id=request.request_id, query_id=request.query_id, score=float(len(request.query))
            )

    def Embed(self, requests, context):
        self.streams.append("Embed")
        for request in requests:
            yield scorer_pb2.EmbedResponse(request_id=request.request_id, embedding=[float(len(request.text)), 0.0])


@pytest.fixture()
def old_server():
    servicer = _OldScorer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "ScoreBatch": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreBatch,
            request_deserializer=scorer_pb2.ScoreRequest.FromString,
            response_serializer=scorer_pb2.ScoreResponse.SerializeToString,
        ),
        "Embed": grpc.stream_stream_rpc_method_handler(
            servicer.Embed,
            request_deserializer=scorer_pb2.EmbedRequest.FromString,
            response_serializer=scorer_pb2.EmbedResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("clipserve.v1.Scorer", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_the_sdk_falls_back_to_one_item_per_message_on_an_older_server(old_server):
    address, servicer = old_server
    inputs = [
        clipserve.SimilarityInput("x" * (i % 9 + 1), "http://example.invalid/a.png", query_id=str(i))
        for i in range(300)
    ]
    with clipserve.CLIP(address) as clip:
        results = clip.score_batch(inputs)
        vectors = clip.embed_texts(["abc", "de"])
    assert [r.score for r in results] == [float(i % 9 + 1) for i in range(300)]  # each once, in order
    assert [r.query_id for r in results] == [str(i) for i in range(300)]
    assert [v.embedding for v in vectors] == [[3.0, 0.0], [2.0, 0.0]]
    assert "ScoreBatch" in servicer.streams and "Embed" in servicer.streams


def test_the_async_sdk_falls_back_too(old_server):
    address, _ = old_server

    async def main() -> list:
        async with clipserve.AsyncCLIP(address) as clip:
            return await clip.score_batch([("ab", "http://example.invalid/a.png")] * 50)

    assert [r.score for r in asyncio.run(main())] == [2.0] * 50


# -- how requests are packed -------------------------------------------------------------------------


def test_chunks_hold_at_most_chunk_items_and_about_chunk_bytes():
    packer = Packer(scorer_pb2.ScoreRequestChunk)
    sent = []
    for i in range(CHUNK_ITEMS + 5):
        sent += packer.add(scorer_pb2.ScoreRequest(request_id=str(i), query="q", image_url="http://h/x.png"))
    sent += packer.flush()
    assert [len(m.items) for m in sent] == [CHUNK_ITEMS, 5]

    big = b"\0" * (CHUNK_BYTES // 3)
    sent = []
    for i in range(7):
        sent += packer.add(scorer_pb2.ScoreRequest(request_id=str(i), query="q", image_bytes=big))
    sent += packer.add(scorer_pb2.ScoreRequest(request_id="huge", query="q", image_bytes=b"\0" * (2 * CHUNK_BYTES)))
    sent += packer.flush()
    assert [len(m.items) for m in sent] == [2, 2, 2, 1, 1]  # a third of a MiB each: two fit; the huge one goes alone
    assert all(m.ByteSize() <= CHUNK_BYTES for m in sent[:-1])
    assert [r.request_id for m in sent for r in m.items] == [str(i) for i in range(7)] + ["huge"]


def test_without_the_packed_rpc_each_request_is_its_own_message():
    packer = Packer(None)
    request = scorer_pb2.ScoreRequest(request_id="1", query="q")
    assert packer.add(request) == [request] and packer.flush() == [] and not packer
