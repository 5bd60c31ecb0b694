"""Keeping image fetches off loopback, private and link-local networks (SSRF guard).

A host is judged exactly as the HTTP client will use it: ``target`` parses a URL as aiohttp
does (yarl: IDNA/NFKC, so fullwidth digits and ideographic full stops become an IP literal),
and a literal IP, in any spelling the client or the C library would connect to (``127.1``,
``0x7f.1``, ``2130706433``), is judged as the address it is. A name is checked on the addresses
it actually resolves to, inside the resolver the client connects with, so a name that resolves
differently on a second lookup (DNS rebinding) cannot slip through. Whatever the path, the
connector's socket factory vets the address of every connection it opens (every request,
every redirect hop): what no earlier check saw is still refused there.

IPv6 addresses that carry an IPv4 address (IPv4-mapped and -compatible, NAT64, 6to4) are
judged as the IPv4 address they carry; Teredo and local-use NAT64 are never public.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a network's own translator
_TEREDO = ipaddress.ip_network("2001::/32")  # a relay delivers it to whatever the client is
# A DNS name as resolvers take it: labels of letters, digits, '-' and '_' (IDNA already applied).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MAX_NAME = 253


class ForbiddenAddressError(OSError):
    """A URL's host is (or resolves to) an address the server may not fetch from. ``address``
    is what was refused, for the log: never told to the caller for a name (it would say where
    an internal name points)."""

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message)
        self.address = address


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that carry one."""
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d (IPv4-compatible, deprecated), not :: or ::1
        return ipaddress.IPv4Address(int(ip))
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour  # 2002:aabb:ccdd::/48


def is_forbidden(address: str) -> bool:
    """True for anything that is not a public unicast address.

    ``is_global`` is false for loopback, RFC 1918 private, link-local (169.254/16, incl. cloud
    metadata), carrier-grade NAT, unique-local IPv6, unspecified and reserved ranges.
    """
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64 or ip in _TEREDO:
            return True
        ip = embedded_ipv4(ip) or ip
    return not ip.is_global or ip.is_multicast


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as inet_aton reads it (what getaddrinfo connects to): one to four parts,
    each decimal, octal (leading 0) or hex (0x), the last filling the remaining bytes."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        try:
            if part[:2] in ("0x", "0X"):
                values.append(int(part[2:], 16) if part[2:] else 0)
            elif len(part) > 1 and part[0] == "0":
                values.append(int(part, 8))
            elif part.isdigit() and part.isascii():
                values.append(int(part))
            else:
                return None
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def literal_ip(host: str) -> str | None:
    """The host as an IP address string if it is a literal IP in any spelling, else None.
    ``host`` is the host as the HTTP client has it (``target(url).raw_host``)."""
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(candidate.split("%", 1)[0]))
    except ValueError:
        legacy = _legacy_ipv4(candidate[:-1] if candidate.endswith(".") else candidate)
        return str(legacy) if legacy is not None else None


def describe_address(ip: str, host: str) -> str:
    """A literal address for an error message: as written when not canonical, and the IPv4
    address an IPv6 one carries (``::ffff:7f00:1 (127.0.0.1)``)."""
    parts = [] if ip == host.strip("[]") else [repr(host[:80])]
    address = ipaddress.ip_address(ip)
    carried = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if carried is not None:
        parts.append(f"it carries {carried}")
    return ip + (f" ({', '.join(parts)})" if parts else "")


def valid_name(host: str) -> bool:
    """A host name a resolver can look up (after IDNA): anything else fails as invalid input
    instead of being sent to DNS, retried and failed as a connection error."""
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= _MAX_NAME and all(_LABEL.fullmatch(label) for label in name.split("."))


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
            # Says what was refused, not where the name points: that stays in the log.
            raise ForbiddenAddressError(f"{host} resolves to a non-public address", address=forbidden[0])
        return results

    def is_forbidden(self, address: str) -> bool:
        return self._forbidden(address)

    def socket_factory(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """The connector's socket factory: refuses to open a connection to a forbidden address,
        whichever way the address came (a literal the client normalised, a resolver, a pooled
        lookup), for every request and redirect hop."""
        family, type_, proto, _, sockaddr = addr_info
        if self._forbidden(str(sockaddr[0])):
            raise ForbiddenAddressError("refused to connect to a non-public address", address=str(sockaddr[0]))
        return socket.socket(family=family, type=type_, proto=proto)

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
