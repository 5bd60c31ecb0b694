"""Inputs that cost the caller little and the server much (issue #32): each is refused with a
clear error before the costly step, and the server goes on serving everyone else.

Memory is bounded by what is materialised (the sizes that reach a resize, the objects that
reach a parser), not by RSS, which would flake on a shared box; no test times anything."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipserve_server.images.decode_protocol import DecodeJob
from clipserve_server.utils.config import ServerConfig
from clipserve_server.utils.domain import ImageSource
from clipserve_server.utils.errors import ErrorKind, ItemError

from ..conftest import ServerProcess
from ..helpers import make_batcher, make_image
from ..hostile import empty_items_chunk, ico_with_png, malformed_request, many_scans_jpeg, thin_png, webp_canvas

pytestmark = pytest.mark.cost(11.5)  # its CPU cost among the files (tests/conftest.py)


class _Spy:
    """Counts calls to ``owner.name`` (and lets them through)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.calls = 0
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


def _refused(call, *words: str) -> str:
    with pytest.raises(ItemError) as info:
        call()
    assert info.value.kind is ErrorKind.INVALID_INPUT, info.value
    assert all(word in info.value.message for word in words), info.value.message
    return info.value.message


# -- image geometry -------------------------------------------------------------------------------


def _limits():
    """A server's image limits, as shipped."""
    from clipserve_server.images.geometry import ImageLimits

    return ImageLimits.of(ServerConfig())


def test_a_long_thin_image_is_refused_before_anything_resizes_it():
    resized: list[tuple[int, int]] = []
    job = DecodeJob(lambda image: resized.append(image.size), max_pixels=50_000_000, limits=_limits())
    _refused(lambda: job(thin_png(600_000), "thin.png"), "600000x1", "aspect ratio")
    assert resized == []
    job(thin_png(90, 1), "banner.png")  # 90:1 is within the default 100:1
    assert resized == [(90, 1)]


def test_a_thin_pixel_tensor_is_refused_before_the_processor_resizes_it():
    from clipserve_server.inference.engine import validate_image

    pixels = np.zeros((1, 600_000, 3), dtype=np.float32)  # what ModelInfer's FP32 [1, N, 3] carries
    _refused(lambda: validate_image(ImageSource(pixels=pixels), 1 << 25, 50_000_000, _limits()), "aspect ratio")


@pytest.mark.parametrize(
    ("kind", "data", "plugin"),
    [
        ("ico", ico_with_png(9000, 9000), "IcoImagePlugin.IcoImageFile"),
        ("webp", webp_canvas(9000, 9000), "WebPImagePlugin.WebPImageFile"),
    ],
)
def test_decoders_that_decode_while_opening_never_see_an_oversized_file(monkeypatch, kind, data, plugin):
    import importlib

    from clipserve_server.images.decode import decode_image

    module, cls = plugin.split(".")
    opened = _Spy(monkeypatch, getattr(importlib.import_module(f"PIL.{module}"), cls), "_open")
    _refused(lambda: decode_image(data, max_pixels=10_000_000, name=kind), "81000000 pixels", "limit")
    assert opened.calls == 0


@pytest.mark.parametrize(("scans", "size", "max_pixels"), [(300, 2048, 50_000_000), (40, 4096, 20_000_000)])
def test_a_jpeg_of_many_scans_is_refused_from_its_markers_before_decoding(monkeypatch, scans, size, max_pixels):
    """Too many scans at all, or too many for its size (each is a pass over every pixel)."""
    from PIL import ImageFile

    loaded = _Spy(monkeypatch, ImageFile.ImageFile, "load")
    job = DecodeJob(lambda image: image.size, max_pixels=max_pixels, limits=_limits())
    _refused(lambda: job(many_scans_jpeg(scans, size), "scans.jpg"), "scans", "limit")
    assert loaded.calls == 0


# -- decode fairness ------------------------------------------------------------------------------


def test_a_freed_decode_slot_goes_to_the_caller_with_fewest_in_use():
    from clipserve_server.images.fairness import FairShare
    from clipserve_server.utils.callers import CALLER

    async def scenario() -> list[str]:
        share = FairShare(2)
        order: list[str] = []
        release = asyncio.Event()

        async def decode(caller: str) -> None:
            CALLER.set(caller)
            async with share.slot():
                order.append(caller)
                await release.wait()

        slow = [asyncio.ensure_future(decode("slow")) for _ in range(6)]  # takes both slots, queues four
        await asyncio.sleep(0)
        other = asyncio.ensure_future(decode("other"))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*slow, other)
        return order

    order = asyncio.run(scenario())
    assert order[:3] == ["slow", "slow", "other"]  # the first freed slot: not the slow caller's queue


# -- messages -------------------------------------------------------------------------------------


def test_a_chunk_of_millions_of_items_is_refused_before_it_is_parsed(monkeypatch):
    from clipserve_server.serving import lenient_decoding as wire

    parsed = _Spy(monkeypatch, wire.scorer_pb2.ScoreRequestChunk, "FromString")
    _refused(
        lambda: wire.parse_score_chunk(empty_items_chunk(2_000_000), max_items=4096), "4096", "--max-items-per-message"
    )
    assert parsed.calls == 0
    assert len(wire.parse_score_chunk(empty_items_chunk(64), max_items=4096)) == 64


def test_the_fallback_reader_walks_a_bounded_number_of_fields(monkeypatch):
    from clipserve_server.serving import lenient_decoding as wire

    walked = _Spy(monkeypatch, wire, "_varint")
    request = wire.parse_score_request(malformed_request(2_000_000))
    assert isinstance(request, wire.MalformedRequest) and request.request_id == "id"
    assert walked.calls < 1000


def test_a_model_infer_batch_over_the_limit_is_refused_from_its_shape(monkeypatch):
    from clipserve_server.serving import oip_messages as pb
    from clipserve_server.serving import tensors
    from clipserve_server.serving.oip_models import BatchScores

    request = pb.ModelInferRequest(model_name="default")
    for name in ("text", "image_bytes"):
        request.inputs.add(name=name, datatype="BYTES", shape=[1_000_000])
        request.raw_input_contents.append(b"\x01\x00\x00\x00a" * 1_000_000)
    unpacked = _Spy(monkeypatch, tensors, "_unpack_bytes")
    _refused(
        lambda: tensors.read_inputs(request, BatchScores.inputs, "default", max_items=4096),
        "1000000",
        "4096-item limit",
    )
    assert unpacked.calls == 0


# -- queries --------------------------------------------------------------------------------------

FITTING_QUERIES = [
    "a photo of a cat",
    "a photo of a cat " * 20,  # well past 77 tokens: cut by the tokenizer either way
    "supercalifragilisticexpialidocious" * 3,
    "x" * 300,
    "  leading and trailing  \n\t",
    "a" + " " * 5000 + "cat",  # fits in 3 tokens: the whitespace run is folded, never counted
    "\u200b" * 70 + "zero width",
    "e\u0301" * 40,
    "日本語のテキスト" * 10,
    "emoji 🐈‍⬛ and flags 🇫🇷 " * 5,
    "line\nbreaks\r\nand\ttabs " * 10,
]


def test_cutting_a_query_never_changes_the_tokens_of_one_that_fits(tiny_checkpoint):
    from transformers import AutoProcessor

    from clipserve_server.inference.queries import cut_query, query_char_limit

    tokenizer = AutoProcessor.from_pretrained(tiny_checkpoint).tokenizer
    limit = query_char_limit(0, 77)

    def tokens(text: str) -> list[int]:
        return tokenizer([text], truncation=True, max_length=77)["input_ids"][0]

    for query in FITTING_QUERIES:
        assert tokens(cut_query(query, limit)) == tokens(query), query[:40]
    huge = "a photo of a cat " * 600_000  # 10 MB
    cut = cut_query(huge, limit)
    assert len(cut) < 2 * limit and tokens(cut) == tokens(huge[: 4 * limit])


def test_texts_tokenized_ahead_of_the_forward_give_the_same_features(tiny_checkpoint):
    """What the server does now (prepare_texts on the tokenizer thread, then forward) equals
    tokenizing inside the forward, as before."""
    from clipserve_server.models.loading import load_model
    from clipserve_server.models.model import Tokens
    from clipserve_server.utils.config import ModelSpec

    model = load_model(ModelSpec("default", str(tiny_checkpoint)), ServerConfig(device="cpu", runtime="torch"))
    texts = ["a dog on a beach", "a cat " * 100, "x"]
    prepared = model.prepare_texts(texts)
    assert isinstance(prepared, Tokens) and len(prepared) == 3
    np.testing.assert_array_equal(model.forward(prepared, [])[0], model.forward(texts, [])[0])


def test_the_text_cache_is_bounded_by_bytes():
    from clipserve_server.inference.cache import EmbeddingCache
    from clipserve_server.models.model import Embedding

    async def fill() -> EmbeddingCache:
        cache = EmbeddingCache(100_000, max_bytes=1 << 20)
        for i in range(200):
            async def compute() -> Embedding:
                return Embedding.of(np.ones(512, dtype=np.float32))

            cache.lookup(f"{i} " + "x" * 20_000, compute)
            await asyncio.sleep(0)
        return cache

    cache = asyncio.run(fill())
    assert 0 < cache.bytes <= 1 << 20 and cache.stats().entries < 200


# -- the wedge watchdog ---------------------------------------------------------------------------


def test_a_wedged_forward_that_finishes_later_brings_the_model_back():
    gate = threading.Event()
    wedge = threading.Event()

    def forward(texts, images):
        if wedge.is_set():
            gate.wait(60)
        return np.ones((len(texts), 4), dtype=np.float32), np.ones((len(images), 4), dtype=np.float32)

    async def scenario() -> None:
        events: list[str] = []
        alive = asyncio.Event()

        def came_back() -> None:
            events.append("alive")
            alive.set()

        batcher = make_batcher(forward, max_batch_size=4, max_delay_s=0, max_queue_size=16, forward_timeout_s=0.2,
                               on_dead=lambda exc: events.append("dead"), on_alive=came_back)
        batcher.start()
        wedge.set()
        with pytest.raises(ItemError) as info:
            await batcher.encode_text("q", wait=True)
        assert "did not finish" in info.value.message and events == ["dead"] and not batcher.alive
        wedge.clear()
        gate.set()  # the wedged pass finishes after all
        await asyncio.wait_for(alive.wait(), 60)
        assert batcher.alive
        assert (await batcher.encode_text("again", wait=True)).shape == (4,)
        await batcher.stop()

    asyncio.run(scenario())


# -- through a real server ------------------------------------------------------------------------

# As environment variables, so that the same server starts on code without these settings.
_LIMITS = {
    "CLIPSERVE_FORWARD_TIMEOUT_S": "3",
    "CLIPSERVE_DECODE_POOL": "processes",
    "CLIPSERVE_DECODE_WORKERS": "2",
    "CLIPSERVE_DECODE_TIMEOUT_S": "1",
    "CLIPSERVE_MAX_JPEG_SCANS": "100000",  # so that the slow JPEG reaches the decode budget
    "CLIPSERVE_MAX_JPEG_SCAN_PASSES": "100000",
    "CLIPSERVE_MAX_ITEMS_PER_MESSAGE": "1024",
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    process = ServerProcess(
        ["--model", str(tiny_checkpoint), "--device", "cpu", "--runtime", "torch", "--no-cache"], env=_LIMITS
    )
    yield process
    process.terminate()


def _health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _score(address: str, query: str, image: bytes, timeout: float = 120) -> scorer_pb2.ScoreResponse:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        return scorer_pb2_grpc.ScorerStub(channel).Score(
            scorer_pb2.ScoreRequest(query=query, image_bytes=image), timeout=timeout
        )


def _meanwhile(address: str) -> threading.Thread:
    """Another caller, scoring an ordinary pair while the hostile request is answered."""
    outcome: list[object] = []

    def other() -> None:
        outcome.append(_score(address, "a photo of a cat", make_image(40, 40, seed=3)).score)

    thread = threading.Thread(target=other)
    thread.outcome = outcome  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_a_jpeg_that_decodes_for_seconds_fails_at_the_budget_and_its_worker_is_replaced(server):
    other = _meanwhile(server.address)
    with pytest.raises(grpc.RpcError) as info:
        _score(server.address, "q", many_scans_jpeg(3000))
    other.join(120)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "--decode-timeout-s" in info.value.details()
    assert other.outcome and _health(server.address) == "SERVING"  # type: ignore[attr-defined]
    assert _score(server.address, "q", make_image(seed=5)).score  # the replacement worker decodes


def test_a_chunk_over_the_item_limit_ends_the_call_invalid_argument(server):
    chunk = scorer_pb2.ScoreRequestChunk.FromString(empty_items_chunk(500_000))
    other = _meanwhile(server.address)
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            for _ in scorer_pb2_grpc.ScorerStub(channel).ScoreChunks(iter([chunk]), timeout=120):
                pass
    other.join(120)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "1024" in info.value.details()
    assert other.outcome and _health(server.address) == "SERVING"  # type: ignore[attr-defined]


def test_a_ten_megabyte_query_is_cut_and_cannot_trip_the_watchdog(server):
    # Last: on code without the cut, it wedges the server for good (--forward-timeout-s 3).
    other = _meanwhile(server.address)
    response = _score(server.address, "a photo of a cat " * 600_000, make_image(seed=1))
    other.join(120)
    assert response.score == pytest.approx(
        _score(server.address, "a photo of a cat " * 20, make_image(seed=1)).score, abs=1e-4
    )
    assert other.outcome and _health(server.address) == "SERVING"  # type: ignore[attr-defined]
