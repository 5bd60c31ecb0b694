"""The synchronous SDK: ``CLIP`` mirrors the in-process adapter's ``score`` / ``score_batch``
and adds ``embed_texts`` / ``embed_images``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from ._base import ClientBase, UnaryAttempts
from ._chunks import Packer, answers
from ._errors import ClipServeError
from ._info import ModelInfo, ModelList
from ._replicas import Replicas
from ._run import STOP, Lane, Run, Take
from ._types import EmbeddingResult, SimilarityInput, SimilarityResult
from .v1 import scorer_pb2, scorer_pb2_grpc

_POLL_S = 0.25  # how often waiting threads look again, besides being woken by changes
_CLOSE_S = 2.0  # how long finished streams get to close cleanly before they are cancelled


class CLIP(ClientBase):
    """Scores (query, image) pairs and embeds texts and images on remote clipserve servers,
    from any thread (``AsyncCLIP`` is its asyncio twin).

    Args:
        address: ``host:port`` of the server; several (a list, or separated by commas) to
            spread the work over; or ``dns:///name:port`` for every address the name resolves
            to (a Kubernetes headless Service), looked up again every two seconds while calls
            run. Defaults to the ``CLIPSERVE_ADDRESS`` environment variable, then
            ``localhost:50051``.
        config: Path to the benchmark maker's config.toml, for ``[similarity_config].col_name``
            (the score column of file scoring).
        timeout: Total seconds allowed for one call, retries included. None: no limit.
        max_in_flight: Most items a batch call keeps outstanding on each server. By default
            (None) as many as the server reads ahead of its answers (its
            ``--stream-max-in-flight``, which it tells each stream; 256 for servers that do
            not): enough to keep its batches full without queueing the whole input there.
            Each server starts with 16 and gets one more per answer, so that a short batch
            still reaches every server.
        retry: When to retry UNAVAILABLE / RESOURCE_EXHAUSTED, and for how long to wait for a
            server that cannot be reached (see ``RetryPolicy``; by default 30 s).
        progress: Show a tqdm progress bar in batch calls by default.
        tls: Use TLS (implied by any of the PEM arguments).
        root_certificates: CA bundle that signed the server's certificate (PEM bytes or
            path); None with ``tls=True`` uses the system roots.
        certificate_chain: The client certificate, for mutual TLS (PEM bytes or path).
        private_key: The client certificate's key, for mutual TLS (PEM bytes or path).
        auth_token: Sent as ``authorization: Bearer <token>``; defaults to
            ``CLIPSERVE_AUTH_TOKEN``.
        max_upload_bytes: local files larger than this fail locally with INVALID_ARGUMENT
            instead of being sent (match the server's ``--max-image-bytes``).
        model: which of the server's models to use (``list_models()``); "" is its default.

    Use it as a context manager, or call ``close()``, to release the connections.
    """

    def _open(self) -> None:
        self._replicas = Replicas(self.discovery, self.connection.channel, scorer_pb2_grpc.ScorerStub)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connections to every replica."""
        for channel in self._replicas.channels():
            channel.close()

    def __enter__(self) -> "CLIP":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- API -------------------------------------------------------------------------------
    def score(self, query: str, image_url: str) -> float:
        """The score of one pair; raises ClipServeError (with ``.code``) when it has none."""
        return self._unary(lambda stub: stub.Score, self._score_request(query, image_url)).score

    def model_info(self, model: str | None = None) -> ModelInfo:
        """The model (this client's unless ``model`` names another), device, dtype, batching
        limits and cache statistics, and which replica answered (``replica``); the message
        itself is its ``.proto``."""
        request = scorer_pb2.GetModelInfoRequest(model=self.model if model is None else model)
        return ModelInfo.from_proto(self._unary(lambda stub: stub.GetModelInfo, request))

    def list_models(self) -> ModelList:
        """Every model the server holds, and which one is its default."""
        return ModelList.from_proto(self._unary(lambda stub: stub.ListModels, scorer_pb2.ListModelsRequest()))

    def score_batch(
        self, inputs: Iterable[SimilarityInput | tuple[str, str] | dict[str, Any]], *, progress: bool | None = None
    ) -> list[SimilarityResult]:
        """Score every pair; one result per input, in input order.

        Pairs are spread over every replica of the address, each taking more as it answers
        (as many outstanding per replica as it reads ahead, at most ``max_in_flight``). A
        pair that fails gets ``score=None`` and ``error`` set; it never aborts the others. If a
        stream breaks (server restart, overload, a replica gone), its unanswered pairs go to
        the others. Local files cross the network once per server (docs/sdk.md, "What
        crosses the wire for local files").
        """
        return self._batch(self._score_job(inputs), progress)

    def embed_texts(
        self, texts: Iterable[str], *, raw: bool = False, progress: bool | None = None
    ) -> list[EmbeddingResult]:
        """The embedding of each text, in order: unit length (what scoring uses) unless
        ``raw``, which gives the model's own unnormalised text features."""
        return self._batch(self._embed_job(texts, images=False, raw=raw), progress)

    def embed_images(
        self, images: Iterable[str], *, raw: bool = False, progress: bool | None = None
    ) -> list[EmbeddingResult]:
        """The embedding of each image (URL, local path or ``file://`` URL), in order; unit
        length unless ``raw``. Local files are uploaded as in ``score_batch``."""
        return self._batch(self._embed_job(images, images=True, raw=raw), progress)

    # -- internals -------------------------------------------------------------------------
    def _unary(self, method: Callable[[Any], Any], request: Any) -> Any:
        attempts = UnaryAttempts(self, self._replicas.rotate())
        while True:
            stub = self._replicas.stub(attempts.replica())
            try:
                return method(stub)(request, timeout=attempts.deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                time.sleep(attempts.failed(ClipServeError.from_rpc_error(exc)))

    def _batch(self, job: Any, progress: bool | None) -> list[Any]:
        run = self._run(job, progress)
        workers: list[threading.Thread] = []
        try:
            while not run.done:
                replicas = self._replicas.current()
                for lane in run.sync_replicas(replicas):
                    worker = threading.Thread(
                        target=self._work, args=(run, lane), name=f"clipserve-{lane.replica.target}", daemon=True
                    )
                    worker.start()
                    workers.append(worker)
                run.check(None if replicas else self.discovery.resolution_error())
                run.wait(_POLL_S)
        finally:
            # Done: every stream half-closes and ends by itself; give up on that after a moment.
            deadline = time.monotonic() + (_CLOSE_S if run.done else 0.0)
            for worker in workers:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
            run.cancel()
            run.close()
            for worker in workers:
                worker.join(timeout=10)
        return run.in_order()

    def _work(self, run: Run[Any], lane: Lane) -> None:
        """One replica's worker: a stream at a time, pausing between failed ones."""
        stub = self._replicas.stub(lane.replica)
        while (pause := run.before_stream(lane)) is not None:
            if pause > 0:
                time.sleep(min(pause, _POLL_S))  # not run.wait: every answer elsewhere would wake it
                continue
            run.stream_ended(lane, self._stream(run, lane, stub))

    def _stream(self, run: Run[Any], lane: Lane, stub: scorer_pb2_grpc.ScorerStub) -> ClipServeError | None:
        """One stream to the lane's replica, sending what the run hands it; returns the error
        that ended it, or None."""
        stream, chunked = lane.stream, lane.chunked
        packer = Packer(run.job.chunk if chunked else None)

        def requests() -> Iterator[Any]:
            # Runs on a gRPC thread: blocks here, not on the server, when the window is full,
            # and sends what it has packed as soon as nothing more is ready.
            while True:
                take = run.take(lane, stream) if packer else run.take_blocking(lane, stream, _POLL_S)
                if not isinstance(take, Take):  # STOP or WAIT
                    yield from packer.flush()
                    if take is STOP:
                        return
                    continue
                try:
                    request = self._build(run, lane, take)
                except ClipServeError as exc:
                    run.fail_item(lane, take.index, exc)
                    continue
                yield from packer.add(request)

        call = getattr(stub, run.rpc(lane))(requests(), timeout=run.deadline.remaining(), metadata=self._metadata)
        run.attach(lane, call)
        try:
            run.stream_opened(lane, stream, call.initial_metadata())  # sent before any answer
            for response in call:
                run.answer(lane, answers(response, chunked))
        except grpc.RpcError as exc:
            return ClipServeError.from_rpc_error(exc)
        finally:
            call.cancel()
        return None
