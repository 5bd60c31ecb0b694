"""Which servers (replicas) stand behind the address a client was given.

The SDK talks to each replica over a channel of its own and hands work to each one as it
asks for more, so that every replica is used from the first request and a faster one takes
more. (gRPC's own round_robin picks only among replicas already connected, and a stream
stays on the replica it started on: a fresh client would send a whole batch to one.)

Address forms:
- ``host:port``: one server (gRPC resolves the name and connects to one of its addresses);
- several ``host:port`` (a list, or separated by commas): one replica each;
- ``ipv4:a:p,b:p`` / ``ipv6:[a]:p,...``: one replica per address;
- ``dns:///name:port`` (e.g. a Kubernetes headless Service): one replica per address the name
  resolves to, resolved again every ``DNS_REFRESH_S`` seconds while calls run, so replicas
  that appear or go are picked up within a few seconds;
- anything else (``unix:``, ...): passed to gRPC as one server.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._config import DEFAULT_ADDRESS

DNS_REFRESH_S = 2.0

Resolver = Callable[[str, int], list[str]]


def resolve_ips(host: str, port: int) -> list[str]:
    """The host's addresses, as gRPC target strings (IPv6 in brackets)."""
    found: list[str] = []
    for family, *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family == socket.AF_INET:
            found.append(f"{sockaddr[0]}:{port}")
        elif family == socket.AF_INET6:
            found.append(f"[{sockaddr[0]}]:{port}")
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class ReplicaAddress:
    """One server: where to connect, and the name it answers to (for TLS and :authority)."""

    target: str
    authority: str | None = None  # set when ``target`` is an IP found by resolving a name
    tls_name: str | None = None


@dataclass
class _DnsName:
    host: str
    port: int
    found: list[str] = field(default_factory=list)
    error: str | None = None
    resolved_at: float = float("-inf")


def split_address(address: str | Sequence[str] | None, config_address: str | Sequence[str] | None = None) -> list[str]:
    """The address entries, from the argument, the config file, ``CLIPSERVE_ADDRESS`` or the default."""
    chosen = address or config_address or os.environ.get("CLIPSERVE_ADDRESS") or DEFAULT_ADDRESS
    parts = [chosen] if isinstance(chosen, str) else list(chosen)
    if len(parts) == 1 and parts[0].startswith(("ipv4:", "ipv6:")):
        scheme, _, rest = parts[0].partition(":")
        return [p.strip() for p in rest.split(",") if p.strip()]
    return [p.strip() for part in parts for p in part.split(",") if p.strip()]


def _dns_name(entry: str) -> tuple[str, int] | None:
    """(host, port) for a ``dns:`` target; None for any other entry."""
    if not entry.startswith("dns:"):
        return None
    rest = entry[4:]
    if rest.startswith("//"):
        rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""  # dns://authority/host:port
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{entry!r}: expected dns:///host:port")
    return host.strip("[]"), int(port)


class Discovery:
    """The current replicas of an address; thread-safe."""

    def __init__(self, entries: list[str], resolver: Resolver | None = None, refresh_s: float = DNS_REFRESH_S) -> None:
        if not entries:
            raise ValueError("no server address given")
        self.display = ",".join(entries)
        self._static: list[ReplicaAddress] = []
        self._dns: list[_DnsName] = []
        for entry in entries:
            name = _dns_name(entry)
            if name is not None:
                self._dns.append(_DnsName(*name))
            elif len(entries) > 1 and ("://" in entry or entry.startswith("unix:")):
                raise ValueError(f"{entry!r}: a list of addresses takes host:port or dns:/// entries")
            else:
                self._static.append(ReplicaAddress(entry))
        self._resolver = resolver
        self._refresh_s = refresh_s
        self._lock = threading.Lock()

    @property
    def dynamic(self) -> bool:
        return bool(self._dns)

    def replicas(self) -> list[ReplicaAddress]:
        """Every replica now (DNS names are resolved again when they are due)."""
        with self._lock:
            now = time.monotonic()
            for name in self._dns:
                if now - name.resolved_at >= self._refresh_s:
                    self._resolve(name, now)
            found = list(self._static)
            for name in self._dns:
                authority = f"{name.host}:{name.port}"
                found.extend(ReplicaAddress(ip, authority=authority, tls_name=name.host) for ip in name.found)
        return found

    def resolution_error(self) -> str | None:
        """Why a DNS name has no addresses, if one has none."""
        with self._lock:
            errors = [f"cannot resolve {n.host}: {n.error}" for n in self._dns if not n.found and n.error]
        return "; ".join(errors) or None

    def _resolve(self, name: _DnsName, now: float) -> None:
        name.resolved_at = now
        try:
            found = (self._resolver or resolve_ips)(name.host, name.port)
        except OSError as exc:
            # Keep the last answer: a DNS hiccup must not empty the replica set mid-run.
            name.error = str(exc)
            return
        name.found, name.error = found, None


class Replicas:
    """A channel and stub per replica, made on first use and kept for the client's life."""

    def __init__(
        self, discovery: Discovery, open_channel: Callable[[ReplicaAddress], Any], make_stub: Callable[[Any], Any]
    ) -> None:
        self.discovery = discovery
        self._open_channel = open_channel
        self._make_stub = make_stub
        self._open: dict[ReplicaAddress, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self._next = random.randrange(1 << 16)  # clients started together do not all pick the same first

    def current(self) -> list[ReplicaAddress]:
        return self.discovery.replicas()

    def stub(self, replica: ReplicaAddress) -> Any:
        with self._lock:
            if replica not in self._open:
                channel = self._open_channel(replica)
                self._open[replica] = (channel, self._make_stub(channel))
            return self._open[replica][1]

    def rotate(self) -> list[ReplicaAddress]:
        """The replicas, starting one further along on each call (unary calls spread)."""
        found = self.current()
        if not found:
            return found
        with self._lock:
            self._next = (self._next + 1) % len(found)
            start = self._next
        return found[start:] + found[:start]

    def channels(self) -> list[Any]:
        with self._lock:
            channels = [channel for channel, _ in self._open.values()]
            self._open.clear()
        return channels
