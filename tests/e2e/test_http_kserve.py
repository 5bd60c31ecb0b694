"""The Open Inference Protocol over REST (KServe v2, Triton's HTTP API) with Triton's own
``tritonclient.http``: binary tensors (its default) and JSON ones give what
``tritonclient.grpc`` gets from the gRPC side, for the ``clip`` alias and a model's batch
scoring signature; health, metadata and errors as the protocol has them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from ..conftest import ServerProcess
from ..helpers import make_image

pytestmark = pytest.mark.cost(0.35)  # its CPU cost among the files (tests/conftest.py)


@pytest.fixture(scope="module")
def clients(real_server: ServerProcess):
    http = triton_http.InferenceServerClient(real_server.http_address, network_timeout=120.0)
    grpc = triton_grpc.InferenceServerClient(real_server.address)
    yield http, grpc
    http.close()
    grpc.close()


def infer(
    module, client, model: str, tensors: dict[str, tuple[str, np.ndarray]], outputs: list[str], binary: bool = True
):
    inputs = []
    for name, (datatype, array) in tensors.items():
        tensor = module.InferInput(name, list(array.shape), datatype)
        if module is triton_http:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    wanted = [
        module.InferRequestedOutput(name, binary_data=binary)
        if module is triton_http
        else module.InferRequestedOutput(name)
        for name in outputs
    ]
    result = client.infer(model_name=model, inputs=inputs, outputs=wanted)
    return [result.as_numpy(name) for name in outputs]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_clip_alias_over_rest_equals_grpc(clients, binary):
    http, grpc = clients
    pixels = np.random.default_rng(400).integers(0, 256, (30, 40, 3)).astype(np.float32)
    tensors = {"text": ("BYTES", np.array(["a dog on a beach".encode()], dtype=object)), "image": ("FP32", pixels)}
    names = ["text_embedding", "image_embedding"]
    over_rest = infer(triton_http, http, "clip", tensors, names, binary)
    over_grpc = infer(triton_grpc, grpc, "clip", tensors, names)
    for rest, expected in zip(over_rest, over_grpc):
        assert rest.dtype == np.float32 and rest.shape == expected.shape
        np.testing.assert_array_equal(rest, expected)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_batch_scores_over_rest_equal_grpc(clients, image_host, binary):
    http, grpc = clients
    urls = [image_host.add(f"kserve-{i}.png", make_image(36, 36, seed=410 + i)) for i in range(2)] + [
        image_host.url("status/404")
    ]
    tensors = {
        "text": ("BYTES", np.array([b"a dog", b"a cat", b"a missing one"], dtype=object)),
        "image_url": ("BYTES", np.array([url.encode() for url in urls], dtype=object)),
    }
    rest_scores, rest_errors = infer(triton_http, http, "default", tensors, ["score", "error"], binary)
    grpc_scores, grpc_errors = infer(triton_grpc, grpc, "default", tensors, ["score", "error"])
    np.testing.assert_array_equal(rest_scores, grpc_scores)  # NaN where failed, on both
    # JSON BYTES come back as text (the protocol's JSON form), binary ones as bytes.
    assert [e.encode() if isinstance(e, str) else bytes(e) for e in rest_errors] == [bytes(e) for e in grpc_errors]
    assert grpc_errors[2].startswith(b"NOT_FOUND")


def test_json_outputs_are_strict_json_with_null_for_a_failed_pairs_score(real_server, image_host):
    """JSON has no NaN: a JSON parser that follows the standard (a browser's, Go's) reads the
    answer, and a failed pair's score is null (tritonclient reads it as NaN, as above)."""
    body = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a dog", "a missing one"]},
            {
                "name": "image_url",
                "datatype": "BYTES",
                "shape": [2],
                "data": [image_host.add("kserve-json.png", make_image(36, 36, seed=420)), image_host.url("status/404")],
            },
        ]
    }
    request = urllib.request.Request(
        f"http://{real_server.http_address}/v2/models/default/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON: {text[:300]}")

    answer = json.loads(text, parse_constant=refuse)
    [score] = [output["data"] for output in answer["outputs"] if output["name"] == "score"]
    assert isinstance(score[0], float) and score[1] is None


def test_health_and_metadata_as_the_protocol_has_them(clients):
    http, grpc = clients
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("clip") and http.is_model_ready("default")
    assert http.get_server_metadata()["name"] == "clipserve"
    for model in ("clip", "default"):
        rest = http.get_model_metadata(model)
        over_grpc = grpc.get_model_metadata(model, as_json=True)
        assert [i["name"] for i in rest["inputs"]] == [i["name"] for i in over_grpc["inputs"]]
        assert [o["name"] for o in rest["outputs"]] == [o["name"] for o in over_grpc["outputs"]]
        assert [i["datatype"] for i in rest["inputs"]] == [i["datatype"] for i in over_grpc["inputs"]]


def test_errors_name_the_problem_with_the_mapped_status(clients, real_server):
    http, _ = clients
    with pytest.raises(InferenceServerException) as unknown:
        http.get_model_metadata("no-such-model")
    assert unknown.value.status() == "404" and "no-such-model" in unknown.value.message()
    with pytest.raises(InferenceServerException) as wrong:
        infer(triton_http, http, "clip", {"text": ("FP32", np.zeros(1, dtype=np.float32))}, ["text_embedding"])
    assert wrong.value.status() == "400" and "'text' must be BYTES" in wrong.value.message()
    request = urllib.request.Request(
        f"http://{real_server.http_address}/v2/models/clip/infer",
        data=b'{"inputs": [',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=60)
    assert malformed.value.code == 400 and "not JSON" in json.loads(malformed.value.read())["error"]
