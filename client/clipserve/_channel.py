"""How the SDK reaches a server: address, TLS material and bearer token, for sync and aio."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ._replicas import ReplicaAddress

# Large enough for big uploads; the server enforces its own (configurable) limit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

PemSource = bytes | str | Path | None


def _pem(source: PemSource) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def channel_options(replica: ReplicaAddress) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # A server that went away is tried again within two seconds, not gRPC's default of up
        # to two minutes: a restarted replica takes work again almost at once.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if replica.authority is not None:
        options.append(("grpc.default_authority", replica.authority))
    if replica.tls_name is not None:
        # Connected by IP (one of a DNS name's replicas): the certificate names the host.
        options.append(("grpc.ssl_target_name_override", replica.tls_name))
    return options


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to authenticate to it.

    Args:
        address: what the client was given, for messages (``_replicas`` says how it is split).
        tls: use TLS (implied by any of the PEM arguments).
        root_certificates: CA bundle that signed the server's certificate (PEM bytes or path);
            None with ``tls=True`` uses the system roots.
        certificate_chain, private_key: the client certificate for mutual TLS.
        auth_token: sent as ``authorization: Bearer <token>``; defaults to ``CLIPSERVE_AUTH_TOKEN``.
    """

    address: str
    tls: bool = False
    root_certificates: PemSource = None
    certificate_chain: PemSource = None
    private_key: PemSource = None
    auth_token: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls or any(
            x is not None for x in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        token = self.auth_token or os.environ.get("CLIPSERVE_AUTH_TOKEN")
        return (("authorization", f"Bearer {token}"),) if token else None

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            _pem(self.root_certificates), _pem(self.private_key), _pem(self.certificate_chain)
        )

    def channel(self, replica: ReplicaAddress) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(replica.target, self._credentials(), options=channel_options(replica))
        return grpc.insecure_channel(replica.target, options=channel_options(replica))

    def aio_channel(self, replica: ReplicaAddress) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(replica.target, self._credentials(), options=channel_options(replica))
        return grpc.aio.insecure_channel(replica.target, options=channel_options(replica))
