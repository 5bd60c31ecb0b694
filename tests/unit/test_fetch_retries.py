"""The fetcher against hosts that fail the way busy ones do: what it retries, how long it waits,
how many requests it sends one host at a time (in process, over real loopback HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from clipserve_server.images.fetch import FetchError, FetchSettings, ImageFetcher
from clipserve_server.images.fetch_events import FetchTally
from clipserve_server.images.host_limits import HostGate
from clipserve_server.images.retry import EqualJitterRetry, parse_retry_after
from clipserve_server.utils.config import FETCH_BACKOFF_CAP_S, FETCH_RETRY_STATUSES, ServerConfig
from clipserve_server.utils.errors import ErrorKind

from ..flaky_host import MODES, FlakyHost
from ..helpers import make_image

IMAGE = make_image(24, 20, seed=7)


@pytest.fixture()
def host() -> Iterator[FlakyHost]:
    flaky = FlakyHost()
    yield flaky
    flaky.close()


def fetch_all(urls: list[str], **config) -> list[bytes | FetchError]:
    """Fetch ``urls`` at once with a fresh fetcher, built as the server builds its own from a
    ``ServerConfig`` (its defaults, bar a quick backoff and these ``config`` fields); each result
    is the body or the error."""
    settings = FetchSettings.of(
        ServerConfig(
            **{
                "allow_private_networks": True,
                "fetch_timeout_s": 10.0,
                "max_image_bytes": 1 << 20,
                "fetch_backoff_s": 0.05,
                **config,
            }
        )
    )

    async def main() -> list:
        fetcher = ImageFetcher(settings, events=FetchTally())
        await fetcher.start()
        try:
            return await asyncio.gather(*(fetcher.fetch(url) for url in urls), return_exceptions=True)
        finally:
            await fetcher.close()

    return asyncio.run(main())


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    now = datetime(2026, 12, 3, 19, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("Thu, 03 Dec 2026 19:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 03 Dec 2026 18:00:00 GMT", now=now) == 0.0  # already past: no wait
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_doubles_per_retry_with_jitter_and_a_cap():
    policy, rng = EqualJitterRetry(attempts=10, backoff_s=0.5), random.Random(1)
    for retry, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (7, FETCH_BACKOFF_CAP_S)):
        waits = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 4  # jittered: failures together do not come back together


@pytest.mark.parametrize("mode", MODES)
def test_a_transient_failure_is_retried_and_the_image_served(host, mode):
    """503, 429 and a reset connection each cost one more request, not the image."""
    url = host.add(f"{mode}.png", IMAGE, mode)
    assert fetch_all([url]) == [IMAGE]
    assert len(host.times(url)) == 2


def test_a_retry_after_is_honoured_by_the_hosts_clock(host):
    """The host answers 429 with Retry-After: 1; its own clock sees the retry a second later or more."""
    url = host.add("busy.png", IMAGE, "429")
    assert fetch_all([url]) == [IMAGE]
    first, second = host.times(url)
    assert second - first >= 1.0


@pytest.mark.parametrize(
    "path, settings, kind",
    [
        ("status/404", {}, ErrorKind.NOT_FOUND),
        ("status/403", {}, ErrorKind.FETCH_FAILED),
        ("ok/big.png", {"max_image_bytes": 100}, ErrorKind.INVALID_INPUT),
    ],
    ids=["404", "403", "over the size cap"],
)
def test_what_another_attempt_would_not_change_is_fetched_once(host, path, settings, kind):
    host.add("big.png", IMAGE)
    url = host.url(path)
    [error] = fetch_all([url], **settings)
    assert isinstance(error, FetchError) and error.kind is kind and "attempt" not in error.message
    assert len(host.times(url)) == 1


def test_a_refused_address_is_never_requested(host):
    """The SSRF guard's refusal is final: no attempt reaches the host, none is retried."""
    url = host.add("private.png", IMAGE)
    [error] = fetch_all([url], allow_private_networks=False)
    assert isinstance(error, FetchError) and error.kind is ErrorKind.FORBIDDEN and "attempt" not in error.message
    assert host.times(url) == []


def test_the_error_after_the_last_attempt_names_the_attempts_and_the_reason(host):
    url = host.add("down.png", IMAGE, "always503")
    [error] = fetch_all([url], fetch_attempts=3)
    assert isinstance(error, FetchError) and error.kind is ErrorKind.FETCH_FAILED
    assert error.message == f"{url}: HTTP 503 Service Unavailable after 3 attempts"
    assert len(host.times(url)) == 3


def test_a_retry_after_past_the_budget_fails_at_once_instead_of_waiting(host):
    """Retry-After: 1 against a 0.5 s budget: one request, and the error says why no second."""
    url = host.add("later.png", IMAGE, "429")
    [error] = fetch_all([url], fetch_timeout_s=0.5)
    assert isinstance(error, FetchError) and error.kind is ErrorKind.FETCH_FAILED
    assert "HTTP 429" in error.message and "Retry-After of 1s would not fit in the 0.5s fetch budget" in error.message
    assert len(host.times(url)) == 1


def test_one_hosts_simultaneous_requests_never_exceed_its_cap(host):
    host.hold_s = 0.05  # each answer takes a while, so that requests pile up
    urls = [host.add(f"many{i}.png", IMAGE) for i in range(24)]
    assert fetch_all(urls, fetch_host_connections=3) == [IMAGE] * 24
    assert host.most_active <= 3


def test_a_429_slows_down_that_host_only():
    """The host that answered 429 gets half its slots, the others keep all of theirs; each
    success gives one back."""

    async def main() -> None:
        gate = HostGate(4)
        gate.slow_down("busy.example")
        assert (gate.limit("busy.example"), gate.limit("calm.example")) == (2, 4)
        held = [gate.slot("busy.example") for _ in range(3)]
        await held[0].__aenter__()
        await held[1].__aenter__()
        third = asyncio.ensure_future(held[2].__aenter__())
        calm = [gate.slot("calm.example") for _ in range(4)]
        for slot in calm:  # the calm host's four go in at once
            await asyncio.wait_for(slot.__aenter__(), 5)
        await asyncio.sleep(0)
        assert not third.done()  # the busy host's third waits for a slot
        gate.succeeded("busy.example")  # its allowance grows back: the third goes in
        await asyncio.wait_for(third, 5)
        assert gate.limit("busy.example") == 3
        for slot in [*held, *calm]:
            await slot.__aexit__(None, None, None)

    asyncio.run(main())


def test_the_fetch_defaults_are_the_configs_alone():
    """``FetchSettings`` has no defaults of its own: what a fetcher does by default is what
    ``ServerConfig`` (and so ``--help``) says."""
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(FetchSettings))
    settings = FetchSettings.of(ServerConfig())
    config = ServerConfig()
    assert (settings.retry.attempts, settings.retry.backoff_s) == (config.fetch_attempts, config.fetch_backoff_s)
    assert (settings.attempt_timeout_s, settings.host_connections) == (
        config.fetch_attempt_timeout_s,
        config.fetch_host_connections,
    )


def test_the_help_names_the_retried_statuses_and_the_backoff_cap():
    help_text = {field.name: field.metadata["help"] for field in dataclasses.fields(ServerConfig)}
    assert all(str(status) in help_text["fetch_attempts"] for status in FETCH_RETRY_STATUSES)
    assert f"at most {FETCH_BACKOFF_CAP_S:g} s" in help_text["fetch_backoff_s"]
