"""``clipserve serve``: parse configuration, set up logging, run the server."""

from __future__ import annotations

import asyncio
import signal
import sys

from .config_loaders import load_config
from .utils.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except (ValueError, OSError) as exc:
        print(f"clipserve serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    from .app import run

    code = asyncio.run(run(config))
    # Shut down already: a second SIGTERM (an orchestrator that repeats it) while the
    # interpreter exits must not turn a clean exit into death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
