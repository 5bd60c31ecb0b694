"""One server, several models: each request names its model (or gets the default one), each
model has its own caches and batcher, and they share the decode pool and the device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import clipserve
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

from ..conftest import ServerProcess
from ..helpers import make_image

pytestmark = pytest.mark.cost(9)  # its CPU cost among the files (tests/conftest.py)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """A second tiny random-weight CLIP, different from ``tiny_checkpoint`` (other seed)."""
    from clipserve_server.models.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("other-clip"), arch="tiny", seed=99)


@pytest.fixture(scope="module")
def two_models(tiny_checkpoint, other_checkpoint):
    server = ServerProcess(
        ["--model", f"first={tiny_checkpoint}", "--model", f"second={other_checkpoint}", "--allow-private-networks"],
        metrics=True,
    )
    yield server
    assert server.terminate() == 0, "".join(server.log)


def reference_for(checkpoint: Path):
    """In-process logits_per_image of ``checkpoint`` for one (query, image bytes) pair."""
    import io

    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)

    def score(query: str, data: bytes) -> float:
        inputs = processor(
            text=[query], images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt", padding=True
        )
        with torch.no_grad():
            return float(model(**inputs).logits_per_image[0][0])

    score.tolerance = 1e-4 * float(model.logit_scale.detach().exp())  # type: ignore[attr-defined]
    return score


def test_requests_for_two_models_interleaved_in_one_stream_are_each_scored_by_their_own(
    two_models, tiny_checkpoint, other_checkpoint
):
    first, second = reference_for(tiny_checkpoint), reference_for(other_checkpoint)
    images = [make_image(40, 30, seed=50 + i) for i in range(6)]
    requests = [
        scorer_pb2.ScoreRequest(
            request_id=str(i), query=f"query {i % 3}", image_bytes=images[i % 6], model=("first", "second", "")[i % 3]
        )
        for i in range(24)
    ]
    requests.append(scorer_pb2.ScoreRequest(request_id="nope", query="q", image_bytes=images[0], model="third"))
    with grpc.insecure_channel(two_models.address) as channel:
        replies = {r.request_id: r for r in scorer_pb2_grpc.ScorerStub(channel).ScoreBatch(iter(requests), timeout=120)}
    for i, request in enumerate(requests[:-1]):
        reference = second if request.model == "second" else first  # "" is the default: the first
        assert replies[str(i)].score == pytest.approx(
            reference(request.query, request.image_bytes), abs=reference.tolerance
        ), request.model
    assert first("query 0", images[0]) != pytest.approx(
        second("query 0", images[0]), abs=first.tolerance
    )  # the two models differ
    assert replies["nope"].error.code == "NOT_FOUND" and "first, second" in replies["nope"].error.message


def test_the_sdk_and_the_cli_choose_a_model_by_name(two_models, other_checkpoint, image_host):
    second = reference_for(other_checkpoint)
    url = image_host.url("img/photo2.png")
    with clipserve.CLIP(two_models.address, model="second") as clip:
        assert clip.score("a red car", url) == pytest.approx(
            second("a red car", image_host.images["photo2.png"]), abs=second.tolerance
        )
        info = clip.model_info()
        assert (info.name, info.model_id) == ("second", str(other_checkpoint))
        listed = clip.list_models()
    assert [m.name for m in listed.models] == ["first", "second"] and listed.default_model == "first"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipserve.cli",
            "score",
            "a red car",
            url,
            "--address",
            two_models.address,
            "--model",
            "second",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(
        second("a red car", image_host.images["photo2.png"]), abs=second.tolerance
    )
    with clipserve.CLIP(two_models.address, model="third", retry=clipserve.RetryPolicy(max_attempts=1)) as clip:
        with pytest.raises(clipserve.ClipServeError) as info:
            clip.model_info()
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_each_model_has_its_own_caches_and_metrics(two_models, image_host):
    url = image_host.url("img/photo5.png")
    with (
        clipserve.CLIP(two_models.address, model="first") as first,
        clipserve.CLIP(two_models.address, model="second") as second,
    ):
        before = (first.model_info().image_cache.entries, second.model_info().image_cache.entries)
        first.score_batch([("cache me", url)] * 3)
        after = (first.model_info().image_cache.entries, second.model_info().image_cache.entries)
        second.embed_texts(["only the second"])
    assert after == (before[0] + 1, before[1])  # the first model's cache alone holds the image
    samples = two_models.metrics()
    assert samples['clipserve_items_total{code="OK",model="first",rpc="ScoreChunks"}'] >= 3
    assert samples['clipserve_items_total{code="OK",model="second",rpc="EmbedChunks"}'] >= 1
    assert 'clipserve_cache_entries{cache="text",model="second"}' in samples


def test_models_whose_weights_cannot_fit_are_refused_before_loading(tiny_checkpoint, other_checkpoint):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipserve.cli",
            "serve",
            "--port",
            "0",
            "--model",
            f"a={tiny_checkpoint}",
            "--model",
            f"b={other_checkpoint}",
            "--memory-budget-gb",
            "0.0001",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    assert (
        "the models' weights need" in errors[0]
        and "a (" in errors[0]
        and "b (" in errors[0]
        and "--memory-budget-gb" in errors[0]
    )
    assert "Traceback" not in done.stderr


def test_clipserve_models_lists_them_as_json(two_models):
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "models", "--address", two_models.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [m["name"] for m in listed["models"]] == ["first", "second"] and listed["defaultModel"] == "first"
