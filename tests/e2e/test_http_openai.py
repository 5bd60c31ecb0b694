"""OpenAI's embeddings API on the HTTP face, called with the real ``openai`` client (and curl),
against the real server on the tiny checkpoint: the vectors are gRPC Embed's, texts and
images alike (by URL and by data URI), in both encodings; errors arrive as the client's own
exception types with the status the error kind maps to. ``/v1/score`` answers as ScoreBatch.
"""

from __future__ import annotations

import base64
import json
import subprocess

import numpy as np
import openai
import pytest

import clipserve

from ..conftest import ServerProcess
from ..helpers import make_image

pytestmark = pytest.mark.cost(0.3)  # its CPU cost among the files (tests/conftest.py)

TEXTS = ["a dog on a beach", "a cat on a sofa", "a red bicycle"]


@pytest.fixture(scope="module")
def client(real_server: ServerProcess) -> openai.OpenAI:
    assert real_server.http_port, "the server reports its HTTP port at start-up"
    return openai.OpenAI(base_url=f"http://{real_server.http_address}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def grpc_clip(real_server: ServerProcess):
    with clipserve.CLIP(real_server.address, timeout=120) as clip:
        yield clip


def as_array(vectors) -> np.ndarray:
    """Vectors as floats; a base64 string (what an explicit encoding_format="base64" gives
    back, undecoded by the client) read as little-endian float32."""
    if isinstance(vectors, str):
        return np.frombuffer(base64.b64decode(vectors), dtype="<f4")
    if vectors and isinstance(vectors[0], str):
        return np.stack([as_array(vector) for vector in vectors])
    return np.array(vectors, dtype=np.float32)


def test_text_embeddings_are_grpc_embeds_in_both_encodings(client, grpc_clip):
    """The openai client asks for base64 by default (little-endian float32 bytes, which it
    decodes); float is the JSON list. Both are exactly what gRPC's Embed gives."""
    expected = as_array([result.embedding for result in grpc_clip.embed_texts(TEXTS)])
    by_default = client.embeddings.create(model="default", input=TEXTS)
    as_floats = client.embeddings.create(model="default", input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model="default", input=TEXTS, encoding_format="base64")
    for response in (by_default, as_floats, as_base64):
        assert response.object == "list" and response.model == "default"
        assert [item.index for item in response.data] == [0, 1, 2]
        assert all(item.object == "embedding" for item in response.data)
        np.testing.assert_array_equal(as_array([item.embedding for item in response.data]), expected)
        assert response.usage.prompt_tokens == response.usage.total_tokens == 0
    one = client.embeddings.create(model="default", input=TEXTS[1])  # a single string
    np.testing.assert_array_equal(as_array(one.data[0].embedding), expected[1])
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)


def test_image_embeddings_by_url_and_data_uri_are_grpc_embeds(client, grpc_clip, image_host):
    """``"modality": "image"`` (infinity's convention, via extra_body): each input an http(s)
    URL, fetched through the server's fetcher, or a data: URI; the same vector either way."""
    data = make_image(52, 44, seed=351)
    url = image_host.add("openai-351.png", data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    [expected] = grpc_clip.embed_images([url])
    for encoding in ("float", "base64", openai.omit):
        response = client.embeddings.create(
            model="default", input=[url, uri], encoding_format=encoding, extra_body={"modality": "image"}
        )
        vectors = as_array([item.embedding for item in response.data])
        np.testing.assert_array_equal(vectors[0], as_array(expected.embedding))
        np.testing.assert_array_equal(vectors[1], as_array(expected.embedding))


def test_errors_are_openai_exceptions_with_the_mapped_status(client, image_host):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="no-such-model", input="x")
    assert "default" in unknown.value.message, "a 404 for a model lists the names served"
    with pytest.raises(openai.BadRequestError) as dimensions:
        client.embeddings.create(model="default", input="x", dimensions=7)
    assert dimensions.value.body["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError) as missing:  # the image host answered 404
        client.embeddings.create(
            model="default",
            input=[image_host.add("ok-352.png", make_image(seed=352)), image_host.url("status/404")],
            extra_body={"modality": "image"},
        )
    assert "input[1]" in missing.value.message, "a failed image is named by its index"
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.embeddings.create(
            model="default",
            input=["data:image/png;base64," + base64.b64encode(b"plain text").decode()],
            extra_body={"modality": "image"},
        )
    assert "input[0]" in not_an_image.value.message
    with pytest.raises(openai.UnprocessableEntityError) as unreachable:  # a dead host: 422, which no client retries
        client.embeddings.create(
            model="default", input=["http://127.0.0.1:9/none.png"], extra_body={"modality": "image"}
        )
    assert unreachable.value.status_code == 422
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="default", input=[])


def test_models_lists_the_served_names(client):
    assert [model.id for model in client.models.list()] == ["default"]


def curl(*args: str) -> tuple[int, dict]:
    done = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=120, check=True
    )
    body, status = done.stdout.rsplit("\n", 1)
    return int(status), json.loads(body)


def test_score_over_http_answers_as_score_batch(real_server, grpc_clip, image_host):
    """POST /v1/score with curl: one result per pair in input order, a bad pair costs only
    itself (with ScoreBatch's code), scores equal to ScoreBatch's."""
    urls = [image_host.add(f"score-{i}.png", make_image(40, 40, seed=360 + i)) for i in range(3)]
    pairs = [(TEXTS[i], urls[i]) for i in range(3)] + [("a query", image_host.url("status/404"))]
    expected = grpc_clip.score_batch(pairs)
    body = {"pairs": [{"query": q, "image_url": u, "request_id": f"r{i}"} for i, (q, u) in enumerate(pairs)]}
    status, answer = curl(
        f"http://{real_server.http_address}/v1/score", "-H", "Content-Type: application/json", "-d", json.dumps(body)
    )
    assert status == 200 and answer["model"] == "default"
    results = answer["results"]
    assert [r["request_id"] for r in results] == ["r0", "r1", "r2", "r3"]
    assert [np.float32(r["score"]) for r in results[:3]] == [np.float32(e.score) for e in expected[:3]]
    assert results[3]["error"]["code"] == expected[3].error_code == "NOT_FOUND"


def test_curl_embeddings_and_errors_in_openai_shape(real_server, grpc_clip):
    status, answer = curl(
        f"http://{real_server.http_address}/v1/embeddings",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"model": "default", "input": TEXTS[0]}),
    )
    assert status == 200
    np.testing.assert_array_equal(
        as_array(answer["data"][0]["embedding"]), as_array(grpc_clip.embed_texts([TEXTS[0]])[0].embedding)
    )
    status, answer = curl(f"http://{real_server.http_address}/v1/embeddings", "-d", "{not json")
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
