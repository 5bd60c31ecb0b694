"""clipserve.ray on a local Ray (2 CPUs): a fleet of real `clipserve serve` replicas as Ray
actors, Ray Data jobs that score and embed through it, and the file tools' --engine ray.

The replicas serve the deterministic fake model with simulated accelerator time, reserving no
CPU (Ray's 2 CPUs go to the client actors); equal inputs give equal scores on any replica.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet  # noqa: E402,F401  (pa.parquet)
import psutil  # noqa: E402

import clipserve  # noqa: E402
from clipserve.ray import EmbedBatches, Fleet, ScoreBatches  # noqa: E402
from clipserve.ray.engine import quiet_ray_data  # noqa: E402

from ..helpers import make_image  # noqa: E402

# Ray Data's own DataContext warns of its own deprecated settings when it is first made.
pytestmark = [
    pytest.mark.cost(12.5),  # its CPU cost among the files (tests/conftest.py)
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

# 40 ms per forward pass of up to 8 items: 200 new texts or images a second per replica, so
# that a job of a few thousand new queries runs for seconds, long enough to kill things in.
FLEET_MODEL = "fake:forward_ms=40"
FLEET_FLAGS = ["--max-batch-size", "8", "--max-batch-delay-ms", "2", "--log-level", "WARNING"]
WAIT_S = 300.0  # a guard against a hang on the busy 2-core box, not a speed claim


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 2 CPUs, no dashboard, a small object store, quiet."""
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    quiet_ray_data()
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet(FLEET_MODEL, replicas=2, num_cpus=0, flags=FLEET_FLAGS)
    with fleet:
        yield fleet


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Local image files: the client actors read and upload them."""
    folder = tmp_path_factory.mktemp("ray-images")
    paths = []
    for i in range(12):
        path = folder / f"image{i}.png"
        path.write_bytes(make_image(32 + i, 24 + i, seed=i))
        paths.append(str(path))
    return paths


def _pairs_table(images: list[str], rows: int, prefix: str) -> "pa.Table":
    return pa.table({
        "row": list(range(rows)),
        "query_text": [f"{prefix} query {i % 300}" for i in range(rows)],
        "image_url": [images[i % len(images)] for i in range(rows)],
    })


def _blocks(table: "pa.Table", size: int) -> list["pa.Table"]:
    return [table.slice(start, size) for start in range(0, table.num_rows, size)]


def _score_job(address: str, table: "pa.Table", batch_format: str = "pyarrow"):
    return ray.data.from_arrow(_blocks(table, 250)).map_batches(
        ScoreBatches,
        fn_constructor_kwargs={"address": address, "error_column": "clip_error"},
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,
        batch_size=250,
        batch_format=batch_format,
    )


def _wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.2)


# -- the fleet ----------------------------------------------------------------------------------------

def test_a_fleet_yields_the_address_list_of_replicas_that_each_answer_serving(fleet):
    addresses = fleet.address.split(",")
    assert len(addresses) == 2 and len(set(addresses)) == 2
    for status in fleet.status():
        assert status["error"] is None and psutil.pid_exists(status["pid"])
    with clipserve.CLIP(fleet.address, timeout=60) as clip:
        answered = {clip.model_info().replica for _ in range(6)}
    assert len(answered) == 2  # unary calls take turns: both replicas answer


def test_leaving_a_fleet_stops_every_server_also_one_whose_actor_was_killed(ray_cluster):
    fleet = Fleet("fake", replicas=2, num_cpus=0, flags=["--log-level", "WARNING"])
    with fleet:
        first, second = fleet.status()
        servers = [psutil.Process(s["pid"]) for s in (first, second)]
        family = [p for server in servers for p in [server, *server.children(recursive=True)]]
        os.kill(first["actor_pid"], signal.SIGKILL)  # the actor dies: its server must not outlive it
        _wait_for(
            lambda: not servers[0].is_running() or servers[0].status() == psutil.STATUS_ZOMBIE,
            "server exit after its actor died",
        )
    _wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family), "fleet processes gone"
    )


def test_a_replica_that_cannot_start_fails_the_fleet_at_once_with_its_output(ray_cluster):
    fleet = Fleet("fake", replicas=1, num_cpus=0, flags=["--no-such-flag"])
    with pytest.raises(RuntimeError, match="no-such-flag"):
        fleet.start()
    assert fleet.actors == []  # stopped, not left behind


# -- Ray Data jobs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_format", ["pyarrow", "pandas"])
def test_a_score_job_over_the_fleet_equals_score_batch_on_one_server_every_row_once(fleet, images, batch_format):
    table = _pairs_table(images, 3000, batch_format)
    out = _score_job(fleet.address, table, batch_format).to_arrow_refs()
    scored = pa.concat_tables([ray.get(ref) for ref in out]).sort_by("row")
    assert scored.column("row").to_pylist() == list(range(3000))  # every row, once
    assert scored.column("query_text").to_pylist() == table.column("query_text").to_pylist()  # the input columns kept
    one_server = fleet.address.split(",")[0]
    with clipserve.CLIP(one_server, timeout=300) as clip:
        expected = clip.score_batch(
            list(zip(table.column("query_text").to_pylist(), table.column("image_url").to_pylist()))
        )
    scores = scored.column("clip_score").to_pylist()
    assert all(e.score is not None for e in expected) and scored.column("clip_error").null_count == 3000
    assert max(abs(s - e.score) for s, e in zip(scores, expected)) <= 1e-5


def test_a_replica_killed_mid_job_costs_no_row(fleet, images):
    """kill -9 of one fleet server while the job runs: every row still scored, none null, and
    the server is back on its port."""
    before = fleet.status()[0]
    table = _pairs_table(images, 2000, "kill").set_column(
        1, "query_text", pa.array([f"new query {i}" for i in range(2000)])
    )
    batches, after_kill = [], 0
    for batch in _score_job(fleet.address, table).iter_batches(batch_format="pyarrow", batch_size=None):
        if not batches:
            os.kill(before["pid"], signal.SIGKILL)
        else:
            after_kill += 1
        batches.append(batch)
    scored = pa.concat_tables(batches)
    assert after_kill > 0  # the kill came before the job's end
    assert sorted(scored.column("row").to_pylist()) == list(range(2000))
    assert scored.column("clip_score").null_count == 0, scored.filter(
        pa.compute.is_null(scored.column("clip_score"))
    ).column("clip_error")[:3]
    _wait_for(
        lambda: fleet.status()[0]["restarts"] == before["restarts"] + 1 and fleet.status()[0]["pid"] is not None,
        "restart",
    )
    with clipserve.CLIP(before["address"], timeout=WAIT_S) as clip:  # the same address
        assert clip.score("a dog", images[0]) is not None


def test_an_actor_killed_mid_job_costs_no_row_and_repeats_none(fleet, images):
    """kill -9 of a client actor: Ray starts it again and runs its batch again; each row once."""
    table = _pairs_table(images, 2000, "actor").set_column(
        1, "query_text", pa.array([f"actor query {i}" for i in range(2000)])
    )
    me = os.getpid()
    batches, after_kill = [], 0
    for batch in _score_job(fleet.address, table).iter_batches(batch_format="pyarrow", batch_size=None):
        if not batches:
            workers = [
                p
                for p in psutil.process_iter(["cmdline"])
                if "MapWorker(MapBatches(ScoreBatches))" in " ".join(p.info["cmdline"] or []) and p.pid != me
            ]
            assert workers, "no client actor process found"
            workers[0].kill()
        else:
            after_kill += 1
        batches.append(batch)
    assert after_kill > 0  # the kill came before the job's end
    rows = pa.concat_tables(batches).column("row").to_pylist()
    assert sorted(rows) == list(range(2000))
    assert pa.concat_tables(batches).column("clip_score").null_count == 0


def test_an_embed_job_adds_float32_vectors_equal_to_the_sdks(fleet, images):
    table = pa.table({"row": list(range(len(images))), "path": images})
    out = ray.data.from_arrow(table).map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"address": fleet.address, "column": "path", "kind": "image"},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
        batch_format="pyarrow",
    )
    embedded = pa.concat_tables([ray.get(ref) for ref in out.to_arrow_refs()]).sort_by("row")
    assert embedded.schema.field("embedding").type == pa.list_(pa.float32())
    with clipserve.CLIP(fleet.address, timeout=120) as clip:
        expected = clipserve.as_array(clip.embed_images(images))
    got = embedded.column("embedding").to_pylist()
    assert all(max(abs(a - b) for a, b in zip(row, want)) <= 1e-6 for row, want in zip(got, expected.tolist()))


# -- the file tools' --engine ray --------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", *args], capture_output=True, text=True, timeout=WAIT_S + 300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _files(folder: Path, images: list[str]) -> tuple[Path, Path]:
    """A qrels file whose images come from an images file, with rows that fail: a missing
    image (NOT_FOUND), a row without a query (refused before sending)."""
    qrels, index = folder / "qrels.jsonl", folder / "images.jsonl"
    index.write_text(
        "".join(
            json.dumps({"image_id": f"im{i}", "image_url": url}) + "\n"
            for i, url in enumerate([*images, str(folder / "gone.png")])
        )
    )
    rows = [
        {
            "query_id": f"q{i % 97}",
            "query_text": f"file query {i % 97}",
            "image_id": f"im{i % (len(images) + 1)}",
            "rel": i % 3,
        }
        for i in range(1200)
    ]
    rows[5]["query_text"] = ""
    qrels.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return qrels, index


def test_score_file_engine_ray_writes_the_same_file_as_without(fleet, ray_cluster, images, tmp_path):
    qrels, index = _files(tmp_path, images)
    common = ["--images", str(index), "--address", fleet.address, "--error-column", "error", "--no-progress"]
    _cli("score-file", str(qrels), "-o", str(tmp_path / "sdk.jsonl"), *common)
    ray_run = _cli(
        "score-file",
        qrels.as_uri(),
        "-o",
        (tmp_path / "ray" / "scored.jsonl").as_uri(),
        *common,  # URIs: through pyarrow.fs
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster,
        "--ray-actors",
        "2",
        "--ray-cpus-per-actor",
        "0.5",
        "--ray-batch-size",
        "200",
    )
    written = (tmp_path / "ray" / "scored.jsonl").read_bytes()
    assert written == (tmp_path / "sdk.jsonl").read_bytes()
    rows = [json.loads(line) for line in written.splitlines()]
    assert sum(r["clip_score"] is None for r in rows) == 1 + sum(r["image_id"] == f"im{len(images)}" for r in rows)
    assert "1200 rows" in ray_run.stderr and "NOT_FOUND" in ray_run.stderr


def test_embed_file_engine_ray_with_a_fleet_it_starts_writes_the_same_file_as_without(
    fleet, ray_cluster, images, tmp_path
):
    rows = tmp_path / "images.parquet"
    pa.parquet.write_table(
        pa.table({"id": [f"im{i}" for i in range(len(images) + 1)], "path": [*images, str(tmp_path / "gone.png")]}),
        rows,
    )
    common = [str(rows), "--image-column", "path", "--no-progress"]
    _cli("embed-file", *common, "-o", str(tmp_path / "sdk.parquet"), "--address", fleet.address)
    _cli(
        "embed-file",
        *common,
        "-o",
        str(tmp_path / "ray.parquet"),
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster,
        "--ray-replicas",
        "1",
        "--model",
        "fake",
        "--ray-cpus-per-replica",
        "0",
        "--ray-actors",
        "1",
        "--ray-cpus-per-actor",
        "0.5",
        "--ray-batch-size",
        "5",
    )
    sdk, on_ray = pa.parquet.read_table(tmp_path / "sdk.parquet"), pa.parquet.read_table(tmp_path / "ray.parquet")
    assert on_ray.equals(sdk)
    assert on_ray.column("embedding").null_count == 1 and on_ray.column("error")[-1].as_py().startswith("NOT_FOUND")
