"""The Open Inference Protocol (KServe v2) on clipserve's port, called with Triton's own client.

Triton users call a CLIP model named ``clip`` with ``tritonclient``: a text and an image (PIL
pixels as floats) in, each one's features out. These tests make that exact call against the
real server (``real_server``: ``clipserve serve`` in its own process, on the tiny checkpoint)
and hold the answers against transformers in this process; they also call each model under
its own name (batch scoring, as ScoreBatch), and refuse malformed tensors.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

import clipserve
from clipserve_server.models.fake_model import FakeModel

from ..conftest import ServerProcess
from ..helpers import grpcurl, make_image

pytestmark = pytest.mark.cost(7)  # its CPU cost among the files (tests/conftest.py)


def clip_embeddings(
    client: triton.InferenceServerClient, text: str, image: np.ndarray | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """The call a Triton CLIP user's app makes (waggle-sensor's sage-nrp-image-search,
    ``get_clip_embeddings``): one text as BYTES [1], the image as FP32 [H, W, 3] or, without
    one, a 1x1 black image; both outputs asked for by name. Returns them as [1, D] arrays."""
    pixels = np.array(image).astype(np.float32) if image is not None else np.zeros((1, 1, 3), dtype=np.float32)
    inputs = [triton.InferInput("text", [1], "BYTES"), triton.InferInput("image", list(pixels.shape), "FP32")]
    inputs[0].set_data_from_numpy(np.array([text.encode("utf-8")], dtype="object"))
    inputs[1].set_data_from_numpy(pixels)
    outputs = [triton.InferRequestedOutput("text_embedding"), triton.InferRequestedOutput("image_embedding")]
    result = client.infer(model_name="clip", inputs=inputs, outputs=outputs, **kwargs)
    return result.as_numpy("text_embedding"), result.as_numpy("image_embedding")


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """What the app holds: a decoded RGB image as a uint8 array (np.array of a PIL image)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def infer(client: triton.InferenceServerClient, model: str, **tensors: tuple[str, np.ndarray]):
    inputs = []
    for name, (datatype, array) in tensors.items():
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model_name=model, inputs=inputs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def transformers_clip(tiny_checkpoint: Path):
    """The Triton model's computation, in this process: CLIPProcessor and CLIPModel's features."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_checkpoint).eval()
    processor = CLIPProcessor.from_pretrained(tiny_checkpoint)

    def text_features(text: str) -> np.ndarray:
        tokens = processor(text=[text], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            output = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return getattr(output, "pooler_output", output).numpy()

    def image_features(pixels: np.ndarray) -> np.ndarray:
        inputs = processor(images=pixels, return_tensors="pt")
        with torch.no_grad():
            output = model.get_image_features(pixel_values=inputs["pixel_values"])
        return getattr(output, "pooler_output", output).numpy()

    return text_features, image_features


@pytest.fixture(scope="module")
def client(real_server: ServerProcess):
    with triton.InferenceServerClient(url=real_server.address) as c:
        yield c


def test_waggles_three_call_shapes_give_the_features_transformers_gives(client, transformers_clip):
    """Text + image, text + the 1x1 black stand-in, "" + image: each output equals what
    CLIPModel gives in process on the same input (the image through CLIPProcessor on the float
    array itself), and the missing half is zeros, as the Triton model answers."""
    text_features, image_features = transformers_clip
    image = photo(37, 53, seed=1)
    text, pixels = clip_embeddings(client, "a heron standing in shallow water", image)
    assert text.shape == pixels.shape == (1, 16) and text.dtype == pixels.dtype == np.float32
    assert cosine(text, text_features("a heron standing in shallow water")) >= 1 - 1e-6
    expected = image_features(image.astype(np.float32))
    assert cosine(pixels, expected) >= 1 - 1e-6
    np.testing.assert_allclose(pixels, expected, atol=1e-4 * float(np.linalg.norm(expected)))

    text_only, no_image = clip_embeddings(client, "a heron standing in shallow water")
    assert not no_image.any()
    np.testing.assert_array_equal(text_only, text)

    no_text, image_only = clip_embeddings(client, "", image)
    assert not no_text.any()
    np.testing.assert_array_equal(image_only, pixels)
    blank, _ = clip_embeddings(client, "   ", image)  # stripped first, as the Triton model does
    assert not blank.any()


def test_float_pixels_are_preprocessed_exactly_as_clipprocessor_does_them(tiny_checkpoint):
    """The server's preprocessing of a float array is CLIPProcessor's on that array, bit for
    bit, at awkward sizes too (one and three pixels high, where the processor alone would guess
    the channels come first); not the rounded 8-bit image's (resizing floats differs)."""
    import torch
    from transformers import CLIPProcessor

    from clipserve_server.models.clip_model import HFClipModel

    model = HFClipModel(str(tiny_checkpoint), device="cpu")
    processor = CLIPProcessor.from_pretrained(tiny_checkpoint)
    for height, width in ((37, 53), (300, 41), (1, 9), (3, 7), (32, 32)):
        pixels = photo(height, width, seed=height).astype(np.float32) + np.float32(0.25)
        expected = processor(images=pixels, return_tensors="pt", input_data_format="channels_last")["pixel_values"][0]
        got = model._pipeline.normalize(torch.from_numpy(model.preprocess_array(pixels)).unsqueeze(0))[0]
        assert torch.equal(got, expected), (height, width)


def test_metadata_names_the_models_inputs_and_outputs(client, real_server):
    """ServerMetadata, ModelMetadata (the alias and the model by name), liveness and readiness
    answer what a Triton client asks before inferring; reflection lists the service."""
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("clip") and client.is_model_ready("default")
    server = client.get_server_metadata()
    assert server.name == "clipserve" and server.version == clipserve.__version__

    def signature(tensors) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.datatype, list(t.shape)) for t in tensors]

    alias = client.get_model_metadata("clip")
    assert signature(alias.inputs) == [("text", "BYTES", [1]), ("image", "FP32", [-1, -1, 3])]
    assert signature(alias.outputs) == [("text_embedding", "FP32", [1, -1]), ("image_embedding", "FP32", [1, -1])]
    scorer = client.get_model_metadata("default")
    assert signature(scorer.inputs) == [
        ("text", "BYTES", [-1]),
        ("image_url", "BYTES", [-1]),
        ("image_bytes", "BYTES", [-1]),
    ]
    assert signature(scorer.outputs) == [("score", "FP32", [-1]), ("error", "BYTES", [-1])]
    assert scorer.platform == "transformers"

    listed = grpcurl(real_server.address, "list")
    assert "inference.GRPCInferenceService" in listed.stdout.split(), listed.stderr
    described = grpcurl(real_server.address, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer" in described.stdout, described.stderr


def test_sixteen_threads_calling_at_once_each_get_their_single_call_answer(tiny_checkpoint):
    """16 threads x 96 calls, one image per call, on a server without caches (so every call is
    encoded again, in batches shared with other callers): each answer equals the one the same
    input got alone, to float32 rounding."""
    server = ServerProcess(["--model", str(tiny_checkpoint), "--no-cache"])
    try:
        with triton.InferenceServerClient(url=server.address) as alone:
            cases = [(f"photo number {i}", photo(20 + i, 30 + 2 * i, seed=i)) for i in range(12)]
            expected = [clip_embeddings(alone, text, image) for text, image in cases]
        mismatches: list[str] = []
        failures: list[BaseException] = []

        def caller(thread: int) -> None:
            try:
                with triton.InferenceServerClient(url=server.address) as own:
                    for call in range(96):
                        index = (thread + call) % len(cases)
                        got = clip_embeddings(own, *cases[index])
                        for name, a, b in zip(("text", "image"), got, expected[index]):
                            if not np.allclose(a, b, rtol=1e-5, atol=1e-5):
                                mismatches.append(f"thread {thread} call {call}: {name} of case {index}")
            except BaseException as exc:  # reported below, not lost in the thread
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[0]
        assert not mismatches, mismatches[:5]
    finally:
        assert server.terminate() == 0, "".join(server.log)


def test_each_model_by_name_scores_as_score_batch_does(client, real_server, image_host):
    """The model under its own name: texts and image URLs (or uploaded bytes) in, scores and
    per-item errors out, equal to what ScoreBatch answers for the same pairs; a bad item costs
    only itself."""
    urls = [image_host.url(f"img/photo{i}.png") for i in range(4)] + [image_host.url("status/404"), "ftp://example.com/x.png"]
    texts = ["a red fox", "a blue whale", "a red fox", "an owl", "a heron", "an owl"]
    with clipserve.CLIP(real_server.address) as sdk:
        expected = sdk.score_batch([clipserve.SimilarityInput(t, u) for t, u in zip(texts, urls)])
    result = infer(
        client,
        "default",
        text=("BYTES", np.array([t.encode() for t in texts], dtype=object)),
        image_url=("BYTES", np.array([u.encode() for u in urls], dtype=object)),
    )
    scores, errors = result.as_numpy("score"), result.as_numpy("error")
    assert scores.dtype == np.float32 and scores.shape == errors.shape == (6,)
    for want, score, error in zip(expected, scores, errors):
        if want.error is None:
            assert error == b"" and score == pytest.approx(want.score, abs=1e-5)
        else:
            assert np.isnan(score) and error.decode().split(":")[0] == want.error_code, (error, want.error)
    assert errors[4].startswith(b"NOT_FOUND") and errors[5].startswith(b"INVALID_ARGUMENT")

    uploads = infer(
        client,
        "default",
        text=("BYTES", np.array([b"a red fox", b"an owl"], dtype=object)),
        image_bytes=("BYTES", np.array([image_host.images["photo0.png"], b"not an image"], dtype=object)),
    )
    assert uploads.as_numpy("score")[0] == pytest.approx(scores[0], abs=1e-5)
    assert uploads.as_numpy("error")[1].startswith(b"INVALID_ARGUMENT")


@pytest.mark.parametrize(
    ("model", "tensors", "code", "named"),
    [
        (
            "clip",
            {"text": ("BYTES", np.array([b"x"], dtype=object)), "image": ("FP64", np.ones((2, 2, 3)))},
            "INVALID_ARGUMENT",
            "'image' must be FP32",
        ),
        (
            "clip",
            {"text": ("BYTES", np.array([b"x"], dtype=object)), "image": ("FP32", np.ones((4, 4), np.float32))},
            "INVALID_ARGUMENT",
            "'image' has shape [4, 4]",
        ),
        (
            "clip",
            {
                "text": ("BYTES", np.array([b"x", b"y"], dtype=object)),
                "image": ("FP32", np.ones((2, 2, 3), np.float32)),
            },
            "INVALID_ARGUMENT",
            "'text' has shape [2]",
        ),
        ("clip", {"image": ("FP32", np.ones((2, 2, 3), np.float32))}, "INVALID_ARGUMENT", "missing input 'text'"),
        (
            "clip",
            {
                "text": ("BYTES", np.array([b"\xff\xfe"], dtype=object)),
                "image": ("FP32", np.ones((2, 2, 3), np.float32)),
            },
            "INVALID_ARGUMENT",
            "'text': not UTF-8",
        ),
        (
            "clip",
            {"text": ("BYTES", np.array([b"x"], dtype=object)), "picture": ("FP32", np.ones((2, 2, 3), np.float32))},
            "INVALID_ARGUMENT",
            "no input 'picture'",
        ),
        (
            "default",
            {
                "text": ("BYTES", np.array([b"x", b"y"], dtype=object)),
                "image_url": ("BYTES", np.array([b"http://h/a.png"], dtype=object)),
            },
            "INVALID_ARGUMENT",
            "'image_url' 1",
        ),
        (
            "default",
            {"text": ("BYTES", np.array([b"x"], dtype=object))},
            "INVALID_ARGUMENT",
            "'image_url' and 'image_bytes'",
        ),
        ("nope", {"text": ("BYTES", np.array([b"x"], dtype=object))}, "NOT_FOUND", "no model named 'nope'"),
    ],
    ids=[
        "datatype",
        "image-rank",
        "text-shape",
        "missing",
        "not-utf8",
        "unknown-input",
        "lengths",
        "no-image",
        "unknown-model",
    ],
)
def test_malformed_tensors_are_refused_naming_the_input_and_the_server_serves_on(client, model, tensors, code, named):
    """A wrong datatype or shape, a missing or unknown input, an unknown model: the call fails
    with INVALID_ARGUMENT or NOT_FOUND and a message that names it; the next call is answered."""
    with pytest.raises(InferenceServerException) as refused:
        infer(client, model, **tensors)
    assert refused.value.status() == f"StatusCode.{code}"
    assert named in refused.value.message()
    text, _ = clip_embeddings(client, "still serving")
    assert text.any()


def test_typed_contents_are_read_like_raw_ones(client, real_server):
    """A client that sends its tensors in ``contents`` (typed fields) rather than raw bytes, as
    some v2 clients do, gets the answer tritonclient's raw request gets. (The request is built
    with the server's own message classes: tritonclient's would not send it this way.)"""
    import grpc

    from clipserve_server.serving import oip_messages as pb

    image = photo(12, 10, seed=5)
    expected = clip_embeddings(client, "a kingfisher", image)
    request = pb.ModelInferRequest(model_name="clip")
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a kingfisher")
    request.inputs.add(name="image", datatype="FP32", shape=list(image.shape)).contents.fp32_contents.extend(
        image.astype(np.float32).ravel().tolist()
    )
    with grpc.insecure_channel(real_server.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = call(request, timeout=60)
    assert [o.name for o in response.outputs] == ["text_embedding", "image_embedding"]
    for raw, want in zip(response.raw_output_contents, expected):
        np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4").reshape(1, -1), want)


def test_optional_methods_answer_unimplemented(client):
    """Model configuration and the repository are not served: UNIMPLEMENTED, not a crash."""
    for call in (lambda: client.get_model_config("clip"), lambda: client.get_model_repository_index()):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED"


def test_a_server_and_tritonclient_share_a_process_and_pixels_are_cached(make_fake_server):
    """The server builds the protocol's messages in a pool of its own, so tritonclient (whose
    messages have the same names) works against an in-process server; the same pixels sent
    twice are encoded once."""
    model = FakeModel()
    server = make_fake_server(model)
    with triton.InferenceServerClient(url=server.address) as c:
        image = photo(24, 24, seed=7)
        first = clip_embeddings(c, "a cat", image)
        second = clip_embeddings(c, "a cat", image)
    assert model.encoded_images == 1 and model.encoded_texts == ["a cat"]
    np.testing.assert_array_equal(first[1], second[1])


def test_the_bearer_token_and_tls_guard_the_protocol_as_the_rest_of_the_port(make_fake_server, tmp_path):
    """With --auth-token-file a call without the token is UNAUTHENTICATED and one with it is
    answered; with --tls-cert only a TLS client gets in."""
    import trustme

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key, root = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(root))
    server = make_fake_server(auth_token_file=str(token), tls_cert=str(chain), tls_key=str(key))
    with triton.InferenceServerClient(url=server.address, ssl=True, root_certificates=str(root)) as c:
        with pytest.raises(InferenceServerException) as refused:
            clip_embeddings(c, "a cat")
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        text, _ = clip_embeddings(c, "a cat", headers={"authorization": "Bearer s3cret"})
        assert text.any()


def test_the_alias_is_configurable_and_never_hides_a_model(make_fake_server):
    """--v2-alias names the alias ('' turns it off); where a model has that name, the model's own
    name wins and the alias is off (a configuration that names a model "clip" still starts)."""
    from clipserve_server.config_loaders import load_config

    assert load_config(["--model", "fake", "--v2-alias", "openai-clip"]).v2_alias == "openai-clip"
    assert load_config(["--model", "fake", "--v2-alias", ""]).v2_alias == ""
    assert load_config(["--model", "fake"]).v2_alias == "clip"
    named_clip = load_config(["--model", "clip=fake", "--model", "other=fake"])
    assert named_clip.v2_alias == "clip" and named_clip.resolved_v2_alias == ""
    assert load_config(["--model", "fake"]).resolved_v2_alias == "clip"
    renamed, off = make_fake_server(v2_alias="openai-clip"), make_fake_server(v2_alias="")
    with triton.InferenceServerClient(url=renamed.address) as c:
        assert c.is_model_ready("openai-clip")
        with pytest.raises(InferenceServerException, match="no model named 'clip'"):
            c.get_model_metadata("clip")
    with triton.InferenceServerClient(url=off.address) as c:
        with pytest.raises(InferenceServerException, match="no model named 'clip'"):
            clip_embeddings(c, "a cat")


def test_the_batch_model_accepts_uploads_of_real_images(client):
    """image_bytes carries encoded files (PNG, JPEG): decoded as ScoreBatch's uploads are."""
    files = np.array([make_image(30, 20, seed=3), make_image(30, 20, seed=4, fmt="JPEG")], dtype=object)
    result = infer(
        client, "default", text=("BYTES", np.array([b"one", b"two"], dtype=object)), image_bytes=("BYTES", files)
    )
    assert list(result.as_numpy("error")) == [b"", b""] and np.isfinite(result.as_numpy("score")).all()
