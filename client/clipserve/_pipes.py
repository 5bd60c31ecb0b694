"""A closed pipe ends a command quietly, as it ends a Unix tool (``clipserve info | head -1``).

Python ignores SIGPIPE and raises ``BrokenPipeError`` instead, which would end the command in
a traceback; restoring SIGPIPE's default would also kill the server on a client's closed
socket, so the error is caught here instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# What a shell reports for a tool that SIGPIPE ended (128 + signal 13), e.g. `yes | head -1`.
CLOSED_PIPE_EXIT = 141


def quiet_on_closed_pipe(command: Callable[[], int]) -> int:
    """Run ``command``; when what it writes to meets a closed pipe, return CLOSED_PIPE_EXIT quietly."""
    try:
        try:
            return command()
        finally:
            # Also when argparse exits (--help): the last buffered output may be what meets
            # the closed pipe.
            sys.stdout.flush()
            sys.stderr.flush()
    except BrokenPipeError:
        # The interpreter flushes both again at exit and would print "Exception ignored ...
        # BrokenPipeError": whatever is still buffered goes to /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return CLOSED_PIPE_EXIT
