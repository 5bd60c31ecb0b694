"""``clipserve serve``: parse configuration, set up logging, run the server."""

from __future__ import annotations

import asyncio
import logging
import sys

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except (ValueError, OSError) as exc:
        print(f"clipserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .app import run

    return asyncio.run(run(config))
