"""CLI manners: a closed pipe ends every ``clipserve`` command quietly, as it ends Unix tools."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clipserve._pipes import CLOSED_PIPE_EXIT

from ..helpers import make_image


def _run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """``clipserve ARGS`` with stdout a pipe whose reader is gone before the first write, as
    ``clipserve info | head -1`` is once head has its line (deterministic: no race with head)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "clipserve.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("command", ["info", "models", "health", "score"])
def test_a_closed_stdout_ends_the_command_quietly_with_the_status_of_sigpipe(fake_server, tmp_path, command):
    """No traceback, no "Exception ignored" at exit: nothing on stderr, and the exit status a
    shell reports for a tool that SIGPIPE ended (141)."""
    args = [command, "--address", fake_server.address]
    if command == "score":
        image = tmp_path / "x.png"
        image.write_bytes(make_image(seed=3))
        args[1:1] = ["a photo", str(image)]
    done = _run_into_closed_pipe(*args)
    assert done.stderr == ""
    assert done.returncode == CLOSED_PIPE_EXIT


def test_a_closed_pipe_leaves_real_errors_reported(tmp_path):
    """Only the closed pipe is quiet: an unreachable server still says so, with exit status 1."""
    done = _run_into_closed_pipe(
        "score", "a photo", str(tmp_path / "x.png"), "--address", "127.0.0.1:1", "--timeout", "5"
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_serve_with_a_closed_stdout_ends_quietly_too():
    """The server announces where it listens on stdout; with no reader there it stops, as a
    Unix daemon in a broken pipeline would: status 141, its log (stderr) without a traceback."""
    done = _run_into_closed_pipe("serve", "--model", "fake", "--host", "127.0.0.1", "--port", "0")
    assert done.returncode == CLOSED_PIPE_EXIT
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
