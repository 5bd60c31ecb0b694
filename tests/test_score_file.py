"""`clipserve score-file`: the benchmark maker's similarity step, against a server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

QUERIES = ["a dog", "a red car", "snow on a mountain"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def benchmark_files(tmp_path, image_host):
    images = [{"image_id": f"im{i}", "image_url": image_host.url(f"img/photo{i}.png"), "license": "cc0"} for i in range(6)]
    images.append({"image_id": "broken", "image_url": image_host.url("img/not-an-image.png"), "license": "cc0"})
    qrels = [
        {"query_id": f"q{q}", "query_text": text, "image_id": image["image_id"], "relevance_label": (q + i) % 2}
        for q, text in enumerate(QUERIES)
        for i, image in enumerate(images)
    ]
    qrels.append({"query_id": "q9", "query_text": "unknown image", "image_id": "nowhere", "relevance_label": 0})
    write_jsonl(tmp_path / "images.jsonl", images)
    write_jsonl(tmp_path / "qrels.jsonl", qrels)
    return tmp_path, qrels


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipserve.cli", "score-file", "--no-progress", *args], capture_output=True, text=True, timeout=120)


def test_every_row_is_written_in_order_with_its_score(fake_server, benchmark_files):
    folder, qrels = benchmark_files
    done = run_cli(str(folder / "qrels.jsonl"), "--images", str(folder / "images.jsonl"), "-o", str(folder / "out.jsonl"), "--col-name", "clip_score", "--address", fake_server.address)
    assert done.returncode == 0, done.stderr
    out = read_jsonl(folder / "out.jsonl")
    assert [{k: v for k, v in row.items() if k != "clip_score"} for row in out] == qrels  # rows unchanged, in order
    assert list(out[0]) == [*qrels[0], "clip_score"]  # the score column comes last
    failed = {i for i, row in enumerate(out) if row["clip_score"] is None}
    assert failed == {i for i, row in enumerate(qrels) if row["image_id"] in ("broken", "nowhere")}
    assert "22 rows: 18 scored, 4 failed" in done.stderr


def test_settings_come_from_the_benchmark_makers_config(fake_server, benchmark_files):
    folder, qrels = benchmark_files
    (folder / "config.toml").write_text(
        f"""
column_query = "query_text"
column_image_id = "image_id"
image_url_temp_column = "image_url"
images_jsonl = "{folder / 'images.jsonl'}"
qrels_jsonl = "{folder / 'qrels.jsonl'}"
qrels_with_score_jsonl = "{folder / 'scored' / 'qrels_scored.jsonl'}"

[similarity_config]
adapter = "local_clip"
col_name = "clip_score"
address = "{fake_server.address}"
"""
    )
    done = run_cli("--config", str(folder / "config.toml"))
    assert done.returncode == 0, done.stderr
    out = read_jsonl(folder / "scored" / "qrels_scored.jsonl")
    assert len(out) == len(qrels) and "clip_score" in out[0]


def test_resume_keeps_what_is_done_and_scores_the_rest(fake_server, benchmark_files):
    folder, qrels = benchmark_files
    common = ["--images", str(folder / "images.jsonl"), "--address", fake_server.address]
    assert run_cli(str(folder / "qrels.jsonl"), "-o", str(folder / "full.jsonl"), *common).returncode == 0
    full = (folder / "full.jsonl").read_text().splitlines(keepends=True)
    (folder / "partial.jsonl").write_text("".join(full[:5]))
    done = run_cli(str(folder / "qrels.jsonl"), "-o", str(folder / "partial.jsonl"), "--resume", *common)
    assert done.returncode == 0, done.stderr
    assert "5 already scored" in done.stderr
    assert (folder / "partial.jsonl").read_text() == "".join(full)

    (folder / "other.jsonl").write_text(json.dumps({"query_text": "something else", "image_id": "im0"}) + "\n")
    refused = run_cli(str(folder / "qrels.jsonl"), "-o", str(folder / "other.jsonl"), "--resume", *common)
    assert refused.returncode == 1 and "cannot resume" in refused.stderr


def test_csv_and_parquet_by_extension(fake_server, benchmark_files):
    folder, qrels = benchmark_files
    with (folder / "qrels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(qrels[0]))
        writer.writeheader()
        writer.writerows(qrels)
    pq.write_table(pa.Table.from_pylist(qrels), folder / "qrels.parquet")
    common = ["--images", str(folder / "images.jsonl"), "--address", fake_server.address]
    assert run_cli(str(folder / "qrels.csv"), "-o", str(folder / "out.csv"), *common).returncode == 0
    assert run_cli(str(folder / "qrels.parquet"), "-o", str(folder / "out.parquet"), *common).returncode == 0
    with (folder / "out.csv").open(newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    parquet_rows = pq.read_table(folder / "out.parquet").to_pylist()
    assert [r["image_id"] for r in csv_rows] == [r["image_id"] for r in qrels] == [r["image_id"] for r in parquet_rows]
    csv_scores = [float(r["similarity_score"]) if r["similarity_score"] else None for r in csv_rows]
    parquet_scores = [r["similarity_score"] for r in parquet_rows]
    assert csv_scores == pytest.approx(parquet_scores) and csv_scores.count(None) == 4


def test_an_unreachable_server_fails_the_run(benchmark_files):
    folder, _ = benchmark_files
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "score-file", str(folder / "qrels.jsonl"), "--images", str(folder / "images.jsonl"),
         "--address", "127.0.0.1:9", "--no-progress", "--timeout", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr and "--resume" in done.stderr
