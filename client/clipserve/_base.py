"""What the sync and aio clients share: settings, replicas, requests, the retry decisions."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from ._channel import Connection, PemSource
from ._config import DEFAULT_COL_NAME, load_client_config
from ._errors import ClipServeError
from ._jobs import EmbedJob, Image, Job, ScoreJob, check_text, coerce_input, local_path
from ._replicas import Discovery, ReplicaAddress, split_address
from ._retry import RETRYABLE_CODES, Deadline, RetryPolicy
from ._run import ClientStats, Lane, Run, Take, unreachable
from ._types import SimilarityInput
from ._uploads import FileDigests, Send
from ._wire import DEFAULT_MAX_IMAGE_BYTES
from .v1 import scorer_pb2

log = logging.getLogger("clipserve")


class ClientBase:
    """What ``CLIP`` and ``AsyncCLIP`` share: the constructor (documented on ``CLIP``), the
    connection and replicas, the retry policy, and building each call's requests and jobs."""

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        config: str | Path | None = None,
        timeout: float | None = None,
        max_in_flight: int | None = None,
        retry: RetryPolicy | None = None,
        progress: bool = False,
        tls: bool = False,
        root_certificates: PemSource = None,
        certificate_chain: PemSource = None,
        private_key: PemSource = None,
        auth_token: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        model: str = "",
    ) -> None:
        file_config = load_client_config(config) if config is not None else None
        self.discovery = Discovery(split_address(address, file_config.address if file_config else None))
        self.address = self.discovery.display
        self.connection = Connection(self.address, tls, root_certificates, certificate_chain, private_key, auth_token)
        self.col_name = file_config.col_name if file_config else DEFAULT_COL_NAME
        self.timeout = timeout if timeout is not None else (file_config.timeout if file_config else None)
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.retry = retry or RetryPolicy()
        self.progress = progress
        self.model = model
        self.digests = FileDigests(max_upload_bytes)
        self._metadata = self.connection.metadata
        self._stats = ClientStats()
        self._stats_lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        """Create the replica channels (sync or aio)."""
        raise NotImplementedError

    def stats(self) -> ClientStats:
        """Answers per replica, image bytes uploaded, resends and hedges, over this client's life."""
        with self._stats_lock:
            stats = copy.deepcopy(self._stats)
        stats.hashed_bytes, stats.hash_seconds = self.digests.hashed_bytes, self.digests.hash_seconds
        return stats

    # -- building requests -----------------------------------------------------------------
    def _score_job(self, inputs: Iterable[SimilarityInput | tuple[str, str] | dict[str, Any]]) -> ScoreJob:
        return ScoreJob([coerce_input(x) for x in inputs], model=self.model)

    def _embed_job(self, inputs: Iterable[str], *, images: bool, raw: bool) -> EmbedJob:
        return EmbedJob(list(inputs), images=images, raw=raw, model=self.model)

    def _run(self, job: Job[Any], progress: bool | None, on_change: Any = None) -> Run[Any]:
        return Run(
            job,
            address=self.address,
            max_in_flight=self.max_in_flight,
            retry=self.retry,
            timeout=self.timeout,
            stats=self._stats,
            stats_lock=self._stats_lock,
            progress=self.progress if progress is None else progress,
            on_change=on_change,
        )

    def _build(self, run: Run[Any], lane: Lane, take: Take) -> Any:
        """The wire request for ``take`` on ``lane``. May block (hashing or reading a local
        file): the sync client calls it on its stream threads, the aio one in a thread."""
        ref = run.job.image_ref(take.index)
        path = local_path(ref) if ref is not None else None
        if path is None:
            return run.job.request(take.index, Image(url=ref) if ref is not None else None)
        file = self.digests.get(path)
        send = take.resend or Send.HASH  # the server holds it already, or asks for the bytes
        request = run.job.request(take.index, Image(file=file, send=send))
        run.sending_file(lane, take.index, file.sha256, send, file.size)
        return request

    def _needs_thread(self, run: Run[Any], take: Take) -> bool:
        ref = run.job.image_ref(take.index)
        return ref is not None and local_path(ref) is not None

    def _score_request(self, query: str, image_url: str) -> scorer_pb2.ScoreRequest:
        """A unary Score request: a local file goes with its bytes (one round trip)."""
        check_text("query", query)
        check_text("image_url", image_url)
        request = scorer_pb2.ScoreRequest(query=query, model=self.model)
        path = local_path(image_url)
        if path is None:
            request.image_url = image_url
        else:
            file = self.digests.get(path)
            request.image_sha256 = file.sha256
            request.image_bytes = file.read()
        return request


class UnaryAttempts:
    """The retry loop of one unary call: which replica to try next, how long to pause, and
    when to give up; the sync and aio clients each do the calling and sleeping."""

    def __init__(self, client: ClientBase, replicas: list[ReplicaAddress]) -> None:
        self._client = client
        self._replicas = replicas
        self.deadline = Deadline(client.timeout)
        self._started = time.monotonic()
        self._attempts = 0
        self._warned = False

    def replica(self) -> ReplicaAddress:
        if not self._replicas:
            why = self._client.discovery.resolution_error() or "no address to connect to"
            raise ClipServeError(
                grpc.StatusCode.UNAVAILABLE, f"cannot reach the server at {self._client.address}: {why}"
            )
        return self._replicas[self._attempts % len(self._replicas)]

    def failed(self, error: ClipServeError) -> float:
        """Seconds to pause before the next attempt; raises when ``error`` is final."""
        if error.code not in RETRYABLE_CODES:
            raise error
        self._attempts += 1
        policy = self._client.retry
        waited = time.monotonic() - self._started
        # The last attempt is made when max_wait is up, not a whole backoff after it.
        pause = min(policy.backoff(self._attempts), max(0.0, policy.max_wait - waited))
        remaining = self.deadline.remaining()
        if policy.exhausted(self._attempts, waited) or (remaining is not None and remaining <= pause):
            raise unreachable(self._client.address, error, waited)
        if not self._warned and error.code == grpc.StatusCode.UNAVAILABLE:
            self._warned = True
            limit = min(policy.max_wait - waited, remaining if remaining is not None else policy.max_wait)
            log.warning(
                "clipserve: waiting up to %.0fs for the server at %s: %s", limit, self._client.address, error.details
            )
        return pause
