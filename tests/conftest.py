"""Session fixtures: a tiny random-weight checkpoint, a loopback image host, real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipserve_server.utils.config import ServerConfig
from clipserve_server.models.fake_model import FakeModel

from .helpers import ImageHost, InProcessServer, make_image

ROOT = Path(__file__).resolve().parent.parent


# The files whose tests start servers, worker processes or conversions carry a cost marker
# (``pytestmark = pytest.mark.cost(N)``: their rank by CPU, children included, measured on the
# 2-core box; higher is heavier). pytest-xdist hands each worker a whole file at a time
# (--dist loadfile) in collection order (--no-loadscope-reorder: by default it would order files
# by their number of tests, and a few-test file that starts four servers would come last and
# leave one worker running it alone). Heaviest first, the two workers end together. A file with
# no marker keeps its place after the marked ones.
def _cost(item: pytest.Item) -> float:
    marker = item.get_closest_marker("cost")
    return float(marker.args[0]) if marker is not None else 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_cost, reverse=True)  # stable: tests keep their order within a file


@pytest.fixture(scope="session", autouse=True)
def runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The servers of this run share one conversion cache (--runtime-cache), under tmp: a model
    converts once per run (entries are keyed by its weights), never from a user's cache. One for
    all pytest-xdist workers (the folder above each worker's): entries are written under a
    temporary name and renamed, so workers converting the same model at once is safe."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder = shared / "runtime-cache"
    folder.mkdir(exist_ok=True)
    previous = os.environ.get("CLIPSERVE_RUNTIME_CACHE")
    os.environ["CLIPSERVE_RUNTIME_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["CLIPSERVE_RUNTIME_CACHE"]
    else:
        os.environ["CLIPSERVE_RUNTIME_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipserve_server.models.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-clip"), arch="tiny", seed=1234)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):
    """The reference adapter's computation: one full transformers forward per pair.

    Queries are truncated to the model's context, which the reference adapter does not do
    (it raises); everything else is exactly its code path.
    """
    import io

    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)

    def score(query: str, image_bytes: bytes) -> float:
        image = Image.open(io.BytesIO(image_bytes))
        if image.mode != "RGB":
            image = image.convert("RGB")
        inputs = processor(
            text=[query], images=image, return_tensors="pt", padding=True, truncation=True, max_length=77
        )
        with torch.no_grad():
            return float(model(**inputs).logits_per_image[0][0])

    score.tolerance = 1e-4 * float(model.logit_scale.detach().exp())  # type: ignore[attr-defined]
    return score


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    for i in range(6):
        host.add(f"photo{i}.png", make_image(40 + 7 * i, 30 + 5 * i, seed=i))
        host.add(f"photo{i}.jpg", make_image(64, 48, seed=100 + i, fmt="JPEG"))
    host.add("not-an-image.png", b"this is plain text, not a picture")
    yield host
    host.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`clipserve serve` in a subprocess, exactly as a user starts it.

    ``metrics=True`` serves its Prometheus metrics too (read them with ``metrics()``);
    ``wait=False`` returns at once (call ``wait_ready()``), so that several start together.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        port: int = 0,
        *,
        metrics: bool = False,
        wait: bool = True,
    ) -> None:
        self.metrics_port = free_port() if metrics else 0
        extra = ["--metrics-port", str(self.metrics_port)] if metrics else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self.port = 0
        self.address = ""
        self.http_port = 0  # the HTTP face's port, from its start-up line (0: not serving HTTP)
        self.http_address = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "ServerProcess":
        self.port = int(self._wait_for("clipserve listening on ").rsplit(":", 1)[1])
        self.address = f"127.0.0.1:{self.port}"
        self._wait_for("clipserve ready")
        http = [line for line in self.log if line.startswith("clipserve HTTP on ")]
        if http:
            self.http_port = int(http[-1].strip().rsplit(":", 1)[1])
            self.http_address = f"127.0.0.1:{self.http_port}"
        # Keep draining the server's output, or its logging blocks once the pipe is full.
        self._drain = threading.Thread(target=self._collect, daemon=True)
        self._drain.start()
        return self

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples, e.g. ``{'clipserve_items_total{code="OK",rpc="ScoreBatch"}': 12.0}``."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def items(self, rpcs: tuple[str, ...] = ("ScoreBatch", "ScoreChunks")) -> int:
        """Items this server answered (scored or failed) on any of ``rpcs`` (default: pairs,
        one per message or packed)."""
        prefix = "clipserve_items_total{"
        return int(
            sum(
                v
                for k, v in self.metrics().items()
                if k.startswith(prefix) and any(f'rpc="{rpc}"' in k for rpc in rpcs)
            )
        )

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    # Generous: a server converts each new model's towers at start-up (--runtime auto; tens of
    # seconds per model on 2 busy cores, several servers of a module starting side by side).
    # This is a guard against a hung start, not a speed claim.
    def _wait_for(self, prefix: str, timeout: float = 600.0) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.wait()}) before {prefix!r}:\n" + "".join(self.log))
            self.log.append(line)
            if line.startswith(prefix):
                return line.strip()
        raise TimeoutError(f"no {prefix!r} within {timeout}s:\n" + "".join(self.log))

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_drain"):
            self._drain.join(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="session")
def real_server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """The real server on the tiny checkpoint; may fetch from the loopback image host."""
    server = ServerProcess(["--model", str(tiny_checkpoint), "--allow-private-networks", "--fetch-timeout-s", "2"])
    yield server
    code = server.terminate()
    assert code == 0, "".join(server.log)


# A loopback download took over 1 s with two copies of the suite on the busy 2-core box: no test
# of the fake_server needs a short fetch timeout (the fetch-timeout tests use their own).
FAKE_SERVER_CONFIG = ServerConfig(max_batch_delay_ms=2.0, allow_private_networks=True, fetch_timeout_s=30.0)


@pytest.fixture(scope="session")
def fake_server() -> Iterator[InProcessServer]:
    """A server on the deterministic FakeModel that may fetch from the loopback image host."""
    server = InProcessServer(FAKE_SERVER_CONFIG, FakeModel())
    yield server
    server.stop()


@pytest.fixture()
def make_fake_server() -> Iterator:
    """Start servers with a custom config and FakeModel; all are stopped after the test."""
    started: list[InProcessServer] = []

    def start(model: FakeModel | None = None, **overrides) -> InProcessServer:
        server = InProcessServer(ServerConfig(**overrides), model or FakeModel())
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
