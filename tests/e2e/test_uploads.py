"""Local image files cross the network once per server: the SDK names them by SHA-256 and
sends their bytes only when a server asks for them."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

import clipserve

from ..conftest import ServerProcess, free_port
from ..helpers import make_image

pytestmark = pytest.mark.cost(2)  # its CPU cost among the files (tests/conftest.py)

QUERIES, PER_QUERY, FILES = 40, 25, 200


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("local-images")
    for i in range(FILES):
        (folder / f"img{i:03d}.{'png' if i % 3 == 0 else 'jpg'}").write_bytes(
            make_image(96, 72, seed=500 + i, fmt="PNG" if i % 3 == 0 else "JPEG")
        )
    return folder


def workload(folder: Path) -> list[clipserve.SimilarityInput]:
    """The benchmark maker's shape: each query against 25 of 200 images, each image in ~5 pairs."""
    rng = random.Random(7)
    files = sorted(folder.iterdir())
    return [
        clipserve.SimilarityInput(f"query {q}", str(path), query_id=str(q), image_id=path.name)
        for q in range(QUERIES)
        for path in rng.sample(files, PER_QUERY)
    ]


def total_size(inputs: list[clipserve.SimilarityInput]) -> int:
    return sum(Path(p).stat().st_size for p in {x.image_url for x in inputs})


def uploaded(server) -> float:
    return server.server.metrics.registry.get_sample_value("clipserve_upload_bytes_total")


def assert_exactly_once_in_order(results, inputs) -> None:
    assert [(r.query_id, r.image_id) for r in results] == [(x.query_id, x.image_id) for x in inputs]
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]


def test_each_file_is_uploaded_once_to_a_cold_server_and_not_at_all_to_a_warm_one(make_fake_server, image_folder):
    server = make_fake_server()
    inputs = workload(image_folder)
    size = total_size(inputs)
    with clipserve.CLIP(server.address) as clip:  # a fresh client, as a new run would have
        cold = clip.score_batch(inputs)
        stats = clip.stats()
    assert_exactly_once_in_order(cold, inputs)
    assert uploaded(server) == size, (uploaded(server), size)  # README: 1.00 × the files
    assert stats.upload_bytes == uploaded(server)
    assert stats.hashed_bytes == size  # each file hashed once

    with clipserve.CLIP(server.address) as again:  # the same files again, another process
        warm = again.score_batch(inputs)
        assert again.stats().upload_bytes == 0  # README: warm, 0.0
    assert [r.score for r in warm] == [r.score for r in cold]


def test_a_server_without_a_cache_is_sent_the_bytes_it_asks_for(make_fake_server, image_folder):
    server = make_fake_server(cache=False, text_cache_size=0, image_cache_size=0)
    inputs = workload(image_folder)[:200]
    with clipserve.CLIP(server.address) as clip:
        results = clip.score_batch(inputs)
        assert_exactly_once_in_order(results, inputs)
        assert clip.stats().resends > 0
    with clipserve.CLIP(make_fake_server().address) as cached:
        assert [r.score for r in cached.score_batch(inputs)] == [r.score for r in results]


def test_files_with_the_same_content_are_one_upload(make_fake_server, tmp_path):
    server = make_fake_server()
    data = make_image(80, 60, seed=9, fmt="JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "copy of a.jpg").write_bytes(data)
    inputs = [
        clipserve.SimilarityInput(f"q{i}", str(tmp_path / name))
        for i in range(10)
        for name in ("a.jpg", "copy of a.jpg")
    ]
    with clipserve.CLIP(server.address) as clip:
        results = clip.score_batch(inputs)
        assert clip.stats().upload_bytes == len(data)
    assert all(results[i].score == results[i + 1].score for i in range(0, 20, 2))


def test_a_replica_restarted_mid_run_learns_the_files_again(image_folder):
    port = free_port()
    args = ["--model", "fake:forward_ms=40", "--max-batch-size", "8"]
    inputs = workload(image_folder)[:400]
    first = ServerProcess(args, port=port)
    results: list = []
    retry = clipserve.RetryPolicy(max_backoff=0.5, max_wait=120)  # a restart on a loaded machine may take over 30 s
    with clipserve.CLIP(first.address, timeout=120, retry=retry) as clip:
        runner = threading.Thread(target=lambda: results.extend(clip.score_batch(inputs)))
        runner.start()
        deadline = time.monotonic() + 60
        while clip.stats().items_by_replica.get(first.address, 0) < 100:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.proc.kill()  # mid-run, no goodbye
        first.terminate()
        second = ServerProcess(args, port=port)
        try:
            runner.join(120)
            stats = clip.stats()
        finally:
            second.terminate()
    assert_exactly_once_in_order(results, inputs)
    assert stats.upload_bytes <= 2.2 * total_size(inputs)  # the restarted replica learns each file again, once


def test_score_file_sends_local_images_by_hash_too(make_fake_server, image_folder, tmp_path):
    import json
    import subprocess
    import sys

    server = make_fake_server()
    files = sorted(image_folder.iterdir())[:20]
    (tmp_path / "images.jsonl").write_text(
        "".join(json.dumps({"image_id": p.name, "image_url": str(p)}) + "\n" for p in files)
    )
    rows = [{"query_text": f"query {q}", "image_id": p.name} for q in range(5) for p in files]
    (tmp_path / "qrels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def score_file() -> None:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "clipserve.cli",
                "score-file",
                str(tmp_path / "qrels.jsonl"),
                "--images",
                str(tmp_path / "images.jsonl"),
                "-o",
                str(tmp_path / "out.jsonl"),
                "--address",
                server.address,
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and "100 scored, 0 failed" in done.stderr, done.stderr

    size = sum(p.stat().st_size for p in files)
    score_file()
    assert uploaded(server) == size  # each file once, though each is in five rows
    score_file()
    assert uploaded(server) == size  # the second run: hashes only


def test_embed_images_uploads_each_file_once_too(make_fake_server, image_folder):
    server = make_fake_server()
    files = [str(p) for p in sorted(image_folder.iterdir())[:10]]
    size = sum(Path(p).stat().st_size for p in files)
    with clipserve.CLIP(server.address) as clip:
        first = clip.embed_images(files * 3)
        again = clip.embed_images(files, raw=True)
        assert clip.stats().upload_bytes == size
    assert all(r.error is None for r in first + again)
    assert [r.input for r in first] == files * 3


def test_max_image_bytes_holds_for_uploads_too(make_fake_server, tmp_path):
    """README: --max-image-bytes caps each image, downloaded or uploaded: a local file over it
    fails as INVALID_ARGUMENT naming the limit; one of exactly that size is scored."""
    small, big = make_image(20, 20, seed=1), make_image(90, 90, seed=2)
    assert len(small) < len(big)
    (tmp_path / "small.png").write_bytes(small)
    (tmp_path / "big.png").write_bytes(big)
    server = make_fake_server(max_image_bytes=len(small))
    with clipserve.CLIP(server.address) as clip:
        at_limit, over = clip.score_batch([("q", str(tmp_path / "small.png")), ("q", str(tmp_path / "big.png"))])
        with pytest.raises(clipserve.ClipServeError) as info:
            clip.score("q", str(tmp_path / "big.png"))
    assert at_limit.error is None and at_limit.score is not None
    assert (
        over.score is None
        and over.error_code == "INVALID_ARGUMENT"
        and f"over the {len(small)}-byte image limit" in over.error
    ), over.error
    assert info.value.code.name == "INVALID_ARGUMENT"
