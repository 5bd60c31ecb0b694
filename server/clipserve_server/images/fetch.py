"""Downloading images over HTTP(S): pooled connections, a size cap, a guard, retries, politeness.

Redirects are followed by hand so that every hop's scheme and address is checked, and so that a
``--fetch-header`` reaches only the host it was meant for. A transient failure is tried again
(``retry``) within the item's one budget, ``--fetch-timeout-s``; each request holds one of its
host's slots (``host_limits``). The server's event loop fetches with it, or each decode worker process
does (``decode_worker``): the same class and settings either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import aiohttp
from yarl import URL

from ..utils.config import FETCH_RETRY_STATUSES, FetchHeader, fetch_headers
from ..utils.errors import ErrorKind, ItemError
from .fetch_events import FetchEvents
from .host_limits import HostGate
from .netguard import ForbiddenAddressError, GuardedResolver, describe_address, literal_ip, valid_name
from .retry import EqualJitterRetry, parse_retry_after

if TYPE_CHECKING:
    from ..utils.config import ServerConfig

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
_CHUNK = 64 * 1024
T = TypeVar("T")
log = logging.getLogger(__name__)


class FetchError(ItemError):
    """A download failed (as opposed to the image it brought): counted by reason in the metrics.

    ``outcome`` names the failure for the attempt metrics; ``retry``: whether another attempt
    may succeed; ``retry_after``: the seconds the host asked us to wait first, if it did."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        outcome: str = "error",
        retry: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(kind, message)
        self.outcome = outcome
        self.retry = retry
        self.retry_after = retry_after


@dataclass(frozen=True)
class FetchSettings:
    """The server's download settings, as ``ImageFetcher`` takes them; picklable, for the decode
    worker processes that fetch. No defaults: they are the config's (``of``), written once there."""

    timeout_s: float  # one image's whole budget, every attempt and wait included
    attempt_timeout_s: float  # one request's; 0: no limit but the whole budget
    max_bytes: int
    max_redirects: int
    allow_private_networks: bool
    concurrency: int
    retry: EqualJitterRetry
    host_connections: int
    headers: tuple[FetchHeader, ...]

    @classmethod
    def of(cls, config: ServerConfig) -> FetchSettings:
        return cls(
            timeout_s=config.fetch_timeout_s,
            attempt_timeout_s=config.fetch_attempt_timeout_s,
            max_bytes=config.max_image_bytes,
            max_redirects=config.max_redirects,
            allow_private_networks=config.allow_private_networks,
            concurrency=config.fetch_concurrency,
            retry=EqualJitterRetry(config.fetch_attempts, config.fetch_backoff_s),
            host_connections=config.fetch_host_connections,
            headers=fetch_headers(config.fetch_header),
        )

    def share(self, processes: int) -> FetchSettings:
        """One of ``processes`` fetchers' settings: an equal share of each host's connections,
        so that together they keep within the cap (at least one each)."""
        return dataclasses.replace(self, host_connections=max(1, self.host_connections // processes))



class ImageFetcher:
    def __init__(
        self, settings: FetchSettings, *, events: FetchEvents, resolver: GuardedResolver | None = None
    ) -> None:
        """``events``: where each attempt and retry is reported (the metrics, or a worker's
        tally). ``resolver`` replaces the default guarded resolver (tests use it to decide which
        addresses count as forbidden)."""
        self._timeout_s = settings.timeout_s
        self._attempt_timeout_s = settings.attempt_timeout_s or settings.timeout_s
        self._max_bytes = settings.max_bytes
        self._max_redirects = settings.max_redirects
        self._allow_private = settings.allow_private_networks
        self._concurrency = settings.concurrency
        self._retry = settings.retry
        self._hosts = HostGate(settings.host_connections)
        self._headers = settings.headers
        self._events = events
        self._guard = resolver or GuardedResolver()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency,
            resolver=None if self._allow_private else self._guard,
            socket_factory=None if self._allow_private else self._guard.socket_factory,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers={"User-Agent": "clipserve (+image fetcher)"},
            trust_env=False,  # proxies from the environment would bypass the address guard
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``; raises FetchError saying what went wrong (and after how many
        attempts, when there were several)."""
        assert self._session is not None, "start() first"
        failed: list[FetchError] = []
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:  # a backstop: the attempts keep within the deadline themselves, bar waiting for a host's slot
            return await _within(self._timeout_s, self._attempts(url, deadline, failed))
        except asyncio.TimeoutError:
            raise self._timed_out(url, len(failed) + 1) from None

    async def _attempts(self, url: str, deadline: float, failed: list[FetchError]) -> bytes:
        loop = asyncio.get_running_loop()
        host = _host_of(url)
        while True:
            try:
                data = await self._follow(url, deadline)
            except FetchError as exc:
                failed.append(exc)
                self._events.fetch_attempt(host, exc.outcome)
                tries = len(failed)
                if not exc.retry or tries >= self._retry.attempts:
                    raise _after(exc, tries) from None
                wait = exc.retry_after if exc.retry_after is not None else self._retry.backoff(tries)
                if loop.time() + wait >= deadline:
                    why = f"a Retry-After of {wait:g}s" if exc.retry_after is not None else "another attempt"
                    raise _after(
                        exc, tries, f"; {why} would not fit in the {self._timeout_s:g}s fetch budget"
                    ) from None
                self._events.fetch_retry(host, wait, exc.retry_after is not None)
                await asyncio.sleep(wait)
            else:
                self._events.fetch_attempt(host, "ok")
                return data

    async def _follow(self, url: str, deadline: float) -> bytes:
        """One attempt: the request, and those its redirects lead to."""
        assert self._session is not None
        loop = asyncio.get_running_loop()
        current = url
        for _ in range(self._max_redirects + 1):
            hop_host = self._check_url(current, original=url)
            async with self._hosts.slot(hop_host):
                left = deadline - loop.time()
                try:
                    answer = await _within(min(self._attempt_timeout_s, left), self._request(url, current, hop_host))
                except asyncio.TimeoutError:
                    if left <= self._attempt_timeout_s:  # the budget ran out, not just this request's time
                        raise self._timed_out(url, 0) from None
                    raise FetchError(
                        ErrorKind.TIMEOUT,
                        f"{url}: no answer within {self._attempt_timeout_s:g}s",
                        outcome="timeout",
                        retry=True,
                    ) from None
            if isinstance(answer, bytes):
                return answer
            try:
                current = str(URL(current).join(URL(answer)))
            except (ValueError, UnicodeError):  # the host's fault, not the caller's
                raise FetchError(
                    ErrorKind.FETCH_FAILED, f"{url}: redirected to an invalid URL {answer[:200]!r}", outcome="redirects"
                ) from None
        raise FetchError(
            ErrorKind.FETCH_FAILED, f"{url}: more than {self._max_redirects} redirects", outcome="redirects"
        )

    async def _request(self, url: str, current: str, hop_host: str) -> bytes | str:
        """The body at ``current`` (one hop of ``url``), or where it redirects to."""
        assert self._session is not None
        try:
            async with self._session.get(
                current, allow_redirects=False, headers=self._headers_for(url, current)
            ) as response:
                status = response.status
                if status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(
                            ErrorKind.FETCH_FAILED,
                            f"{url}: HTTP {status} redirect without a Location",
                            outcome="redirects",
                        )
                    return location
                if status >= 400:
                    if status == 429:
                        self._hosts.slow_down(hop_host)
                    reason = f"{url}: HTTP {status} {response.reason or ''}".rstrip()
                    kind = ErrorKind.NOT_FOUND if status in (404, 410) else ErrorKind.FETCH_FAILED
                    retry = status in FETCH_RETRY_STATUSES
                    after = parse_retry_after(response.headers.get("Retry-After")) if retry else None
                    raise FetchError(kind, reason, outcome=f"http_{status}", retry=retry, retry_after=after)
                self._hosts.succeeded(hop_host)
                return await self._read_capped(url, response)
        except FetchError:
            raise
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ForbiddenAddressError):
                raise self._refused(url, exc.os_error) from None
            outcome = "dns_error" if isinstance(exc, aiohttp.ClientConnectorDNSError) else "connect_error"
            raise FetchError(
                ErrorKind.FETCH_FAILED, f"{url}: cannot connect: {exc.os_error or exc}", outcome=outcome, retry=True
            ) from None
        except ForbiddenAddressError as exc:
            raise self._refused(url, exc) from None
        except aiohttp.InvalidURL as exc:
            raise FetchError(ErrorKind.INVALID_INPUT, f"{url}: not a valid URL ({exc})", outcome="invalid") from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise  # _follow tells the budget from this request's time
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as exc:
            # The connection dropped (reset, closed early, a body cut short): worth another try.
            raise FetchError(
                ErrorKind.FETCH_FAILED, f"{url}: {type(exc).__name__}: {exc}", outcome="reset", retry=True
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise FetchError(ErrorKind.FETCH_FAILED, f"{url}: {type(exc).__name__}: {exc}") from None

    def _headers_for(self, original: str, current: str) -> dict[str, str] | None:
        """The ``--fetch-header`` headers for this hop: only on the URL's own origin, whose host
        the pattern names; a redirect elsewhere goes without them."""
        if not self._headers:
            return None
        first, now = URL(original), URL(current)  # both checked by _check_url already
        if (first.scheme, first.raw_host, first.port) != (now.scheme, now.raw_host, now.port):
            return None
        return {header.name: header.value for header in self._headers if header.matches(now.raw_host or "")} or None

    def _check_url(self, current: str, *, original: str) -> str:
        """Refuses what must not be fetched, judging the host as the client will connect to
        it; returns that host."""
        where = original if current == original else f"{original} (redirected to {current})"
        malformed = (
            ErrorKind.INVALID_INPUT if current == original else ErrorKind.FETCH_FAILED
        )  # a bad Location is the host's doing
        try:
            parts = URL(current)  # as aiohttp parses it: IDNA/NFKC applied to the host
            host, _ = parts.raw_host, parts.port
        except (ValueError, UnicodeError) as exc:  # bad brackets, a 300-character label, a bad port...
            raise FetchError(malformed, f"{where}: not a valid URL ({exc})", outcome="invalid") from None
        if parts.scheme not in ("http", "https"):
            raise FetchError(
                ErrorKind.INVALID_INPUT,
                f"{where}: only http and https URLs are fetched, not {parts.scheme or 'a scheme-less URL'}"
                + ("; send local files as image_bytes" if parts.scheme in ("file", "") else ""),
                outcome="invalid",
            )
        if not host:
            raise FetchError(malformed, f"{where}: the URL has no host", outcome="invalid")
        ip = literal_ip(host)
        if ip is None and not valid_name(host):
            raise FetchError(malformed, f"{where}: {host[:80]!r} is not a valid host name", outcome="invalid")
        # Literal IPs never reach the resolver, so they are checked here (and again, with every
        # other address, when the connection is opened).
        if ip is not None and not self._allow_private and self._guard.is_forbidden(ip):
            raise _forbidden(where, f"{describe_address(ip, host)} is not a public address")
        return host

    def _refused(self, url: str, exc: ForbiddenAddressError) -> FetchError:
        log.info("refused to fetch from a non-public address", extra={"url": url[:200], "address": exc.address})
        return _forbidden(url, str(exc))

    def _timed_out(self, url: str, attempts: int) -> FetchError:
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        return FetchError(
            ErrorKind.TIMEOUT, f"fetching {url} took longer than {self._timeout_s:g}s{tried}", outcome="timeout"
        )

    async def _read_capped(self, url: str, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self._max_bytes:
            raise FetchError(
                ErrorKind.INVALID_INPUT,
                f"{url}: the image is {declared} bytes, over the {self._max_bytes}-byte limit",
                outcome="too_large",
            )
        if declared is not None:
            # aiohttp reads no more than the declared length: one read, not a loop of chunks
            # (~0.3 ms less of the event loop per 435 KB photo).
            return await response.read()
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > self._max_bytes:
                raise FetchError(
                    ErrorKind.INVALID_INPUT,
                    f"{url}: the image is over the {self._max_bytes}-byte limit",
                    outcome="too_large",
                )
        return bytes(body)


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    if _timeout is None:  # Python 3.10
        return await asyncio.wait_for(awaitable, seconds)
    async with _timeout(seconds):  # unlike wait_for, no task per fetch
        return await awaitable


def _after(last: FetchError, attempts: int, note: str = "") -> FetchError:
    """The item's error: the last attempt's reason, and how many attempts were made."""
    if attempts < 2 and not note:
        return last
    return FetchError(
        last.kind, f"{last.message} after {attempts} attempt{'s' if attempts > 1 else ''}{note}", outcome=last.outcome
    )


def _host_of(url: str) -> str:
    """The URL's host as the client connects to it ('' when there is none or it is malformed)."""
    try:
        return URL(url).raw_host or ""
    except (ValueError, UnicodeError):
        return ""


def _forbidden(where: str, why: str) -> FetchError:
    return FetchError(
        ErrorKind.FORBIDDEN,
        f"{where}: {why} (start the server with --allow-private-networks to permit this)",
        outcome="forbidden",
    )
