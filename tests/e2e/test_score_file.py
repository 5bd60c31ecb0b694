"""`clipserve score-file`: the benchmark maker's similarity step, against a server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import clipserve

from ..helpers import make_image

pytestmark = pytest.mark.cost(1)  # its CPU cost among the files (tests/conftest.py)

QUERIES = ["a dog", "a red car", "snow on a mountain"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def benchmark_files(tmp_path, image_host):
    images = [
        {"image_id": f"im{i}", "image_url": image_host.url(f"img/photo{i}.png"), "license": "cc0"} for i in range(6)
    ]
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


def expected_scores(address: str, pairs: list[tuple[str, str]]) -> list[float]:
    """Each pair's score by another path (one unary `score` call per pair), so that a row/score
    mix-up in a file format's writer cannot also be in what the test expects."""
    with clipserve.CLIP(address) as clip:
        return [clip.score(query, url) for query, url in pairs]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "score-file", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_row_is_written_in_order_with_its_score(fake_server, benchmark_files, image_host):
    folder, qrels = benchmark_files
    done = run_cli(
        str(folder / "qrels.jsonl"),
        "--images",
        str(folder / "images.jsonl"),
        "-o",
        str(folder / "out.jsonl"),
        "--col-name",
        "dfn_score",
        "--address",
        fake_server.address,
    )
    assert done.returncode == 0, done.stderr
    out = read_jsonl(folder / "out.jsonl")
    assert [{k: v for k, v in row.items() if k != "dfn_score"} for row in out] == qrels  # rows unchanged, in order
    assert list(out[0]) == [*qrels[0], "dfn_score"]  # the score column comes last
    failed = {i for i, row in enumerate(out) if row["dfn_score"] is None}
    assert failed == {i for i, row in enumerate(qrels) if row["image_id"] in ("broken", "nowhere")}
    assert "22 rows: 18 scored, 4 failed" in done.stderr
    assert f"4 failed: INVALID_ARGUMENT x4 (e.g. {image_host.url('img/not-an-image.png')}: " in done.stderr


def test_the_score_column_defaults_to_the_local_clip_adapters(fake_server, benchmark_files):
    folder, qrels = benchmark_files
    done = run_cli(
        str(folder / "qrels.jsonl"), "--images", str(folder / "images.jsonl"), "--address", fake_server.address
    )
    assert done.returncode == 0, done.stderr
    out = read_jsonl(folder / "qrels_with_score.jsonl")
    assert [list(row)[-1] for row in out] == ["clip_score"] * len(qrels)


def test_an_address_in_similarity_config_is_still_read(fake_server, benchmark_files):
    # Not documented: the benchmark maker's loader refuses the key, so a config that other
    # steps of its pipeline read never has it. Files written before that was known still work.
    folder, qrels = benchmark_files
    (folder / "config.toml").write_text(
        f"""
images_jsonl = "{folder / 'images.jsonl'}"
qrels_jsonl = "{folder / 'qrels.jsonl'}"
qrels_with_score_jsonl = "{folder / 'scored' / 'qrels_scored.jsonl'}"

[similarity_config]
adapter = "local_clip"
address = "{fake_server.address}"
"""
    )
    done = run_cli("--config", str(folder / "config.toml"))
    assert done.returncode == 0, done.stderr
    assert len(read_jsonl(folder / "scored" / "qrels_scored.jsonl")) == len(qrels)


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


def test_the_column_flags_name_the_query_image_id_and_url_columns(fake_server, tmp_path, image_host):
    """score-file's --column-query, --column-image-id and --image-url-column read other column
    names, in the rows and in the images file; --col-name names the score column."""
    images = [{"img": f"im{i}", "link": image_host.url(f"img/photo{i}.png")} for i in range(3)]
    rows = [{"text": query, "img": f"im{i}"} for query in QUERIES for i in range(3)]
    write_jsonl(tmp_path / "images.jsonl", images)
    write_jsonl(tmp_path / "qrels.jsonl", rows)
    done = run_cli(
        str(tmp_path / "qrels.jsonl"),
        "--images",
        str(tmp_path / "images.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--column-query",
        "text",
        "--column-image-id",
        "img",
        "--image-url-column",
        "link",
        "--col-name",
        "s",
        "--address",
        fake_server.address,
    )
    assert done.returncode == 0, done.stderr
    out = read_jsonl(tmp_path / "out.jsonl")
    links = {image["img"]: image["link"] for image in images}
    expected = expected_scores(fake_server.address, [(row["text"], links[row["img"]]) for row in rows])
    assert [row["s"] for row in out] == pytest.approx(expected, abs=1e-4)


def test_clip_config_reads_col_name_from_the_benchmark_makers_file(tmp_path):
    """README: CLIP(config="config.toml") reads col_name from its [similarity_config]: the score
    column for file scoring, clip_score when it has none."""
    named, unnamed = tmp_path / "named.toml", tmp_path / "unnamed.toml"
    named.write_text('[similarity_config]\nadapter = "local_clip"\ncol_name = "dfn_score"\n')
    unnamed.write_text('[similarity_config]\nadapter = "local_clip"\n')
    with clipserve.CLIP("127.0.0.1:1", config=str(named)) as clip:
        assert clip.col_name == "dfn_score"
    with clipserve.CLIP("127.0.0.1:1", config=str(unnamed)) as clip:
        assert clip.col_name == "clip_score"


def test_csv_and_parquet_by_extension(fake_server, benchmark_files):
    """CSV and Parquet files are scored too: each row gets its own pair's score."""
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
    csv_scores = [float(r["clip_score"]) if r["clip_score"] else None for r in csv_rows]
    parquet_scores = [r["clip_score"] for r in parquet_rows]
    assert csv_scores == pytest.approx(parquet_scores) and csv_scores.count(None) == 4
    urls = {row["image_id"]: row["image_url"] for row in read_jsonl(folder / "images.jsonl")}
    scored = [i for i, row in enumerate(qrels) if row["image_id"] not in ("broken", "nowhere")]
    expected = expected_scores(
        fake_server.address, [(qrels[i]["query_text"], urls[qrels[i]["image_id"]]) for i in scored]
    )
    assert [csv_scores[i] for i in scored] == pytest.approx(expected, abs=1e-4)
    assert [parquet_scores[i] for i in scored] == pytest.approx(expected, abs=1e-4)


# -- image URLs from image_base_url -------------------------------------------------------------------

def test_image_urls_are_built_from_image_base_url(fake_server, tmp_path, image_host):
    # The user's images file lists the images without a URL column; the config's image_base_url
    # gives them, as the benchmark maker builds them: base without its trailing "/", "/", image id.
    write_jsonl(
        tmp_path / "images.jsonl",
        [{"image_id": name, "license": "cc0"} for name in ("photo0.png", "photo1.jpg", "photo2.png")],
    )
    qrels = [{"query_text": "a dog", "image_id": name} for name in ("photo0.png", "photo1.jpg", "/photo2.png")]
    write_jsonl(tmp_path / "qrels.jsonl", qrels)
    common = [
        str(tmp_path / "qrels.jsonl"),
        "--images",
        str(tmp_path / "images.jsonl"),
        "--error-column",
        "error",
        "--address",
        fake_server.address,
    ]
    (tmp_path / "config.toml").write_text(f'image_base_url = "{image_host.url("img")}/"\n')

    from_config = run_cli(*common, "-o", str(tmp_path / "from_config.jsonl"), "--config", str(tmp_path / "config.toml"))
    from_flag = run_cli(*common, "-o", str(tmp_path / "from_flag.jsonl"), "--image-base-url", image_host.url("img"))
    for done, name in ((from_config, "from_config.jsonl"), (from_flag, "from_flag.jsonl")):
        assert done.returncode == 0, done.stderr
        out = read_jsonl(tmp_path / name)
        assert [row["error"] for row in out] == [None] * 3 and None not in [row["clip_score"] for row in out]
        assert [{k: v for k, v in row.items() if k not in ("clip_score", "error")} for row in out] == qrels

    # Without one, the rows fail, and say why.
    without = run_cli(*common, "-o", str(tmp_path / "without.jsonl"))
    assert without.returncode == 0, without.stderr
    reason = (
        "no image URL for image_id 'photo0.png': images.jsonl has no 'image_url' for it, and no image_base_url is set"
    )
    assert f"3 failed: INVALID_ARGUMENT x3 (e.g. {reason})" in without.stderr
    assert read_jsonl(tmp_path / "without.jsonl")[0]["error"] == f"INVALID_ARGUMENT: {reason}"


# -- failure reasons ---------------------------------------------------------------------------------

def test_the_summary_groups_failures_by_code_and_the_error_column_says_which(fake_server, tmp_path, image_host):
    urls = [
        image_host.url("img/photo0.png"),
        image_host.url("img/missing-a.png"),
        image_host.url("img/not-an-image.png"),
        image_host.url("img/missing-b.png"),
        image_host.url("status/500"),
    ]
    write_jsonl(
        tmp_path / "qrels.jsonl",
        [{"query_text": "a dog", "image_id": str(i), "image_url": url} for i, url in enumerate(urls)],
    )
    done = run_cli(str(tmp_path / "qrels.jsonl"), "--error-column", "why", "--address", fake_server.address)
    assert done.returncode == 0, done.stderr
    assert (
        f"4 failed: NOT_FOUND x2 (e.g. {urls[1]}: HTTP 404 Not Found), "
        f"INVALID_ARGUMENT x1 (e.g. {urls[2]}: not a recognised image"
    ) in done.stderr
    assert f"FAILED_PRECONDITION x1 (e.g. {urls[4]}: HTTP 500" in done.stderr
    errors = [row["why"] for row in read_jsonl(tmp_path / "qrels_with_score.jsonl")]
    assert errors[0] is None
    assert [e.split(":")[0] for e in errors[1:]] == [
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
    ]
    assert errors[3] == f"NOT_FOUND: {urls[3]}: HTTP 404 Not Found"


# -- --retry-failed ----------------------------------------------------------------------------------

@pytest.fixture()
def late_image(tmp_path, image_host):
    """An image the host does not have yet (404), and a function that uploads it."""
    name = f"late-{tmp_path.name}.png"
    return image_host.url(f"img/{name}"), lambda: image_host.add(name, make_image(30, 30, seed=77))


def test_retry_failed_rescores_only_the_rows_without_a_score(fake_server, tmp_path, image_host, late_image):
    late_url, upload = late_image
    images = {"im0": image_host.url("img/photo0.png"), "late": late_url, "im1": image_host.url("img/photo1.png")}
    write_jsonl(tmp_path / "images.jsonl", [{"image_id": k, "image_url": v} for k, v in images.items()])
    write_jsonl(
        tmp_path / "qrels.jsonl",
        [
            {"query_id": f"q{i}", "query_text": q, "image_id": im}
            for i, (q, im) in enumerate([("a dog", "im0"), ("a cat", "late"), ("a car", "im1"), ("snow", "late")])
        ],
    )
    common = [
        str(tmp_path / "qrels.jsonl"),
        "--images",
        str(tmp_path / "images.jsonl"),
        "--address",
        fake_server.address,
    ]
    assert run_cli(*common).returncode == 0
    scored = tmp_path / "qrels_with_score.jsonl"
    lines = scored.read_text(encoding="utf-8").splitlines(keepends=True)
    assert [json.loads(line)["clip_score"] is None for line in lines] == [False, True, False, True]
    # What another tool may have written: its own formatting, a row with no score column at
    # all (retried), and a NaN score (kept, as the benchmark maker's similarity-retry keeps it).
    lines[0] = '{"query_id":"q0",  "query_text":"a \\u0064og", "image_id":"im0", "clip_score":1.5e0}\n'
    lines.append(json.dumps({"query_id": "q4", "query_text": "a bird", "image_id": "late"}) + "\n")
    lines.append('{"query_id": "q5", "query_text": "a tree", "image_id": "late", "clip_score": NaN}\n')
    scored.write_text("".join(lines), encoding="utf-8")

    upload()
    done = run_cli(*common, "--retry-failed")
    assert done.returncode == 0, done.stderr
    assert "6 rows, 3 without a score re-scored: 3 scored, 0 still failed" in done.stderr
    after = scored.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(after) == len(lines)
    for i in (0, 2, 5):
        assert after[i] == lines[i]  # byte for byte
    queries = {1: "a cat", 3: "snow", 4: "a bird"}
    expected = dict(zip(queries, expected_scores(fake_server.address, [(q, late_url) for q in queries.values()])))
    for i in (1, 3, 4):
        before, now = json.loads(lines[i]), json.loads(after[i])
        assert now["clip_score"] == pytest.approx(expected[i], abs=1e-4)  # this row's own pair
        assert list(now) == [
            *before,
            *(["clip_score"] if "clip_score" not in before else []),
        ]  # same columns, same order
        assert {k: v for k, v in now.items() if k != "clip_score"} == {
            k: v for k, v in before.items() if k != "clip_score"
        }


def test_retry_failed_keeps_other_csv_rows_byte_for_byte(fake_server, tmp_path, image_host, late_image):
    late_url, upload = late_image
    # Written by another tool: "\n" line ends, quoted cells, one with a comma and a newline.
    before = (
        "query_text,image_url,note,clip_score\n"
        f'"a dog, running",{image_host.url("img/photo0.png")},"two\nlines",1.25\n'
        f"a cat,{late_url},x,\n"
        f'snow,{image_host.url("img/photo1.png")},"""quoted""",-0.5\n'
    )
    path = tmp_path / "scored.csv"
    path.write_bytes(before.encode())
    upload()
    done = run_cli("--retry-failed", "-o", str(path), "--address", fake_server.address)
    assert done.returncode == 0, done.stderr
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    score = rows[1]["clip_score"]
    assert float(score) == pytest.approx(expected_scores(fake_server.address, [("a cat", late_url)])[0], abs=1e-4)
    assert path.read_bytes() == before.replace(f"a cat,{late_url},x,\n", f"a cat,{late_url},x,{score}\n").encode()


def test_retry_failed_keeps_other_parquet_values_and_types(fake_server, tmp_path, image_host, late_image):
    late_url, upload = late_image
    table = pa.table(
        {
            "query_text": ["a dog", "a cat", "snow"],
            "image_url": [image_host.url("img/photo0.png"), late_url, image_host.url("img/photo1.png")],
            "relevance_label": pa.array([1, 0, 1], type=pa.int8()),
            "clip_score": pa.array([1.25, None, -0.5], type=pa.float64()),
        }
    )
    path = tmp_path / "scored.parquet"
    pq.write_table(table, path)
    upload()
    done = run_cli("--retry-failed", "-o", str(path), "--address", fake_server.address)
    assert done.returncode == 0, done.stderr
    after = pq.read_table(path)
    assert after.schema == table.schema
    for name in ("query_text", "image_url", "relevance_label"):
        assert after.column(name).equals(table.column(name))
    scores = after.column("clip_score").to_pylist()
    assert scores[0] == 1.25 and scores[2] == -0.5
    assert scores[1] == pytest.approx(expected_scores(fake_server.address, [("a cat", late_url)])[0], abs=1e-4)


def test_retry_failed_can_add_an_error_column_to_a_csv(fake_server, tmp_path, image_host, late_image):
    late_url, upload = late_image
    before = (
        f"query_text,image_url,clip_score\r\na dog,{image_host.url('img/photo0.png')},1.25\r\na cat,{late_url},\r\n"
    )
    path = tmp_path / "scored.csv"
    path.write_bytes(before.encode())
    upload()
    done = run_cli("--retry-failed", "-o", str(path), "--error-column", "why", "--address", fake_server.address)
    assert done.returncode == 0, done.stderr
    with path.open(newline="") as fh:
        score = list(csv.DictReader(fh))[1]["clip_score"]
    assert float(score) == pytest.approx(expected_scores(fake_server.address, [("a cat", late_url)])[0], abs=1e-4)
    expected = (
        "query_text,image_url,clip_score,why\r\n"
        f"a dog,{image_host.url('img/photo0.png')},1.25,\r\n"
        f"a cat,{late_url},{score},\r\n"
    )
    assert path.read_bytes() == expected.encode()  # a kept row only gains the empty cell


def test_a_parquet_run_where_every_pair_failed_still_has_a_float_score_column(fake_server, tmp_path, late_image):
    late_url, upload = late_image
    pq.write_table(
        pa.table({"query_text": ["a dog", "a cat"], "image_url": [late_url, late_url]}), tmp_path / "qrels.parquet"
    )
    output = tmp_path / "qrels_with_score.parquet"
    assert run_cli(str(tmp_path / "qrels.parquet"), "--address", fake_server.address).returncode == 0
    assert pq.read_table(output).schema.field("clip_score").type == pa.float64()  # not Arrow's "null" type
    upload()
    done = run_cli(
        str(tmp_path / "qrels.parquet"), "--retry-failed", "--error-column", "why", "--address", fake_server.address
    )
    assert done.returncode == 0, done.stderr
    after = pq.read_table(output)
    assert after.schema.field("why").type == pa.string() and after.column("why").to_pylist() == [None, None]
    assert all(isinstance(score, float) for score in after.column("clip_score").to_pylist())


def test_retry_failed_with_every_row_scored_writes_nothing_and_needs_no_server(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text(
        '{"query_text": "a dog", "image_id": "im0", "clip_score": 1.5}\n'
        '{"query_text": "a cat", "image_id": "im1", "clip_score": NaN}\n'
    )
    before = path.stat()
    done = run_cli("--retry-failed", "-o", str(path), "--address", "127.0.0.1:9")
    assert done.returncode == 0, done.stderr
    assert "every one has a score: nothing to retry" in done.stderr
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_a_rewrite_that_fails_half_way_leaves_the_file_whole(tmp_path):
    from clipserve.files.inplace import open_scored

    path = tmp_path / "scored.jsonl"
    write_jsonl(path, [{"query_text": q, "image_id": "im", "clip_score": None} for q in ("a", "b", "c")])
    before = path.read_bytes()
    scored = open_scored(path)
    with pytest.raises(TypeError):  # row 2 cannot be written, after rows 0 and 1 were
        scored.save({0: {"clip_score": 1.0}, 2: {"clip_score": object()}}, {"clip_score": "float64"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scored.jsonl"]  # and no temporary file is left


# -- a server that is not there, or goes away --------------------------------------------------------

@pytest.mark.parametrize("again", ["--resume", "--retry-failed"])
def test_an_unreachable_server_fails_the_run_with_one_clear_line(benchmark_files, again):
    folder, _ = benchmark_files
    write_jsonl(folder / "out.jsonl", [{"query_text": "a dog", "image_id": "im0", "clip_score": None}])
    before = (folder / "out.jsonl").read_bytes()
    args = ["-o", str(folder / "out.jsonl"), "--address", "127.0.0.1:9", "--timeout", "3"]
    done = run_cli(
        str(folder / "qrels.jsonl"),
        "--images",
        str(folder / "images.jsonl"),
        *args,
        *([again] if again == "--retry-failed" else []),
    )
    assert done.returncode == 1
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: UNAVAILABLE: cannot reach the server at 127.0.0.1:9")
    assert "Connection refused" in error and error.endswith(f"rerun with {again} to carry on")
    assert (folder / "out.jsonl").read_bytes() == before  # nothing was scored, nothing was written


class ServerGoneAfter:
    """A CLIP whose server answers ``answers`` pairs, then cannot be reached (as the SDK
    reports it: ClipServeError(UNAVAILABLE) with every pair's result in ``.results``)."""

    address = "gpu-box:50051"

    def __init__(self, answers: int) -> None:
        self.answers = answers

    def model_info(self) -> None:
        return None

    def stats(self):
        from clipserve import ClientStats

        return ClientStats()

    def score_batch(self, items, progress=None):
        from clipserve import ClipServeError, SimilarityResult
        from clipserve._jobs import failed_score

        why = "cannot reach the server at gpu-box:50051 (retried for 30s): Connection refused"
        results = []
        for item in items:
            self.answers -= 1
            ok = self.answers >= 0
            results.append(
                SimilarityResult(item.query, item.image_url, float(len(item.query)))
                if ok
                else failed_score(item, "UNAVAILABLE", why)
            )
        if self.answers < 0:
            error = ClipServeError(grpc.StatusCode.UNAVAILABLE, why)
            error.results = results
            raise error
        return results


def test_a_server_lost_mid_run_leaves_an_output_that_resume_carries_on(tmp_path):
    from clipserve.files.scorefile import FileJob, RunFailed, score_file

    rows = [
        {"query_text": "q" * (i + 1), "image_id": f"im{i}", "image_url": f"https://example.com/{i}.jpg"}
        for i in range(10)
    ]
    write_jsonl(tmp_path / "qrels.jsonl", rows)
    job = FileJob(qrels=tmp_path / "qrels.jsonl", output=tmp_path / "out.jsonl")
    with pytest.raises(RunFailed, match=r"cannot reach the server at gpu-box:50051 .*rerun with --resume"):
        score_file(ServerGoneAfter(6), job, chunk_size=4, progress=False)
    assert read_jsonl(job.output) == [{**row, "clip_score": float(i + 1)} for i, row in enumerate(rows[:6])]
    score_file(ServerGoneAfter(100), job, resume=True, chunk_size=4, progress=False)
    assert read_jsonl(job.output) == [{**row, "clip_score": float(i + 1)} for i, row in enumerate(rows)]


def test_a_server_lost_mid_retry_keeps_what_was_rescored(tmp_path):
    from clipserve.files.scorefile import FileJob, RunFailed, retry_failed

    rows = [
        {"query_text": "q" * (i + 1), "image_url": f"https://example.com/{i}.jpg", "clip_score": None if i % 2 else 0.5}
        for i in range(6)
    ]
    write_jsonl(tmp_path / "out.jsonl", rows)
    lines = (tmp_path / "out.jsonl").read_text().splitlines(keepends=True)
    with pytest.raises(RunFailed, match="rerun with --retry-failed"):
        retry_failed(ServerGoneAfter(1), FileJob(output=tmp_path / "out.jsonl"), progress=False)
    after = (tmp_path / "out.jsonl").read_text().splitlines(keepends=True)
    assert json.loads(after[1])["clip_score"] == 2.0  # re-scored before the server went away
    assert [after[i] for i in (0, 2, 3, 4, 5)] == [lines[i] for i in (0, 2, 3, 4, 5)]  # the rest as it was
