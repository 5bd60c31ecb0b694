"""A hostile caller against the server's network edge: addresses spelled to slip past the fetch
guard, uploads that lie about their hash, malformed URLs and tensors, forged log lines, and
the metrics port as a window on other callers.

In these tests 127.0.0.1 (the session's image host, and a redirector) stands for the public
internet; every other address is judged as shipped, so 127.0.0.2, where the "internal" image
host listens, is loopback: no spelling of it may reach it, on any path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

import clipserve
from clipserve_server.images import fetch as fetch_module
from clipserve_server.images.fetch import FetchSettings, ImageFetcher
from clipserve_server.images.fetch_events import FetchTally
from clipserve_server.images.netguard import GuardedResolver, is_forbidden
from clipserve_server.models.fake_model import FakeModel
from clipserve_server.utils.config import ServerConfig
from clipserve_server.utils.errors import ErrorKind, ItemError
from clipserve_server.utils.logs import JsonFormatter, TextFormatter

from ..helpers import ImageHost, InProcessServer, error_codes, make_image

pytestmark = pytest.mark.cost(0.5)  # its CPU cost among the files (tests/conftest.py)

# 127.0.0.2 spelled as the HTTP client or the C library would still connect to it.
SPELLINGS = {
    "unicode digits and dots": ["１２７.０.０.２", "127。0。0。2", "１２７．０．０．２", "①②⑦.0.0.②"],
    "integer and short forms": ["2130706434", "0x7f.2", "017700000002", "127.2", "0x7f000002", "0177.0.0.02"],
    "IPv6 carrying the IPv4": [
        "[::ffff:127.0.0.2]",  # IPv4-mapped
        "[::127.0.0.2]",  # IPv4-compatible
        "[64:ff9b::7f00:2]",  # NAT64
        "[64:ff9b:1::7f00:2]",  # local-use NAT64
        "[2002:7f00:2::]",  # 6to4
        "[2001:0:4136:e378:8000:63bf:80ff:fffd]",  # Teredo, client 127.0.0.2
    ],
}


def _public_is_127_0_0_1(address: str) -> bool:
    return address != "127.0.0.1" and is_forbidden(address)


def _config(**overrides) -> ServerConfig:
    return ServerConfig(
        **{
            "max_batch_delay_ms": 2.0,
            "fetch_timeout_s": 10.0,
            "fetch_attempts": 1,
            "decode_pool": "threads",
            **overrides,
        }
    )


def guarded_server(**overrides) -> InProcessServer:
    """A server whose guard is as shipped but for 127.0.0.1, which counts as public here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fetch_module, "GuardedResolver", lambda: GuardedResolver(forbidden=_public_is_127_0_0_1))
        return InProcessServer(_config(**overrides), FakeModel())


@pytest.fixture(scope="module")
def internal() -> Iterator[ImageHost]:
    host = ImageHost("127.0.0.2")
    host.add("secret.png", make_image(seed=9))
    yield host
    host.close()


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessServer]:
    started = guarded_server()
    yield started
    started.stop()


def internal_urls(internal: ImageHost, spellings: list[str]) -> list[str]:
    port = internal.base.rsplit(":", 1)[1]
    return [f"http://{spelling}:{port}/img/secret.png" for spelling in spellings]


def errors_on_every_path(
    server: InProcessServer, image_host: ImageHost, urls: list[str]
) -> dict[str, list[str | None]]:
    """The error code each URL gets through Score, ScoreBatch, Embed, ModelInfer and as the
    Location of a redirect from the public host."""
    codes = error_codes(server.address, urls)
    for index, url in enumerate(urls):
        image_host.redirects[f"/to-internal/{index}"] = url
    with clipserve.CLIP(server.address, timeout=60) as clip:
        redirects = [image_host.url(f"to-internal/{index}") for index in range(len(urls))]
        codes["redirect"] = [r.error_code for r in clip.score_batch([("q", url) for url in redirects])]
    return codes


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_no_spelling_of_a_loopback_address_reaches_it_on_any_path(server, internal, image_host, spelling):
    """Each spelling, through each path a URL takes (and as a redirect's Location), is refused
    PERMISSION_DENIED per pair, and the internal host sees no request at all."""
    before = sum(internal.hits.values())
    codes = errors_on_every_path(server, image_host, internal_urls(internal, SPELLINGS[spelling]))
    assert sum(internal.hits.values()) == before, internal.hits
    assert codes == {path: ["PERMISSION_DENIED"] * len(SPELLINGS[spelling]) for path in codes}, codes


def test_decode_worker_processes_that_download_refuse_every_spelling_too(internal):
    """--decode-pool processes: the workers download, with the same guard (as shipped there)."""
    spellings = [spellings[0] for spellings in SPELLINGS.values()] + [SPELLINGS["IPv6 carrying the IPv4"][2]]
    pooled = InProcessServer(_config(decode_pool="processes", decode_workers=2), FakeModel())
    before = sum(internal.hits.values())
    try:
        codes = error_codes(pooled.address, internal_urls(internal, spellings))
    finally:
        pooled.stop()
    assert sum(internal.hits.values()) == before
    assert codes == {path: ["PERMISSION_DENIED"] * len(spellings) for path in codes}, codes


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("64:ff9b::808:808", False),
        ("2002:808:808::", False),
        ("::ffff:8.8.8.8", False),
        ("2606:4700::1111", False),  # carry 8.8.8.8 / public
        ("64:ff9b::a00:1", True),
        ("2002:a9fe:a9fe::", True),
        ("::ffff:169.254.169.254", True),
        ("::10.0.0.1", True),  # carry private ones
        ("64:ff9b:1::808:808", True),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),
        ("::1", True),
        ("::", True),  # never public
    ],
)
def test_an_ipv6_address_is_judged_as_the_ipv4_it_carries(address, forbidden):
    assert is_forbidden(address) is forbidden


def test_the_refusal_says_what_was_refused_never_where_an_internal_name_points(image_host):
    """A name is still judged on what it resolves to (here localhost, also spelled in circled
    letters; the guard as shipped); the caller is told the name is refused, not the address
    behind it."""
    port = image_host.base.rsplit(":", 1)[1]
    shipped = InProcessServer(_config(), FakeModel())
    before = sum(image_host.hits.values())
    try:
        with clipserve.CLIP(shipped.address) as clip:
            results = clip.score_batch([("q", f"http://localhost:{port}/img/photo0.png"), ("q", f"http://ⓛocalhost:{port}/img/photo0.png")])
    finally:
        shipped.stop()
    assert sum(image_host.hits.values()) == before
    for result in results:
        assert result.error_code == "PERMISSION_DENIED" and "localhost resolves to a non-public address" in result.error
        assert "127.0.0.1" not in result.error and "::1" not in result.error, result.error


def test_the_connector_refuses_an_address_that_no_earlier_check_saw(internal, monkeypatch):
    """The check at connect time stands behind the URL check: with the URL check blind to
    literal IPs, the connection to 127.0.0.2 is still never opened."""
    monkeypatch.setattr(fetch_module, "literal_ip", lambda host: None)

    async def fetch() -> bytes:
        settings = FetchSettings.of(
            ServerConfig(fetch_timeout_s=5, max_image_bytes=1 << 20, max_redirects=3, fetch_concurrency=4)
        )
        fetcher = ImageFetcher(settings, events=FetchTally())
        await fetcher.start()
        try:
            return await fetcher.fetch(internal_urls(internal, ["127.0.0.2"])[0])
        finally:
            await fetcher.close()

    import asyncio

    before = sum(internal.hits.values())
    with pytest.raises(ItemError) as refused:
        asyncio.run(fetch())
    assert refused.value.kind is ErrorKind.FORBIDDEN
    assert sum(internal.hits.values()) == before


# -- malformed input is the caller's mistake, never INTERNAL --------------------------------------

MALFORMED_URLS = [
    "http://[::1/x.png",
    "http://[]/x.png",
    "http://" + "a" * 300 + ".example.com/x.png",
    "http://a" + ".b" * 200 + "/x.png",
    "http://example.com:99999/x.png",
    "http://example.com:port/x.png",
    "http://example.com:-1/x.png",
    "http://exa mple.com/x.png",
    "http://a\x00b.example/x.png",
    "http://a..b.example/x.png",
]


def test_malformed_urls_are_invalid_arguments_on_every_path_and_log_no_traceback(server, image_host, caplog):
    with caplog.at_level(logging.INFO):
        codes = errors_on_every_path(server, image_host, MALFORMED_URLS)
    redirected = codes.pop("redirect")  # a bad Location is the image host's fault, not the caller's
    assert codes == {path: ["INVALID_ARGUMENT"] * len(MALFORMED_URLS) for path in codes}, codes
    assert set(redirected) == {"FAILED_PRECONDITION"}, redirected
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.exc_info
    ]


def test_an_impossible_tensor_shape_is_an_invalid_argument(server):
    """An image of no pixels but dimensions no array can have ([0, 2**62, 3])."""
    with triton.InferenceServerClient(server.address) as client:
        text, image = triton.InferInput("text", [1], "BYTES"), triton.InferInput("image", [0, 2**62, 3], "FP32")
        text.set_data_from_numpy(np.array([b"q"], dtype=object))
        image._raw_content = b""  # what set_data_from_numpy would give for no elements
        with pytest.raises(triton.InferenceServerException) as refused:
            client.infer(model_name="clip", inputs=[text, image])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "'image'" in refused.value.message()


# -- logs and metrics ------------------------------------------------------------------------------

FORGED = "x\n2026-12-06\t20:00:00,000\tERROR\tclipserve.serving.servicer:\tforged\tline"


def test_a_request_id_cannot_forge_a_log_line_in_text_or_json_logs(server, caplog):
    with caplog.at_level(logging.INFO), grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError):  # an empty query: refused, and logged with its request_id
            scorer_pb2_grpc.ScorerStub(channel).Score(
                scorer_pb2.ScoreRequest(query="", image_url="http://x/", request_id=FORGED), timeout=30
            )
    records = [r for r in caplog.records if getattr(r, "request_id", None) == FORGED]
    assert records
    for record in records:
        text = TextFormatter().format(record)
        assert "\n" not in text and "\t" not in text, text
        json_line = JsonFormatter().format(record)
        assert "\n" not in json_line and json.loads(json_line)["request_id"] == FORGED


def fetch_hosts(server: InProcessServer) -> set[str]:
    return {
        s.labels["host"]
        for m in server.server.metrics.registry.collect()
        if m.name.startswith("clipserve_fetch")
        for s in m.samples
        if "host" in s.labels
    }


def test_the_metrics_port_names_no_callers_host_unless_asked(internal, image_host):
    """By default every fetch counts under host="all"; --metrics-host-labels names the hosts
    reached, and still gives a host refused or not resolved (and retried) no label of its own."""
    urls = [image_host.url("img/photo0.png"), internal_urls(internal, ["127.0.0.2"])[0], "http://internal-db.corp.invalid:5432/x.png"]
    for labels in (False, True):
        started = guarded_server(
            metrics_host_labels=labels, fetch_attempts=2, fetch_backoff_s=0.05
        )  # a DNS failure is retried
        try:
            with clipserve.CLIP(started.address) as clip:
                clip.score_batch([("q", url) for url in urls])
            hosts = fetch_hosts(started)
        finally:
            started.stop()
        assert hosts == ({"127.0.0.1", "other"} if labels else {"all"}), hosts


# -- uploads by hash: a liar fails alone -----------------------------------------------------------

def _request(data: bytes, sha256: str, request_id: str) -> scorer_pb2.ScoreRequest:
    return scorer_pb2.ScoreRequest(query="q", image_bytes=data, image_sha256=sha256, request_id=request_id)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize(
    "size", [(48, 40), (400, 300)], ids=["small", "large"]
)  # the large one is hashed off the event loop
def test_an_upload_lying_about_its_hash_fails_alone_in_one_message(cache, size):
    """One ScoreChunks message: a lie under an image's hash, then honest uploads and a hash
    reference of that image. The lie fails naming its own upload; the honest ones score."""
    honest = make_image(*size, seed=3)
    junk = b"junk" * 100
    sha = hashlib.sha256(honest).hexdigest()
    started = guarded_server(cache=cache, text_cache_size=100 if cache else 0, image_cache_size=100 if cache else 0)
    try:
        chunk = scorer_pb2.ScoreRequestChunk(
            items=[
                _request(junk, sha, "liar"),
                _request(honest, sha, "honest-1"),
                scorer_pb2.ScoreRequest(query="q", image_sha256=sha, request_id="ref"),
                _request(honest, sha, "honest-2"),
            ]
        )
        with grpc.insecure_channel(started.address) as channel:
            replies = {
                item.request_id: item
                for reply in scorer_pb2_grpc.ScorerStub(channel).ScoreChunks(iter([chunk]), timeout=60)
                for item in reply.items
            }
    finally:
        started.stop()
    liar = replies.pop("liar")
    assert (
        liar.error.code == "INVALID_ARGUMENT"
        and f"<{len(junk)} uploaded bytes>: image_sha256 does not match" in liar.error.message
    )
    reference = replies.pop("ref")  # joined an honest upload, or asked for the bytes: never the liar's error
    assert not reference.HasField("error") or reference.error.reason == "IMAGE_BYTES_NEEDED", reference.error
    assert all(not reply.HasField("error") for reply in replies.values()), [r.error for r in replies.values()]


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_concurrent_honest_uploaders_are_not_failed_by_a_liar(cache, tmp_path):
    """Fresh SDK clients upload one local file while another caller streams junk under its
    hash: every honest pair scores; every lie fails with its own size in the message."""
    honest = make_image(96, 72, seed=4)
    path = tmp_path / "honest.png"
    path.write_bytes(honest)
    sha = hashlib.sha256(honest).hexdigest()
    junk = b"\x89PNG lies" * 7
    started = guarded_server(cache=cache, text_cache_size=100 if cache else 0, image_cache_size=100 if cache else 0)
    stop = threading.Event()
    lies: list[scorer_pb2.ScoreResponse] = []

    def liar() -> None:
        def chunks() -> Iterator[scorer_pb2.ScoreRequestChunk]:
            while not stop.wait(0.002):
                yield scorer_pb2.ScoreRequestChunk(items=[_request(junk, sha, "lie")] * 20)

        with grpc.insecure_channel(started.address) as channel:
            for reply in scorer_pb2_grpc.ScorerStub(channel).ScoreChunks(chunks(), timeout=120):
                lies.extend(reply.items)

    results: list[clipserve.SimilarityResult] = []

    def honest_caller(index: int) -> None:
        with clipserve.CLIP(started.address) as clip:  # each its own fresh client
            results.extend(clip.score_batch([(f"query {index} {q}", str(path)) for q in range(20)]))

    attacker = threading.Thread(target=liar)
    try:
        attacker.start()
        callers = [threading.Thread(target=honest_caller, args=(i,)) for i in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(120)
    finally:
        stop.set()
        attacker.join(60)
        started.stop()
    assert len(results) == 80 and [r.error for r in results if r.error] == []
    assert lies and all(f"<{len(junk)} uploaded bytes>: image_sha256 does not match" in r.error.message for r in lies)
