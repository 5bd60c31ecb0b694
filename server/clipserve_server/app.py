"""Assembling and running the server: gRPC, health, reflection, model loading, shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
from clipserve.v1 import scorer_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from .images.decode_pool import Decoder, build_decoder
from .images.fetch import FetchSettings, ImageFetcher
from .inference.engine import ScoringEngine
from .inference.instances import Instance, InstancePool
from .models.devices import Device, resolve_devices
from .models.memory import check_fits
from .models.model import EmbeddingModel
from .serving import oip_messages
from .serving.open_inference import InferenceModels, OpenInferenceServicer, add_open_inference_to_server
from .serving.drain import InFlightCalls
from .serving.http.app import HttpFace
from .serving.registry import ModelRegistry
from .serving.security import interceptors, server_credentials
from .serving.servicer import ScorerServicer, add_scorer_to_server
from .utils.config import ModelSpec, ServerConfig
from .utils.metrics import Metrics
from .utils.threads import model_thread_setup

log = logging.getLogger(__name__)

# Objects allocated (net) between collections of the youngest generation, once serving: see start().
_YOUNG_GENERATION = 10_000

SCORER_SERVICE = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Health answers for the whole server ("") and for each service that scores.
_SCORING_SERVICES = ("", SCORER_SERVICE, oip_messages.SERVICE)
ModelFactory = Callable[[ModelSpec, ServerConfig], EmbeddingModel]


def load_configured_model(spec: ModelSpec, config: ServerConfig) -> EmbeddingModel:
    from .models.loading import load_model

    return load_model(spec, config)


class ModelLoadError(RuntimeError):
    """Loading one of the configured models failed; ``__cause__`` says why."""

    def __init__(self, spec: ModelSpec, device: str = "") -> None:
        super().__init__(
            f"could not load the model {spec.name!r} ({spec.source})" + (f" on {device}" if device else "")
        )
        self.spec = spec


def _sharing_the_device(forward: Callable, slots: threading.Semaphore) -> Callable:
    """A model's forward that waits for a free slot of its device: with several models, a
    device runs as many forwards at once as ``--instances``, whichever models they are for."""

    def shared(texts: list, images: list) -> Any:
        with slots:
            return forward(texts, images)

    return shared


class ClipServer:
    """One server: listens at once, answers health NOT_SERVING until the model is warm."""

    def __init__(self, config: ServerConfig, model_factory: ModelFactory = load_configured_model) -> None:
        self.config = config
        self._model_factory = model_factory
        self._registry = ModelRegistry([spec.name for spec in config.models], config.default_model)
        self._decoder: Decoder | None = None
        self._fetcher: ImageFetcher | None = None
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._in_flight = InFlightCalls()
        self._loader: asyncio.Task | None = None
        self.metrics = Metrics(host_labels=config.metrics_host_labels)
        self.port: int | None = None
        self._http: HttpFace | None = None
        self.http_port: int | None = None  # the HTTP face's bound port; None when --http-port off

    async def start(self) -> int:
        """Bind and start serving; the model loads in the background. Returns the port."""
        mib = 1024 * 1024
        credentials = server_credentials(self.config)
        self._server = grpc.aio.server(
            interceptors=[self._in_flight, *interceptors(self.config)],
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_mb * mib),
                ("grpc.max_send_message_length", 4 * mib),
                # gRPC shares a port between processes by default; a second server started on
                # a busy port by mistake should fail, not silently take half the traffic.
                ("grpc.so_reuseport", 0),
            ]
        )
        add_scorer_to_server(
            ScorerServicer(
                self._registry, stream_max_in_flight=self.config.resolved_stream_max_in_flight, metrics=self.metrics
            ),
            self._server,
            max_items_per_message=self.config.max_items_per_message,
        )
        alias = self.config.resolved_v2_alias
        if self.config.v2_alias and not alias:
            log.warning(
                "a model is named %r, so the Open Inference Protocol "
                "serves it under that name with the batch signature; "
                "set --v2-alias to another name for the Triton CLIP signature",
                self.config.v2_alias,
            )
        inference_models = InferenceModels(self._registry, alias=alias, max_items=self.config.max_items_per_message)
        add_open_inference_to_server(OpenInferenceServicer(inference_models, metrics=self.metrics), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        # From one pool that holds every service's schema, the protocol's private one included
        # (oip_messages: it cannot be in the default pool).
        schemas = oip_messages.pool(
            *(module.DESCRIPTOR.serialized_pb for module in (scorer_pb2, health_pb2, reflection_pb2))
        )
        reflection.enable_server_reflection(
            (SCORER_SERVICE, oip_messages.SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server, pool=schemas
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        self._registry.replica = self.config.replica_name or f"{socket.gethostname()}:{self.port}"
        await self._server.start()
        log.info("listening on %s:%d", self.config.host, self.port)
        http_port = self.config.resolved_http_port
        if http_port is not None:
            self._http = HttpFace(self._registry, inference_models, self.config, self.metrics)
            self.http_port = await self._http.start(http_port)
            log.info("HTTP on %s:%d", self.config.host, self.http_port)
        if self.config.metrics_port:
            self.metrics.serve(self.config.host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.config.metrics_port)
        self._loader = asyncio.ensure_future(self._load())
        return self.port

    async def wait_ready(self) -> None:
        """Return once the model is loaded and warm; raise if loading failed."""
        assert self._loader is not None, "start() first"
        await asyncio.shield(self._loader)

    async def _load(self) -> None:
        """Load every model on every device (refusing at once a set that cannot fit), then serve
        them all."""
        specs = self.config.models
        await asyncio.get_running_loop().run_in_executor(None, check_fits, specs, self.config)
        devices = resolve_devices(self.config.device)
        loaded: list[list[EmbeddingModel]] = []  # per model, one per device: weights once per device
        for spec in specs:
            loaded.append([await self._load_one(spec, device, len(devices) > 1) for device in devices])
        # One decode pool for every model (preprocessing does not depend on the device; with
        # --gpu-decode, images land on the first device and move with their batch).
        instances = self.config.instances
        cpu_threads = model_thread_setup(share=instances * sum(device.is_cpu for device in devices))
        gpu_threads = model_thread_setup()  # both before any decode thread has run: the process's threads
        self._decoder = build_decoder([models[0] for models in loaded], self.config, self.metrics)
        await self._decoder.start()
        # One fetcher for every model: one count of each host's connections.
        self._fetcher = ImageFetcher(FetchSettings.of(self.config), events=self.metrics)
        await self._fetcher.start()
        slots = {device.name: threading.BoundedSemaphore(instances) for device in devices}
        for job, (spec, models) in enumerate(zip(specs, loaded)):
            pool = InstancePool([
                Instance(
                    device.name,
                    index,
                    model.forward if len(specs) == 1 else _sharing_the_device(model.forward, slots[device.name]),
                    cpu_threads if device.is_cpu else gpu_threads,
                    prepare=model.prepare_texts,
                )
                for device, model in zip(devices, models)
                for index in range(instances)
            ])
            engine = ScoringEngine(
                models[0],
                self.config,
                decoder=self._decoder.for_job(job),
                on_dead=self._engine_died,
                on_alive=self._engine_recovered,
                metrics=self.metrics,
                name=spec.name,
                instances=pool,
                fetcher=self._fetcher,
            )
            await engine.start()
            self._registry.add(spec.name, engine)
            d = models[0].description
            log.info(
                "serving %s as %r on %s (%s, %s), embedding dim %d, %d instance(s) per device",
                d.model_id, spec.name, engine.device, d.dtype, d.backend, d.embedding_dim, instances,
            )
        self.metrics.attach(self._registry.engines)
        # What is loaded by now (torch, transformers, the models: millions of objects) lives as
        # long as the process. Frozen, it is out of the cyclic collector's sight: otherwise every
        # full collection, triggered by the garbage of ordinary traffic, walks all of it on the
        # event loop (measured: 0.27 s per full collection with a small model loaded, one in about eight warm
        # passes of 1000 pairs).
        gc.collect()
        gc.freeze()
        # Traffic keeps thousands of small objects alive at once (a callback and a response
        # message per pair in flight): at the default 700 the youngest generation was collected ~370 times
        # in a cold pass of 10,000 pairs, re-scanning what was in flight each time (~12% of
        # the event loop's CPU). A young generation of 10,000 costs a few collections a pass.
        gc.set_threshold(_YOUNG_GENERATION, *gc.get_threshold()[1:])
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _load_one(self, spec: ModelSpec, device: Device, several: bool) -> EmbeddingModel:
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(
                None, self._model_factory, spec, replace(self.config, device=device.torch)
            )
            await loop.run_in_executor(None, model.warmup)
        except Exception as exc:
            raise ModelLoadError(spec, device.name if several else "") from exc
        return model

    def _engine_died(self, exc: BaseException) -> None:
        # Health must never claim SERVING for a server that cannot score.
        asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    def _engine_recovered(self) -> None:
        # A wedged forward finished after all: SERVING again once every model can score.
        if not self._registry.closing and all(engine.alive for _, engine in self._registry.engines()):
            asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.SERVING))

    async def _set_health(self, status: int) -> None:
        for service in _SCORING_SERVICES:
            await self._health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` seconds, then stop."""
        grace = self.config.grace_period_s if grace is None else grace
        self._registry.closing = True
        await self._health.enter_graceful_shutdown()
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        # The HTTP face stops listening at once; its requests in flight finish within the grace.
        http_stopped = asyncio.ensure_future(self._http.stop()) if self._http is not None else None
        if self._server is not None:
            # The calls in flight finish while new ones are still answered UNAVAILABLE (drain.py).
            started = time.monotonic()
            await self._in_flight.wait_idle(grace)
            await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        if http_stopped is not None:
            await http_stopped
        for _, engine in self._registry.engines():
            await engine.stop()
        if self._fetcher is not None:
            await self._fetcher.close()
        if self._decoder is not None:
            await self._decoder.close()


async def run(config: ServerConfig, model_factory: ModelFactory = load_configured_model) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code."""
    server = ClipServer(config, model_factory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0
    try:
        try:
            port = await server.start()
        except (ValueError, OSError, RuntimeError) as exc:  # bad TLS/token files, port in use
            print(f"clipserve serve: cannot start: {exc}", file=sys.stderr, flush=True)
            return 2
        # A line tools can wait for (tests start the server with --port 0 and read it).
        print(f"clipserve listening on {config.host}:{port}", flush=True)
        if server.http_port is not None:
            print(f"clipserve HTTP on {config.host}:{server.http_port}", flush=True)
        ready = asyncio.ensure_future(server.wait_ready())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is not None:
            from .models.load_errors import explain

            error = ready.exception()
            # One line that says what to do; the library traceback only for --log-level debug.
            if isinstance(error, ModelLoadError) and error.__cause__ is not None:
                message = explain(error.spec.source, error.__cause__)
                if len(config.models) > 1:
                    message = f"[{error.spec.name}] {message}"
            else:
                message = str(error)  # e.g. ModelsTooLarge: already says what to do
            log.error("%s", message, exc_info=error if log.isEnabledFor(logging.DEBUG) else None)
            exit_code = 1
        else:
            if ready.done():
                print("clipserve ready", flush=True)
            await stopped
            log.info("shutting down (grace %.1fs)", config.grace_period_s)
    finally:
        await server.stop()
    return exit_code
