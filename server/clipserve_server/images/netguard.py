"""Keeping image fetches off loopback, private and link-local networks (SSRF guard).

The check runs on the addresses a hostname actually resolves to, inside the resolver the HTTP
client connects with, so a name that resolves differently on a second lookup (DNS rebinding)
cannot slip through; every redirect hop goes through the same resolver.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver


class ForbiddenAddressError(OSError):
    """A URL's host is (or resolves to) an address the server may not fetch from."""


def is_forbidden(address: str) -> bool:
    """True for anything that is not a public unicast address.

    ``is_global`` is false for loopback, RFC 1918 private, link-local (169.254/16, incl. cloud
    metadata), carrier-grade NAT, unique-local IPv6, unspecified and reserved ranges.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def literal_ip(host: str) -> str | None:
    """The host as an IP address string if it is a literal IP, else None."""
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(candidate.split("%", 1)[0]))
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves like ``inner`` (aiohttp's default resolver), then refuses forbidden addresses.

    The connector connects only to the addresses returned here, so what was checked is what
    is used.
    """

    def __init__(self, inner: AbstractResolver | None = None, forbidden: Callable[[str], bool] = is_forbidden) -> None:
        self._inner = inner  # the default one needs a running loop: made on first use
        self._forbidden = forbidden

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        if self._inner is None:
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        forbidden = [r["host"] for r in results if self._forbidden(r["host"])]
        if forbidden:
            raise ForbiddenAddressError(f"{host} resolves to a non-public address ({forbidden[0]})")
        return results

    def is_forbidden(self, address: str) -> bool:
        return self._forbidden(address)

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
