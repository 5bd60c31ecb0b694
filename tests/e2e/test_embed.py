"""Embed: the vectors themselves, batched and cached next to scoring."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import clipserve
from clipserve_server.models.fake_model import FakeModel

from ..conftest import ServerProcess, free_port
from ..helpers import grpcurl, json_objects, make_image

pytestmark = pytest.mark.cost(4)  # its CPU cost among the files (tests/conftest.py)


@pytest.fixture(scope="session")
def reference_features(tiny_checkpoint: Path):
    """An in-process transformers forward: the model's own text and image features."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)

    def features(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def text(query: str) -> np.ndarray:
        with torch.no_grad():
            return features(
                model.get_text_features(**processor(text=[query], return_tensors="pt", padding=True))
            ).numpy()[0]

    def image(data: bytes) -> np.ndarray:
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.no_grad():
            return features(model.get_image_features(**processor(images=picture, return_tensors="pt"))).numpy()[0]

    return text, image


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_embeddings_match_an_in_process_forward_pass(real_server, image_host, reference_features, tmp_path):
    text_features, image_features = reference_features
    local = tmp_path / "local.jpg"
    local.write_bytes(image_host.images["photo2.jpg"])
    texts = ["a dog on a beach", "a red car", "émoji 🚗 and a\ttab"]
    images = [image_host.url("img/photo1.png"), str(local), f"file://{local}"]
    expected_images = [image_host.images["photo1.png"], local.read_bytes(), local.read_bytes()]
    with clipserve.CLIP(real_server.address, timeout=120) as clip:
        unit_texts, raw_texts = clip.embed_texts(texts), clip.embed_texts(texts, raw=True)
        unit_images, raw_images = clip.embed_images(images), clip.embed_images(images, raw=True)
    for text, unit, raw in zip(texts, unit_texts, raw_texts):
        assert (unit.input, raw.input) == (text, text)
        assert np.linalg.norm(unit.embedding) == pytest.approx(1.0, abs=1e-6)
        assert cosine(unit.embedding, text_features(text)) >= 1 - 1e-6
        assert relative(raw.embedding, text_features(text)) <= 1e-4
    for data, unit, raw in zip(expected_images, unit_images, raw_images):
        assert np.linalg.norm(unit.embedding) == pytest.approx(1.0, abs=1e-6)
        assert cosine(unit.embedding, image_features(data)) >= 1 - 1e-6
        assert relative(raw.embedding, image_features(data)) <= 1e-4


def test_a_score_is_the_scaled_dot_product_of_the_two_embeddings(real_server, image_host):
    """README: by default the vectors have unit length, what scoring uses:
    score == exp(logit_scale) * dot(text, image) + logit_bias."""
    url = image_host.url("img/photo4.png")
    with clipserve.CLIP(real_server.address, timeout=120) as clip:
        info = clip.model_info()
        score = clip.score("a small boat", url)
        [text] = clip.embed_texts(["a small boat"])
        [image] = clip.embed_images([url])
    # The vectors themselves, not the reply's `normalized` flag (which the servicer sets).
    assert np.linalg.norm(text.embedding) == pytest.approx(1.0, abs=1e-6)
    assert np.linalg.norm(image.embedding) == pytest.approx(1.0, abs=1e-6)
    assert score == pytest.approx(
        info.logit_scale * float(np.dot(text.embedding, image.embedding)) + info.logit_bias, abs=1e-5 * info.logit_scale
    )


def test_scoring_and_embedding_share_one_cache(make_fake_server, image_host):
    model = FakeModel()
    server = make_fake_server(model, allow_private_networks=True)
    urls = [image_host.url(f"img/photo{i}.jpg") for i in range(3)]
    with clipserve.CLIP(server.address) as clip:
        clip.score_batch([(f"query {i}", url) for i, url in enumerate(urls)])
        encoded = (len(model.encoded_texts), model.encoded_images)
        clip.embed_images(urls)
        clip.embed_texts([f"query {i}" for i in range(3)])
        assert (len(model.encoded_texts), model.encoded_images) == encoded == (3, 3)  # no new forward pass
        [fresh] = clip.embed_texts(["embedded first"])
        clip.score("embedded first", urls[0])
        assert model.encoded_texts.count("embedded first") == 1
    assert fresh.embedding is not None


def test_each_bad_input_gets_its_own_error_in_input_order(fake_server, image_host, tmp_path):
    images = [
        image_host.url("img/photo0.png"),
        image_host.url("status/404"),
        image_host.url("img/not-an-image.png"),
        str(tmp_path / "missing.jpg"),
        "ftp://example.com/x.png",
        image_host.url("img/photo1.png"),
    ]
    with clipserve.CLIP(fake_server.address) as clip:
        results = clip.embed_images(images)
        texts = clip.embed_texts(["fine", "", "  ", "also fine"])
    assert [r.input for r in results] == images
    assert [r.error_code for r in results] == [
        None,
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        None,
    ]
    assert all((r.embedding is None) == (r.error is not None) for r in results)
    assert [r.error_code for r in texts] == [None, "INVALID_ARGUMENT", "INVALID_ARGUMENT", None]
    with pytest.raises(ValueError, match="2 of 4"):
        clipserve.as_array(texts)
    matrix = clipserve.as_array([texts[0], texts[3]])
    assert matrix.dtype == np.float32 and matrix.shape == (2, 16)


def test_raw_vectors_are_the_unit_ones_times_their_length(fake_server):
    with clipserve.CLIP(fake_server.address) as clip:
        [unit] = clip.embed_texts(["a dog"])
        [raw] = clip.embed_texts(["a dog"], raw=True)
    length = np.linalg.norm(raw.embedding)
    assert length != pytest.approx(1.0, abs=1e-3)  # the stand-in model's features are not unit vectors either
    assert np.allclose(np.asarray(raw.embedding) / length, unit.embedding, atol=1e-6)


def test_the_async_client_embeds_like_the_sync_one(fake_server, image_host):
    url = image_host.url("img/photo5.jpg")

    async def main():
        async with clipserve.AsyncCLIP(fake_server.address) as clip:
            return await asyncio.gather(clip.embed_texts(["a", "b"]), clip.embed_images([url], raw=True))

    texts, images = asyncio.run(main())
    with clipserve.CLIP(fake_server.address) as clip:
        assert [r.embedding for r in texts] == [r.embedding for r in clip.embed_texts(["a", "b"])]
        assert images[0].embedding == clip.embed_images([url], raw=True)[0].embedding


def test_an_embed_run_survives_a_server_restart_with_every_input_once(tmp_path):
    port = free_port()
    args = ["--model", "fake:forward_ms=30", "--max-batch-size", "4"]
    files = []
    for i in range(120):
        files.append(tmp_path / f"im{i}.png")
        files[-1].write_bytes(make_image(12, 12, seed=900 + i))
    first = ServerProcess(args, port=port)
    results: list = []
    with clipserve.CLIP(first.address, timeout=120, retry=clipserve.RetryPolicy(max_backoff=0.5)) as clip:
        runner = threading.Thread(target=lambda: results.extend(clip.embed_images([str(f) for f in files])))
        runner.start()
        deadline = time.monotonic() + 60
        while sum(clip.stats().items_by_replica.values()) < 30:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.proc.kill()
        first.terminate()
        second = ServerProcess(args, port=port)
        try:
            runner.join(120)
        finally:
            second.terminate()
    assert [r.input for r in results] == [str(f) for f in files]
    assert all(r.error is None and len(r.embedding) == 16 for r in results), [r.error for r in results if r.error][:3]


def test_grpcurl_embeds_a_text_and_an_image(real_server, image_host):
    requests = "\n".join(
        json.dumps(r)
        for r in (
            {"request_id": "t", "text": "a dog"},
            {"request_id": "i", "image_url": image_host.url("img/photo0.png"), "raw": True},
        )
    )
    done = grpcurl("-d", requests, real_server.address, "clipserve.v1.Scorer/Embed")
    assert done.returncode == 0, done.stderr
    replies = {r["request_id"]: r for r in map(json.loads, json_objects(done.stdout))}
    assert len(replies["t"]["embedding"]) == len(replies["i"]["embedding"]) == 16
    assert np.linalg.norm(replies["t"]["embedding"]) == pytest.approx(1.0, abs=1e-5)


# -- clipserve embed-file --------------------------------------------------------------------------

def embed_file_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "embed-file", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_embed_file_writes_parquet_vectors_in_input_order(fake_server, image_host, tmp_path):
    import pyarrow.parquet as pq

    rows = [{"image_id": f"im{i}", "url": image_host.url(f"img/photo{i}.png"), "license": "cc0"} for i in range(6)]
    rows.insert(3, {"image_id": "gone", "url": image_host.url("status/404"), "license": "cc0"})
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = embed_file_cli(
        str(tmp_path / "images.jsonl"),
        "-o",
        str(tmp_path / "vectors.parquet"),
        "--image-column",
        "url",
        "--address",
        fake_server.address,
    )
    assert done.returncode == 0, done.stderr
    assert "7 rows: 6 embedded, 1 failed" in done.stderr and "NOT_FOUND x1" in done.stderr
    table = pq.read_table(tmp_path / "vectors.parquet")
    vector_type = table.schema.field("embedding").type
    assert (vector_type.list_size, str(vector_type.value_type)) == (16, "float")
    out = table.to_pylist()
    assert [r["image_id"] for r in out] == [r["image_id"] for r in rows] and out[0]["license"] == "cc0"
    assert out[3]["embedding"] is None and out[3]["error"].startswith("NOT_FOUND")
    with clipserve.CLIP(fake_server.address) as clip:
        expected = clip.embed_images([rows[0]["url"]])[0].embedding
    assert out[0]["embedding"] == pytest.approx(expected) and out[0]["error"] is None
    assert not (tmp_path / "vectors.parquet.parts").exists()


def test_embed_file_writes_npy_with_ids_and_resumes(fake_server, tmp_path):
    rows = [{"query_id": f"q{i}", "text": f"query number {i}"} for i in range(10)]
    (tmp_path / "queries.csv").write_text("query_id,text\n" + "".join(f"{r['query_id']},{r['text']}\n" for r in rows))
    args = [
        str(tmp_path / "queries.csv"),
        "-o",
        str(tmp_path / "q.npy"),
        "--text-column",
        "text",
        "--id-column",
        "query_id",
        "--chunk-size",
        "4",
        "--address",
        fake_server.address,
    ]
    assert embed_file_cli(*args, "--raw").returncode == 0
    full = np.load(tmp_path / "q.npy")
    ids = [json.loads(line) for line in (tmp_path / "q.ids.jsonl").read_text().splitlines()]
    assert full.shape == (10, 16) and full.dtype == np.float32
    assert ids == [{"id": f"q{i}", "error": None} for i in range(10)]

    # An interrupted run left its first chunks: --resume embeds only the rest.
    from clipserve.files.embedfile import EmbedFileJob, _save_part

    with clipserve.CLIP(fake_server.address) as clip:
        first = clip.embed_texts([r["text"] for r in rows[:4]], raw=True)
    (tmp_path / "q.npy").unlink()
    parts = EmbedFileJob(tmp_path / "queries.csv", tmp_path / "q.npy", "text", images=False).parts
    parts.mkdir()
    _save_part(parts, 0, first, 16)
    resumed = embed_file_cli(*args, "--raw", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "4 embedded before" in resumed.stderr
    assert np.array_equal(np.load(tmp_path / "q.npy"), full)
