"""Which call the work under way is for, without passing it through every layer.

The servicer sets ``CALLER`` at the start of each call; tasks started for the call (its
stream's reader, the encodes it starts) copy the context, so the decode pool can share its
workers fairly between calls (images/fairness.py) knowing nothing of gRPC.
"""

from __future__ import annotations

import contextvars
import uuid

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("clipserve_caller", default="")


def begin_call() -> None:
    """The work from here on (and every task started from it) is a new call's, for the decode
    pool's fair shares: each protocol face calls this once per call."""
    CALLER.set(uuid.uuid4().hex)
