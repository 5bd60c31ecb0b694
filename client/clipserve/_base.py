"""What the sync and aio clients share: settings, the channel, the retry decision."""

from __future__ import annotations

from pathlib import Path

import grpc

from ._channel import Connection, PemSource, resolve_address, static_target_size
from ._config import DEFAULT_COL_NAME, load_client_config
from ._requests import DEFAULT_MAX_UPLOAD_BYTES
from ._retry import RETRYABLE_CODES, Deadline, RetryPolicy


class ClientBase:
    """Scores (query, image) pairs on a remote clipserve server (``CLIP``, ``AsyncCLIP``).

    Args:
        address: ``host:port`` of the server, any gRPC target (e.g. ``dns:///svc:50051``,
            whose replicas round_robin spreads calls over), or several ``host:port`` (a list
            or comma-separated) to spread over those. Defaults to ``[similarity_config].address``
            from ``config``, then the ``CLIPSERVE_ADDRESS`` environment variable, then
            ``localhost:50051``.
        config: Path to a config.toml whose ``[similarity_config]`` table has ``address``
            (and ``col_name``, the score column for file scoring).
        timeout: Total seconds allowed for one ``score`` or ``score_batch`` call, retries
            included. None waits as long as it takes.
        max_in_flight: Items ``score_batch`` keeps outstanding; enough to fill the server's
            batches without queueing the whole input on the server.
        streams: Parallel ScoreBatch streams per ``score_batch``. Load balancing is per call,
            so each replica needs a stream of its own: the default is the number of addresses
            given (1 for a single server); with a ``dns:///`` name, set it to at least the
            number of replicas.
        retry: When to retry UNAVAILABLE / RESOURCE_EXHAUSTED (see ``RetryPolicy``).
        progress: Show a tqdm progress bar in ``score_batch`` by default.
        tls, root_certificates, certificate_chain, private_key, auth_token: how to reach a
            server that uses TLS, mutual TLS or a bearer token (see ``Connection``).
        max_upload_bytes: local files larger than this fail locally with INVALID_ARGUMENT
            instead of being sent (match the server's ``--max-image-bytes``).

    Use it as a context manager, or call ``close()``, to release the connection.
    """

    def __init__(
        self,
        address: str | list[str] | None = None,
        *,
        config: str | Path | None = None,
        timeout: float | None = None,
        max_in_flight: int = 256,
        streams: int | None = None,
        retry: RetryPolicy | None = None,
        progress: bool = False,
        tls: bool = False,
        root_certificates: PemSource = None,
        certificate_chain: PemSource = None,
        private_key: PemSource = None,
        auth_token: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        file_config = load_client_config(config) if config is not None else None
        self.address = resolve_address(address, file_config.address if file_config else None)
        self.connection = Connection(self.address, tls, root_certificates, certificate_chain, private_key, auth_token)
        self.max_upload_bytes = max_upload_bytes
        self.col_name = file_config.col_name if file_config else DEFAULT_COL_NAME
        self.timeout = timeout if timeout is not None else (file_config.timeout if file_config else None)
        self.streams = streams if streams is not None else static_target_size(self.address)
        if max_in_flight < 1 or self.streams < 1:
            raise ValueError("max_in_flight and streams must be at least 1")
        self.max_in_flight = max_in_flight
        self.retry = retry or RetryPolicy()
        self.progress = progress
        self._metadata = self.connection.metadata
        self._open()

    def _open(self) -> None:
        """Create the channel and stub (sync or aio)."""
        raise NotImplementedError

    def _retry_pause(self, code: grpc.StatusCode, attempt: int, deadline: Deadline) -> float | None:
        """Seconds to wait before the next attempt, or None when the failure is final."""
        if code not in RETRYABLE_CODES or attempt >= self.retry.max_attempts:
            return None
        pause = self.retry.backoff(attempt)
        remaining = deadline.remaining()
        if remaining is not None and remaining <= pause:
            return None
        return pause
