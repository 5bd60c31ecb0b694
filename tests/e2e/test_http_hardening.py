"""The HTTP face under hostile or careless callers, on the deterministic FakeModel: the token of
--auth-token-file (health open), the SSRF guard of the gRPC side (the image host sees nothing),
the body cap (413), malformed JSON (400), a body that never finishes (408), TLS with the gRPC
certificate; after each, the server still answers."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import trustme

import clipserve

from ..helpers import GatedModel, make_image

pytestmark = pytest.mark.cost(0.2)  # its CPU cost among the files (tests/conftest.py)

_JSON = {"Content-Type": "application/json"}


def call(
    base: str,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={**_JSON, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def base_of(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


def answers(base: str, **kwargs) -> bool:
    status, body = call(base, "/v1/embeddings", {"input": "still here"}, **kwargs)
    return status == 200 and len(json.loads(body)["data"]) == 1


def test_without_the_token_everything_but_health_is_401(make_fake_server, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = make_fake_server(auth_token_file=str(token))
    base = base_of(server)
    pixels = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    for path, body in (
        ("/v1/embeddings", {"input": "x"}),
        ("/v1/score", {"pairs": []}),
        ("/v1/models", None),
        ("/v2/models/clip/infer", pixels),
        ("/v2/models/clip", None),
        ("/vectorize", {"texts": ["x"]}),
        ("/meta", None),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, _ = call(base, path, body, headers=headers)
            assert status == 401, (path, headers)
    for path, status in (
        ("/v2/health/live", 200),
        ("/v2/health/ready", 200),
        ("/.well-known/live", 204),
        ("/.well-known/ready", 204),
    ):
        assert call(base, path)[0] == status, path
    assert answers(base, headers={"Authorization": "Bearer s3cret"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="default", input="x"
        )
    response = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0).embeddings.create(
        model="default", input="x"
    )
    assert len(response.data) == 1


def test_ssrf_spellings_are_refused_before_the_image_host_sees_anything(make_fake_server, image_host):
    """A server without --allow-private-networks refuses loopback image URLs on every face,
    as gRPC does (the same fetcher and guard), before any connection."""
    server = make_fake_server()  # private networks not allowed
    base = base_of(server)
    port = image_host.base.rsplit(":", 1)[1]
    image_host.add("ssrf-600.png", make_image(seed=600))
    spellings = [f"http://127.0.0.1:{port}/img/ssrf-600.png", f"http://localhost:{port}/img/ssrf-600.png", f"http://[::ffff:127.0.0.1]:{port}/img/ssrf-600.png"]
    with clipserve.CLIP(server.address) as clip:
        over_grpc = clip.score_batch([("q", url) for url in spellings])
    assert all(result.error_code == "PERMISSION_DENIED" for result in over_grpc)
    for url in spellings:
        status, body = call(base, "/v1/embeddings", {"input": [url], "modality": "image"})
        assert status == 403 and "input[0]" in json.loads(body)["error"]["message"], url
    status, body = call(base, "/v1/score", {"pairs": [{"query": "q", "image_url": url} for url in spellings]})
    assert [r["error"]["code"] for r in json.loads(body)["results"]] == ["PERMISSION_DENIED"] * len(spellings)
    infer = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["q"]},
            {"name": "image_url", "datatype": "BYTES", "shape": [1], "data": [spellings[0]]},
        ]
    }
    status, body = call(base, "/v2/models/default/infer", infer)
    assert json.loads(body)["outputs"][1]["data"][0].startswith("PERMISSION_DENIED")
    assert image_host.hits.get("/img/ssrf-600.png", 0) == 0, "the image host saw a request"
    assert answers(base)


def test_a_body_over_the_cap_is_413_and_malformed_json_400(make_fake_server):
    server = make_fake_server(max_message_mb=1)
    base = base_of(server)
    big = "data:image/png;base64," + base64.b64encode(b"\0" * (2 * 1024 * 1024)).decode()
    status, body = call(base, "/v1/embeddings", {"input": [big], "modality": "image"})
    assert status == 413 and json.loads(body)["error"]["message"]
    for path in ("/v1/embeddings", "/v1/score", "/vectorize", "/v2/models/clip/infer"):
        for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            status, body = call(base, path, raw=raw)
            assert status == 400 and "error" in json.loads(body), (path, raw)
    assert answers(base)


def test_a_body_that_stops_arriving_is_408_and_an_idle_connection_closed(make_fake_server):
    server = make_fake_server(http_idle_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"input":'
        )
        reply = sock.recv(4096)  # the server answers on its own: the client never finishes
    assert reply.startswith(b"HTTP/1.1 408")
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=60) as idle:
        assert idle.recv(4096) == b"", "a connection that sends nothing is closed by the server"
    assert answers(base_of(server))


def test_headers_that_trickle_in_are_cut_off_at_the_idle_timeout(make_fake_server):
    """A slowloris: a header line now and then, never the blank line that ends them. The
    connection is closed once --http-idle-timeout-s has gone by since it opened, however
    steadily the bytes come (each line would reset a per-read timer)."""
    server = make_fake_server(http_idle_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=60) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        opened = time.monotonic()
        closed = False
        while not closed and time.monotonic() - opened < 30:
            try:
                sock.sendall(b"X-Slow: still coming\r\n")
            except OSError:  # reset: closed by the server
                break
            sock.settimeout(0.2)
            try:
                closed = sock.recv(4096) == b""
            except TimeoutError:
                pass
            except OSError:
                break
        else:
            assert closed, "the server kept a connection whose headers never ended for 30 s"
    assert answers(base_of(server))


def test_tls_with_the_grpc_certificate(make_fake_server, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    server = make_fake_server(tls_cert=str(chain), tls_key=str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    base = f"https://127.0.0.1:{server.server.http_port}"
    assert answers(base, context=context)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on a TLS port
        call(f"http://127.0.0.1:{server.server.http_port}", "/v1/models")


def test_the_vectors_are_unit_length_on_the_fake_model_too(fake_server):
    status, body = call(base_of(fake_server), "/v1/embeddings", {"input": ["a", "b"]})
    vectors = np.array([item["embedding"] for item in json.loads(body)["data"]])
    assert status == 200 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_a_full_queue_is_429_naming_the_input_and_the_server_recovers(make_fake_server):
    """Unary semantics, as gRPC's Score: while the model is held and its queue full, a request
    is refused at once with 429 (which the openai client retries with backoff)."""
    model = GatedModel()
    server = make_fake_server(model, max_queue_size=2, max_batch_size=1)
    base = base_of(server)
    model.hold()
    first: list[int] = []
    holder = threading.Thread(
        target=lambda: first.append(call(base, "/v1/embeddings", {"input": "held in the forward pass"})[0])
    )
    holder.start()
    try:
        assert model.held.wait(60)
        status, body = call(base, "/v1/embeddings", {"input": [f"queued {i}" for i in range(4)]})
        assert status == 429
        error = json.loads(body)["error"]
        assert (
            error["type"] == "rate_limit_error" and "input[" in error["message"] and "queue is full" in error["message"]
        )
    finally:
        model.release()
        holder.join(60)
    assert first == [200]
    assert answers(base)
