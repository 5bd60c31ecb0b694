"""A server that is down, or an address with a typo: every entry point waits a bounded,
configurable time, says once what it is waiting for, then fails with UNAVAILABLE naming the
address and the connection error."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import grpc
import pytest

import clipserve

from ..conftest import free_port

SHORT = clipserve.RetryPolicy(max_wait=2.0)


def nothing_listens() -> str:
    return f"localhost:{free_port()}"


def assert_names_the_server(error: clipserve.ClipServeError, address: str) -> None:
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert address in error.details and "Connection refused" in error.details, error.details


def test_the_default_wait_is_30_seconds():
    """README: a server that cannot be reached is waited for at most `max_wait` (30 s)."""
    assert clipserve.RetryPolicy().max_wait == 30.0


def test_score_batch_raises_after_the_retry_policy_and_logs_once(caplog):
    address = nothing_listens()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="clipserve"), clipserve.CLIP(address, retry=SHORT) as clip:
        with pytest.raises(clipserve.ClipServeError) as info:
            clip.score_batch([("a dog", "https://example.com/dog.jpg")] * 3)
    assert time.monotonic() - started < 20
    assert_names_the_server(info.value, address)
    assert [r.error_code for r in info.value.results] == ["UNAVAILABLE"] * 3
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waiting) == 1 and "Connection refused" in waiting[0], waiting


def test_score_and_the_async_client_fail_the_same_way():
    address = nothing_listens()
    with clipserve.CLIP(address, retry=SHORT) as clip, pytest.raises(clipserve.ClipServeError) as info:
        clip.score("a dog", "https://example.com/dog.jpg")
    assert_names_the_server(info.value, address)

    async def main() -> clipserve.ClipServeError:
        async with clipserve.AsyncCLIP(address, retry=SHORT) as clip:
            with pytest.raises(clipserve.ClipServeError) as error:
                await clip.score_batch([("a dog", "https://example.com/dog.jpg")])
            return error.value

    assert_names_the_server(asyncio.run(main()), address)


# A call that ignored its timeout would wait out the 30 s retry window: these bounds sit far
# enough from both the 3 s budget and 30 s that a loaded machine does not blur them.
IGNORED_TIMEOUT_S = 15.0


def test_timeout_is_the_total_budget_of_a_call_retries_included():
    """README: `timeout` is the total budget of a call, retries included (with the default
    30 s retry window, a 3 s timeout still ends the call after about 3 s)."""
    address = nothing_listens()
    started = time.monotonic()
    with clipserve.CLIP(address, timeout=3) as clip, pytest.raises(clipserve.ClipServeError):
        clip.score("a dog", "https://example.com/dog.jpg")
    assert time.monotonic() - started < IGNORED_TIMEOUT_S

    started = time.monotonic()
    with clipserve.CLIP(address, timeout=3) as clip:
        results = clip.score_batch([("a dog", "https://example.com/dog.jpg")] * 3)
    assert time.monotonic() - started < IGNORED_TIMEOUT_S
    # The budget ran out before the retry window did: each pair says so.
    assert [r.error_code for r in results] == ["DEADLINE_EXCEEDED"] * 3, results


@pytest.mark.parametrize("command", [["score", "a dog", "https://example.com/dog.jpg"], ["health"], ["info"]])
def test_the_cli_prints_one_clear_line_within_its_timeout(command):
    """The client commands' `--timeout` bounds the whole command, retries included."""
    address = nothing_listens()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", *command, "--address", address, "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Plus the interpreter's start, which a busy machine slows: still far below 30 s.
    assert time.monotonic() - started < IGNORED_TIMEOUT_S + 5, done.stderr
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "waiting" not in line]
    assert len(errors) == 1 and address.split(":")[1] in errors[0] and "Connection refused" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
