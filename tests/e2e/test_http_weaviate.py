"""Weaviate's multi2vec-clip module talks to clipserve as to its own inference container
(weaviate/multi2vec-clip-inference). The requests here are byte for byte what the module's Go
client sends (modules/multi2vec-clip/clients: ``json.Marshal`` of ``{texts, images}`` with
``omitempty``, ``Content-Type: application/json``, Go's default headers), and the answers are
read as it reads them: ready is a status below 300, ``/meta`` a JSON object, ``/vectorize``
``{textVectors, imageVectors}`` of unit vectors, an error any status above 399 with
``{"error": message}``."""

from __future__ import annotations

import base64
import http.client
import json

import numpy as np
import pytest

import clipserve

from ..conftest import ServerProcess
from ..helpers import make_image

pytestmark = pytest.mark.cost(0.4)  # its CPU cost among the files (tests/conftest.py)

GO_HEADERS = {"User-Agent": "Go-http-client/1.1", "Accept-Encoding": "gzip"}


def weaviate_call(server: ServerProcess, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    try:
        headers = dict(GO_HEADERS)
        payload = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode()  # encoding/json's compact form
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def grpc_clip(real_server: ServerProcess):
    with clipserve.CLIP(real_server.address, timeout=120) as clip:
        yield clip


def test_probes_and_meta_as_the_module_reads_them(real_server):
    assert weaviate_call(real_server, "GET", "/.well-known/live") == (204, b"")
    assert weaviate_call(real_server, "GET", "/.well-known/ready") == (204, b"")
    status, body = weaviate_call(real_server, "GET", "/meta")
    meta = json.loads(body)
    assert status == 200 and isinstance(meta, dict) and meta["embedding_dim"] > 0


def test_vectorize_gives_the_grpc_unit_vectors_in_order(real_server, grpc_clip, tmp_path):
    texts = ["a dog on a beach", "a cat on a sofa"]
    images = [make_image(40, 32, seed=500), make_image(32, 40, seed=501, fmt="JPEG")]
    status, body = weaviate_call(
        real_server, "POST", "/vectorize", {"texts": texts, "images": [base64.b64encode(i).decode() for i in images]}
    )
    assert status == 200
    answer = json.loads(body)
    files = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for file, data in zip(files, images):
        file.write_bytes(data)
    expected_texts = [r.embedding for r in grpc_clip.embed_texts(texts)]
    expected_images = [r.embedding for r in grpc_clip.embed_images([str(f) for f in files])]  # uploaded: the same bytes
    np.testing.assert_array_equal(np.float32(answer["textVectors"]), np.float32(expected_texts))
    np.testing.assert_array_equal(np.float32(answer["imageVectors"]), np.float32(expected_images))
    np.testing.assert_allclose(np.linalg.norm(np.float32(answer["imageVectors"]), axis=1), 1.0, rtol=1e-5)


def test_only_texts_or_only_images_leave_the_other_list_empty(real_server):
    """Weaviate vectorizes an object's text and its image in separate calls (``omitempty``
    leaves the other key out)."""
    status, body = weaviate_call(real_server, "POST", "/vectorize", {"texts": ["only a text"]})
    answer = json.loads(body)
    assert status == 200 and len(answer["textVectors"]) == 1 and answer["imageVectors"] == []
    status, body = weaviate_call(
        real_server, "POST", "/vectorize", {"images": [base64.b64encode(make_image(seed=502)).decode()]}
    )
    answer = json.loads(body)
    assert status == 200 and answer["textVectors"] == [] and len(answer["imageVectors"]) == 1


def test_a_bad_image_is_an_error_the_module_reports(real_server):
    status, body = weaviate_call(
        real_server, "POST", "/vectorize", {"texts": ["fine"], "images": [base64.b64encode(b"not a picture").decode()]}
    )
    assert status > 399
    assert "images[0]" in json.loads(body)["error"]
    status, body = weaviate_call(real_server, "POST", "/vectorize", {"images": ["%%% not base64"]})
    assert status == 400 and "images[0]" in json.loads(body)["error"]
